"""Continual strategies side by side on one stream (the same as the `modx-bench` command).

    python eval/bench_strategies.py --config configs/bench_stream.yaml \
        --strategies finetune modx modx:alpha=5 --seeds 0 1 --out runs/bench

Writes OUT/bench.json and OUT/report.html; see modx/train/bench.py and docs/training.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modx.train.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
