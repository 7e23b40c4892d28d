"""modx.train under faults: kill -9 anywhere, unsafe checkpoints, full disks, NaNs,
vanishing shards. Each test injects its fault (docs/training.md, "Failures")."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modx.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_helpers import (  # noqa: E402
    ROOT,
    NullEvaluator,
    fake_stream_overrides,
    install_fake_stream,
    tiny_overrides,
)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run() builds its own Accelerator; forget the previous one's singleton state."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


# ---- kill -9 anywhere, then --resume: the uninterrupted run's weights and results ----------

STRATEGIES = {
    "finetune": {"strategy.name": "finetune"},
    "modx": {"strategy.name": "modx"},
    "ewc": {"strategy.name": "ewc", "strategy.ewc_batches": 2},
    "replay": {"strategy.name": "replay", "strategy.replay.size": 32},
    # the default run's representative: EWC's Fisher and a replay buffer in one state
    "ewc+replay": {"strategy.name": "ewc", "strategy.ewc_batches": 2, "strategy.replay.ratio": 0.25,
                   "strategy.replay.size": 32, "strategy.replay.source": "buffer"},
    # Mod-X replaying a stream of phase a's shards: the replay stream resumes where it was
    "modx+stream": {"strategy.name": "modx", "strategy.replay.source": "stream"},
    # ZSCL: its reference stream (2 loader workers, the digits' shards), ensemble and initial model
    "zscl": {"strategy.name": "zscl", "strategy.zscl_we_every": 2},
}
# how often each point is reached in the tiny 2 x 3-step run (ckpt_every=2, 2 eval sets)
KILL_POINTS = {"step": 6, "checkpoint": 4, "evaluate": 6}


def train_cli(run_dir: Path, data_root: Path, extra: dict, kill: str | None = None, resume: bool = False,
              signal: str | None = None) -> int:
    """`python train_modx.py` on the tiny stream with 2 loader workers; MODX_KILL_AT=kill
    (MODX_KILL_SIGNAL=signal: that signal instead of SIGKILL)."""
    from modx.data.builtin import ensure_builtin

    reference = ensure_builtin("digits", root=str(data_root))[0]  # read by zscl only
    overrides = tiny_overrides(run_dir, data_root, **{"train.workers": 2, "strategy.reference": reference, **extra})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MODX_KILL_AT", None)
    env.pop("MODX_KILL_SIGNAL", None)
    if kill is not None:
        env["MODX_KILL_AT"] = kill
    if signal is not None:
        env["MODX_KILL_SIGNAL"] = signal
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}-{'resume' if resume else 'run'}.log"
    with log.open("w") as out:  # a file, not a pipe: killed runs leave orphaned workers for a moment
        cmd = [sys.executable, str(ROOT / "train_modx.py"), *overrides, *(["--resume"] if resume else [])]
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600).returncode
    if rc not in (0, -9):
        pytest.fail(f"{' '.join(cmd)} exited {rc}:\n{log.read_text()[-3000:]}")
    return rc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root):
    """The reference run of each strategy (trained once per test module)."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp(f"whole-{name}") / "run"
            assert train_cli(runs[name], data_root, STRATEGIES[name]) == 0
        return runs[name]

    return get


def check_kill_and_resume(tmp_path: Path, data_root: Path, whole: Path, strategy: str, kill: str,
                          signal: str | None = None) -> dict:
    """Kill (or signal) a run, resume it, compare with `whole`; returns the trainer state
    the stopped run left."""
    killed = tmp_path / "killed"
    assert train_cli(killed, data_root, STRATEGIES[strategy], kill=kill, signal=signal) == (0 if signal else -9), \
        "the kill hook did not fire"
    assert not (killed / "summary.json").exists()
    ckpt = killed / "checkpoints"
    stopped = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "trainer_state.json").read_text())
    assert train_cli(killed, data_root, STRATEGIES[strategy], resume=True) == 0
    for name in ("phase-0", "phase-1"):
        assert_same_weights(weights(whole / "checkpoints" / name), weights(killed / "checkpoints" / name))
    assert records(killed / "results.jsonl") == records(whole / "results.jsonl")
    assert records(killed / "disorder.jsonl") == records(whole / "disorder.jsonl")
    summary, reference = (json.loads((d / "summary.json").read_text()) for d in (killed, whole))
    cost, reference_cost = summary.pop("cost"), reference.pop("cost")  # wall-clock times differ
    assert summary == reference
    assert cost["train_samples"] == reference_cost["train_samples"]
    return stopped


