"""ZSCL and CTP (modx.strategies.zscl / .ctp): their losses against naive float64 loops
(value and gradient), and each strategy's hooks on a tiny CLIP-shaped model."""

from __future__ import annotations

import copy
import math
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from modx.config import ConfigError, StrategyConfig, load_config
from modx.losses import clip_loss
from modx.strategies import build_strategy
from modx.strategies.base import Context
from modx.strategies.ctp import momentum_contrast, topology_kl
from modx.strategies.zscl import l2_to, zscl_distillation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_strategies import TinyClip, batch  # noqa: E402


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def unit(n: int, d: int, seed: int, grad: bool = False) -> torch.Tensor:
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    return x.requires_grad_(grad)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(a[k] * b[k] for k in range(len(a)))


def normalized(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their norm (the losses normalise their inputs: the gradient sees it)."""
    return torch.stack([row / torch.sqrt(dot(row, row)) for row in x])


def log_softmax(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    top = max(float(x.detach()) for x in xs)
    log_z = top + torch.log(sum(torch.exp(x - top) for x in xs))
    return [x - log_z for x in xs]


# ----------------------------------------------------------------------------- ZSCL losses


def naive_zscl(img, img0, txt0, scale, temp):
    """T^2 mean over rows of -sum_j softmax(teacher / T)_j log softmax(student / T)_j, one
    scalar at a time in float64: image rows over the texts, then text rows over the images."""
    n = len(img)
    img, img0, txt0 = normalized(img), normalized(img0), normalized(txt0)
    image_rows = text_rows = 0.0
    for i in range(n):
        p = [math.exp(v) for v in log_softmax([scale * dot(img0[i], txt0[j]) / temp for j in range(n)])]
        log_q = log_softmax([scale * dot(img[i], txt0[j]) / temp for j in range(n)])
        image_rows = image_rows - sum(p[j] * log_q[j] for j in range(n))
    for j in range(n):
        p = [math.exp(v) for v in log_softmax([scale * dot(txt0[j], img0[i]) / temp for i in range(n)])]
        log_q = log_softmax([scale * dot(txt0[j], img[i]) / temp for i in range(n)])
        text_rows = text_rows - sum(p[i] * log_q[i] for i in range(n))
    return image_rows * temp**2 / n, text_rows * temp**2 / n


def test_zscl_distillation_matches_a_naive_loop_in_value_and_gradient():
    img, img0, txt0 = unit(6, 4, 0, grad=True), unit(6, 4, 1), unit(6, 4, 2)
    l_img, l_txt = zscl_distillation(img, img0, txt0, scale=torch.tensor(10.0), temperature=2.0)
    ref = img.detach().double().requires_grad_(True)
    want_img, want_txt = naive_zscl(ref, img0.double(), txt0.double(), 10.0, 2.0)
    assert l_img.item() == pytest.approx(want_img.item(), rel=1e-5)
    assert l_txt.item() == pytest.approx(want_txt.item(), rel=1e-5)
    assert l_img.item() != pytest.approx(l_txt.item(), rel=1e-3)  # two directions, two values
    (grad,) = torch.autograd.grad(l_img + 0.5 * l_txt, img)
    (want,) = torch.autograd.grad(want_img + 0.5 * want_txt, ref)
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-6)


def test_zscl_distillation_split_over_ranks_averages_to_the_global_value_and_gradient():
    img, img0, txt0 = unit(8, 4, 3, grad=True), unit(8, 4, 4), unit(8, 4, 5)
    whole = sum(zscl_distillation(img, img0, txt0, 10.0))
    (grad_whole,) = torch.autograd.grad(whole, img)
    shares = [sum(zscl_distillation(img, img0, txt0, 10.0, rank=r, world=2)) for r in range(2)]
    assert (shares[0] + shares[1]).item() / 2 == pytest.approx(whole.item(), rel=1e-6)
    assert shares[0].item() != pytest.approx(shares[1].item(), rel=1e-3)
    # data-parallel training averages the ranks' gradients (the gather's backward sums them)
    (grad_split,) = torch.autograd.grad((shares[0] + shares[1]) / 2, img)
    torch.testing.assert_close(grad_split, grad_whole, rtol=1e-5, atol=1e-7)


def test_l2_to_sums_the_squared_distance_to_the_anchor():
    model, anchor = TinyClip(0), TinyClip(1)
    want = sum(((p.double() - q.double()) ** 2).sum() for p, q in zip(model.parameters(), anchor.parameters()))
    assert l2_to(model, anchor).item() == pytest.approx(want.item(), rel=1e-6)
    assert l2_to(model, copy.deepcopy(model)).item() == 0.0


# ----------------------------------------------------------------------------- CTP losses


def test_momentum_contrast_matches_a_naive_loop_in_value_and_gradient():
    rows, keys, queue = unit(3, 4, 0, grad=True), unit(6, 4, 1), unit(5, 4, 2)
    got = momentum_contrast(rows, keys, queue, temperature=0.07, offset=3)  # rank 1 of 2, b = 3
    ref = rows.detach().double().requires_grad_(True)
    columns, unit_rows = torch.cat([keys, queue]).double(), normalized(ref)
    want = sum(-log_softmax([dot(unit_rows[i], c) / 0.07 for c in columns])[3 + i] for i in range(3)) / 3
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(got, rows)
    (want_grad,) = torch.autograd.grad(want, ref)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("same_modal", [False, True])
def test_topology_kl_matches_a_naive_loop_in_value_and_gradient(same_modal):
    rows, columns = unit(3, 4, 0, grad=True), unit(6, 4, 1, grad=True)
    old_rows, old_columns = unit(3, 4, 2), unit(6, 4, 3)
    got = topology_kl(rows, columns, old_rows, old_columns, temperature=0.5, offset=3, same_modal=same_modal)
    r, c = rows.detach().double().requires_grad_(True), columns.detach().double().requires_grad_(True)
    r_unit, c_unit = normalized(r), normalized(c)
    total = 0.0
    for i in range(3):
        js = [j for j in range(6) if not (same_modal and j == 3 + i)]
        log_p = log_softmax([dot(old_rows[i].double(), old_columns[j].double()) / 0.5 for j in js])
        log_q = log_softmax([dot(r_unit[i], c_unit[j]) / 0.5 for j in js])
        total = total + sum(torch.exp(a) * (a - b) for a, b in zip(log_p, log_q))
    want = total / 3
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    grads = torch.autograd.grad(got, [rows, columns])
    want_grads = torch.autograd.grad(want, [r, c])
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)


def test_topology_kl_same_modal_leaves_out_each_rows_own_column():
    """A sample's similarity to itself is 1 / tau in both models: kept, it would take almost
    all of every row's probability and the same-modal KL would all but vanish."""
    new, old = unit(4, 4, 0), unit(4, 4, 1)
    same = topology_kl(new, new, old, old, 0.07, same_modal=True).item()
    kept = topology_kl(new, new, old, old, 0.07, same_modal=False).item()
    assert same > 1.0 and kept < same / 10


def test_losses_stay_float32_under_bf16_autocast():
    """bf16 features (a bf16 forward) give the float32 losses of their float32 copies."""
    a, b, c = (unit(8, 16, seed).bfloat16() for seed in (0, 1, 2))
    cases = [
        lambda x, y, z: zscl_distillation(x, y, z, 30.0)[0],
        lambda x, y, z: zscl_distillation(x, y, z, 30.0)[1],
        lambda x, y, z: momentum_contrast(x[:4], y, z, 0.07),
        lambda x, y, z: topology_kl(x[:4], y, z[:4], z, 0.07, same_modal=True),
    ]
    for loss in cases:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loss(a, b, c)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(loss(a.float(), b.float(), c.float()).item(), rel=1e-6)


# ----------------------------------------------------------------------------- ZSCL strategy


def zscl(accelerator, **kwargs):
    cfg = StrategyConfig(name="zscl", reference="unused", **kwargs)
    strategy = build_strategy(cfg, accelerator)
    reference = batch(100, n=4)
    strategy.reference_batch = lambda: reference
    return strategy, reference


def test_zscl_distils_from_the_initial_model_never_the_old_one(accelerator):
    strategy, ref = zscl(accelerator, zscl_we_every=0, zscl_l2=0.0)
    model, b = TinyClip(0), batch(1)
    strategy.begin_phase(0, model, None)  # the initial model is taken here
    with torch.no_grad():
        model.visual.weight.add_(0.3)  # training moved the model
    old = TinyClip(7)
    strategy.begin_phase(1, model, old)
    loss, logs = strategy.loss(model, b, old)
    initial = TinyClip(0)(ref["image"], ref["text"])
    student = model(ref["image"], ref["text"])["image_features"]
    l_img, l_txt = zscl_distillation(student, initial["image_features"], initial["text_features"],
                                     TinyClip(0).logit_scale.exp())
    assert logs["loss_zscl_image"].item() == pytest.approx(l_img.item(), rel=1e-6) and l_img.item() > 0
    assert logs["loss_zscl_text"].item() == pytest.approx(l_txt.item(), rel=1e-6)
    out = model(b["image"], b["text"])
    clip = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
    assert loss.item() == pytest.approx(clip.item() + l_img.item() + l_txt.item(), rel=1e-6)
    assert strategy.old_samples == strategy.extra_samples == 4  # the reference batch, twice


def test_zscl_distillation_trains_the_image_tower_only(accelerator):
    """As the authors' code: the student's logits use the initial model's text features."""
    strategy, _ = zscl(accelerator, zscl_we_every=0, zscl_l2=0.0)
    model, b = TinyClip(0), batch(2)
    strategy.begin_phase(0, model, None)
    with torch.no_grad():
        model.visual.weight.add_(0.3)
    strategy.loss(model, b, None)[0].backward()
    text_grad, visual_grad = model.text.weight.grad.clone(), model.visual.weight.grad.clone()
    model.zero_grad()
    out = model(b["image"], b["text"])
    clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    torch.testing.assert_close(text_grad, model.text.weight.grad)
    assert not torch.allclose(visual_grad, model.visual.weight.grad)


def test_zscl_l2_pulls_to_the_phase_start(accelerator):
    strategy, _ = zscl(accelerator, zscl_we_every=0, zscl_l2=0.5)
    model = TinyClip(0)
    strategy.begin_phase(0, model, None)
    assert strategy.loss(model, batch(3), None)[1]["loss_l2"].item() == 0.0  # phase 0: the initial model
    old = TinyClip(4)
    strategy.begin_phase(1, model, old)
    loss, logs = strategy.loss(model, batch(3), old)
    assert logs["loss_l2"].item() == pytest.approx(l2_to(model, old).item(), rel=1e-6) and logs["loss_l2"] > 0
    rest = logs["loss_clip"] + logs["loss_zscl_image"] + logs["loss_zscl_text"]
    assert loss.item() == pytest.approx((rest + 0.5 * logs["loss_l2"]).item(), rel=1e-6)


def test_zscl_weight_ensemble_averages_the_start_and_every_nth_step(accelerator):
    """The loop: loss, backward, before_step, optimiser step (here: new weights). With
    zscl_we_every=2 the phase ends on the mean of the start and steps 1, 3 and 5."""
    strategy, _ = zscl(accelerator, zscl_we_every=2, zscl_l2=0.0)
    model = TinyClip(0)
    strategy.begin_phase(0, model, None)
    members = [copy.deepcopy(model.state_dict())]
    for step in range(1, 6):
        strategy.loss(model, batch(step), None)
        strategy.before_step(model)
        model.load_state_dict(TinyClip(10 + step).state_dict())  # the optimiser step
        if step % 2 == 1:
            members.append(copy.deepcopy(model.state_dict()))
    strategy.end_phase(0, model, None, [])
    assert strategy.merges == 3
    for name, value in model.state_dict().items():
        want = torch.stack([m[name] for m in members]).mean(dim=0)
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=name)


