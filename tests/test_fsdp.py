"""Sharded training (FSDP2, modx.train.fsdp) on CPU over gloo, 2 processes started by
`accelerate launch --use_fsdp --fsdp_version 2`, against DDP (`--multi_gpu`, gloo on CPU)
over the same global batches (tests/_train_helpers.py's fake stream)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_helpers import MICRO_MODEL, ROOT, digits_run_metrics  # noqa: E402

from modx.models import create_model  # noqa: E402
from modx.train.fsdp import ShardingError, requested  # noqa: E402
from modx.train.launch import LaunchError, check_distributed  # noqa: E402

SCRIPT = str(ROOT / "tests" / "_train_helpers.py")
FSDP = ["--use_fsdp", "--fsdp_version", "2"]
DDP = ["--multi_gpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, how: list[str], *args: str, n: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           SCRIPT, str(out), "train.workers=0", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # fmt: skip


def weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / name / "model.safetensors")


def assert_weights_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for k in want:
        a, b = want[k], got[k]
        if k.endswith("attn.in_proj_bias"):  # its key part has zero true gradient: AdamW steps on noise
            a, b = a[: a.shape[0] // 3], b[: b.shape[0] // 3]
        torch.testing.assert_close(b, a, rtol=1e-4, atol=atol, msg=k)


def assert_trains_alike(got: Path, want: Path) -> None:
    """Two runs of the fake stream (the same global batches): the same 8 micro-step losses
    (rel 1e-5), training moved the weights, and the phase-1 exports have the same keys and
    close weights."""
    loss_got = json.loads((got / "losses.json").read_text())
    loss_want = json.loads((want / "losses.json").read_text())
    assert len(loss_got) == len(loss_want) == 8
    assert loss_got == pytest.approx(loss_want, rel=1e-5, abs=1e-6)
    w_want = weights(want, "phase-1")
    assert any(not torch.equal(w_want[k], v) for k, v in weights(want, "initial").items())
    assert_weights_close(weights(got, "phase-1"), w_want)


def distributed(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["distributed"]


@pytest.mark.parametrize(
    "strategy",
    [["strategy.name=finetune"], ["strategy.name=modx", "strategy.replay.ratio=0"],
     ["strategy.name=ctp", "strategy.ctp_queue_size=12"]],  # momentum model sharded, followed on the shards
    ids=["finetune", "modx", "ctp"],
)
def test_fsdp_trains_like_ddp_and_holds_half_of_each_parameter(tmp_path, strategy):
    """2 FSDP processes and 2 DDP processes over the same global batches: the same losses
    and weights (float32 rounding) after two phases, Mod-X's KL against a sharded old model
    included; each process's checkpoint holds half of each sharded parameter; the summary
    records how each run was distributed. CTP: its momentum model sharded like the student
    and following it on the local shards, its queue of gathered features."""
    args = [*strategy, "train.grad_accum=2"]
    sharded, ddp = launch(tmp_path / "fsdp", FSDP, *args), launch(tmp_path / "ddp", DDP, *args)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert distributed(tmp_path / "fsdp") == {"type": "FSDP", "num_processes": 2}
    assert distributed(tmp_path / "ddp") == {"type": "MULTI_CPU", "num_processes": 2}
    assert_trains_alike(tmp_path / "fsdp", tmp_path / "ddp")

    state = tmp_path / "fsdp" / "checkpoints" / "state-00000004"
    assert not list(state.glob("*.bin")) and not list(state.glob("*.pkl"))  # no pickle
    for rank in (0, 1):
        with safe_open(str(state / f"shard_{rank}.safetensors"), framework="pt") as f:
            proj = f.get_tensor("/model/visual.proj")
            assert proj.shape == (16, 32)  # half of the (32, 32) matrix's rows
            assert f.get_tensor("/model/logit_scale").shape == ()  # 0-d: replicated
        shapes = json.loads((state / f"shard_{rank}.json").read_text())["shapes"]
        assert shapes["model/visual.proj"] == [32, 32]


SHARD_GRAD_OP = [*FSDP, "--fsdp_reshard_after_forward", "false"]
MORE = {  # the strategies that keep sharded state of their own or edit sharded weights or gradients
    "zscl": ["strategy.name=zscl", "strategy.zscl_we_every=1", "strategy.zscl_l2=100"],  # pull as large as CLIP
    "cclip": ["strategy.name=cclip"],
    "cmcl": ["strategy.name=cmcl", "strategy.cmcl_lambda_min=0.02", "strategy.cmcl_train=all"],
}


@pytest.mark.parametrize(
    "name, how",
    [*(pytest.param(n, FSDP, id=n) for n in MORE),
     *(pytest.param(n, SHARD_GRAD_OP, marks=pytest.mark.slow, id=f"{n}-shard_grad_op") for n in MORE)],
)
def test_fsdp_zscl_cclip_cmcl_train_like_ddp(tmp_path, name, how):
    """2 FSDP processes give DDP's losses and weights (float32 rounding), with gradient
    accumulation. ZSCL: the L2 pull's value summed over the shards and its gradient added to
    them, the initial model sharded, the weight ensemble on the local shards (held in the
    state as shards). C-CLIP: the adapters merged into the sharded weights and drawn anew
    whole (as DDP draws them) at the phase end, the predictor replicated; the exports hold
    plain weights. CMCL (every parameter trains): the heads' gradients projected whole, the
    statistics from a whole copy of the model."""
    args = [*MORE[name], "train.grad_accum=2"]
    sharded, ddp = launch(tmp_path / "fsdp", how, *args), launch(tmp_path / "ddp", DDP, *args)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert distributed(tmp_path / "fsdp") == {"type": "FSDP", "num_processes": 2}
    assert_trains_alike(tmp_path / "fsdp", tmp_path / "ddp")  # the same keys: C-CLIP's exports are plain
    if name == "zscl":
        state = tmp_path / "fsdp" / "checkpoints" / "state-00000002"  # phase a's end: W of phase b begun
        for rank in (0, 1):
            tree = json.loads((state / f"strategy_{rank}.json").read_text())["strategy"]
            assert tree["world_size"] == 2


@pytest.mark.parametrize("name", list(MORE))
def test_fsdp_zscl_cclip_cmcl_killed_run_resumes_exactly(tmp_path, name):
    """Killed (SIGKILL) mid-phase b, a sharded run resumes to the uninterrupted run's weights
    exactly: ZSCL's initial model read back by rows from the run's export, its weight
    ensemble from the local shards of the state; C-CLIP's adapters and predictor from the
    model state; CMCL's statistics (here as its authors train: only the heads, FSDP holding
    the frozen towers' parameters beside them)."""
    args = [*[a for a in MORE[name] if a != "strategy.cmcl_train=all"], "train.ckpt_every=1"]
    whole = launch(tmp_path / "whole", FSDP, *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "killed"
    killed = launch(run, FSDP, *args, env={"MODX_KILL_AT": "step:4"})
    assert killed.returncode != 0 and (run / "checkpoints" / "state-00000003").is_dir()
    assert not (run / "checkpoints" / "phase-1").exists()
    resumed = launch(run, FSDP, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    w_whole, w_resumed = weights(tmp_path / "whole", "phase-1"), weights(run, "phase-1")
    for k in w_whole:
        torch.testing.assert_close(w_resumed[k], w_whole[k], rtol=0, atol=1e-6, msg=k)
    losses = json.loads((tmp_path / "whole" / "losses.json").read_text())
    assert json.loads((run / "losses-resumed.json").read_text()) == pytest.approx(losses[3:], rel=1e-6)


@pytest.mark.parametrize("scale", [2.0**14, 2.0**17], ids=["steps_taken", "overflows_skipped"])
def test_fsdp_fp16_with_a_grad_scaler_trains_like_ddp(tmp_path, scale):
    """train.precision=fp16 with a GradScaler (a CPU run gets one here as a GPU run does:
    MODX_TEST_CPU_FP16) over sharded gradients gives DDP's losses, weights and scale.
    Initial scale 2^14: every step is taken, and ZSCL's L2 pull adds its gradient to the
    unscaled shards from the second step of a phase on. 2^17: steps overflow and are skipped
    on every process, the scale backs off. Under fp16 Adam moves the weights whose gradient
    is rounding noise by about lr either way, so a few elements (about 100 here) may differ
    beyond float32 tolerance; adding the pull to the scaled gradients moves 25 000."""
    args = [*MORE["zscl"], "train.precision=fp16"]
    env = {"MODX_TEST_CPU_FP16": str(scale)}
    sharded, ddp = launch(tmp_path / "fsdp", FSDP, *args, env=env), launch(tmp_path / "ddp", DDP, *args, env=env)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    loss_fsdp = json.loads((tmp_path / "fsdp" / "losses.json").read_text())
    loss_ddp = json.loads((tmp_path / "ddp" / "losses.json").read_text())
    assert loss_fsdp == pytest.approx(loss_ddp, rel=2e-4)
    w_fsdp, w_ddp = weights(tmp_path / "fsdp", "phase-1"), weights(tmp_path / "ddp", "phase-1")
    assert any(not torch.equal(w_ddp[k], v) for k, v in weights(tmp_path / "ddp", "initial").items())  # steps taken
    assert set(w_fsdp) == set(w_ddp)
    assert sum(int(((w_fsdp[k] - w_ddp[k]).abs() > 1e-5).sum()) for k in w_ddp) < 500
    state = "checkpoints/state-00000004"
    scale_ddp = torch.load(tmp_path / "ddp" / state / "scaler.pt", weights_only=True)["scale"]
    scale_fsdp = json.loads((tmp_path / "fsdp" / state / "scaler.json").read_text())["scale"]
    assert scale_fsdp == scale_ddp
    if scale == 2.0**14:
        assert scale_fsdp == 2.0**16  # 4 good steps: grown twice
    else:
        assert scale_fsdp < scale  # backed off


def test_fsdp_grad_scaler_skips_on_every_process_when_one_shard_overflows(tmp_path):
    """modx.train.fsdp.GradScaler on 2 processes: an inf in one process's shard of a gradient
    makes every process skip the step and back off (found_inf reduced over processes), with
    a replicated 0-d parameter beside the sharded ones; finite gradients are unscaled."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), str(ROOT / "tests" / "_fsdp_scaler.py"), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"scaler_{rank}.json").read_text())
        assert result["found_inf"] == 1.0 and result["scale_after"] == 512.0  # backed off from 1024
        assert result["weight_unchanged"]  # the step was skipped
        assert result["unscaled"] == pytest.approx(result["want"], rel=1e-6)  # the next, finite step


def test_fsdp_run_killed_resumes_exactly_also_on_another_number_of_processes(tmp_path):
    """Killed (SIGKILL) mid-phase b, the sharded run resumes from its sharded state to the
    uninterrupted run's weights: on 2 processes exactly, on 3 (uneven shards) to float
    rounding."""
    args = ["strategy.name=modx", "strategy.replay.ratio=0", "train.batch_size=12", "train.ckpt_every=1"]
    whole = launch(tmp_path / "whole", FSDP, *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    w_whole = weights(tmp_path / "whole", "phase-1")
    for n in (2, 3):
        run = tmp_path / f"killed{n}"
        killed = launch(run, FSDP, *args, env={"MODX_KILL_AT": "step:4"})
        assert killed.returncode != 0 and (run / "checkpoints" / "state-00000003").is_dir()
        assert not (run / "checkpoints" / "phase-1").exists()
        resumed = launch(run, FSDP, *args, "--resume", n=n)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming" in resumed.stdout + resumed.stderr
        w_resumed = weights(run, "phase-1")
        if n == 2:
            for k in w_whole:
                torch.testing.assert_close(w_resumed[k], w_whole[k], rtol=0, atol=1e-6, msg=k)
        else:
            assert_weights_close(w_resumed, w_whole)
        assert distributed(run) == {"type": "FSDP", "num_processes": n}


def test_fsdp_run_evaluates_on_every_process_like_one_process(tmp_path):
    """train_modx.py sharded over 2 processes on the built-in data: every process embeds its
    share of the eval set (with a whole copy of the sharded model); the initial model's
    metrics match one process's, the trained model's are close; summary.json says how each
    run was distributed."""
    runs = {name: digits_run_metrics(tmp_path, name, how, _free_port())
            for name, how in (("one", ["--num_processes", "1"]), ("fsdp", [*FSDP, "--num_processes", "2"]))}
    assert distributed(tmp_path / "one") == {"type": "NO", "num_processes": 1}
    assert distributed(tmp_path / "fsdp") == {"type": "FSDP", "num_processes": 2}
    assert set(runs["fsdp"]) == {-1, 0}
    assert runs["fsdp"][-1] == pytest.approx(runs["one"][-1], rel=1e-4, abs=1e-4)
    assert runs["fsdp"][0]["n_images"] == runs["one"][0]["n_images"] > 0


def test_fsdp_export_of_an_open_clip_model_loads_in_open_clip_and_create_model(tmp_path):
    """A plain open_clip architecture trained sharded exports whole weights that open_clip
    (local-dir:) and modx's create_model read back, the same features either way."""
    plain = {k: {kk: vv for kk, vv in v.items() if kk != "backbone"} if isinstance(v, dict) else v
             for k, v in MICRO_MODEL.items()}  # fmt: skip
    plain["vision_cfg"]["pool_type"] = "tok"  # open_clip's default pooling (modx's pooled last block)
    arch = tmp_path / "micro-open-clip.json"
    arch.write_text(json.dumps(plain))
    done = launch(tmp_path / "run", FSDP, f"model.arch={arch}", "strategy.name=finetune")
    assert done.returncode == 0, done.stderr[-3000:]
    export = tmp_path / "run" / "checkpoints" / "phase-1"
    assert (export / "open_clip_config.json").is_file()
    ours = create_model(str(export))[0].eval()
    theirs = open_clip.create_model(f"local-dir:{export}", output_dict=True).eval()
    assert type(theirs) is open_clip.model.CLIP
    saved = load_file(export / "model.safetensors")
    assert set(saved) == set(theirs.state_dict())
    assert any(not torch.equal(saved[k], v) for k, v in weights(tmp_path / "run", "initial").items())
    image = torch.randn(2, 3, 32, 32)
    text = torch.randint(1, 100, (2, 16))
    with torch.no_grad():
        a, b = ours(image, text), theirs(image, text)
    torch.testing.assert_close(a["image_features"], b["image_features"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["text_features"], b["text_features"], rtol=1e-5, atol=1e-6)


def test_a_process_of_several_that_is_not_distributed_stops_before_writing(tmp_path, monkeypatch):
    """WORLD_SIZE > 1 while Accelerate runs one process: one line, nothing written."""
    check_distributed(2, {"WORLD_SIZE": "2"})  # distributed: fine
    check_distributed(1, {})  # one plain process: fine
    with pytest.raises(LaunchError, match="WORLD_SIZE=2") as err:
        check_distributed(1, {"WORLD_SIZE": "2"})
    assert "\n" not in str(err.value)

    from _train_helpers import fake_stream_overrides

    import modx.train.loop as loop
    from modx.config import load_config

    class Alone:  # what Accelerate gives a process it does not see as distributed
        num_processes, process_index, is_main_process = 1, 0, True

        def __init__(self, *args, **kwargs):
            pass

    out = tmp_path / "run"
    cfg = load_config(None, fake_stream_overrides(out))
    monkeypatch.setattr(loop, "Accelerator", Alone)
    monkeypatch.setenv("WORLD_SIZE", "2")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(LaunchError):
        loop.run(cfg)
    assert sorted(p.name for p in out.iterdir()) == before  # no config, checkpoint or log


def test_fsdp_launch_options_are_checked_and_a_refusal_is_one_line(tmp_path):
    assert requested({}) is None
    assert requested({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "FULL_SHARD"
    assert requested({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                      "FSDP_RESHARD_AFTER_FORWARD": "false"}) == "SHARD_GRAD_OP"  # fmt: skip
    with pytest.raises(ShardingError, match="--fsdp_version 2"):
        requested({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    from _train_helpers import fake_stream_overrides

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}  # as a launch sets
    done = subprocess.run([sys.executable, str(ROOT / "train_modx.py"), *fake_stream_overrides(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_modx.py: FSDP version 1 was asked for")  # no traceback
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fsdp_ewc_trains_like_one_process_with_the_global_batch(tmp_path):
    """EWC sharded: its Fisher (of the global batch's gradients) and anchors as local shards,
    the penalty's gradient added to the shards: 2 FSDP processes give one process's losses
    and weights (the penalty is on in phase b, its gradient as large as the loss's)."""
    args = ["strategy.name=ewc", "strategy.ewc_batches=2", "strategy.ewc_lambda=1e6", "train.workers=0"]
    one = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "one"), *args], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    sharded = launch(tmp_path / "fsdp", FSDP, *args)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    loss_one = json.loads((tmp_path / "one" / "losses.json").read_text())
    loss_fsdp = json.loads((tmp_path / "fsdp" / "losses.json").read_text())
    assert loss_fsdp == pytest.approx(loss_one, rel=1e-5, abs=1e-6)
    assert_weights_close(weights(tmp_path / "fsdp", "phase-1"), weights(tmp_path / "one", "phase-1"))


@pytest.mark.slow
def test_shard_grad_op_trains_like_full_shard(tmp_path):
    """SHARD_GRAD_OP (parameters kept whole between forward and backward) computes what
    FULL_SHARD computes."""
    args = ["strategy.name=modx", "strategy.replay.ratio=0"]
    full = launch(tmp_path / "full", FSDP, *args)
    grad_op = launch(tmp_path / "op", [*FSDP, "--fsdp_reshard_after_forward", "false"], *args)
    assert full.returncode == 0 and grad_op.returncode == 0, grad_op.stderr[-3000:]
    a = json.loads((tmp_path / "full" / "losses.json").read_text())
    b = json.loads((tmp_path / "op" / "losses.json").read_text())
    assert a == pytest.approx(b, rel=1e-6)
    assert_weights_close(weights(tmp_path / "op", "phase-1"), weights(tmp_path / "full", "phase-1"), atol=1e-6)