@pytest.mark.parametrize("strategy", ["ewc+replay", "modx+stream", "zscl"])
def test_run_killed_in_phase_b_resumes_to_the_uninterrupted_results(tmp_path, data_root, uninterrupted, strategy):
    """kill -9 during training after phase a (EWC Fisher, replay buffer or replay stream,
    ZSCL's ensemble and reference stream, old model, RNG and the loader workers' stream all
    restored): same weights, results.jsonl, summary."""
    check_kill_and_resume(tmp_path, data_root, uninterrupted(strategy), strategy, "step:5")


@pytest.mark.parametrize("strategy", ["ewc+replay", "modx+stream", "zscl"])
def test_run_preempted_off_the_checkpoint_schedule_resumes_to_the_uninterrupted_results(tmp_path, data_root,
                                                                                     uninterrupted, strategy):
    """SIGTERM after global step 5 (ckpt_every=2: one step into the segment that started at
    step 4's state): the resumed run rebuilds the real loader's segment (2 workers; the
    replay stream or buffer snapshot, ZSCL's reference stream), reads past that step's
    batches and ends with the uninterrupted run's weights, results and summary."""
    stopped = check_kill_and_resume(tmp_path, data_root, uninterrupted(strategy), strategy, "step:5", signal="SIGTERM")
    assert stopped["global_step"] == 5
    assert stopped["segment"] == {**stopped["segment"], "phase_step": 1, "global_step": 4, "batches": 1}


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
@pytest.mark.parametrize("strategy", ["finetune", "modx", "ewc", "replay"])
def test_run_killed_anywhere_resumes_to_the_uninterrupted_results(tmp_path, data_root, uninterrupted, strategy, point):
    nth = random.Random(f"{strategy}-{point}").randint(1, KILL_POINTS[point])
    check_kill_and_resume(tmp_path, data_root, uninterrupted(strategy), strategy, f"{point}:{nth}")


# ---- checkpoints are never unpickled ------------------------------------------------------


class _Payload:
    """Unpickling this runs os.makedirs(marker): what a planted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A finished 2 x 2-step run on the fake stream with a state after every step."""
    from modx.train import run

    out = tmp_path_factory.mktemp("saved") / "run"
    with pytest.MonkeyPatch.context() as mp:
        install_fake_stream([], mp.setattr)
        run(load_config(None, fake_stream_overrides(out, "train.ckpt_every=1", "train.keep_checkpoints=10")))
    reset_accelerate()
    return out


@pytest.mark.parametrize(
    "planted", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "strategy_0.pt", "model.safetensors",
                "strategy_0.safetensors", "rng_0.safetensors"],
)
def test_resume_refuses_a_planted_pickle_and_names_it(tmp_path, saved_run, monkeypatch, planted):
    from modx.train import run
    from modx.train.checkpoint import CheckpointError

    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    marker = tmp_path / "code-ran"
    state = out / "checkpoints" / "state-00000003"
    torch.save({"state": _Payload(marker)}, state / planted)
    (out / "checkpoints" / "latest").write_text(state.name)
    install_fake_stream([], monkeypatch.setattr)
    cfg = load_config(None, fake_stream_overrides(out, "train.ckpt_every=1"))
    with pytest.raises(CheckpointError, match=planted.replace(".", r"\.")):
        run(cfg, resume="latest")
    assert not marker.exists()


def test_cli_refuses_an_unsafe_checkpoint_with_one_line(tmp_path, saved_run):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    torch.save(_Payload(tmp_path / "code-ran"), out / "checkpoints" / "state-00000004" / "optimizer.bin")
    (out / "checkpoints" / "latest").write_text("state-00000004")
    cmd = [sys.executable, str(ROOT / "train_modx.py"), *fake_stream_overrides(out), "--resume"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    assert "optimizer.bin" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "code-ran").exists()


