"""Replay at any scale (modx.data.replay, modx.train.replay): a share of the global batch,
the same on any number of processes, from a stream of earlier shards or a buffer of
encoded samples saved as a WebDataset shard."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modx.config import ConfigError, load_config
from modx.data.replay import (
    STATE_JSON,
    STATE_TAR,
    Entry,
    ReplayBuffer,
    ReplayPlan,
    buffer_picks,
    decode_entry,
    rank_slice,
    read_entries,
    replay_counts,
    schedule_weights,
    view_seed,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_helpers import ROOT, tiny_overrides  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def raw_sample(key: str, size: int = 8, seed: int = 0) -> tuple[str, str, bytes, tuple[str, ...]]:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return key, "png", out.getvalue(), (f"a caption of {key}", f"another caption of {key}")


# ---- the share of the global batch ----------------------------------------------------------


@pytest.mark.parametrize("batch", [8, 64, 96])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_replay_counts_sum_to_the_share_of_the_global_batch_on_any_number_of_processes(batch, ratio):
    want = int(np.floor(ratio * batch + 0.5))  # round half up, the closed form
    for world in (1, 2, 4, 8):
        counts = replay_counts(batch, ratio, world)
        assert len(counts) == world and sum(counts) == want
        assert max(counts) - min(counts) <= 1
    assert sum(replay_counts(batch, ratio, 4, available=3)) == min(want, 3)  # no more than there is


def test_schedules_split_the_share_as_tic_clip_does():
    assert schedule_weights("equal", [10, 1000, 5]) == pytest.approx([1 / 3] * 3)
    assert schedule_weights("all", [10, 30, 60]) == pytest.approx([0.1, 0.3, 0.6])
    # newest half, the one before a quarter, ..., the oldest the rest
    assert schedule_weights("exp", [1, 1, 1, 1]) == pytest.approx([1 / 8, 1 / 8, 1 / 4, 1 / 2])
    assert schedule_weights("exp", [7]) == [1.0]
    for schedule in ("equal", "all", "exp"):
        assert sum(schedule_weights(schedule, [3, 5, 2, 9, 4])) == pytest.approx(1.0)


# ---- the buffer ------------------------------------------------------------------------------


def feed(buffer: ReplayBuffer, n: int, per_batch: int, phase: int = 0, step0: int = 0) -> None:
    for b in range(n // per_batch):
        raw = [raw_sample(f"k{buffer.seen + i}", seed=buffer.seen + i) for i in range(per_batch)]
        buffer.add(raw, [per_batch], 0, phase, step0 + b)


def test_reservoir_keeps_every_sample_with_equal_probability():
    """Vitter's algorithm R: after n samples each is in a buffer of c slots with probability
    c / n, whatever its place in the stream (frequencies over 400 seeds, 5 sigma)."""
    n, c, seeds = 40, 8, 400
    hits = np.zeros(n)
    for seed in range(seeds):
        buffer = ReplayBuffer(c, 10**9, seed)
        for b in range(n // 5):
            buffer.add([("k", "png", b"x", ("c",))] * 5, [5], 0, 0, b)
        for e in buffer.slots:
            hits[e.id] += 1
    p = c / n
    assert np.abs(hits / seeds - p).max() < 5 * np.sqrt(p * (1 - p) / seeds)
    assert hits.sum() == c * seeds


class FakeWorld:
    """all_gather_object between threads standing for processes."""

    def __init__(self, n: int):
        self.barrier, self.box = threading.Barrier(n), [None] * n

    def exchange(self, rank: int):
        def gather(items: list) -> list[list]:
            self.box[rank] = items
            self.barrier.wait()
            out = list(self.box)
            self.barrier.wait()
            return out

        return gather


def test_the_buffer_holds_the_same_samples_on_one_or_several_processes():
    """Micro-batches of 8 fresh samples offered by 1 process, or as 3 + 3 + 2 by 3 processes
    that exchange their new samples: every process ends with the 1-process buffer."""
    stream = [raw_sample(f"k{i}", seed=i) for i in range(64)]
    one = ReplayBuffer(12, 10**9, seed=5)
    for b in range(8):
        one.add(stream[8 * b : 8 * b + 8], [8], 0, 0, b)
    world, counts = FakeWorld(3), [3, 3, 2]
    many = [ReplayBuffer(12, 10**9, seed=5) for _ in range(3)]

    def rank_loop(rank: int) -> None:
        for b in range(8):
            start = 8 * b + sum(counts[:rank])
            many[rank].add(stream[start : start + counts[rank]], counts, rank, 0, b, world.exchange(rank))

    threads = [threading.Thread(target=rank_loop, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(one) == 12 and one.seen == 64
    for buffer in many:
        assert buffer.slots == one.slots


def test_other_seeds_keep_other_samples_and_ranks_never_enter_the_seed():
    a, b = ReplayBuffer(6, 10**9, seed=0), ReplayBuffer(6, 10**9, seed=1)
    feed(a, 40, 8)
    feed(b, 40, 8)
    assert [e.id for e in a.slots] != [e.id for e in b.slots]
    from modx.train.data import data_seed

    seeds = {data_seed(s, step, rank) for s in range(4) for step in range(0, 400, 7) for rank in range(8)}
    assert len(seeds) == 4 * len(range(0, 400, 7)) * 8  # no (seed, step, rank) shares a stream


def test_the_buffer_stays_within_max_mb():
    buffer = ReplayBuffer(50, max_bytes=20_000, seed=0)
    for b in range(10):
        raw = [raw_sample(f"k{b}-{i}", size=16 + 8 * (i % 3), seed=b * 8 + i) for i in range(8)]
        buffer.add(raw, [8], 0, 0, b)
        assert buffer.nbytes <= 20_000
        assert buffer.nbytes == sum(e.nbytes for e in buffer.slots if e is not None)
    assert 0 < len(buffer) < 50  # the byte bound, not the slots, limits it
    assert buffer.peak_bytes <= 20_000


def test_skipped_steps_leave_the_buffer():
    buffer = ReplayBuffer(100, 10**9, seed=0)
    feed(buffer, 24, 8)  # steps 0, 1, 2
    assert buffer.forget_steps({1}) == 8
    assert {e.step for e in buffer.slots if e is not None} == {0, 2}


def test_the_buffer_is_saved_as_a_webdataset_shard_and_loads_exactly(tmp_path):
    from modx.data import make_loader
    from modx.train.checkpoint import CheckpointError, check_loadable

    buffer = ReplayBuffer(10, 10**9, seed=3)
    feed(buffer, 16, 4, phase=0)
    feed(buffer, 8, 4, phase=1, step0=4)
    buffer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_JSON, STATE_TAR]  # no tensors, no pickle
    check_loadable(tmp_path)
    restored = ReplayBuffer(10, 10**9, seed=3)
    restored.load(tmp_path)
    assert restored.slots == buffer.slots and restored.seen == 24 and restored.nbytes == buffer.nbytes
    # an ordinary shard: modx's loader reads every sample with all its captions
    loader = make_loader(str(tmp_path / STATE_TAR), mode="eval", batch_size=100, preprocess=None,
                         tokenizer=None, workers=0, captions="all", rank=0, world_size=1)
    (batch,) = list(loader)
    assert len(batch["image"]) == 10 and len(batch["text"]) == 20
    (tmp_path / STATE_TAR).write_bytes(b"not a tar")
    with pytest.raises(CheckpointError, match="replay.tar"):
        check_loadable(tmp_path)


# ---- picks and views --------------------------------------------------------------------------


def plan_over(entries: tuple[Entry, ...], counts: tuple[int, ...]) -> ReplayPlan:
    return ReplayPlan(counts=counts, first_batch=10, seed=7, phase=1, entries=entries)


def test_picks_are_distinct_and_each_process_decodes_its_share_of_the_same_views():
    from modx.models import create_model

    _, preprocess, _, _ = create_model("modx-tiny-s4d")
    buffer = ReplayBuffer(30, 10**9, seed=0)
    feed(buffer, 40, 8)
    entries = buffer.earlier(1)
    one = plan_over(entries, (6,))
    for batch in range(20):
        picks = buffer_picks(one, batch)
        assert len(set(picks)) == 6  # never a sample twice in one global batch

    def views(plan: ReplayPlan, rank: int, batch: int) -> list[torch.Tensor]:
        mine = rank_slice(plan.counts, rank)
        picks = buffer_picks(plan, batch)[mine]
        return [decode_entry(entries[i], preprocess, view_seed(plan, batch, mine.start + k))["image"]
                for k, i in enumerate(picks)]

    three = plan_over(entries, (2, 2, 2))
    alone = views(one, 0, 3)
    shared = views(three, 0, 3) + views(three, 1, 3) + views(three, 2, 3)
    assert all(torch.equal(a, b) for a, b in zip(alone, shared))


def test_a_replayed_sample_is_decoded_and_augmented_anew_each_time():
    from modx.models import create_model

    _, preprocess, _, _ = create_model("modx-tiny-s4d")  # open_clip's RandomResizedCrop
    entry = Entry(0, 0, 0, "k", "png", raw_sample("k", size=64)[2], ("one", "two", "three"))
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    views = [decode_entry(entry, preprocess, seed) for seed in range(12)]
    assert torch.equal(torch.rand(3), before)  # the caller's RNG did not move
    assert len({v["image"].sum().item() for v in views}) > 6  # new crops
    assert {v["captions"][0] for v in views} == {"one", "two", "three"}
    assert torch.equal(decode_entry(entry, preprocess, 5)["image"], views[5]["image"])  # seeded


# ---- the loader builds the mixed batches ------------------------------------------------------


def digits(data_root: Path) -> tuple[str, str]:
    from modx.data.builtin import ensure_builtin

    return ensure_builtin("digits", root=str(data_root))


def test_the_loader_mixes_the_buffers_picks_into_every_batch_the_same_on_any_number_of_processes(data_root):
    """Source buffer through the real loader (2 workers): each process's batch ends with its
    count of replayed rows, and the replayed ids of each global micro-batch are the picks,
    the same whether 1 or 2 processes read them."""
    from modx.data import make_loader

    train, _ = digits(data_root)
    buffer = ReplayBuffer(40, 10**9, seed=1)
    feed(buffer, 48, 8)
    entries = buffer.earlier(1)

    def replayed_ids(world: int) -> list[list[int]]:
        plan = ReplayPlan(counts=tuple(replay_counts(8, 0.5, world)), first_batch=30, seed=4, phase=1,
                          entries=entries, keep_raw=True)
        per_rank = []
        for rank in range(world):
            loader = make_loader(train, mode="train", batch_size=8 // world, preprocess=None, tokenizer=None,
                                 workers=2, seed=rank, rank=rank, world_size=world, budget_steps=6, replay=plan)
            ids = []
            for batch in loader:
                n = plan.counts[rank]
                assert batch["replayed"] == [False] * (8 // world - n) + [True] * n
                assert len(batch["raw"]) == 8 // world - n and all(r[1] == "png" for r in batch["raw"])
                ids.append([i for i, f in zip(batch["sample_id"], batch["replayed"]) if f])
            per_rank.append(ids)
        return [sum((ids[j] for ids in per_rank), []) for j in range(6)]

    one, two = replayed_ids(1), replayed_ids(2)
    assert one == two
    plan = ReplayPlan(counts=(4,), first_batch=30, seed=4, phase=1, entries=entries)
    assert one == [[entries[i].id for i in buffer_picks(plan, 30 + j)] for j in range(6)]


def test_the_stream_replays_each_sample_on_one_process_only(data_root):
    """Source stream: two replay sources (one of 4 shards, split by shard; one of 1 shard,
    split by key) read by 2 processes: no key is replayed by both, each batch holds its
    count, and the shares follow the weights."""
    from modx.data import make_loader, parse_sources

    train, test = digits(data_root)
    many = tuple(parse_sources(train)[0].urls)
    one = tuple(parse_sources(test)[0].urls)
    plan = ReplayPlan(counts=(3, 3), first_batch=0, seed=0, phase=2, sources=(many, one), weights=(0.25, 0.75))
    keys, by_source = [], []
    test_keys = {k for b in make_loader(test, mode="eval", batch_size=500, preprocess=None, tokenizer=None,
                                        workers=0, rank=0, world_size=1) for k in b["key"]}
    for rank in range(2):
        loader = make_loader(train, mode="train", batch_size=4, preprocess=None, tokenizer=None, workers=1,
                             seed=rank, rank=rank, world_size=2, budget_steps=60, replay=plan)
        mine = []
        for batch in loader:
            assert batch["replayed"] == [False, True, True, True]
            rows = [k for k, f in zip(batch["key"], batch["replayed"]) if f]
            assert len(set(rows)) == 3
            mine += rows
        keys.append(set(mine))
        by_source += [k in test_keys for k in mine]
    assert not keys[0] & keys[1]
    assert abs(np.mean(by_source) - 0.75) < 0.1  # 360 draws: the weights, within ~4 sigma


# ---- end to end -----------------------------------------------------------------------------


def test_config_refuses_a_share_the_batch_cannot_hold(tmp_path, data_root):
    from modx.train import run

    for extra, key in [({"strategy.name": "replay", "strategy.replay.ratio": 0.05}, "strategy.replay.ratio"),
                       ({"strategy.name": "modx", "strategy.replay.ratio": 0.1}, "strategy.replay.ratio")]:
        with pytest.raises(ConfigError, match=key):
            run(load_config(None, tiny_overrides(tmp_path / "r", data_root, **extra)))
    with pytest.raises(ConfigError, match="strategy.replay.data"):
        load_config(None, ["strategy.replay.data=x.tar"])  # the buffer cannot replay shards
    with pytest.raises(ConfigError, match="strategy.replay.source"):
        load_config(None, ["strategy.replay.source=disk"])


def test_only_trained_samples_enter_the_buffer(tmp_path, data_root, monkeypatch):
    """With loader workers prefetching and a loader rebuilt at every checkpoint, the buffer
    holds only samples that were in a trained batch (never a prefetched, dropped one)."""
    import modx.train.loop as loop
    from modx.train import run

    trained: set[str] = set()
    real_build = loop.build_strategy

    def build(cfg, accelerator, **kwargs):
        strategy = real_build(cfg, accelerator, **kwargs)
        real_loss = strategy.loss

        def loss(model, batch, old_model):
            trained.update(k for k, f in zip(batch["key"], batch["replayed"]) if not f)
            return real_loss(model, batch, old_model)

        strategy.loss = loss
        return strategy

    monkeypatch.setattr(loop, "build_strategy", build)
    extra = {"strategy.name": "replay", "strategy.replay.source": "buffer", "train.workers": 2,
             "train.ckpt_every": 1}
    run_dir = run(load_config(None, tiny_overrides(tmp_path / "run", data_root, **extra)))
    state = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    kept = {e.key for _, e in read_entries(state / STATE_TAR)}
    assert kept and kept <= trained
    assert json.loads((state / STATE_JSON).read_text())["seen"] == 3 * 8 + 3 * 4  # fresh samples only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, nprocs: int, args: list[str], kill: str | None = None, resume: bool = False) -> None:
    """tests/_train_helpers.py (the fake stream) on `nprocs` CPU processes (gloo)."""
    script = str(ROOT / "tests" / "_train_helpers.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MODX_KILL_AT", None)
    if kill:
        env["MODX_KILL_AT"] = kill
    cmd = [sys.executable, script] if nprocs == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nprocs),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), script]
    done = subprocess.run([*cmd, str(out), *args, *(["--resume"] if resume else [])],
                          capture_output=True, text=True, timeout=300, env=env)
    if kill:
        assert done.returncode != 0, "the kill hook did not fire"
    else:
        assert done.returncode == 0, done.stderr[-3000:]


REPLAY_RUN = ["strategy.name=modx", "strategy.replay.source=buffer", "strategy.replay.ratio=0.5",
              "strategy.replay.size=16", "train.ckpt_every=1", "train.workers=0",
              "stream.phases=[{name: a, train: X, eval: X, steps: 3}, {name: b, train: X, eval: X, steps: 3}]"]


def replay_args(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "x.tar").touch()
    return [a.replace("X", str(out / "x.tar")) for a in REPLAY_RUN]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / "phase-1" / "model.safetensors")


def replayed_sets(out: Path, nprocs: int, tag: str = "") -> list[set[int]]:
    ranks = [json.loads((out / f"replayed{tag}_{r}.json").read_text()) for r in range(nprocs)]
    return [set(sum((ids[j] for ids in ranks), [])) for j in range(len(ranks[0]))]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    launch(out, 1, replay_args(out))
    return out


def test_two_processes_replay_what_one_process_replays_with_the_same_losses(one_process_run, tmp_path):
    """Mod-X with a 50 % buffer share on the fake stream (the same global batches on any
    number of processes): 2 processes replay the same samples in every micro-batch as 1
    process, with the same losses and final weights."""
    from test_train import assert_weights_close

    two = tmp_path / "two"
    launch(two, 2, replay_args(two))
    sets_one, sets_two = replayed_sets(one_process_run, 1), replayed_sets(two, 2)
    assert len(sets_one) == 6 and sets_one[:3] == [set()] * 3  # phase a: nothing earlier
    assert all(len(s) == 4 for s in sets_one[3:]) and sets_two == sets_one
    loss_one = json.loads((one_process_run / "losses.json").read_text())
    loss_two = json.loads((two / "losses.json").read_text())
    assert loss_two == pytest.approx(loss_one, rel=1e-5, abs=1e-6)
    assert_weights_close(final_weights(two), final_weights(one_process_run))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_number_of_processes_exactly(one_process_run, tmp_path, before, after):
    """Killed mid-phase b on `before` processes, resumed on `after`: the buffer (one for all
    processes) and the stream go on where they were; the final weights are those of the
    uninterrupted run."""
    from test_train import assert_weights_close

    out = tmp_path / "run"
    launch(out, before, replay_args(out), kill="step:5")  # the latest state: phase b, step 1
    assert (out / "checkpoints" / "latest").read_text().strip() == "state-00000004"
    launch(out, after, replay_args(out), resume=True)
    assert replayed_sets(out, after, "-resumed") == replayed_sets(one_process_run, 1)[4:]
    assert_weights_close(final_weights(out), final_weights(one_process_run))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is the Linux default")
def test_loader_workers_are_forked_even_from_a_spawned_process(data_root):
    """A spawned process (modx-bench's runs) would spawn its workers too: each would get a
    pickled copy of the replay snapshot instead of sharing the main process's pages."""
    import multiprocessing as mp

    train, _ = digits(data_root)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_worker_start_method, args=(train, queue))
    child.start()
    child.join(timeout=120)
    assert queue.get(timeout=5) == ("spawn", "fork")


def _worker_start_method(train: str, queue) -> None:
    import multiprocessing as mp

    from modx.data import make_loader

    loader = make_loader(train, mode="train", batch_size=4, preprocess=None, tokenizer=None, workers=1,
                         rank=0, world_size=1, budget_steps=1)
    queue.put((mp.get_start_method(), loader._loader.multiprocessing_context.get_start_method()))
