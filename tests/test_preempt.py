"""Preemption, requeue and elastic restarts (docs/training.md, "Preemption and requeue").

A signal of train.preempt_signals stops every process at the same step with a state saved
and exit status 0; `train.resume: auto` continues from it (or starts a fresh run). The
signals come from the testing hook (MODX_KILL_AT with MODX_KILL_SIGNAL, modx/train/faults.py:
the process signals itself at a known step) or from outside (a whole process group).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from modx.config import ConfigError, load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_helpers import ROOT, fake_stream_overrides, install_fake_stream, tiny_overrides  # noqa: E402
from test_train_faults import assert_same_weights, weights  # noqa: E402

TIMEOUT = 300  # a process that waits for another in a collective fails the test instead of hanging it


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each run() builds its own Accelerator; the fault hook counts from zero."""
    from accelerate.state import AcceleratorState, GradientState

    import modx.train.faults as faults

    monkeypatch.setattr(faults, "_reached", faults.Counter())
    for key in ("MODX_KILL_AT", "MODX_KILL_SIGNAL", "MODX_KILL_RANK"):
        monkeypatch.delenv(key, raising=False)
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def trainer_state(run_dir: Path) -> dict:
    ckpt = run_dir / "checkpoints"
    return json.loads((ckpt / (ckpt / "latest").read_text().strip() / "trainer_state.json").read_text())


# A state after every step: a preemption state is then at a step where the uninterrupted
# run saved one too, so both stream the same batches after it (modx.train.data).
THREE_STEPS = ("stream.phases=[{name: a, train: X, eval: X, steps: 3}, {name: b, train: X, eval: X, steps: 3}]",
               "train.ckpt_every=1", "train.keep_checkpoints=10")


def fake_args(out: Path, *extra: str) -> list[str]:
    args = fake_stream_overrides(out, *extra)
    return [a.replace("X", str(out / "fake.tar")) if a.startswith("stream.phases=[{name: a, train: X") else a
            for a in args]


def run_in_process(out: Path, monkeypatch, *extra: str) -> list[float]:
    from modx.train import run

    losses: list[float] = []
    install_fake_stream(losses, monkeypatch.setattr)
    run(load_config(None, fake_args(out, *THREE_STEPS, *extra)))
    return losses


@pytest.fixture
def whole(tmp_path, monkeypatch) -> tuple[Path, list[float]]:
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path / "whole"
    losses = run_in_process(out, monkeypatch)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out, list(losses)  # (a later run in the test would append to `losses` too)


@pytest.mark.parametrize(("nth", "stopped_at"), [(2, (0, 2, 2)), (3, (1, 0, 3))], ids=["mid-phase", "phase-end"])
def test_a_signal_stops_at_the_step_with_a_state_and_auto_resumes_exactly(tmp_path, monkeypatch, whole, nth,
                                                                         stopped_at):
    """SIGTERM after step `nth`: the run stops there (after the phase end when it was the
    phase's last step) with a state, says how to resume and restores the signal handlers;
    train.resume=auto continues to the uninterrupted run's losses and weights."""
    from modx.train.preempt import Preempted

    out = tmp_path / "preempted"
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv("MODX_KILL_AT", f"step:{nth}")
    monkeypatch.setenv("MODX_KILL_SIGNAL", "SIGTERM")
    with pytest.raises(Preempted, match=r"resume with train\.resume=auto") as stop:
        run_in_process(out, monkeypatch)
    assert signal.getsignal(signal.SIGTERM) is handler
    phase, phase_step, global_step = stopped_at
    assert f"step {phase_step} of phase {phase}" in str(stop.value)
    state = trainer_state(out)
    assert (state["phase"], state["phase_step"], state["global_step"]) == stopped_at
    assert f"state-{global_step:08d}" in str(stop.value)
    assert (out / "checkpoints" / "phase-0").exists() == (phase == 1)

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    monkeypatch.delenv("MODX_KILL_AT")
    losses = run_in_process(out, monkeypatch, "train.resume=auto")
    whole_dir, whole_losses = whole
    assert losses == whole_losses[global_step:]
    assert_same_weights(weights(whole_dir / "checkpoints" / "phase-1"), weights(out / "checkpoints" / "phase-1"))


# ---- off the checkpoint schedule: the resumed run fast-forwards inside the segment ---------

