"""modx.losses against naive float64 loops, and the multi-process gather."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from modx.losses import (
    ClipLoss,
    clip_loss,
    clip_loss_local,
    gather_features,
    modx_kl,
    modx_kl_local,
    world_info,
)


def _unit_rows(x: torch.Tensor) -> list[list[float]]:
    rows = []
    for r in x.double().tolist():
        n = math.sqrt(sum(v * v for v in r))
        rows.append([v / n for v in r])
    return rows


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def naive_clip_loss(img, txt, scale: float) -> float:
    i, t = _unit_rows(img), _unit_rows(txt)
    n = len(i)
    total = 0.0
    for a in range(n):  # image a -> texts
        logits = [scale * _dot(i[a], t[b]) for b in range(n)]
        total -= math.log(_softmax(logits)[a])
    for b in range(n):  # text b -> images
        logits = [scale * _dot(t[b], i[a]) for a in range(n)]
        total -= math.log(_softmax(logits)[b])
    return total / (2 * n)


def naive_modx_kl(img, txt, img_o, txt_o, tau=1.0, align=True, reduction="sum", diagonal=True) -> float:
    i, t, io, to = map(_unit_rows, (img, txt, img_o, txt_o))
    n = len(i)
    s = [[_dot(i[a], t[b]) for b in range(n)] for a in range(n)]
    so = [[_dot(io[a], to[b]) for b in range(n)] for a in range(n)]
    halves = []
    for new, old in ((s, so), ([list(c) for c in zip(*s)], [list(c) for c in zip(*so)])):
        kl = 0.0
        for r in range(n):
            if align and max(range(n), key=lambda j: old[r][j]) != r:
                continue  # old model wrong on this row: replaced by the new row, KL 0
            cols = [j for j in range(n) if diagonal or j != r]
            p = _softmax([old[r][j] / tau for j in cols])
            q = _softmax([new[r][j] / tau for j in cols])
            kl += sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q))
        halves.append(kl if reduction == "sum" else kl / n)
    return (halves[0] + halves[1]) / 2


def _features(seed: int, n: int = 6, d: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_loss_matches_naive_loop(scale):
    img, txt, _, _ = _features(0)
    got = clip_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale)
    assert got.item() == pytest.approx(naive_clip_loss(img, txt, scale), rel=1e-10)


@pytest.mark.parametrize("tau", [1.0, 0.07, 2.5])
@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("diagonal", [True, False])
def test_modx_kl_matches_naive_loop(tau, align, reduction, diagonal):
    img, txt, img_o, txt_o = _features(1, n=7)
    got = modx_kl(img, txt, img_o, txt_o, temperature=tau, cognition_align=align, reduction=reduction,
                  diagonal=diagonal)
    want = naive_modx_kl(img, txt, img_o, txt_o, tau, align, reduction, diagonal)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_modx_kl_is_zero_when_models_agree_and_positive_otherwise():
    img, txt, _, _ = _features(2)
    assert modx_kl(img, txt, img, txt).item() == pytest.approx(0.0, abs=1e-6)
    img_o, txt_o = img + 0.3 * torch.randn_like(img), txt + 0.3 * torch.randn_like(txt)
    assert modx_kl(img, txt, img_o, txt_o, cognition_align=False).item() > 1e-4


def test_cognition_alignment_drops_rows_the_old_model_gets_wrong():
    # Old model: correct on every row except image 0 -> text 1 (and text 1 -> image 0).
    n, d = 4, 4
    txt_o = torch.eye(n, d, dtype=torch.float64)
    img_o = torch.eye(n, d, dtype=torch.float64)
    img_o[0] = txt_o[1] * 2 + txt_o[0]  # image 0's best text is text 1
    img, txt = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    aligned = modx_kl(img, txt, img_o, txt_o, cognition_align=True).item()
    full = modx_kl(img, txt, img_o, txt_o, cognition_align=False).item()
    assert aligned == pytest.approx(naive_modx_kl(img, txt, img_o, txt_o, align=True), rel=1e-6)
    assert aligned < full


def test_modx_kl_gradients_reach_only_new_features():
    img, txt, img_o, txt_o = (x.clone().requires_grad_(True) for x in _features(3))
    modx_kl(img, txt, img_o, txt_o, cognition_align=False).backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
    assert img_o.grad is None and txt_o.grad is None


def test_modx_kl_rejects_bad_options():
    img, txt, img_o, txt_o = _features(4)
    with pytest.raises(ValueError, match="reduction"):
        modx_kl(img, txt, img_o, txt_o, reduction="batchmean")
    with pytest.raises(ValueError, match="temperature"):
        modx_kl(img, txt, img_o, txt_o, temperature=0.0)


def test_gather_is_identity_on_one_process():
    img, txt, _, _ = _features(5)
    a, b = gather_features(img, txt)
    assert a is img and b is txt


# ---- two processes (gloo) compute what one process computes on the global batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_and_grads(weight, x_img, x_txt, x_img_old, x_txt_old, local_loss=False, reduction="sum"):
    w = weight.clone().requires_grad_(True)
    img, txt = x_img @ w, x_txt @ w  # a shared linear "encoder"
    img_n, txt_n = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    old_img, old_txt = gather_features(x_img_old, x_txt_old, gather_with_grad=False)
    all_img, all_txt = gather_features(img, txt)
    clip = ClipLoss(local_loss=local_loss)(img_n, txt_n, 10.0)
    if local_loss:
        kl = modx_kl_local(all_img, all_txt, old_img, old_txt, *world_info(), reduction=reduction)
    else:
        kl = modx_kl(all_img, all_txt, old_img, old_txt, reduction=reduction)
    loss = clip + 20.0 * kl
    loss.backward()
    return loss.detach(), w.grad


def _worker(rank: int, world: int, port: int, data, out_dir: str, local_loss: bool, reduction: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        weight, *batch = data
        local = [b.chunk(world)[rank] for b in batch]
        loss, grad = _loss_and_grads(weight, *local, local_loss=local_loss, reduction=reduction)
        dist.all_reduce(grad)
        grad /= world  # data-parallel gradient averaging, as DDP does
        torch.save({"loss": loss, "grad": grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "local_loss, reduction", [(False, "sum"), (True, "sum"), (True, "mean")], ids=["global", "local", "local-mean"]
)
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, local_loss, reduction):
    g = torch.Generator().manual_seed(7)
    data = [torch.randn(5, 4, generator=g, dtype=torch.float64)] + [
        torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(4)
    ]
    ref_loss, ref_grad = _loss_and_grads(*data, reduction=reduction)
    mp.start_processes(
        _worker, args=(2, _free_port(), data, str(tmp_path), local_loss, reduction), nprocs=2, start_method="spawn"
    )
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    if local_loss:  # each rank holds its share; their mean is the global loss
        assert got[0]["loss"].item() != pytest.approx(got[1]["loss"].item(), rel=1e-6)
        assert (got[0]["loss"] + got[1]["loss"]).item() / 2 == pytest.approx(ref_loss.item(), rel=1e-10)
    else:
        for rank in range(2):
            assert got[rank]["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-10)
    for rank in range(2):
        torch.testing.assert_close(got[rank]["grad"], ref_grad, rtol=1e-9, atol=1e-12)


# ---- local loss: per-rank rows against the gathered columns, simulated on one process


def _mean_over_ranks(fn, world: int, *features):
    """Value and gradients of the mean over simulated ranks of fn(rank, *features)."""
    leaves = [f.clone().requires_grad_(True) for f in features]
    value = sum(fn(rank, *leaves) for rank in range(world)) / world
    grads = torch.autograd.grad(value, leaves)
    return value.detach(), grads


@pytest.mark.parametrize("world", [1, 2, 4])
def test_local_clip_loss_averages_to_the_global_loss_and_gradient(world):
    img, txt, _, _ = _features(8, n=8)
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)

    def local(rank, i, t):
        b = i.shape[0] // world
        return clip_loss_local(i[rank * b : (rank + 1) * b], t[rank * b : (rank + 1) * b], i, t, 14.3, rank)

    got, got_grads = _mean_over_ranks(local, world, img, txt)
    want, want_grads = _mean_over_ranks(lambda rank, i, t: clip_loss(i, t, 14.3), 1, img, txt)
    assert got.item() == pytest.approx(naive_clip_loss(img, txt, 14.3), rel=1e-10)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("tau", [1.0, 0.07])
@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_local_modx_kl_averages_to_the_global_kl_and_gradient(world, tau, align, reduction):
    img, txt, img_o, txt_o = _features(9, n=8)
    wrong_rows = ((F.normalize(img_o, dim=-1) @ F.normalize(txt_o, dim=-1).T).argmax(1) != torch.arange(8)).sum()
    assert 0 < wrong_rows < 8  # cognition alignment drops some rows, keeps others
    options = dict(temperature=tau, cognition_align=align, reduction=reduction)

    def local(rank, i, t):
        return modx_kl_local(i, t, img_o, txt_o, rank, world, **options)

    got, got_grads = _mean_over_ranks(local, world, img, txt)
    want, want_grads = _mean_over_ranks(lambda rank, i, t: modx_kl(i, t, img_o, txt_o, **options), 1, img, txt)
    assert got.item() == pytest.approx(naive_modx_kl(img, txt, img_o, txt_o, tau, align, reduction), rel=1e-6)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-9)
    for g, w in zip(got_grads, want_grads):
        # the KL runs in float32: its rounding (a few ulps of the largest gradient) differs
        # between the local and the global order of operations, and from one CPU to another
        torch.testing.assert_close(g, w, rtol=1e-5, atol=4 * 2**-23 * w.abs().max().item())


def test_local_modx_kl_rejects_a_batch_that_does_not_split():
    img, txt, img_o, txt_o = _features(10, n=6)
    with pytest.raises(ValueError, match="split"):
        modx_kl_local(img, txt, img_o, txt_o, 0, 4)


# ---- float32 semantics under autocast


def _bf16_case(seed: int = 11, n: int = 128, d: int = 256):
    g = torch.Generator().manual_seed(seed)
    img_o, txt_o = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    img = img_o + 0.05 * torch.randn(n, d, generator=g)  # a slightly moved "new model"
    txt = txt_o + 0.05 * torch.randn(n, d, generator=g)
    return img, txt, img_o, txt_o


def _value_and_grad(fn, img, txt, autocast: bool):
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = fn(img, txt)
    value.backward()
    return value.detach(), torch.cat([img.grad.flatten(), txt.grad.flatten()])


@pytest.mark.parametrize("loss", ["modx_kl", "clip_loss"])
def test_losses_keep_fp32_value_and_gradient_under_bf16_autocast(loss):
    img, txt, img_o, txt_o = _bf16_case()
    if loss == "modx_kl":
        def fn(i, t):
            return modx_kl(i, t, img_o, txt_o, cognition_align=False)
    else:
        def fn(i, t):
            return clip_loss(F.normalize(i, dim=-1), F.normalize(t, dim=-1), torch.tensor(50.0))
    ref_value, ref_grad = _value_and_grad(fn, img, txt, autocast=False)
    got_value, got_grad = _value_and_grad(fn, img, txt, autocast=True)
    assert got_value.dtype == torch.float32
    assert got_value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    assert F.cosine_similarity(got_grad, ref_grad, dim=0).item() > 0.9999
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_off_diagonal_kl_ignores_the_matched_pairs_similarity():
    """diagonal=False: raising only the matched pairs' similarities costs nothing."""
    from modx.losses import _row_kl

    old = torch.randn(6, 6, dtype=torch.float64)
    new = old + torch.diag(torch.rand(6, dtype=torch.float64) + 0.5)
    assert _row_kl(old, new, diagonal=False).abs().max().item() == pytest.approx(0.0, abs=1e-12)
    assert _row_kl(old, new, diagonal=True).min().item() > 1e-3