def test_an_fp16_state_with_scaler_pt_resumes_and_a_planted_scaler_is_refused(tmp_path):
    """Under fp16 Accelerate writes the GradScaler's state as scaler.pt: modx checks it with
    torch.load(weights_only=True) and resumes (the scale comes back); a pickle planted in its
    place is refused without running. (A CPU run has no GradScaler: the test gives the
    Accelerator one, as fp16 on a GPU does.)"""
    from accelerate import Accelerator

    from modx.train.checkpoint import CheckpointError, load_state, save_state

    def accelerator_with_scaler(scale: float) -> Accelerator:
        reset_accelerate()
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.AdamW(model.parameters())
        accelerator.prepare(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        accelerator.scaler.scale(torch.ones(()))  # the scale tensor exists from the first use
        return accelerator

    state = save_state(accelerator_with_scaler(512.0), tmp_path / "ckpt",
                       {"phase": 0, "phase_step": 1, "global_step": 1}, {"strategy": {}}, keep=2)
    assert (state / "scaler.pt").is_file()
    resumed = accelerator_with_scaler(2.0**16)
    load_state(resumed, state)
    assert resumed.scaler.get_scale() == 512.0
    marker = tmp_path / "code-ran"
    torch.save({"scale": _Payload(marker)}, state / "scaler.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load .*scaler\.pt: it does not load as plain tensors"):
        load_state(accelerator_with_scaler(1.0), state)
    assert not marker.exists()


def test_strategy_state_round_trips_through_safetensors_and_json(tmp_path):
    from modx.train.serialize import load_tree, save_tree

    flat = torch.arange(6.0)
    tree = {"strategy": {"fisher": {"w": flat[:2], "b": flat[2:]}, "anchor": {}}, "none": None, "seen": 6}
    save_tree(tree, tmp_path / "strategy_0")
    back = load_tree(tmp_path / "strategy_0")
    assert torch.equal(back["strategy"]["fisher"]["b"], flat[2:]) and back["strategy"]["anchor"] == {}
    assert back["none"] is None and back["seen"] == 6


def test_rng_state_round_trips_without_pickle(tmp_path):
    import numpy as np

    from modx.train.serialize import load_tree, rng_state, save_tree, set_rng_state

    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    save_tree(rng_state(), tmp_path / "rng_0")
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    set_rng_state(load_tree(tmp_path / "rng_0"))
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first


# ---- a full disk while checkpointing ------------------------------------------------------


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_usable(tmp_path, monkeypatch):
    import modx.train.checkpoint as checkpoint
    from modx.train import run

    real_save_tree, writes = checkpoint.save_tree, []

    def disk_full_at_the_second_state(tree, stem):
        if stem.name == "strategy_0":
            writes.append(stem)
            if len(writes) == 2:
                stem.with_suffix(".safetensors").write_bytes(b"half")
                raise OSError(errno.ENOSPC, "No space left on device")
        real_save_tree(tree, stem)

    install_fake_stream([], monkeypatch.setattr)
    out = tmp_path / "run"
    cfg = load_config(None, fake_stream_overrides(out, "train.ckpt_every=1"))
    monkeypatch.setattr(checkpoint, "save_tree", disk_full_at_the_second_state)
    with pytest.raises(checkpoint.CheckpointError, match=r"\.tmp-state-00000002.*No space left.*state-00000001"):
        run(cfg)
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "state-00000001"
    assert not list(ckpt.glob(".tmp-*"))
    monkeypatch.setattr(checkpoint, "save_tree", real_save_tree)
    reset_accelerate()
    run(cfg, resume="latest")  # the previous state is usable
    assert (ckpt / "phase-1" / "model.safetensors").is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs: room for the first state of the fake-stream run, not the second."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: a failed test may hold files


def test_a_really_full_disk_keeps_the_previous_state_usable(tmp_path, small_disk, monkeypatch):
    from modx.train import run
    from modx.train.checkpoint import CheckpointError

    install_fake_stream([], monkeypatch.setattr)
    out = small_disk / "run"
    small = ("train.ckpt_every=1", "strategy.replay.ratio=0")  # no 12 MB replay buffer in each state
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*\.tmp-state-00000002: .*MiB free there"):
        run(load_config(None, fake_stream_overrides(out, *small)))
    assert (out / "checkpoints" / "latest").read_text().strip() == "state-00000001"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    moved = tmp_path / "moved"  # e.g. after freeing space: the kept state resumes
    shutil.copytree(out, moved)
    reset_accelerate()
    run(load_config(None, fake_stream_overrides(moved, *small)), resume="latest")
    assert (moved / "checkpoints" / "phase-1" / "model.safetensors").is_file()


# ---- non-finite loss or gradients ---------------------------------------------------------


def poison(monkeypatch, bad_steps: set[int], where: str) -> None:
    """Make the loss (or only the gradients) of the given 0-based optimiser steps NaN."""
    import modx.train.loop as loop

    real_build, calls = loop.build_strategy, [0]

    def build(cfg, accelerator, **kwargs):
        strategy = real_build(cfg, accelerator, **kwargs)
        real_loss = strategy.loss

        def loss(model, batch, old_model):
            value, terms = real_loss(model, batch, old_model)
            calls[0] += 1
            if calls[0] - 1 in bad_steps:
                if where == "loss":
                    value = value * float("nan")
                else:  # finite value 0, gradient 0 * inf = NaN
                    value = value + torch.sqrt(torch.zeros(()) * sum(p.sum() for p in model.parameters()))
            return value, terms

        strategy.loss = loss
        return strategy

    monkeypatch.setattr(loop, "build_strategy", build)


class SummaryEvaluator(NullEvaluator):
    extra: dict = {}

    def finish(self, *args, extra=None, **kwargs):
        SummaryEvaluator.extra = extra
        return {}


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch, where):
    import modx.train.loop as loop
    from modx.train import run

    install_fake_stream([], monkeypatch.setattr)
    monkeypatch.setattr(loop, "Evaluator", SummaryEvaluator)
    poison(monkeypatch, {1}, where)
    out = tmp_path / "run"
    run(load_config(None, fake_stream_overrides(out, "train.ckpt_every=1", "train.keep_checkpoints=10")))
    ckpt = out / "checkpoints"
    assert_same_weights(weights(ckpt / "state-00000001"), weights(ckpt / "state-00000002"))  # step 2 skipped
    assert any(not torch.equal(v, weights(ckpt / "state-00000003")[k]) for k, v in weights(ckpt / "state-00000002").items())
    assert SummaryEvaluator.extra["skipped_steps"] == 1
    assert json.loads((ckpt / "state-00000004" / "trainer_state.json").read_text())["skipped_steps"] == 1