def test_zscl_resumes_its_initial_model_from_the_run_export_and_its_average_from_the_state(accelerator, tmp_path):
    strategy, _ = zscl(accelerator, zscl_we_every=1, zscl_l2=0.0)
    model = TinyClip(0)
    strategy.begin_phase(0, model, None)
    strategy.before_step(model)
    model.load_state_dict(TinyClip(1).state_dict())
    strategy.loss(model, batch(1), None)  # merges the step's weights
    state = copy.deepcopy(strategy.state_dict())

    export = tmp_path / "checkpoints" / "initial"
    export.mkdir(parents=True)
    save_file(TinyClip(0).state_dict(), str(export / "model.safetensors"))
    resumed, _ = zscl(accelerator, zscl_we_every=1, zscl_l2=0.0)
    resumed.context = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(output_dir=str(tmp_path))))
    resumed.load_state_dict(state)
    resumed.begin_phase(0, model, None)  # the model holds trained weights now
    for name, value in resumed.initial.state_dict().items():
        assert torch.equal(value, TinyClip(0).state_dict()[name]), name
    assert resumed.merges == strategy.merges == 1
    for name, value in strategy.average.items():
        assert torch.equal(resumed.average[name], value), name


def test_zscl_from_scratch_trains_phase_0_plainly_and_keeps_the_model_it_ends_with(accelerator, tmp_path):
    """Without initial weights (Context.align_initial False) phase 0 is fine-tuning (the CLIP
    loss alone, no reference batch, no weight ensemble) and the initial model ZSCL distils
    from is the model after phase 0; a resume reads it from the phase-0 export. modx-bench
    shares that phase with the other strategies."""
    strategy, ref = zscl(accelerator, zscl_we_every=1, zscl_l2=0.5)
    read = []
    strategy.reference_batch = lambda: read.append(1) or ref
    strategy.context = SimpleNamespace(align_initial=False, config=SimpleNamespace(
        train=SimpleNamespace(output_dir=str(tmp_path))))
    model, b = TinyClip(0), batch(1)
    strategy.begin_phase(0, model, None)
    loss, logs = strategy.loss(model, b, None)
    out = model(b["image"], b["text"])
    assert loss.item() == clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).item()
    assert set(logs) == {"loss_clip"} and not read and strategy.initial is None
    strategy.before_step(model)
    model.load_state_dict(TinyClip(3).state_dict())  # phase 0 trained the model
    strategy.end_phase(0, model, None, [])
    assert torch.equal(model.visual.weight, TinyClip(3).visual.weight)  # no weight ensemble in phase 0
    old = copy.deepcopy(model).requires_grad_(False)
    strategy.begin_phase(1, model, old)
    with torch.no_grad():
        model.visual.weight.add_(0.3)  # phase 1 moves the model
    loss, logs = strategy.loss(model, b, old)
    teacher = TinyClip(3)(ref["image"], ref["text"])
    student = model(ref["image"], ref["text"])["image_features"]
    l_img, _ = zscl_distillation(student, teacher["image_features"], teacher["text_features"],
                                 TinyClip(3).logit_scale.exp())
    assert read and l_img.item() > 0
    assert logs["loss_zscl_image"].item() == pytest.approx(l_img.item(), rel=1e-6)
    for name, value in strategy.initial.state_dict().items():
        assert torch.equal(value, TinyClip(3).state_dict()[name]), name

    export = tmp_path / "checkpoints" / "phase-0"
    export.mkdir(parents=True)
    save_file(TinyClip(3).state_dict(), str(export / "model.safetensors"))
    resumed, _ = zscl(accelerator, zscl_we_every=1, zscl_l2=0.5)
    resumed.context = strategy.context
    resumed.load_state_dict({})  # a fork of the shared phase 0: fine-tuning's (empty) state
    resumed.begin_phase(1, model, old)
    for name, value in resumed.initial.state_dict().items():
        assert torch.equal(value, TinyClip(3).state_dict()[name]), name
    from modx.strategies.zscl import ZSCL

    assert ZSCL.plain_phases(strategy.cfg, align_initial=False) == 1
    assert ZSCL.plain_phases(strategy.cfg, align_initial=True) == 0


