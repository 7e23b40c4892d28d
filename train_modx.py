"""Continual CLIP training over a stream of phases.

    accelerate launch train_modx.py                                  # the demo (configs/demo.yaml)
    accelerate launch train_modx.py --config configs/x.yaml train.lr=1e-3 strategy.name=finetune
    accelerate launch train_modx.py --config configs/x.yaml --resume # continue a killed run
    ... train.resume=auto                         # resume if a checkpoint exists (requeued jobs)

A bad config exits with status 2 and one line naming the key. See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML config (default: {DEMO_CONFIG.name}, the built-in demo)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of train.output_dir")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-3")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # log lines appear at once in files and pipes

    from modx.config import ConfigError, load_config, to_dict
    from modx.data.urls import DataError
    from modx.train.checkpoint import CheckpointError
    from modx.train.fsdp import ShardingError
    from modx.train.launch import LaunchError
    from modx.train.loop import TrainingStopped
    from modx.train.preempt import Preempted

    try:
        cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
        from modx.strategies import validate_strategy

        validate_strategy(cfg.strategy)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        from modx.train.launch import relaunch_on_cpu, requested_cpu_processes

        nprocs = requested_cpu_processes()  # `accelerate launch --cpu --num_processes N`
        if nprocs > 1:
            return relaunch_on_cpu(__file__, sys.argv[1:] if argv is None else argv, nprocs)
        from modx.train import run

        run(cfg, resume="latest" if args.resume else None)
    except (ConfigError, DataError, LaunchError, ShardingError) as err:
        print(f"train_modx.py: {err}", file=sys.stderr)
        return 2
    except Preempted:  # a state was saved and the line saying how to resume printed
        return 0
    except (CheckpointError, TrainingStopped) as err:  # an unsafe checkpoint, a full disk, NaNs
        print(f"train_modx.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