# Phases of 5 steps, a state every 3 steps: a signal after global step 2, 4, 7 or 8 stops the
# run inside a stream segment (modx.train.data). A replay buffer of 16 samples is full in
# phase a, so phase b's samples evict phase a's from it while a segment goes on: the
# segment's snapshot is no longer what the buffer holds when the state is saved.
SPARSE = ("stream.phases=[{name: a, train: X, eval: X, steps: 5}, {name: b, train: X, eval: X, steps: 5}]",
          "train.ckpt_every=3", "train.keep_checkpoints=10", "strategy.replay.size=16")
SPARSE_STRATEGIES = {
    "modx": (),  # Mod-X with its replay buffer (source buffer, the default)
    "modx+stream": ("strategy.replay.source=stream",),
    "zscl": ("strategy.name=zscl", "strategy.zscl_we_every=2"),  # its reference stream too
    "ewc": ("strategy.name=ewc", "strategy.ewc_batches=2"),  # the Fisher reads the stream at the phase end
}


def run_sparse(out: Path, setattr, strategy: str, *extra: str) -> list[float]:
    from modx.train import run

    losses: list[float] = []
    install_fake_stream(losses, setattr)
    run(load_config(None, fake_args(out, *SPARSE, *SPARSE_STRATEGIES[strategy], *extra)))
    return losses


@pytest.fixture(scope="module")
def whole_sparse(tmp_path_factory):
    """The uninterrupted run of each strategy on the SPARSE stream (trained once per module)."""
    from accelerate.state import AcceleratorState, GradientState

    runs: dict[str, tuple[Path, list[float]]] = {}

    def get(strategy: str) -> tuple[Path, list[float]]:
        if strategy not in runs:
            out = tmp_path_factory.mktemp(f"whole-{strategy}") / "run"
            with pytest.MonkeyPatch.context() as mp:
                runs[strategy] = out, run_sparse(out, mp.setattr, strategy)
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
        return runs[strategy]

    return get


@pytest.mark.parametrize(("strategy", "nth", "start"), [
    ("modx", 2, 0), ("modx", 8, 6), ("modx+stream", 8, 6), ("zscl", 4, 3), ("zscl", 8, 6), ("ewc", 4, 3),
])
def test_a_signal_off_the_checkpoint_schedule_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch,
                                                                              whole_sparse, strategy, nth, start):
    """SIGTERM after global step `nth`, not a multiple of train.ckpt_every (3): the state
    records the stream segment that started at global step `start` and the batches read in
    it; train.resume=auto rebuilds that segment, reads past them, and goes on with the
    uninterrupted run's losses (every micro-step) to its weights, bit for bit."""
    from accelerate.state import AcceleratorState, GradientState

    from modx.train.preempt import Preempted

    whole_dir, whole_losses = whole_sparse(strategy)  # first: the runs below patch the loop too
    out = tmp_path / "preempted"
    monkeypatch.setenv("MODX_KILL_AT", f"step:{nth}")
    monkeypatch.setenv("MODX_KILL_SIGNAL", "SIGTERM")
    with pytest.raises(Preempted):
        run_sparse(out, monkeypatch.setattr, strategy)
    state = trainer_state(out)
    assert state["global_step"] == nth
    assert state["segment"]["global_step"] == start and state["segment"]["batches"] == nth - start
    if strategy == "modx" and nth > 5:  # phase b: samples of the snapshot left the buffer meanwhile
        snapshot = out / "checkpoints" / f"state-{nth:08d}" / "replay-segment.tar"
        assert tarfile.open(snapshot).getnames(), "no sample left the buffer: the snapshot is not tested"

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    monkeypatch.delenv("MODX_KILL_AT")
    losses = run_sparse(out, monkeypatch.setattr, strategy, "train.resume=auto")
    assert losses == whole_losses[nth:]
    assert_same_weights(weights(whole_dir / "checkpoints" / "phase-1"), weights(out / "checkpoints" / "phase-1"))