def context(cfg, world: int = 1) -> Context:
    return Context(cfg, None, None, None, rank=0, world_size=world, device=torch.device("cpu"))


def test_zscl_needs_reference_shards_that_exist_and_hold_samples(accelerator, tmp_path):
    base = ["stream.phases=[{name: a, builtin: digits, steps: 2}]", "strategy.name=zscl"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base)
    assert err.value.key == "strategy.reference"
    cfg = load_config(None, [*base, f"strategy.reference={tmp_path}/ref-{{000000..000001}}.tar"])
    with pytest.raises(ConfigError) as err:
        build_strategy(cfg.strategy, accelerator).bind(context(cfg))
    assert err.value.key == "strategy.reference"
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    cfg = load_config(None, [*base, f"strategy.reference={empty}", "train.workers=0"])
    strategy = build_strategy(cfg.strategy, accelerator)
    strategy.bind(context(cfg))
    with pytest.raises(ConfigError) as err:
        strategy.reference_batch()
    assert err.value.key == "strategy.reference" and "no reference batch" in str(err.value)
    cfg = load_config(None, [*base, f"strategy.reference={empty}", "strategy.zscl_batch=9"])
    with pytest.raises(ConfigError) as err:
        build_strategy(cfg.strategy, accelerator).bind(context(cfg, world=2))
    assert err.value.key == "strategy.zscl_batch"