def test_too_many_non_finite_steps_stop_with_the_last_good_state(tmp_path, monkeypatch):
    import modx.train.loop as loop
    from modx.train import run

    install_fake_stream([], monkeypatch.setattr)
    poison(monkeypatch, {1, 2, 3}, "loss")
    out = tmp_path / "run"
    cfg = load_config(None, fake_stream_overrides(out, "train.ckpt_every=100", "train.max_bad_steps=2"))
    with pytest.raises(loop.TrainingStopped, match=r"2 optimiser steps in a row.*train\.max_bad_steps=2.*state-00000003"):
        run(cfg)
    ckpt = out / "checkpoints"
    state = ckpt / "state-00000003"  # phase b's first step was the second bad one
    trainer_state = json.loads((state / "trainer_state.json").read_text())
    assert trainer_state.pop("train_seconds") > 0
    want = {"phase": 1, "phase_step": 1, "global_step": 3, "skipped_steps": 2, "bad_in_row": 2}
    assert {k: trainer_state[k] for k in want} == want
    assert_same_weights(weights(ckpt / "phase-0"), weights(state))  # phase a's last step was skipped,
    assert not (ckpt / "phase-1").exists()  # so the last good model is step 1's = phase a's export
    # only samples that were trained on stay in the replay buffer: none of the skipped steps 1, 2
    from modx.data.replay import read_entries

    steps = {e.step for _, e in read_entries(state / "replay.tar")}
    assert steps == {0}


# ---- shards that vanish or become unreadable mid-run --------------------------------------


def test_a_missing_shard_keeps_its_place_and_is_counted(tmp_path, data_root):
    from modx.data import DataError, make_loader, parse_sources, shard_sizes
    from modx.data.builtin import ensure_builtin

    train, _ = ensure_builtin("digits", root=str(data_root))
    kept = sum(shard_sizes([train.replace("{000000..000003}", f"00000{i}") for i in (0, 2)]))
    for i in (0, 2):
        shutil.copy(train.replace("{000000..000003}", f"00000{i}"), tmp_path / f"s-00000{i}.tar")
    pattern = f"{tmp_path}/s-{{000000..000002}}.tar"
    with pytest.raises(DataError, match="s-000001.tar"):
        parse_sources(pattern)
    (src,) = parse_sources(pattern, missing_ok=True)
    assert [Path(u).name for u in src.urls] == ["s-000000.tar", "s-000001.tar", "s-000002.tar"]
    loader = make_loader(pattern, mode="eval", batch_size=64, preprocess=None, tokenizer=None, workers=0, missing_ok=True)
    assert sum(len(b["key"]) for b in loader) == kept > 600  # shards 0 and 2 of the four
    assert loader.stats.as_dict()["reasons"] == {"open_error": 1}