def test_a_signal_on_the_checkpoint_schedule_saves_a_plain_periodic_state(tmp_path, monkeypatch, whole_sparse):
    """At a ckpt_every multiple the uninterrupted run starts a new segment anyway: the
    preemption state is the periodic one (no position in a segment) and resumes exactly."""
    from accelerate.state import AcceleratorState, GradientState

    from modx.train.preempt import Preempted

    whole_dir, whole_losses = whole_sparse("modx")
    out = tmp_path / "preempted"
    monkeypatch.setenv("MODX_KILL_AT", "step:6")
    monkeypatch.setenv("MODX_KILL_SIGNAL", "SIGTERM")
    with pytest.raises(Preempted):
        run_sparse(out, monkeypatch.setattr, "modx")
    assert "segment" not in trainer_state(out)
    assert not (out / "checkpoints" / "state-00000006" / "replay-segment.json").exists()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    monkeypatch.delenv("MODX_KILL_AT")
    losses = run_sparse(out, monkeypatch.setattr, "modx", "train.resume=auto")
    assert losses == whole_losses[6:]
    assert_same_weights(weights(whole_dir / "checkpoints" / "phase-1"), weights(out / "checkpoints" / "phase-1"))


def test_skipped_steps_before_an_off_schedule_signal_count_as_in_the_uninterrupted_run(tmp_path, monkeypatch):
    """A state every 4 steps, log lines every 4 and at phase ends, train.max_bad_steps=1.
    Step 6 has a NaN loss (skipped), step 7 is good and the signal comes after it. The
    uninterrupted run finds the skipped step at its log line of step 8, drops that step's
    samples from the buffer and stops with a state. The state saved at step 7 keeps the
    longest run of skipped steps since the last log line and the unread skip flags, so the
    resumed run stops at step 8 too, with the same weights and buffer."""
    from accelerate.state import AcceleratorState, GradientState

    from modx.data.replay import read_entries
    from modx.train.loop import TrainingStopped
    from modx.train.preempt import Preempted

    def reset() -> None:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    monkeypatch.setenv("MODX_TEST_NAN_STEPS", "5")  # micro-steps from 0: global step 6
    config = ("train.ckpt_every=4", "train.log_every=4", "train.max_bad_steps=1")
    whole = tmp_path / "whole"
    with pytest.raises(TrainingStopped, match="state-00000008"):
        run_sparse(whole, monkeypatch.setattr, "modx", *config)
    reset()
    out = tmp_path / "preempted"
    monkeypatch.setenv("MODX_KILL_AT", "step:7")
    monkeypatch.setenv("MODX_KILL_SIGNAL", "SIGTERM")
    with pytest.raises(Preempted):
        run_sparse(out, monkeypatch.setattr, "modx", *config)
    reset()
    state = trainer_state(out)
    assert state["bad_in_row"] == 0 and state["segment"]["bad_longest"] == 1
    assert state["segment"]["replay_pending"] == [[5, 1.0], [6, 0.0]]
    monkeypatch.delenv("MODX_KILL_AT")  # (the NaN step counts micro-steps of this run: it does not come again)
    with pytest.raises(TrainingStopped, match="state-00000008"):
        run_sparse(out, monkeypatch.setattr, "modx", *config, "train.resume=auto")
    state, whole_state = (d / "checkpoints" / "state-00000008" for d in (out, whole))
    assert_same_weights(weights(whole_state), weights(state))
    entries = [sorted((slot, e.id, e.step) for slot, e in read_entries(d / "replay.tar")) for d in (state, whole_state)]
    assert entries[0] == entries[1] and 5 not in {step for _, _, step in entries[0]}


def test_the_fast_forward_reads_past_batches_and_leaves_the_training_rngs_as_they_were():
    """TimedBatches.skip(n) reads n batches (over an epoch end too) without handing them
    out, and whatever the loader draws from the process's global RNGs while it does (a
    DataLoader draws its base seed from torch's) is undone: the training process's random
    streams stay where the state left them."""
    import random

    import numpy as np
    import torch

    from modx.train.data import TimedBatches

    class Loader:  # 3 batches an epoch; each draws from the global torch, random and numpy RNGs
        stats = None

        def __init__(self):
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            for i in range(3):
                torch.rand(1), random.random(), np.random.rand()
                yield {"index": torch.tensor(self.epoch * 3 + i)}

    batches = TimedBatches(Loader(), torch.device("cpu"))
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    before = torch.rand(2), random.random(), np.random.rand()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    batches.skip(4)
    after = torch.rand(2), random.random(), np.random.rand()
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
    assert next(batches)["index"].item() == 4


def test_resume_auto_starts_a_fresh_run_when_there_is_no_checkpoint(tmp_path, monkeypatch, capsys):
    run_in_process(tmp_path / "run", monkeypatch, "train.resume=auto")
    assert "nothing to resume" in capsys.readouterr().out
    assert trainer_state(tmp_path / "run")["global_step"] == 6