# ----------------------------------------------------------------------------- CTP strategy


def test_ctp_first_phase_is_clip_plus_momentum_contrast_and_fills_the_queue(accelerator):
    strategy = build_strategy(StrategyConfig(name="ctp", ctp_queue_size=10), accelerator)
    model, b = TinyClip(0), batch(1)  # 6 samples
    strategy.begin_phase(0, model, None)
    queue_img, queue_txt = strategy.random_queue(8, torch.device("cpu"))
    loss, logs = strategy.loss(model, b, None)
    out = model(b["image"], b["text"])
    img, txt = out["image_features"], out["text_features"]
    contrast = (momentum_contrast(img, txt, queue_txt, 0.07) + momentum_contrast(txt, img, queue_img, 0.07)) / 2
    clip = clip_loss(img, txt, out["logit_scale"])
    assert logs["loss_momentum"].item() == pytest.approx(contrast.item(), rel=1e-6)
    assert loss.item() == pytest.approx(clip.item() + contrast.item(), rel=1e-6)
    assert "loss_topology_cross" not in logs and strategy.old_samples == 6
    torch.testing.assert_close(strategy.queue_image[:6], img.detach())
    torch.testing.assert_close(strategy.queue_text[6:], queue_txt[6:])
    strategy.loss(model, b, None)  # 6 more: rows 6..9, then 0..1 (the oldest)
    assert strategy.ptr == 2
    torch.testing.assert_close(strategy.queue_text[[6, 7, 8, 9, 0, 1]], txt.detach())
    torch.testing.assert_close(strategy.queue_text[2:6], txt.detach()[2:6])


