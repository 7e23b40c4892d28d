"""modx.train: the Accelerate loop end to end on tiny setups (CPU, seconds each)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modx.config import load_config
from modx.eval.continual import RANDOM_START, zeroshot_retention
from modx.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _train_helpers import ROOT, fake_stream_overrides, install_fake_stream, tiny_overrides  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run() builds its own Accelerator; forget the previous one's singleton state."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def weights(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / name / "model.safetensors")


def assert_weights_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    """Weights of two runs that differ only in float rounding."""
    for k in want:
        a, b = want[k], got[k]
        if k.endswith("attn.in_proj_bias"):
            # The key bias has zero true gradient (softmax is shift invariant): AdamW turns
            # its rounding noise into +-lr steps, so only the query and value parts compare.
            d = a.shape[0] // 3
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=atol, msg=k)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    "extra",
    [
        ["strategy.name=finetune"],
        ["strategy.name=modx"],
        ["strategy.name=modx", "strategy.replay.ratio=0"],
        ["strategy.name=distill"],
        ["strategy.name=ewc", "strategy.ewc_batches=2"],
        ["strategy.name=replay"],
        ["strategy.name=wiseft"],
        ["strategy.name=joint"],
        ["strategy.name=modx", "strategy.replay.ratio=0.25", "train.grad_accum=2"],
        ["strategy.name=zscl"],
        ["strategy.name=zscl", "strategy.replay.ratio=0.25", "strategy.zscl_we_every=1"],
        ["strategy.name=ctp"],
        ["strategy.name=ctp", "strategy.replay.ratio=0.25", "train.grad_accum=2"],
        ["strategy.name=cclip"],
        ["strategy.name=cclip", "strategy.cclip_lora=false"],
        ["strategy.name=cclip", "strategy.replay.ratio=0.25"],
        ["strategy.name=cmcl"],
        ["strategy.name=cmcl", "strategy.cmcl_train=all"],
        ["strategy.name=cmcl", "strategy.replay.ratio=0.25", "train.grad_accum=2"],
    ],
    ids=lambda e: "+".join(x.split("=")[1] for x in e),
)
def test_each_strategy_trains_a_few_steps(tmp_path, monkeypatch, extra):
    from modx.train import run

    losses: list[float] = []
    install_fake_stream(losses, monkeypatch.setattr)
    run_dir = run(load_config(None, fake_stream_overrides(tmp_path / "run", *extra)))
    accum = 2 if "train.grad_accum=2" in extra else 1
    assert len(losses) == 4 * accum and all(torch.isfinite(torch.tensor(losses)))
    phases = 1 if "strategy.name=joint" in extra else 2
    assert (run_dir / f"checkpoints/phase-{phases - 1}/model.safetensors").is_file()
    assert not (run_dir / f"checkpoints/phase-{phases}").exists()
    final = weights(run_dir, f"phase-{phases - 1}")
    assert any(not torch.equal(final[k], v) for k, v in weights(run_dir, "initial").items())


@pytest.mark.parametrize("strategy", ["cclip", "cmcl"])
def test_cclip_and_cmcl_train_what_their_authors_train(tmp_path, monkeypatch, strategy):
    """The exports hold plain weights (create_model loads them). C-CLIP: the backbones change
    only through their merged adapters (an attention's in_proj and out_proj, which carry
    none, keep their values), the patch embedding is frozen, the rest trains. CMCL (heads):
    only the two projection heads change."""
    from modx.train import run

    install_fake_stream([], monkeypatch.setattr)
    run_dir = run(load_config(None, fake_stream_overrides(tmp_path / "run", f"strategy.name={strategy}")))
    initial, final = weights(run_dir, "initial"), weights(run_dir, "phase-1")
    assert set(final) == set(initial) == set(create_model(str(run_dir / "checkpoints" / "phase-1"))[0].state_dict())
    changed = {k for k in initial if not torch.equal(initial[k], final[k])}
    if strategy == "cmcl":
        assert changed == {"visual.proj", "text.text_projection"}
    else:
        assert {"visual.transformer.resblocks.0.mlp.c_fc.weight", "text.transformer.resblocks.0.mlp.c_proj.weight",
                "visual.proj", "text.token_embedding.weight"} <= changed
        assert not any("conv1" in k or "attn" in k or "ln_1" in k for k in changed)
        assert not any(k.endswith("c_fc.bias") for k in changed)  # LoRA adapts weights, the base bias is frozen


def test_strategies_are_bound_once_and_see_the_gradients_before_each_step(tmp_path, monkeypatch):
    """Strategy.bind gets the run's context; Strategy.before_step runs once per optimiser
    step with the accumulated gradients, before the step: zeroing them there (and no weight
    decay) leaves the weights where they started."""
    import modx.train.loop as loop
    from modx.train import run

    install_fake_stream([], monkeypatch.setattr)
    real_build, seen = loop.build_strategy, {"bind": [], "step": 0}

    def build(cfg, accelerator, **kwargs):
        strategy = real_build(cfg, accelerator, **kwargs)
        strategy.bind = lambda context: seen["bind"].append(context)

        def before_step(model):
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
            for g in grads:
                g.zero_()
            seen["step"] += 1

        strategy.before_step = before_step
        return strategy

    monkeypatch.setattr(loop, "build_strategy", build)
    args = fake_stream_overrides(tmp_path / "run", "train.grad_accum=2", "train.weight_decay=0")
    run_dir = run(load_config(None, args))
    (context,) = seen["bind"]
    assert context.tokenizer is not None and context.world_size == 1 and context.config.train.grad_accum == 2
    assert seen["step"] == 4  # optimiser steps, not micro-batches
    final = weights(run_dir, "phase-1")
    assert all(torch.equal(final[k], v) for k, v in weights(run_dir, "initial").items())


def test_prepare_model_runs_before_the_optimiser_and_exports_leave_its_aids_out(tmp_path, monkeypatch):
    """Strategy.prepare_model gets the bare model once, before the optimiser is built and
    before bind: a module it adds trains (it is in the optimiser and in DDP), and when marked
    `modx_export = False` the phase exports leave it out (create_model loads them)."""
    import modx.train.loop as loop
    from modx.train import run

    install_fake_stream([], monkeypatch.setattr)
    real_build, seen = loop.build_strategy, []
    aid = torch.nn.Linear(1, 1, bias=False)
    aid.modx_export = False
    start = aid.weight.detach().clone()

    def build(cfg, accelerator, **kwargs):
        strategy = real_build(cfg, accelerator, **kwargs)
        real_loss, real_bind = strategy.loss, strategy.bind

        def prepare_model(model):
            assert not seen and not hasattr(model, "module")  # once, the bare model
            seen.append("prepare")
            model.aid = aid
            return model

        def loss(model, batch, old_model):
            value, terms = real_loss(model, batch, old_model)
            return value + (accelerator.unwrap_model(model).aid.weight - 5).pow(2).sum(), terms

        strategy.prepare_model, strategy.loss = prepare_model, loss
        strategy.bind = lambda context: (seen.append("bind"), real_bind(context))
        return strategy

    monkeypatch.setattr(loop, "build_strategy", build)
    run_dir = run(load_config(None, fake_stream_overrides(tmp_path / "run", "strategy.name=finetune")))
    assert seen == ["prepare", "bind"]
    assert (aid.weight - 5).abs().item() < (start - 5).abs().item()  # trained toward 5
    assert not any(k.startswith("aid") for k in weights(run_dir, "phase-1"))
    create_model(str(run_dir / "checkpoints" / "phase-1"))


def test_exported_phase_model_is_usable_by_create_model(tmp_path, monkeypatch):
    from modx.train import run

    install_fake_stream([], monkeypatch.setattr)
    run_dir = run(load_config(None, fake_stream_overrides(tmp_path / "run")))
    model = create_model(str(run_dir / "checkpoints" / "phase-1"))[0]
    state = weights(run_dir, "phase-1")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.logit_scale.item() <= torch.log(torch.tensor(100.0)).item() + 1e-6


def test_trimmed_text_padding_trains_like_the_padded_text(tmp_path, monkeypatch):
    """train.trim_padding cuts each text batch to its longest caption (exact for this
    causal tower): the same losses and weights as the padded batches, with replay mixing
    fresh and buffered captions of other widths."""
    from modx.train import run

    widths: list[int] = []
    runs = {}
    for trim in (True, False):
        losses: list[float] = []
        with monkeypatch.context() as patch:
            install_fake_stream(losses, patch.setattr)
            import modx.train.loop as loop

            class Recording(loop.TimedBatches):
                def __next__(self):
                    batch = super().__next__()
                    widths.append(batch["text"].shape[1])
                    return batch

            patch.setattr(loop, "TimedBatches", Recording)
            args = fake_stream_overrides(tmp_path / str(trim), "strategy.name=modx", f"train.trim_padding={trim}")
            run_dir = run(load_config(None, args))
        runs[trim] = losses, weights(run_dir, "phase-1")
    assert max(widths[:4]) < 16 and set(widths[4:]) == {16}  # "w1 w2 w3" + start/end of 16 columns
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    # other sequence lengths round differently, and AdamW turns rounding noise in the
    # near-zero gradients of the one text block's value projection into steps of up to lr
    assert_weights_close(runs[True][1], runs[False][1], atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "strategy",
    [["strategy.name=modx", "strategy.replay.ratio=0"], ["strategy.name=zscl"], ["strategy.name=ctp"],
     ["strategy.name=cclip", "strategy.cclip_lora_dropout=0"],  # dropout masks depend on the split
     ["strategy.name=cmcl", "strategy.cmcl_lambda_min=0.02"]],
    ids=lambda e: e[0].split("=")[1],
)
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, strategy):
    """Global-batch semantics: 2 x 4 samples on 2 processes == 8 samples on 1 process,
    for the CLIP loss (phase a) and the Mod-X KL over gathered features (phase b); for
    ZSCL's distillation over a gathered reference batch (and its weight ensemble); for
    CTP's momentum contrast (gathered keys, one queue) and topology KL; for C-CLIP's CKC
    (predictor over the gathered batch, adapters merged and renewed at the phase end) and
    CMCL's projection (statistics reduced over processes)."""
    script = str(ROOT / "tests" / "_train_helpers.py")
    args = [*strategy, "train.grad_accum=2", "train.workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, script, str(tmp_path / "one"), *args],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    two = subprocess.run([*launch, script, str(tmp_path / "two"), *args],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    loss_one = json.loads((tmp_path / "one" / "losses.json").read_text())
    loss_two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert len(loss_one) == len(loss_two) == 8
    assert loss_one == pytest.approx(loss_two, rel=1e-5, abs=1e-6)
    w_one, w_two = weights(tmp_path / "one", "phase-1"), weights(tmp_path / "two", "phase-1")
    assert any(not torch.equal(w_one[k], v) for k, v in weights(tmp_path / "one", "initial").items())
    assert_weights_close(w_two, w_one)


@pytest.mark.parametrize(
    "extra",
    [
        {"strategy.name": "modx", "strategy.replay.ratio": 0.25},
        {"strategy.name": "zscl", "strategy.zscl_we_every": 2},  # a merge due across the checkpoint
        {"strategy.name": "ctp", "strategy.ctp_queue_size": 12},  # the queue wraps; an EMA step due
        {"strategy.name": "cclip"},  # adapters and predictor in the model's state, renewed at phase ends
        {"strategy.name": "cmcl", "strategy.cmcl_lambda_min": 0.02},  # the statistics in its state
    ],
    ids=lambda e: e["strategy.name"],
)
def test_killed_run_resumes_to_the_same_weights(tmp_path, data_root, monkeypatch, extra):
    """Kill the run mid-phase b (right after its first checkpoint), resume: the final
    weights, optimiser path, replay buffer and old model match an uninterrupted run; so do
    ZSCL's initial model, weight ensemble and reference stream, and CTP's momentum model
    and queue."""
    import modx.train.loop as loop
    from modx.data.builtin import ensure_builtin
    from modx.train import run

    extra = {**extra, "strategy.reference": ensure_builtin("digits", root=str(data_root))[0]}  # zscl's
    whole = run(load_config(None, tiny_overrides(tmp_path / "whole", data_root, **extra)))

    real_save, calls = loop.save_state, []

    def save_then_die(*args, **kwargs):
        path = real_save(*args, **kwargs)
        calls.append(path)
        if len(calls) == 3:  # step-2 state, end of phase a, then step 4 = phase b step 1
            raise KeyboardInterrupt("killed")
        return path

    monkeypatch.setattr(loop, "save_state", save_then_die)
    cfg = load_config(None, tiny_overrides(tmp_path / "killed", data_root, **extra))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert calls[-1].name == "state-00000004"
    monkeypatch.setattr(loop, "save_state", real_save)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = run(cfg, resume="latest")

    w_whole, w_resumed = weights(whole, "phase-1"), weights(resumed, "phase-1")
    for k in w_whole:
        torch.testing.assert_close(w_resumed[k], w_whole[k], rtol=0, atol=1e-6, msg=k)
    rows = records(resumed / "results.jsonl")
    assert sorted({(r["kind"], r["phase"], r["eval_set"]) for r in rows}) == sorted((r["kind"], r["phase"], r["eval_set"]) for r in rows)
    assert {r["phase"] for r in rows} == {-1, 0, 1}
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["n_phases"] == 2 and summary["forgetting"] is not None


def test_run_directory_holds_config_results_disorder_and_summary(tmp_path, data_root):
    from modx.train import run

    run_dir = run(load_config(None, tiny_overrides(tmp_path / "run", data_root, **{"eval.report": True})))
    assert load_config(run_dir / "config.yaml").train.output_dir == str(run_dir)
    rows = records(run_dir / "results.jsonl")
    assert [(r["kind"], r["phase"], r["eval_index"]) for r in rows] == [
        (kind, p, j) for p in (-1, 0, 1) for kind in ("retrieval", "val") for j in (0, 1)]  # the phases' val sets too
    assert rows[0]["phase_name"] == "initial" and "i2t_R@1" in rows[0]["metrics"]
    assert rows[0]["metrics"]["n_images"] > 0 and rows[0]["metrics"]["n_texts"] >= rows[0]["metrics"]["n_images"]
    disorder = records(run_dir / "disorder.jsonl")
    assert {(d["phase"], d["reference"]) for d in disorder} == {(0, "previous"), (0, "initial"), (1, "previous"), (1, "initial")}
    assert "rotation_image_deg" in disorder[0]["metrics"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["matrix"]) == 2 and len(summary["initial"]) == 2
    assert summary["distributed"] == {"type": "NO", "num_processes": 1}  # how it ran
    assert (run_dir / "report.md").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "state-00000006"


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    """`accelerate launch train_modx.py` with no config: the built-in demo (minutes)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_modx.py"),
           f"train.output_dir={tmp_path / 'demo'}", f"stream.data_root={tmp_path / 'data'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recall matrix" in proc.stdout and "forgetting" in proc.stdout
    assert "reference (finetune)" in proc.stdout  # fine-tuning's shipped result printed beside
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["n_phases"] == 3 and summary["strategy"] == "modx"
    # the demo learns its first domain: chance is about 3 (mean of R@1/5/10 over ~180 digits);
    # the 100-step phase sits on a cliff (fine-tuning gives 36.3 / 33.4 / 58.6 for seeds 0 / 1 / 2)
    assert summary["learned_recall"][0] >= 25
    assert summary["last_recall"][0] >= summary["reference"]["first_last"] + 5  # and keeps it


@pytest.mark.parametrize(
    "start, setting, aligned",
    [("export", "auto", True), ("export", "false", False), ("random", "auto", False), ("random", "true", True)],
)
def test_align_initial_gives_phase_0_the_initial_model_as_old_model(tmp_path, monkeypatch, start, setting, aligned):
    """As the authors' script: a pretrained start is protected from the first phase on."""
    from _train_helpers import micro_model

    import modx.train.loop as loop
    from modx.models import export_model
    from modx.train import run

    arch = micro_model(tmp_path)
    if start == "export":  # a model whose weights are loaded: an exported directory
        export_model(create_model(arch)[0], tmp_path / "start")
        arch = str(tmp_path / "start")
    install_fake_stream([], monkeypatch.setattr)
    recording_build, calls = loop.build_strategy, []

    def build(cfg, accelerator, **kwargs):
        strategy = recording_build(cfg, accelerator, **kwargs)
        inner = strategy.loss

        def loss(model, batch, old_model):
            value, terms = inner(model, batch, old_model)
            calls.append((old_model is not None, None if "loss_kl" not in terms else float(terms["loss_kl"])))
            return value, terms

        strategy.loss = loss
        return strategy

    monkeypatch.setattr(loop, "build_strategy", build)
    overrides = fake_stream_overrides(tmp_path / "run", f"model.arch={arch}", "strategy.name=modx",
                                      f"strategy.align_initial={setting}")
    run(load_config(None, overrides))
    assert [has_old for has_old, _ in calls] == [aligned, aligned, True, True]
    if aligned:  # the first step's model is the old model: nothing to align yet
        assert calls[0][1] == pytest.approx(0.0, abs=1e-6)


def test_zero_shot_held_out_and_in_phase_evaluations(tmp_path, data_root):
    from modx.train import run

    extra = {"eval.zeroshot": "[{builtin: digits}]", "eval.retrieval": "[{name: shapes-test, builtin: shapes}]",
             "eval.every": 2, "eval.probe": 20}  # fmt: skip
    run_dir = run(load_config(None, tiny_overrides(tmp_path / "run", data_root, **extra)))
    rows = records(run_dir / "results.jsonl")
    ends = [(r["kind"], r["phase"], r["eval_set"]) for r in rows if not r.get("in_phase")]
    assert ends == [(k, p, s) for p in (-1, 0, 1) for k, s in
                    (("retrieval", "a"), ("retrieval", "b"), ("retrieval", "shapes-test"), ("val", "a"), ("val", "b"),
                     ("zeroshot", "digits-zs"))]  # fmt: skip
    inside = sorted({(r["phase"], r["step"]) for r in rows if r.get("in_phase")})
    assert inside == [(0, 2), (1, 4)]  # every 2 steps, not at a phase end (steps 3 and 6)
    assert not any(r["kind"] == "val" for r in rows if r.get("in_phase"))  # val sets at phase ends only
    val = next(r for r in rows if r["kind"] == "val")
    test = next(r for r in rows if r["kind"] == "retrieval")
    assert val["metrics"]["n_images"] != test["metrics"]["n_images"]  # digits' val split, not its test split
    assert all(bool(r.get("held_out")) == (r["eval_set"] == "shapes-test") for r in rows if r["kind"] == "retrieval")
    zs = next(r for r in rows if r["kind"] == "zeroshot")
    assert set(zs["metrics"]) >= {"acc1", "acc5", "mean_per_class_recall"} and zs["metrics"]["n_classes"] == 10
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_sets"] == ["a", "b"] and len(summary["matrix"][0]) == 2  # held-out set apart
    assert summary["held_out"]["eval_sets"] == ["shapes-test"] and len(summary["held_out"]["matrix"]) == 2
    assert summary["val"]["eval_sets"] == ["a", "b"] and len(summary["val"]["matrix"]) == 2
    assert summary["val"]["average_recall"] == pytest.approx(sum(summary["val"]["matrix"][-1]) / 2)
    z = summary["zeroshot"]
    assert z["eval_sets"] == ["digits-zs"] and len(z["matrix"]) == 2
    assert z["omitted"] == RANDOM_START and summary["zeroshot_retention"] is None  # a random initial model
    assert all(r.get("random_init") for r in rows if r["kind"] == "zeroshot" and r["phase"] == -1)
    from_a = zeroshot_retention(rows, reference="a")
    assert from_a["retention"][-1][0] == pytest.approx(100 * z["matrix"][-1][0] / z["matrix"][0][0])
    disorder = records(run_dir / "disorder.jsonl")
    assert {d["eval_set"] for d in disorder} == {"a", "b"} and {d["phase"] for d in disorder} == {0, 1}


def test_resume_keeps_the_in_phase_records_before_the_resume_step(tmp_path):
    from modx.train.evaluate import Evaluator

    ev = Evaluator(load_config(None, fake_stream_overrides(tmp_path)), [], None, None, tmp_path, torch.device("cpu"))
    rows = [{"phase": 0, "step": 3}, {"phase": 1, "step": 4, "in_phase": True}, {"phase": 1, "step": 6, "in_phase": True},
            {"phase": 1, "step": 8}, {"phase": 2, "step": 9, "in_phase": True}]  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev.forget_from(1, global_step=5)
    assert records(tmp_path / "results.jsonl") == rows[:2]


def test_two_processes_evaluate_like_one(tmp_path, data_root):
    """Every process embeds its share of the eval, val and zero-shot sets: the initial model's
    metrics (the same weights on any number of processes) match one process's."""
    from modx.data.benchmark import ensure_builtin_zeroshot

    ensure_builtin_zeroshot("digits", str(data_root))  # built once, before the processes start
    extra = {"eval.zeroshot": "[{builtin: digits}]", "stream.phases": "[{name: a, builtin: digits, steps: 1}]",
             "eval.probe": 20}  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(_free_port())]  # fmt: skip
    out = {}
    for n in (1, 2):
        flags = ["--multi_gpu", "--num_processes", "2"] if n == 2 else ["--num_processes", "1"]
        overrides = tiny_overrides(tmp_path / f"run{n}", data_root, **extra)
        done = subprocess.run([*launch, *flags, str(ROOT / "train_modx.py"), *overrides],
                              capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        out[n] = {(r["kind"], r["eval_set"]): r["metrics"] for r in records(tmp_path / f"run{n}" / "results.jsonl") if r["phase"] == -1}
    assert set(out[1]) == set(out[2]) == {("retrieval", "a"), ("val", "a"), ("zeroshot", "digits-zs")}
    for key, metrics in out[1].items():
        assert out[2][key] == pytest.approx(metrics, rel=1e-4, abs=1e-4), key
