"""`accelerate launch --cpu --num_processes N` starts N processes (modx.train.launch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modx.train.launch import requested_cpu_processes

CPU = {"ACCELERATE_USE_CPU": "True"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["python", "accelerate", "launch", "--cpu", "--num_processes", "2", "train_modx.py"], 2),
        (["python", "accelerate", "launch", "--num-processes=3", "--cpu", "train_modx.py", "x=1"], 3),
        (["python", "accelerate", "launch", "--cpu", "train_modx.py"], 1),
        (["python", "accelerate", "launch", "--cpu", "--num_processes", "1", "train_modx.py"], 1),
        # the script's own arguments are not the launcher's
        (["python", "accelerate", "launch", "--cpu", "train_modx.py", "--num_processes", "4"], 1),
        (["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes=2", "t.py"], 2),
        (["python", "other.py", "--num_processes", "2"], 1),
    ],
)
def test_reads_num_processes_from_the_launcher_command_line(argv, expected):
    assert requested_cpu_processes(CPU, argv) == expected


def test_only_under_the_cpu_launcher_and_before_a_distributed_start():
    argv = ["accelerate", "launch", "--cpu", "--num_processes", "2", "train_modx.py"]
    assert requested_cpu_processes({}, argv) == 1
    assert requested_cpu_processes({"ACCELERATE_USE_CPU": "False"}, argv) == 1
    assert requested_cpu_processes({**CPU, "WORLD_SIZE": "2"}, argv) == 1
    assert requested_cpu_processes({**CPU, "LOCAL_RANK": "0"}, argv) == 1


@pytest.mark.slow
def test_accelerate_launch_cpu_runs_two_processes(tmp_path):
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _train_helpers import ROOT, tiny_overrides

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           str(ROOT / "train_modx.py"), *tiny_overrides(tmp_path / "run", tmp_path / "data")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 2 CPU processes" in done.stderr
    assert (tmp_path / "run" / "summary.json").exists()