def test_ctp_momentum_model_follows_the_model_then_the_model_and_old_model(accelerator):
    cfg = StrategyConfig(name="ctp", ctp_momentum=0.9, ctp_compatible_momentum=0.6)
    strategy = build_strategy(cfg, accelerator)
    model, b = TinyClip(0), batch(2)
    strategy.begin_phase(0, model, None)
    start = copy.deepcopy(model.state_dict())
    strategy.loss(model, b, None)
    strategy.before_step(model)
    model.load_state_dict(TinyClip(1).state_dict())  # the optimiser step
    strategy.loss(model, b, None)
    for name, value in strategy.momentum.named_parameters():
        torch.testing.assert_close(value, 0.9 * start[name] + 0.1 * model.state_dict()[name], msg=name)

    old = copy.deepcopy(model).requires_grad_(False)
    strategy.begin_phase(1, model, old)  # a copy of the model at the phase start
    for name, value in strategy.momentum.named_parameters():
        assert torch.equal(value, model.state_dict()[name]), name
    strategy.before_step(model)
    model.load_state_dict(TinyClip(2).state_dict())
    strategy.loss(model, b, old)
    for name, value in strategy.momentum.named_parameters():
        want = 0.6 * old.state_dict()[name] + 0.2 * model.state_dict()[name] + 0.2 * old.state_dict()[name]
        torch.testing.assert_close(value, want, msg=name)


