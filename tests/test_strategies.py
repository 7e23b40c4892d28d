"""modx.strategies: each strategy's loss and phase hooks on a tiny CLIP-shaped model."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from modx.config import ReplayConfig, StrategyConfig
from modx.data.replay import view_digest
from modx.losses import clip_loss, modx_kl
from modx.strategies import STRATEGIES, build_strategy, replay_ratio


class TinyClip(nn.Module):
    """open_clip-shaped: forward(image, text) -> normalised features + exp'd logit scale."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.visual = nn.Linear(12, 8)
        self.text = nn.EmbeddingBag(50, 8)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": F.normalize(self.visual(image.flatten(1)), dim=-1),
            "text_features": F.normalize(self.text(text), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def batch(seed: int, n: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 2, 2, generator=g), "text": torch.randint(50, (n, 4), generator=g),
            "key": [str(i) for i in range(n)]}


def mark(b: dict, keys: list[str]) -> None:
    """Flag the rows named "replay" as replayed (what the loader's batches carry)."""
    b["replayed"] = [k == "replay" for k in keys]


def test_registry_has_every_strategy():
    assert set(STRATEGIES) == {"finetune", "modx", "distill", "ewc", "replay", "wiseft", "joint", "zscl", "ctp",
                               "cclip", "cmcl"}


def test_finetune_is_the_clip_loss(accelerator):
    model, b = TinyClip(), batch(0)
    loss, logs = build_strategy(StrategyConfig(name="finetune"), accelerator).loss(model, b, None)
    out = model(b["image"], b["text"])
    assert loss.item() == pytest.approx(clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).item())
    assert logs["loss_clip"] == pytest.approx(loss.item())


def test_modx_first_phase_is_plain_clip_then_adds_alpha_kl(accelerator):
    model, old, b = TinyClip(0), TinyClip(1).eval(), batch(1)
    strategy = build_strategy(StrategyConfig(name="modx", alpha=20.0, kl_on="batch"), accelerator)
    first, logs = strategy.loss(model, b, None)
    assert "loss_kl" not in logs
    loss, logs = strategy.loss(model, b, old)
    out, out_old = model(b["image"], b["text"]), old(b["image"], b["text"])
    kl = modx_kl(out["image_features"], out["text_features"], out_old["image_features"], out_old["text_features"])
    assert logs["loss_kl"] == pytest.approx(kl.item())
    assert loss.item() == pytest.approx(first.item() + 20.0 * kl.item(), rel=1e-5)


@pytest.mark.parametrize(("name", "kl_on", "cache"), [("modx", "batch", False), ("modx", "replay", False),
                                                     ("modx", "replay", True), ("distill", "batch", False)])
def test_modx_gradient_never_reaches_the_old_model(accelerator, name, kl_on, cache):
    """The old model is left trainable here (requires_grad on, as if nobody froze it): the
    strategy itself keeps the gradient out of it, on every path to the old features (whole
    batch, replayed rows, teacher cache), while the KL's gradient reaches the new model."""
    model, old, b = TinyClip(0), TinyClip(1).eval(), batch(2)
    assert all(p.requires_grad for p in old.parameters())
    mark(b, ["0", "replay", "2", "replay", "replay", "5"])
    b["view"] = [view_digest(b["image"][j], b["text"][j]) if f else 0 for j, f in enumerate(b["replayed"])]
    strategy = build_strategy(StrategyConfig(name=name, kl_on=kl_on, teacher_cache=cache), accelerator)
    strategy.begin_phase(1, model, old)
    loss, logs = strategy.loss(model, b, old)
    assert logs["loss_kl"] > 0
    loss.backward()
    assert all(p.grad is None for p in old.parameters())
    with_kl = model.visual.weight.grad.clone()
    model.zero_grad()
    strategy.loss(model, b, None)[0].backward()  # the CLIP loss alone
    assert not torch.allclose(model.visual.weight.grad, with_kl)


