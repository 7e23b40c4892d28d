"""DeepSpeed ZeRO through Accelerate on CPU (gloo): the same training as DDP, exact resume,
safe checkpoints, and the refusals (modx.train.engines).

Runs where DeepSpeed is installed (`pip install -e ".[dev]"` installs it); each run is
`accelerate launch --use_deepspeed` of tests/_train_helpers.py (the fake stream: the same
global batches on any number of processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")

from _train_helpers import ROOT  # noqa: E402
from test_replay import _free_port, final_weights, replay_args  # noqa: E402
from test_train import assert_weights_close  # noqa: E402

RUN = ["train.workers=0", "train.ckpt_every=1"]


def launch(out: Path, args: list[str], engine: str, kill: str | None = None, resume: bool = False,
           zero_stage: int = 2, nprocs: int = 2, ds_config: Path | None = None) -> subprocess.CompletedProcess:
    """The fake stream on 2 CPU processes: `engine` "deepspeed" (ZeRO `zero_stage`, or the
    DeepSpeed config file `ds_config`) or "ddp"."""
    script = str(ROOT / "tests" / "_train_helpers.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MODX_KILL_AT", None)
    if kill:
        env["MODX_KILL_AT"] = kill
    flags = ["--use_deepspeed", "--zero_stage", str(zero_stage)] if engine == "deepspeed" else ["--multi_gpu"]
    if engine == "deepspeed" and ds_config is not None:
        flags = ["--use_deepspeed", "--deepspeed_config_file", str(ds_config)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", str(nprocs),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), script, str(out), *args, *(["--resume"] if resume else [])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_modx(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    ok(launch(out, [*replay_args(out), *RUN], "ddp"))
    return out


def test_zero2_trains_as_ddp_does_with_sharded_optimiser_states(ddp_modx, tmp_path):
    """Mod-X with a replay buffer (the old model, the replayed KL, the buffer exchange):
    ZeRO-2 gives DDP's losses and weights, and each process holds half the AdamW state."""
    out = tmp_path / "run"
    ok(launch(out, [*replay_args(out), *RUN], "deepspeed"))
    want = json.loads((ddp_modx / "losses.json").read_text())
    assert json.loads((out / "losses.json").read_text()) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert_weights_close(final_weights(out), final_weights(ddp_modx))
    state = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    parts = sorted((state / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(parts) == 2
    sizes = [sum(t.numel() for t in torch.load(p, weights_only=False)["optimizer_state_dict"]
                 ["single_partition_of_fp32_groups"]) for p in parts]
    total = sum(v.numel() for v in final_weights(out).values())
    assert sum(sizes) >= total and max(sizes) <= total // 2 + 64  # each rank: its half (+ padding)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"] == {"type": "DEEPSPEED", "num_processes": 2}


def test_zero2_run_killed_mid_phase_resumes_exactly(ddp_modx, tmp_path):
    """Killed after a checkpoint mid-phase b, resumed: the uninterrupted run's weights.
    The resume first checks every DeepSpeed file with torch.load(weights_only=True)."""
    out = tmp_path / "run"
    done = launch(out, [*replay_args(out), *RUN], "deepspeed", kill="step:5")
    assert done.returncode != 0, "the kill hook did not fire"
    assert (out / "checkpoints" / "latest").read_text().strip() == "state-00000004"
    done = launch(out, [*replay_args(out), *RUN], "ddp", resume=True)
    assert done.returncode != 0 and "it was saved under DeepSpeed" in done.stderr
    ok(launch(out, [*replay_args(out), *RUN], "deepspeed", resume=True))
    assert_weights_close(final_weights(out), final_weights(ddp_modx))


def test_a_deepspeed_state_with_a_pickle_that_runs_code_is_refused(tmp_path):
    from modx.train.checkpoint import CheckpointError, check_loadable

    state = tmp_path / "state"
    (state / "pytorch_model").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, state / "pytorch_model" / "mp_rank_00_model_states.pt")
    (state / "latest").write_text("pytorch_model")
    check_loadable(state, deepspeed=True)  # plain tensors: accepted
    torch.save({"optimizer_state_dict": {"hook": os.system}}, state / "pytorch_model" / "zero_pp_rank_0.pt")
    with pytest.raises(CheckpointError, match="does not load as plain tensors.*GLOBAL posix.system"):
        check_loadable(state, deepspeed=True)


def zero3_config(directory: Path) -> Path:
    """The shipped ZeRO-3 config with every parameter partitioned: DeepSpeed keeps parameters
    under stage3_param_persistence_threshold (1e5 elements) whole, which is every one of the
    micro model's."""
    config = json.loads((ROOT / "configs" / "accelerate" / "deepspeed_zero3.json").read_text())
    config["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    path = directory / "zero3.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def zero3_modx(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3") / "run"
    ok(launch(out, [*replay_args(out), *RUN], "deepspeed", ds_config=zero3_config(out.parent)))
    return out


def test_zero3_trains_mod_x_as_ddp_does_with_partitioned_parameters(ddp_modx, zero3_modx):
    """Mod-X with a replay buffer under ZeRO-3: each process holds half of every parameter
    (and of the AdamW state); the old model, the phase exports and the logit-scale reads are
    whole copies gathered from the partitions. Losses and weights are DDP's."""
    out = zero3_modx
    want = json.loads((ddp_modx / "losses.json").read_text())
    assert json.loads((out / "losses.json").read_text()) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert_weights_close(final_weights(out), final_weights(ddp_modx))  # exports: whole tensors
    state = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    parts = sorted((state / "pytorch_model").glob("zero_pp_rank_*_model_states.pt"))
    assert len(parts) == 2
    total = sum(v.numel() for v in final_weights(out).values())
    for part in parts:  # the parameters themselves: this process's partitions (ZeRO-3's ds_tensor)
        module = torch.load(part, weights_only=False)["module"]
        held = sum(t.numel() for t in module.values() if torch.is_tensor(t))
        assert held <= total // 2 + 64 * len(module), (held, total)  # half (+ padding per tensor)
    optim = sorted((state / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))
    sizes = [sum(t.numel() for t in torch.load(p, weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"])
             for p in optim]
    assert sum(sizes) >= total and max(sizes) <= total // 2 + 64 * len(final_weights(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"] == {"type": "DEEPSPEED", "num_processes": 2}


def test_zero3_run_killed_mid_phase_resumes_exactly(zero3_modx, tmp_path):
    """Killed after a checkpoint in phase b, resumed under ZeRO-3: bit for bit the weights of
    the same run uninterrupted (the partitions, the optimiser's and the buffer all restored)."""
    config = zero3_config(tmp_path)
    whole, out = zero3_modx, tmp_path / "run"
    done = launch(out, [*replay_args(out), *RUN], "deepspeed", kill="step:5", ds_config=config)
    assert done.returncode != 0, "the kill hook did not fire"
    ok(launch(out, [*replay_args(out), *RUN], "deepspeed", resume=True, ds_config=config))
    got, want = final_weights(out), final_weights(whole)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_zero3_run_evaluates_and_exports_whole_weights(tmp_path):
    """train_modx.py on the built-in data under ZeRO-3 (2 processes): the initial model's
    metrics equal one process's (each process embeds its share with a whole copy), and the
    export reads back with create_model at full shape."""
    from _train_helpers import digits_run_metrics

    from modx.models import create_model

    zero3 = ["--use_deepspeed", "--deepspeed_config_file", str(zero3_config(tmp_path)), "--num_processes", "2"]
    runs = {name: digits_run_metrics(tmp_path, name, how, _free_port())
            for name, how in (("one", ["--num_processes", "1"]), ("zero3", zero3))}
    assert set(runs["zero3"]) == {-1, 0}
    assert runs["zero3"][-1] == pytest.approx(runs["one"][-1], rel=1e-4, abs=1e-4)
    assert runs["zero3"][0]["n_images"] == runs["one"][0]["n_images"] > 0
    export = tmp_path / "zero3" / "checkpoints" / "phase-0"
    model = create_model(str(export))[0]
    plain = create_model(str(tmp_path / "one" / "checkpoints" / "phase-0"))[0]
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_zero3_refuses_the_strategies_that_edit_whole_weights_with_one_line(tmp_path):
    """WiSE-FT interpolates the whole weights at a phase end: under ZeRO-3 the error names it
    and the alternatives, before anything is written."""
    out = tmp_path / "run"
    done = launch(out, [*replay_args(out), *RUN, "strategy.name=wiseft", "strategy.replay.ratio=0"],
                  "deepspeed", zero_stage=3)
    assert done.returncode != 0 and "wiseft interpolates the whole weights" in done.stderr
    assert "FSDP's FULL_SHARD" in done.stderr
    assert not (out / "checkpoints").exists()


class _Plugin:
    def __init__(self, config: dict):
        self.deepspeed_config = config


class _Accelerator:  # what deepspeed_problem reads of Accelerate's
    def __init__(self, config: dict, mixed_precision: str = "no"):
        self.state = type("State", (), {"deepspeed_plugin": _Plugin(config)})()
        self.mixed_precision = mixed_precision


def test_the_deepspeed_config_auto_values_come_from_modx_config():
    from modx.train.engines import deepspeed_problem

    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto"}
    assert deepspeed_problem(_Accelerator(config), "modx", 4, 2, 1.0) is None
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0 and "train_batch_size" not in config
    config = {"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5}
    key, why = deepspeed_problem(_Accelerator(config), "modx", 4, 1, 1.0)
    assert key == "train.grad_clip" and "gradient_clipping=0.5" in why
    key, why = deepspeed_problem(_Accelerator({"zero_optimization": {"stage": 2}}), "cmcl", 4, 1, 1.0)
    assert key == "strategy.name" and "cmcl edits the gradients" in why
    key, why = deepspeed_problem(_Accelerator({}), "ewc", 4, 1, 1.0)
    assert key == "strategy.name" and "ewc computes its Fisher information" in why
    key, why = deepspeed_problem(_Accelerator({"bf16": {"enabled": True}}), "modx", 4, 1, 1.0)
    assert key == "train.precision"
    for name in ("zscl", "ctp", "cclip", "wiseft"):  # they read or edit the whole weights
        key, why = deepspeed_problem(_Accelerator({"zero_optimization": {"stage": 3}}), name, 4, 1, 1.0)
        assert key == "strategy.name" and why.startswith(name) and "ZeRO-3" in why
        assert deepspeed_problem(_Accelerator({"zero_optimization": {"stage": 2}}), name, 4, 1, 1.0) is None
    for name in ("finetune", "modx", "distill", "replay", "joint"):
        assert deepspeed_problem(_Accelerator({"zero_optimization": {"stage": 3}}), name, 4, 1, 1.0) is None


def test_weights_a_strategy_edits_at_a_phase_end_reach_zero_fp32_copy(tmp_path):
    """WiSE-FT interpolates the weights after phase a; ZeRO's optimiser keeps an fp32 copy
    that would undo the edit at phase b's first step unless modx copies it back."""
    args = ["strategy.name=wiseft", "strategy.replay.ratio=0", "strategy.align_initial=true"]  # edits after a
    ddp, ds = tmp_path / "ddp", tmp_path / "ds"
    ok(launch(ddp, [*replay_args(ddp), *RUN, *args], "ddp"))
    ok(launch(ds, [*replay_args(ds), *RUN, *args], "deepspeed"))
    assert_weights_close(final_weights(ds), final_weights(ddp))


def test_the_shipped_accelerate_config_runs_with_gradient_accumulation(tmp_path):
    """configs/accelerate/deepspeed_zero2.yaml (+ its JSON, "auto" values filled from
    modx's config) as a user launches it, here on 2 CPU processes with 2 micro-batches."""
    out = tmp_path / "run"
    args = [*replay_args(out), *RUN, "strategy.name=finetune", "strategy.replay.ratio=0", "train.grad_accum=2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "_train_helpers.py"), str(out), *args]
    ok(subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    assert len(json.loads((out / "losses.json").read_text())) == 2 * 6  # micro-batches of 2 phases x 3 steps