def test_ctp_topology_terms_vanish_when_the_model_is_the_old_model(accelerator):
    model, b = TinyClip(0), batch(3)
    strategy = build_strategy(StrategyConfig(name="ctp"), accelerator)
    strategy.begin_phase(1, model, copy.deepcopy(model))
    _, logs = strategy.loss(model, b, copy.deepcopy(model))
    assert logs["loss_topology_cross"].item() == pytest.approx(0.0, abs=1e-6)
    assert logs["loss_topology_same"].item() == pytest.approx(0.0, abs=1e-6)
    old = TinyClip(5)
    loss, logs = strategy.loss(model, b, old)
    assert logs["loss_topology_cross"] > 0 and logs["loss_topology_same"] > 0
    parts = logs["loss_clip"] + logs["loss_momentum"] + logs["loss_topology_cross"] + logs["loss_topology_same"]
    assert loss.item() == pytest.approx(parts.item(), rel=1e-6)
    out, ref = model(b["image"], b["text"]), old(b["image"], b["text"])
    img, txt, img_o, txt_o = out["image_features"], out["text_features"], ref["image_features"], ref["text_features"]
    cross = (topology_kl(img, txt, img_o, txt_o, 0.07) + topology_kl(txt, img, txt_o, img_o, 0.07)) / 2
    assert logs["loss_topology_cross"].item() == pytest.approx(cross.item(), rel=1e-6)
    assert strategy.old_samples == 4 * 6  # momentum and old model, twice (6 samples each)


def test_ctp_resumes_its_momentum_model_and_queue_from_the_state(accelerator):
    strategy = build_strategy(StrategyConfig(name="ctp", ctp_queue_size=16), accelerator)
    model, b = TinyClip(0), batch(4)
    strategy.begin_phase(0, model, None)
    strategy.loss(model, b, None)
    strategy.before_step(model)
    model.load_state_dict(TinyClip(1).state_dict())
    state = copy.deepcopy(strategy.state_dict())  # the step's EMA still due
    resumed = build_strategy(StrategyConfig(name="ctp", ctp_queue_size=16), accelerator)
    resumed.load_state_dict(state)
    resumed.begin_phase(0, model, None)
    losses = [s.loss(model, b, None)[0].item() for s in (strategy, resumed)]
    assert losses[0] == losses[1]
    for (name, a), (_, c) in zip(strategy.momentum.named_parameters(), resumed.momentum.named_parameters()):
        assert torch.equal(a, c), name
    assert torch.equal(strategy.queue_image, resumed.queue_image) and strategy.ptr == resumed.ptr == 12
    resumed.begin_phase(1, model, None)  # another phase: a fresh copy of the model
    for name, value in resumed.momentum.named_parameters():
        assert torch.equal(value, model.state_dict()[name]), name


@pytest.mark.parametrize(
    "override, key",
    [
        ("strategy.ctp_queue_size=4", "strategy.ctp_queue_size"),  # under one global batch (8)
        ("strategy.ctp_momentum=1.0", "strategy.ctp_momentum"),
        ("strategy.ctp_compatible_momentum=-0.1", "strategy.ctp_compatible_momentum"),
        ("strategy.ctp_temperature=0", "strategy.ctp_temperature"),
        ("strategy.zscl_temperature=0", "strategy.zscl_temperature"),
        ("strategy.zscl_we_every=-1", "strategy.zscl_we_every"),
        ("strategy.zscl_batch=0", "strategy.zscl_batch"),
    ],
)
def test_bad_zscl_and_ctp_values_name_the_key(override, key):
    base = ["stream.phases=[{name: a, builtin: digits, steps: 2}]", "train.batch_size=8", "strategy.name=ctp",
            "strategy.reference=x.tar"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, override])
    assert err.value.key == key
