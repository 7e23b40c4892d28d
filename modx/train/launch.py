"""`accelerate launch --cpu --num_processes N` as users expect it: N CPU processes.

Accelerate's simple launcher starts ONE process for `--cpu` whatever `--num_processes`
says (it starts multi-CPU jobs only through mpirun with a host file), and it does not
pass N on to the script. `train_modx.py` reads N from its launcher's command line and,
when N > 1, starts the N processes itself with torch's elastic launcher (gloo on CPU).

`check_distributed` stops a process that the launcher started as one of several while
Accelerate runs it alone (they would be independent runs writing one output directory).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

_NUM_PROCESSES_FLAGS = ("--num_processes", "--num-processes")


def _num_processes_arg(launcher_argv: Sequence[str]) -> int | None:
    """N from an `accelerate launch ... --num_processes N script.py ...` command line."""
    # `accelerate launch ...`, `python -m accelerate.commands.launch ...`, `accelerate-launch ...`
    starts = [i for i, a in enumerate(launcher_argv)
              if a == "launch" or a.endswith(("accelerate.commands.launch", "accelerate-launch"))]
    if not starts:
        return None
    args = list(launcher_argv[starts[0] + 1 :])
    for i, arg in enumerate(args):
        if arg.endswith(".py"):  # the training script: its own arguments follow
            break
        for flag in _NUM_PROCESSES_FLAGS:
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            return int(value) if value.isdigit() else None
    return None


def requested_cpu_processes(
    environ: Mapping[str, str] = os.environ, launcher_argv: Sequence[str] | None = None
) -> int:
    """How many processes `accelerate launch --cpu --num_processes N` asked for (1 otherwise).

    Only under Accelerate's simple CPU launcher (ACCELERATE_USE_CPU=true) and outside an
    already distributed start (no WORLD_SIZE / LOCAL_RANK).
    """
    if environ.get("ACCELERATE_USE_CPU", "").lower() != "true":
        return 1
    if "WORLD_SIZE" in environ or "LOCAL_RANK" in environ:
        return 1
    if launcher_argv is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return 1
        launcher_argv = [a for a in raw.decode(errors="replace").split("\0") if a]
    n = _num_processes_arg(launcher_argv)
    return n if n and n > 1 else 1


def relaunch_on_cpu(script: str, argv: Sequence[str], nprocs: int) -> int:
    """Run `script argv` as `nprocs` CPU processes (torch.distributed.run); its exit status."""
    print(f"train_modx.py: starting {nprocs} CPU processes (torch.distributed.run)", file=sys.stderr)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nprocs}", script, *argv]
    return subprocess.call(cmd)


class LaunchError(RuntimeError):
    """The processes were started in a way modx cannot train with; the message says how to launch."""


def check_distributed(num_processes: int, environ: Mapping[str, str] = os.environ) -> None:
    """Stop (LaunchError) when the launcher started several processes (WORLD_SIZE > 1) but
    Accelerate runs this one alone: each would train the whole run by itself and write the
    same output directory. Call it before anything is written."""
    world = environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1 and num_processes == 1:
        raise LaunchError(
            f"the launcher started {world} processes (WORLD_SIZE={world}) but Accelerate runs this one alone "
            "(not distributed): they would be independent runs writing the same output directory; launch with "
            "`accelerate launch --num_processes N [--use_fsdp --fsdp_version 2] train_modx.py ...`"
        )