def test_distill_aligns_every_row_unlike_modx(accelerator):
    model, old, b = TinyClip(0), TinyClip(1).eval(), batch(3, n=12)  # a random old model is often wrong
    modx_loss = build_strategy(StrategyConfig(name="modx", kl_on="batch"), accelerator).loss(model, b, old)[1]["loss_kl"]
    distill = build_strategy(StrategyConfig(name="distill", cognition_align=True), accelerator)
    distill_loss = distill.loss(model, b, old)[1]["loss_kl"]
    out, out_old = model(b["image"], b["text"]), old(b["image"], b["text"])
    full = modx_kl(out["image_features"], out["text_features"], out_old["image_features"],
                   out_old["text_features"], cognition_align=False)
    assert distill_loss == pytest.approx(full.item())
    assert distill_loss > modx_loss


def naive_fisher(model: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """EWC's diagonal Fisher by hand: per batch the squared gradient of the symmetric CLIP
    cross-entropy, averaged over the batches, then divided by its mean over every entry."""
    squares = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for b in batches:
        twin = copy.deepcopy(model).double()
        out = twin(b["image"].double(), b["text"])
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T  # (B, B)
        target = torch.arange(len(logits))
        ((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2).backward()
        for n, p in twin.named_parameters():
            squares[n] += p.grad**2 / len(batches)
    mean = torch.cat([f.flatten() for f in squares.values()]).mean()
    return {n: f / mean for n, f in squares.items()}


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it(accelerator):
    model = TinyClip()
    strategy = build_strategy(StrategyConfig(name="ewc", ewc_lambda=10.0, ewc_batches=3), accelerator)
    strategy.end_phase(0, model, None, iter([batch(i) for i in range(5)]))
    want = naive_fisher(model, [batch(i) for i in range(3)])  # the first ewc_batches batches
    assert set(strategy.fisher) == set(want)
    for n, f in want.items():
        torch.testing.assert_close(strategy.fisher[n].double(), f, rtol=1e-4, atol=1e-6, msg=n)
    assert strategy.penalty(model).item() == pytest.approx(0.0, abs=1e-12)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.visual.weight.add_(0.1)
    loss, logs = strategy.loss(model, batch(9), None)
    moved = sum((want[n] * (p.detach().double() - anchor[n].double()) ** 2).sum() for n, p in model.named_parameters())
    assert logs["loss_ewc"] == pytest.approx(moved.item() / sum(p.numel() for p in model.parameters()), rel=1e-4)
    assert loss.item() == pytest.approx(logs["loss_clip"] + 5.0 * logs["loss_ewc"], rel=1e-5)
    restored = build_strategy(StrategyConfig(name="ewc"), accelerator)
    restored.load_state_dict(copy.deepcopy(strategy.state_dict()))
    assert restored.penalty(model).item() == pytest.approx(strategy.penalty(model).item())


def test_wiseft_interpolates_with_the_old_model(accelerator):
    model, old = TinyClip(0), TinyClip(1)
    new_weight = model.visual.weight.detach().clone()
    strategy = build_strategy(StrategyConfig(name="wiseft", wiseft_alpha=0.25), accelerator)
    strategy.end_phase(0, model, None, [])  # first phase: no old model, unchanged
    assert torch.equal(model.visual.weight, new_weight)
    strategy.end_phase(1, model, old, [])
    assert torch.allclose(model.visual.weight, 0.75 * old.visual.weight + 0.25 * new_weight)


def naive_clip(out: dict) -> float:
    """The symmetric CLIP cross-entropy of one batch, in float64."""
    logits = out["logit_scale"].double() * out["image_features"].double() @ out["text_features"].double().T
    target = torch.arange(len(logits))
    return ((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2).item()


def naive_paper_kl(img, txt, img_old, txt_old, align: bool = True) -> float:
    """PAPERS.md section 1 row by row in float64: tau 1 (raw cosines), each row of S_o (i2t)
    and of S_o^T (t2i) a softmax over the whole row, rows the old model gets wrong dropped
    when `align`, KL(old || new) summed over rows, the two directions averaged."""
    def unit(x):
        return F.normalize(x.detach().double(), dim=-1)

    s_new, s_old = unit(img) @ unit(txt).T, unit(img_old) @ unit(txt_old).T  # (B, B)
    total = 0.0
    for new, old in ((s_new, s_old), (s_new.T, s_old.T)):
        for i in range(len(new)):
            if align and int(old[i].argmax()) != i:
                continue
            p, q = old[i].softmax(0), new[i].softmax(0)
            total += float((p * (p / q).log()).sum())
    return total / 2


def test_modx_defaults_are_the_papers_kl_20_over_the_batch_and_5_over_a_replay_buffer(accelerator):
    """The defaults, checked by the loss they give against PAPERS.md section 1 written out by
    hand: nothing replayed (a phase start), the default modx adds 20 x the KL over the whole
    batch (the authors' alpha); with replayed samples, 5 x the KL over them alone
    (docs/strategies.md); strategy.replay.ratio=0 (the paper) stays at 20 x the whole batch
    whatever the rows; distill, 20 x the KL of every row, none dropped."""
    model, old, b = TinyClip(0), TinyClip(1).eval(), batch(7, n=10)
    new = model(b["image"], b["text"])
    with torch.no_grad():
        ref = old(b["image"], b["text"])
    feats = (new["image_features"], new["text_features"], ref["image_features"], ref["text_features"])
    clip, whole = naive_clip(new), naive_paper_kl(*feats)
    every_row = naive_paper_kl(*feats, align=False)
    assert every_row > whole > 0  # the random old model gets some rows wrong: alignment matters
    default = build_strategy(StrategyConfig(name="modx"), accelerator)
    assert default.loss(model, b, old)[0].item() == pytest.approx(clip + 20 * whole, rel=1e-5)
    mark(b, ["0", "replay", "2", "replay", "4", "replay", "replay", "7", "8", "9"])
    keep = torch.tensor(b["replayed"])
    replayed = naive_paper_kl(*(f[keep] for f in feats))
    assert replayed != pytest.approx(whole, rel=1e-3)
    assert default.loss(model, b, old)[0].item() == pytest.approx(clip + 5 * replayed, rel=1e-5)
    paper = StrategyConfig(name="modx")
    paper.replay.ratio = 0.0
    assert build_strategy(paper, accelerator).loss(model, b, old)[0].item() == pytest.approx(clip + 20 * whole, rel=1e-5)
    distill = build_strategy(StrategyConfig(name="distill"), accelerator)
    assert distill.loss(model, b, old)[0].item() == pytest.approx(clip + 20 * every_row, rel=1e-5)


def test_replay_ratio_is_the_key_or_the_documented_default_of_every_strategy():
    """strategy.replay.ratio unset: 0.25 for modx, 0.5 for replay, 0 for every other
    registered strategy (config.py's ReplayConfig and docs/strategies.md); set, the key wins."""
    documented = {"modx": 0.25, "replay": 0.5}
    for name in STRATEGIES:
        assert replay_ratio(StrategyConfig(name=name)) == documented.get(name, 0.0), name
        cfg = StrategyConfig(name=name)
        cfg.replay.ratio = 0.125
        assert replay_ratio(cfg) == 0.125, name


def test_modx_kl_on_replay_aligns_only_the_replayed_samples(accelerator):
    model, old, b = TinyClip(0), TinyClip(1).eval(), batch(3)
    mark(b, ["0", "1", "replay", "3", "replay", "replay"])
    cfg = StrategyConfig(name="modx", alpha=1.0, cognition_align=False, kl_on="replay")
    loss, logs = build_strategy(cfg, accelerator).loss(model, b, old)
    new, ref = model(b["image"], b["text"]), old(b["image"], b["text"])
    keep = torch.tensor(b["replayed"])
    want = modx_kl(new["image_features"][keep], new["text_features"][keep], ref["image_features"][keep],
                   ref["text_features"][keep], cognition_align=False)
    assert logs["loss_kl"] == pytest.approx(want.item(), rel=1e-6) and want.item() > 0
    mark(b, ["0", "1", "2", "3", "4", "replay"])  # fewer than two replayed samples: nothing to align
    assert build_strategy(cfg, accelerator).loss(model, b, old)[1]["loss_kl"] == 0.0


def test_modx_auto_aligns_the_replayed_samples_or_the_whole_batch_before_any_replay(accelerator):
    model, old, b = TinyClip(0), TinyClip(1).eval(), batch(4)
    auto = build_strategy(StrategyConfig(name="modx", cognition_align=False), accelerator)
    whole = build_strategy(StrategyConfig(name="modx", cognition_align=False, kl_on="batch"), accelerator)
    only = build_strategy(StrategyConfig(name="modx", cognition_align=False, kl_on="replay"), accelerator)
    assert auto.loss(model, b, old)[1]["loss_kl"] == whole.loss(model, b, old)[1]["loss_kl"] > 0  # nothing replayed
    mark(b, ["0", "replay", "2", "replay", "replay", "5"])
    assert auto.loss(model, b, old)[1]["loss_kl"] == only.loss(model, b, old)[1]["loss_kl"]
    assert only.loss(model, b, old)[1]["loss_kl"] != whole.loss(model, b, old)[1]["loss_kl"]


def test_modx_loss_weighs_the_replay_kl_by_its_default_alpha(accelerator):
    model, old, b = TinyClip(0), TinyClip(1).eval(), batch(5)
    mark(b, ["0", "replay", "2", "replay", "replay", "5"])
    loss, logs = build_strategy(StrategyConfig(name="modx", cognition_align=False), accelerator).loss(model, b, old)
    assert loss.item() == pytest.approx(float(logs["loss_clip"]) + 5.0 * float(logs["loss_kl"]), rel=1e-6)


def test_modx_runs_the_old_model_on_the_replayed_samples_alone_when_its_kl_is_over_them(accelerator):
    class Counting(TinyClip):
        def forward(self, image, text):
            self.seen.append(len(image))
            return super().forward(image, text)

    model, b = TinyClip(0), batch(6, n=8)
    mark(b, ["0", "1", "2", "3", "4", "replay", "replay", "replay"])
    for kl_on, seen in [("replay", [3]), ("auto", [3]), ("batch", [8])]:
        old = Counting(1).eval()
        old.seen = []
        loss, logs = build_strategy(StrategyConfig(name="modx", kl_on=kl_on), accelerator).loss(model, b, old)
        assert old.seen == seen, kl_on
        if kl_on != "batch":  # the same KL as with the whole batch through the old model
            keep = torch.tensor(b["replayed"])
            new, ref = model(b["image"], b["text"]), TinyClip(1)(b["image"], b["text"])
            want = modx_kl(new["image_features"][keep], new["text_features"][keep], ref["image_features"][keep],
                           ref["text_features"][keep])
            assert logs["loss_kl"] == pytest.approx(want.item(), rel=1e-6) and want.item() > 0
    old.seen = []
    mark(b, ["0", "1", "2", "3", "4", "5", "6", "replay"])  # one replayed sample: no pair, no old forward
    build_strategy(StrategyConfig(name="modx", kl_on="replay"), accelerator).loss(model, b, old)
    assert old.seen == []


def test_modx_teacher_cache_is_keyed_by_the_view_never_by_the_sample(accelerator):
    """A replayed view seen before reuses its old features; the same sample augmented anew
    (another image tensor) is a new view with features of its own: cached and uncached
    losses agree, and the old model runs once per distinct view per phase."""

    class Counting(TinyClip):
        def forward(self, image, text):
            self.seen.append(len(image))
            return super().forward(image, text)

    model = TinyClip(0)
    earlier = batch(1, n=2)  # two samples of an earlier phase
    views = {}
    batches = []
    for i, aug in enumerate([0.0, 0.0, 0.5, 0.0]):  # the third batch re-augments them
        b = batch(10 + i, n=4)
        b["image"][2:] = earlier["image"] + aug
        b["text"][2:] = earlier["text"]
        mark(b, ["0", "1", "replay", "replay"])
        b["view"] = [view_digest(b["image"][j], b["text"][j]) if f else 0 for j, f in enumerate(b["replayed"])]
        views[i] = b["view"][2:]
        batches.append(b)
    assert views[0] == views[1] == views[3] != views[2]
    results = {}
    for cache in (True, False):
        old = Counting(1).eval()
        old.seen = []
        strategy = build_strategy(StrategyConfig(name="modx", teacher_cache=cache), accelerator)
        strategy.begin_phase(1, model, old)
        results[cache] = [float(strategy.loss(model, b, old)[1]["loss_kl"]) for b in batches]
        assert old.seen == ([2, 2] if cache else [2, 2, 2, 2])  # views 0 and 2 computed once each
        assert strategy.old_samples == sum(old.seen)
        if cache:
            strategy.begin_phase(2, model, old)  # a new phase, a new old model: computed again
            old.seen = []
            strategy.loss(model, batches[0], old)
            assert old.seen == [2]
    assert results[True] == pytest.approx(results[False], rel=1e-6)
    assert results[True][2] != pytest.approx(results[True][0], rel=1e-3)  # the new view's own features
    small = build_strategy(StrategyConfig(name="modx", teacher_cache=True, replay=ReplayConfig(size=3)), accelerator)
    small.begin_phase(1, model, old)
    assert [float(small.loss(model, b, old)[1]["loss_kl"]) for b in batches] == pytest.approx(results[False], rel=1e-6)
    assert len(small.teacher) == 3  # bounded by strategy.replay.size


# ----------------------------------------------------------------------------- C-CLIP


def micro(seed: int = 0, arch: str | None = None) -> nn.Module:
    """A real micro CLIP (open_clip transformer towers; width = embed_dim = 32) or a bundled one."""
    from modx.models import create_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _train_helpers import MICRO_MODEL

    torch.manual_seed(seed)
    return create_model(arch or MICRO_MODEL)[0]


def clip_batch(seed: int, n: int = 6, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, size, size, generator=g), "text": torch.randint(1, 400, (n, 16), generator=g)}


def naive_ckc(p: list[torch.Tensor], z: list[torch.Tensor], s: torch.Tensor) -> torch.Tensor:
    """CKC term by term: rows normalised one by one, -log softmax of each row over every
    column, both directions."""
    def unit(v):
        return v / torch.sqrt((v * v).sum())

    p, z = [unit(v) for v in p], [unit(v) for v in z]
    total = 0.0
    for a, b in ((p, z), (z, p)):
        for i in range(len(a)):
            logits = [s * (a[i] * b[j]).sum() for j in range(len(b))]
            total = total - (logits[i] - torch.logsumexp(torch.stack(logits), 0)) / len(a)
    return total / 2


def test_ckc_matches_a_naive_loop_value_and_gradient():
    from modx.strategies.cclip import ckc_loss

    g = torch.Generator().manual_seed(0)
    p_img, p_txt, z_img, z_txt = (torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
                                  for _ in range(4))
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    got = ckc_loss(p_img, p_txt, z_img, z_txt, s)
    want = naive_ckc([*p_img, *p_txt], [*z_img, *z_txt], s)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(want.item(), rel=1e-12)
    inputs = (p_img, p_txt, z_img, z_txt, s)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", [None, "modx-tiny-s4d"])
def test_cclip_lora_trains_adapters_in_the_backbones_and_merging_keeps_the_function(accelerator, arch):
    """prepare_model: adapters on the backbones' Linear layers (not on an attention's
    out_proj, which nn.MultiheadAttention reads itself), their base weights frozen, outside
    the backbones all but the patch embedding trains, a predictor. end_phase folds the update
    into the same base parameters, starts new adapters (B = 0) and a new predictor."""
    from peft.tuners.lora import LoraLayer

    model = micro(0, arch)
    strategy = build_strategy(StrategyConfig(name="cclip"), accelerator)
    assert strategy.prepare_model(model) is model
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted and all(".transformer." in f".{n}" and "out_proj" not in n for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} >= {"c_fc", "c_proj"}
    if arch:
        assert any(n.endswith("ssm.output.0") for n in adapted)  # the SSM blocks' output Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainable if ".transformer." in n)
    assert {"visual.proj", "text.text_projection", "text.token_embedding.weight", "logit_scale"} <= trainable
    assert "visual.conv1.weight" not in trainable and any(n.startswith("cclip_predictor.") for n in trainable)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    b = clip_batch(0)
    model.eval()
    with torch.no_grad():
        before = model(b["image"], b["text"])
    ids = {n: id(p) for n, p in model.named_parameters()}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    predictor = model.cclip_predictor.net[0].weight.detach().clone()
    twin = copy.deepcopy(model)
    rng = torch.get_rng_state()
    strategy.end_phase(0, model, None, [])
    assert torch.equal(torch.get_rng_state(), rng)  # drawn from a seed of (train.seed, phase)
    torch.rand(100)  # whatever the global RNG went through: the same new adapters and predictor
    strategy.end_phase(0, twin, None, [])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    with torch.no_grad():
        after = model(b["image"], b["text"])
    torch.testing.assert_close(after["image_features"], before["image_features"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after["text_features"], before["text_features"], rtol=1e-5, atol=1e-5)
    assert ids == {n: id(p) for n, p in model.named_parameters()}
    assert all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)
    assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert not torch.equal(model.cclip_predictor.net[0].weight, predictor)


def test_cclip_full_training_adds_only_the_predictor(accelerator):
    model = micro(0)
    build_strategy(StrategyConfig(name="cclip", cclip_lora=False), accelerator).prepare_model(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_cclip_loss_is_clip_plus_weighted_ckc_of_the_predicted_features_against_the_old_model(accelerator):
    from modx.strategies.cclip import ckc_loss

    model, old = micro(0), micro(1).eval()  # left trainable: the strategy keeps the gradient out of it
    strategy = build_strategy(StrategyConfig(name="cclip", cclip_weight=0.5, cclip_lora_dropout=0.0), accelerator)
    strategy.prepare_model(model)
    b = clip_batch(1)
    first, logs = strategy.loss(model, b, None)  # no old model: the CLIP loss alone
    out = model(b["image"], b["text"])
    clip = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
    assert "loss_ckc" not in logs and first.item() == pytest.approx(clip.item(), rel=1e-6)
    first.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.cclip_predictor.parameters())
    model.zero_grad()
    loss, logs = strategy.loss(model, b, old)
    assert strategy.old_samples == 6
    h = model.cclip_predictor
    with torch.no_grad():
        out, out_old = model(b["image"], b["text"]), old(b["image"], b["text"])
        want = ckc_loss(h(out["image_features"]), h(out["text_features"]), out_old["image_features"],
                        out_old["text_features"], out["logit_scale"])
    assert logs["loss_ckc"] == pytest.approx(want.item(), rel=1e-5)
    assert loss.item() == pytest.approx(clip.item() + 0.5 * want.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in old.parameters())
    assert model.cclip_predictor.net[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- CMCL


def random_cov(n: int, eigenvalues: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T, q


def test_subspace_projector_spans_the_directions_above_the_threshold():
    from modx.strategies.cmcl import subspace_projector

    cov, q = random_cov(5, [3.0, 1.0, 0.05, 0.0, 0.0], seed=0)
    p = subspace_projector(cov, 0.1)
    torch.testing.assert_close(p, q[:, :2] @ q[:, :2].T)
    torch.testing.assert_close(p @ p, p)
    assert torch.linalg.matrix_rank(subspace_projector(cov, 0.01)).item() == 3
    assert not subspace_projector(cov, 5.0).any()


def test_dns_projection_leaves_the_scores_of_earlier_pairs_unchanged():
    """G' = G - P_in G P_out: for an earlier input x in the span of P_in and an earlier
    feature y of the other modality in the span of P_out, the score change x G' y is 0."""
    from modx.strategies.cmcl import dns_project, subspace_projector

    p_in = subspace_projector(random_cov(6, [2.0, 1.0, 0, 0, 0, 0], seed=1)[0], 0.1)
    p_out = subspace_projector(random_cov(4, [1.0, 0.5, 0.3, 0], seed=2)[0], 0.1)
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    projected = dns_project(g, p_in, p_out)
    want = torch.stack([torch.stack([g[i, j] - sum(p_in[i, k] * g[k, m] * p_out[m, j] for k in range(6) for m in range(4))
                                     for j in range(4)]) for i in range(6)])
    torch.testing.assert_close(projected, want)
    torch.testing.assert_close(p_in @ projected @ p_out, torch.zeros(6, 4, dtype=torch.float64))
    x = p_in @ torch.randn(6, 3, dtype=torch.float64)  # (in, samples)
    y = p_out @ torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(x.T @ projected @ y, torch.zeros(3, 3, dtype=torch.float64))
    assert (x.T @ g @ y).abs().max() > 1e-3  # unprojected, the scores would move
    torch.testing.assert_close(dns_project(g, torch.zeros(6, 6, dtype=torch.float64), p_out), g)


def test_cmcl_statistics_are_running_means_with_the_other_modality_in_the_joint_space(accelerator):
    """end_phase: C_in = mean over every sample so far of x^ x^T (the heads' unit-normalised
    inputs), C_out[img] = sum over phases of P_txt(end of phase)^T (sum x^_txt x^_txt^T) P_txt
    / samples, and the same swapped; checked against float64 loops with the inputs recovered
    from the features through the (square) heads' inverses."""
    model = micro(0)
    strategy = build_strategy(StrategyConfig(name="cmcl", cmcl_batches=2), accelerator)
    strategy.prepare_model(model)
    phases = [[clip_batch(0, n=3), clip_batch(1, n=3), clip_batch(9)], [clip_batch(2, n=4), clip_batch(3, n=4)]]
    heads = {"image": model.visual.proj, "text": model.text.text_projection}
    want_in = {s: torch.zeros(32, 32, dtype=torch.float64) for s in heads}
    want_out = {s: torch.zeros(32, 32, dtype=torch.float64) for s in heads}
    for phase, batches in enumerate(phases):
        with torch.no_grad():
            heads["text"].mul_(1.5)  # "training" moves the heads between the phase ends
        ends = {s: w.detach().double() for s, w in heads.items()}
        for b in batches[:2]:
            with torch.no_grad():
                feats = {"image": model.encode_image(b["image"]), "text": model.encode_text(b["text"])}
            for side, y in feats.items():
                for row in y.double() @ torch.linalg.inv(ends[side]):  # the head's input x
                    x = (row / row.norm())[:, None]
                    other = "text" if side == "image" else "image"
                    want_in[side] += x @ x.T
                    want_out[other] += ends[side].T @ x @ x.T @ ends[side]
        count = sum(b["image"].shape[0] for bs in phases[: phase + 1] for b in bs[:2])
        strategy.end_phase(phase, model, None, iter(batches))
        assert strategy.seen == count
        for side in heads:
            torch.testing.assert_close(strategy.stats[f"in_{side}"], want_in[side] / count, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(strategy.stats[f"out_{side}"], want_out[side] / count, rtol=1e-4, atol=1e-6)
    assert strategy.old_samples == count
    restored = build_strategy(StrategyConfig(name="cmcl"), accelerator)
    restored.load_state_dict(copy.deepcopy(strategy.state_dict()))
    assert restored.seen == count and all(torch.equal(restored.stats[k], v) for k, v in strategy.stats.items())


def test_cmcl_trains_the_heads_and_projects_their_gradients_after_the_first_phase(accelerator):
    from modx.strategies.cmcl import dns_project, subspace_projector

    model = micro(0)
    strategy = build_strategy(StrategyConfig(name="cmcl", cmcl_lambda_min=0.02), accelerator)
    strategy.prepare_model(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"visual.proj", "text.text_projection"}
    heads = (model.visual.proj, model.text.text_projection)

    def gradients():
        model.zero_grad()
        strategy.loss(model, clip_batch(5), None)[0].backward()
        return [w.grad.clone() for w in heads]

    strategy.begin_phase(0, model, None)
    raw = gradients()
    strategy.before_step(model)
    assert all(torch.equal(w.grad, g) for w, g in zip(heads, raw))  # the first phase: nothing to keep
    strategy.end_phase(0, model, None, iter([clip_batch(i) for i in range(3)]))
    strategy.begin_phase(1, model, None)
    raw = gradients()
    strategy.before_step(model)
    for side, w, g in zip(("image", "text"), heads, raw):
        p_in = subspace_projector(strategy.stats[f"in_{side}"], 0.02)
        p_out = subspace_projector(strategy.stats[f"out_{side}"], 0.0)
        assert 0 < torch.linalg.matrix_rank(p_in).item() < 32
        torch.testing.assert_close(w.grad, dns_project(g.double(), p_in, p_out).float(), rtol=1e-4, atol=1e-7)
        assert not torch.allclose(w.grad, g)