def test_vanishing_train_and_eval_shards_are_counted_and_skipped(tmp_path, data_root, monkeypatch, capsys):
    import modx.train.loop as loop
    from modx.data.builtin import ensure_builtin
    from modx.train import run

    train, test = ensure_builtin("digits", root=str(data_root))
    shards = tmp_path / "shards"
    shutil.copytree(Path(test).parent, shards)
    train_urls = f"{shards}/train-{{000000..000003}}.tar"
    phases = (f"[{{name: a, train: '{train_urls}', eval: '{shards}/test-000000.tar::{shards}/train-000000.tar', steps: 3}}, "
              f"{{name: b, train: '{train_urls}', eval: '{shards}/test-000002.tar', steps: 3}}]")
    shutil.copy(shards / "test-000000.tar", shards / "test-000002.tar")
    real_save = loop.save_state

    def save_then_lose_shards(*args, **kwargs):  # after the first checkpoint (step 2)
        path = real_save(*args, **kwargs)
        for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
            (shards / name).unlink(missing_ok=True)  # train shards vanish; eval set a loses one
        (shards / "test-000002.tar").write_bytes(b"not a tar")  # eval set b becomes unreadable
        return path

    monkeypatch.setattr(loop, "save_state", save_then_lose_shards)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="eval set .*test-000002.tar skipped: no usable samples"):
        run(load_config(None, tiny_overrides(out, data_root, **{"stream.phases": phases, "train.ckpt_every": 2})))
    rows = {(r["phase"], r["eval_set"]): r["metrics"] for r in records(out / "results.jsonl")}
    assert rows[(-1, "a")]["skipped"] == 0 and rows[(-1, "b")]["skipped"] == 0
    for phase in (0, 1):
        assert rows[(phase, "a")]["skipped"] == 1 and rows[(phase, "a")]["n_images"] < rows[(-1, "a")]["n_images"]
        assert "no usable samples" in rows[(phase, "b")]["error"]
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    skipped = [float(line.split(" skipped ")[1].split()[0]) for line in logged]
    assert skipped[:2] == [0, 0] and max(skipped[2:]) > 0  # the missing train shards
    assert json.loads((out / "summary.json").read_text())["n_phases"] == 2


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_step_skips_on_the_device_flag(fused):
    from modx.train.loop import optimizer_step

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=fused)
    p.grad = torch.ones(3)
    optimizer_step(opt, torch.zeros(()), scaled=False)
    taken = p.detach().clone()
    assert not torch.equal(taken, torch.ones(3)) and opt.state[p]["step"].item() == 1
    p.grad = torch.full((3,), float("nan"))
    optimizer_step(opt, torch.ones(()), scaled=False)  # skipped: no update, no weight decay, same count
    assert torch.equal(p.detach(), taken) and opt.state[p]["step"].item() == 1
    assert torch.isfinite(opt.state[p]["exp_avg"]).all()
    p.grad = torch.ones(3)
    optimizer_step(opt, torch.zeros(()), scaled=False)
    assert opt.state[p]["step"].item() == 2 and not torch.equal(p.detach(), taken)


def test_bad_steps_count_like_a_loop_over_the_flags():
    from modx.train.loop import BadSteps

    g = torch.Generator().manual_seed(0)
    flags = (torch.rand(200, generator=g) < 0.4).tolist()
    counter = BadSteps(limit=4, device=torch.device("cpu"), total=3, in_row=1)
    total, row, longest, reads = 3, 1, 1, 0
    for i, bad in enumerate(flags):
        counter.update(torch.tensor(float(bad)))
        row = row + 1 if bad else 0
        total, longest = total + bad, max(longest, row)
        if i % 7 == 6:  # a log line
            before = counter.total
            assert counter.read() == total - before
            assert (counter.total, counter.in_row, counter.longest) == (total, row, longest)
            longest, reads = row, reads + 1
    assert reads == 28 and max(flags) and counter.limit == 4