def test_preempt_signals_are_validated_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.preempt_signals.*'SIGFOO'"):
        load_config(None, fake_stream_overrides(tmp_path, "train.preempt_signals=[SIGTERM, SIGFOO]"))
    cfg = load_config(None, fake_stream_overrides(tmp_path, "train.preempt_signals=[SIGUSR2]"))
    assert cfg.train.preempt_signals == ["SIGUSR2"]
    assert load_config(None, fake_stream_overrides(tmp_path)).train.preempt_signals == ["SIGTERM", "SIGUSR1"]


# ---- several processes ----------------------------------------------------------------------


def torchrun(out: Path, args: list[str], env: dict[str, str] | None = None, restarts: int = 0,
             resume: bool = False) -> subprocess.CompletedProcess:
    """tests/_train_helpers.py (the fake stream) on 2 CPU processes (gloo) under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), str(ROOT / "tests" / "_train_helpers.py"), str(out), *args,
           *(["--resume"] if resume else [])]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    if restarts:  # a restarted group must not read the previous attempt's addresses (docs/training.md)
        full_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    for key in ("MODX_KILL_AT", "MODX_KILL_SIGNAL", "MODX_KILL_RANK", "MODX_TEST_NAN_STEPS"):
        if env is None or key not in env:
            full_env.pop(key, None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=full_env)


def two_process_args(out: Path, *extra: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fake.tar").touch()
    return [a.replace("X", str(out / "fake.tar")) for a in (*THREE_STEPS, "train.workers=0", *extra)]


@pytest.fixture(scope="module")
def whole_two(tmp_path_factory) -> Path:
    """The uninterrupted 2-process run (Mod-X with its replay buffer, a state after every step)."""
    out = tmp_path_factory.mktemp("whole-two") / "run"
    done = torchrun(out, two_process_args(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def digests(out: Path, tag: str = "") -> list[str]:
    return [(out / f"digest{tag}_{r}.txt").read_text() for r in range(2)]


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, whole_two):
    """SIGUSR1 reaches process 1 only, after step 4 (phase b, with the old model and the
    replay buffer): both processes stop after that step with one state and exit 0; the
    resumed run ends with the uninterrupted run's weights on both processes."""
    out = tmp_path / "run"
    done = torchrun(out, two_process_args(out),
                    env={"MODX_KILL_AT": "step:4", "MODX_KILL_RANK": "1", "MODX_KILL_SIGNAL": "SIGUSR1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "preempted at step 1 of phase 1 (b), global step 4" in done.stdout
    assert trainer_state(out)["global_step"] == 4
    assert not (out / "checkpoints" / "phase-1").exists()
    resumed = torchrun(out, two_process_args(out, "train.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(weights(whole_two / "checkpoints" / "phase-1"), weights(out / "checkpoints" / "phase-1"))
    assert digests(out) == digests(whole_two)


def test_a_killed_process_restarts_the_group_which_resumes_by_itself(tmp_path, whole_two):
    """torchrun --max-restarts 1: process 1 is killed (SIGKILL) after step 2; torchrun
    restarts both, they resume from the latest state (train.resume=auto; the fault hook,
    which would fire again at the restarted run's second step, does not after a restart)
    and end with the uninterrupted run's weights."""
    out = tmp_path / "run"
    done = torchrun(out, two_process_args(out, "train.resume=auto"), restarts=1,
                    env={"MODX_KILL_AT": "step:2", "MODX_KILL_RANK": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout and "at phase 0 step 1 (global step 1)" in done.stdout
    assert_same_weights(weights(whole_two / "checkpoints" / "phase-1"), weights(out / "checkpoints" / "phase-1"))
    assert digests(out) == digests(whole_two)


def sparse_two_args(out: Path, *extra: str) -> list[str]:
    """SPARSE on 2 processes: Mod-X with its replay buffer, a state every 3 steps."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "fake.tar").touch()
    return [a.replace("X", str(out / "fake.tar")) for a in (*SPARSE, "train.workers=0", *extra)]


def test_a_signal_to_one_of_two_processes_off_the_schedule_resumes_to_the_uninterrupted_run(tmp_path):
    """SIGUSR1 to process 1 only, after global step 8 (phase b; the segment started at the
    state of step 6): both processes save the position in the segment and the buffer's
    snapshot; the resumed run fast-forwards on both and ends with the uninterrupted run's
    losses and weights on both processes."""
    whole = tmp_path / "whole"
    done = torchrun(whole, sparse_two_args(whole))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    done = torchrun(out, sparse_two_args(out),
                    env={"MODX_KILL_AT": "step:8", "MODX_KILL_RANK": "1", "MODX_KILL_SIGNAL": "SIGUSR1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "preempted at step 3 of phase 1 (b), global step 8" in done.stdout
    assert trainer_state(out)["segment"]["global_step"] == 6
    resumed = torchrun(out, sparse_two_args(out, "train.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses, whole_losses = (json.loads((d / "losses.json").read_text()) for d in (out, whole))
    assert losses == whole_losses[8:]
    assert_same_weights(weights(whole / "checkpoints" / "phase-1"), weights(out / "checkpoints" / "phase-1"))
    assert digests(out) == digests(whole)


@pytest.mark.parametrize("kind", ["loss", pytest.param("grad", marks=pytest.mark.slow)])
def test_a_non_finite_step_on_one_process_is_skipped_on_every_process(tmp_path, kind):
    """The loss (or the gradients) of optimiser step 2 is NaN on process 1 only: every
    process skips that step (weights unchanged, counted once), none hangs, and both end with
    the same weights."""
    out = tmp_path / "run"
    done = torchrun(out, two_process_args(out), env={"MODX_TEST_NAN_STEPS": "1", "MODX_TEST_NAN_RANK": "1",
                                                    "MODX_TEST_NAN_KIND": kind})
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = out / "checkpoints"
    assert_same_weights(weights(ckpt / "state-00000001"), weights(ckpt / "state-00000002"))
    assert trainer_state(out)["skipped_steps"] == 1
    first, second = digests(out)
    assert first == second


@pytest.mark.slow
def test_sigusr1_to_accelerate_launch_reaches_both_processes_through_the_elastic_agent(tmp_path):
    """`accelerate launch` runs torch's elastic agent, which passes on only the signals of
    PET_SIGNALS_TO_HANDLE (docs/training.md's sbatch script adds SIGUSR1): SIGUSR1 to the
    launcher alone reaches both training processes, which save one state and exit 0 (the
    launcher itself then exits with the signal's status)."""
    from test_replay import _free_port

    out = tmp_path / "run"
    args = two_process_args(out)
    args[0] = args[0].replace("steps: 3}, {name: b", "steps: 200}, {name: b")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "_train_helpers.py"), str(out), *args]
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + TIMEOUT
        while "step 3/" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=TIMEOUT)
    text = log.read_text()
    assert rc == 128 + signal.SIGUSR1, text[-3000:]
    assert text.count("closing signal SIGUSR1") == 2 and "preempted at step" in text
    assert "exitcode" not in text  # no training process failed
    assert 3 <= trainer_state(out)["global_step"] < 200


# ---- a signal to the whole process group, loader workers included ---------------------------


def test_sigterm_to_the_process_group_spares_the_loader_workers(tmp_path, data_root_shared):
    """`kill -TERM -PGID` (a scheduler's preemption) reaches the training process and its 2
    loader workers: the workers ignore it, the run saves a state, prints how to resume and
    exits 0; `train.resume=auto` then finishes the run."""
    out = tmp_path / "run"
    phases = "[{name: a, builtin: digits, steps: 40}, {name: b, builtin: digits, steps: 3}]"
    args = tiny_overrides(out, data_root_shared, **{"train.workers": 2, "stream.phases": phases,
                                                     "train.ckpt_every": 100})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("MODX_KILL_AT", "MODX_KILL_SIGNAL", "MODX_KILL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, str(ROOT / "train_modx.py"), *args]
    log = tmp_path / "run.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + TIMEOUT
        while "step 2/" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=TIMEOUT)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "preempted at step" in text and "resume with train.resume=auto" in text and "Traceback" not in text
    stopped = trainer_state(out)
    assert stopped["phase"] == 0 and 2 <= stopped["global_step"] < 40
    resumed = subprocess.run([*cmd, "train.resume=auto"], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"global step {stopped['global_step']})" in resumed.stdout
    assert json.loads((out / "summary.json").read_text())["n_phases"] == 2


@pytest.fixture(scope="module")
def data_root_shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")
