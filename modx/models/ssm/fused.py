"""S4D's FFT convolution + activation (+ GLU output projection) as one autograd Function that
works on a block of (batch, channel) rows at a time: 64 channels of one batch element at
L = 4096, whole batch elements at short L (`_plan`).

The same function as `fft_conv` -> activation -> nn.Linear(H, 2H) -> nn.GLU(dim=-1), to
float32 rounding. What changes is the memory traffic, which is what the composed version
spends its time on at long L on a CPU (BENCHMARKS.md, "S4D speed"):

- the FFT runs on (rows, 2L) blocks: the input block is gathered
  (transposed) into a zero-padded buffer, FFT'd, multiplied by the kernel's spectrum, inverse
  FFT'd and passed through the activation while it is in cache; no (B, H, L + 1) spectrum
  and no (B, H, 2L) padded copy ever exist;
- activations stay channel-major, (H, L) per batch element, and the projection reads them
  transposed through BLAS (a = z^T W^T + bias), so no layout copies are made;
- what backward needs is kept per group of batch elements, the pre-activation y (g, H, L)
  and the projection's a (g, L, 2H): tensors of a few MB that the allocator reuses from step
  to step, where (B, ...)-sized ones are fresh memory mappings, page-faulted in every step;
- backward recomputes the input's spectrum per block instead of storing it and accumulates
  the kernel's gradient in the frequency domain; z = act(y) is recomputed for the weight
  gradient.
Memory is O(B H L): y, a, the output and the input's gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

FUSED_ACTIVATIONS = ("gelu", "silu", "identity")
_BLOCK_ELEMS = 2**19  # one FFT block: (rows, 2L) float32, 2 MB (64 channels at L = 4096)


def circular_kernel(K: Tensor, L: int) -> Tensor:
    """The length-2L circular kernel of `fft_conv`: K (H, L) causal taps at lags 0..L-1, or
    (2, H, L) with the anti-causal half at lags -1..-L (positions 2L-1 .. L) -> (H, 2L)."""
    if K.dim() == 3:
        return torch.cat([K[0], K[1].flip(-1)], dim=-1)
    return torch.nn.functional.pad(K, (0, L))


def _act(y: Tensor, name: str, out: Tensor) -> Tensor:
    if name == "gelu":
        return torch.ops.aten.gelu.out(y, approximate="none", out=out)
    if name == "silu":
        return torch.ops.aten.silu.out(y, out=out)
    return out.copy_(y)


def _act_backward(g: Tensor, y: Tensor, name: str, out: Tensor) -> Tensor:
    """out = g * act'(y)."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(g, y, approximate="none", grad_input=out)
    if name == "silu":
        return torch.ops.aten.silu_backward.grad_input(g, y, grad_input=out)
    return out.copy_(g)


def _plan(Bsz: int, H: int, L: int, block: int | None) -> list[tuple[int, int, list]]:
    """Blocks of `block` (batch, channel) rows of length 2L (default: 2^19 elements, 64
    channels at L = 4096): (b0, b1, [(h0, h1), ...]) with whole batch elements per group when
    a block holds all H channels, else one batch element and channel slices."""
    rows = block if block is not None else max(1, _BLOCK_ELEMS // (2 * L))
    if rows >= H:
        g = rows // H
        return [(b, min(b + g, Bsz), [(0, H)]) for b in range(0, Bsz, g)]
    hs = [(h, min(h + rows, H)) for h in range(0, H, rows)]
    return [(b, b + 1, hs) for b in range(Bsz)]


def _to_channel_major(dst: Tensor, src: Tensor) -> Tensor:
    """dst (g, H, L) = src (g, L, H) transposed; one batch element as a 2-D copy, which torch
    does with a blocked transpose (3x faster than a strided slice)."""
    if dst.shape[0] == 1:
        dst[0].copy_(src[0].T)
    else:
        dst.copy_(src.transpose(1, 2))
    return dst


def _padded_rfft(x: Tensor, buf: Tensor) -> Tensor:
    """rfft along the last dim of x (g, rows, L) zero-padded to buf's length (tail zero)."""
    rows = buf[: x.shape[0], : x.shape[1]]
    rows[..., : x.shape[2]].copy_(x)
    return torch.fft.rfft(rows)


class _ConvActGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, Kc, weight, bias, activation, block):  # noqa: ANN001, ANN205
        Bsz, L, H = u.shape
        n = Kc.shape[-1]  # 2L
        project = weight is not None
        plan = _plan(Bsz, H, L, block)
        g_max, h_max = max(b1 - b0 for b0, b1, _ in plan), plan[0][2][0][1]
        Kf = torch.fft.rfft(Kc)  # (H, L + 1)
        buf = u.new_zeros(g_max, h_max, n)  # the tail stays zero: the padding
        ut = u.new_empty(g_max, H, L)  # channel-major input
        if project:
            out = u.new_empty(Bsz, L, H)
            z = u.new_empty(g_max, H, L)
            W = weight.T.expand(g_max, H, 2 * H)
        else:
            out = u.new_empty(Bsz, H, L)  # act(y), channel-major
        ys, As = [], []
        for b0, b1, hs in plan:
            g = b1 - b0
            ug = _to_channel_major(ut[:g], u[b0:b1])
            y = u.new_empty(g, H, L)
            zg = z[:g] if project else out[b0:b1]
            for h0, h1 in hs:
                Y = _padded_rfft(ug[:, h0:h1], buf) * Kf[h0:h1]
                y[:, h0:h1] = torch.fft.irfft(Y, n=n)[..., :L]
                if activation != "identity" or not project:
                    _act(y[:, h0:h1], activation, out=zg[:, h0:h1])
            ys.append(y)
            if project:
                zT = (y if activation == "identity" else zg).transpose(1, 2)  # (g, L, H)
                a = torch.baddbmm(bias, zT, W[:g])  # (g, L, 2H) = z^T W^T + bias
                torch.ops.aten.glu.out(a, -1, out=out[b0:b1])  # a1 sigmoid(a2), one pass
                As.append(a)
        ctx.activation, ctx.project, ctx.plan = activation, project, plan
        ctx.save_for_backward(u, Kf, weight, *ys, *As)
        return out if project else out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):  # noqa: ANN001, ANN205
        u, Kf, weight, *saved = ctx.saved_tensors
        Bsz, L, H = u.shape
        plan, act, project, n = ctx.plan, ctx.activation, ctx.project, 2 * L
        ys, As = saved[: len(plan)], saved[len(plan) :]
        need_u, need_K, need_w, need_b = ctx.needs_input_grad[:4]
        g_max, h_max = max(b1 - b0 for b0, b1, _ in plan), plan[0][2][0][1]
        gu = u.new_empty(Bsz, L, H) if need_u else None
        gKf = torch.zeros_like(Kf) if need_K else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = weight.new_zeros(2 * H) if need_b else None
        Kf_conj = Kf.conj().resolve_conj()  # once: a lazy conj in `*` is copied on every use
        # gy and u side by side: one rfft for both (larger FFT batches use both threads better)
        buf = u.new_zeros(2 if need_K else 1, g_max, h_max, n)
        ut, gut = u.new_empty(g_max, H, L), u.new_empty(g_max, H, L)  # channel-major u, gu
        if project:  # scratch reused for every group
            ga = u.new_empty(g_max, L, 2 * H)
            gz_all, z = u.new_empty(g_max, H, L), u.new_empty(g_max, H, L)
            WT = weight.T.expand(g_max, H, 2 * H)
        else:
            gout = gout.transpose(1, 2)  # (B, H, L)
        for (b0, b1, hs), y, a in zip(plan, ys, As if project else [None] * len(plan)):
            g = b1 - b0
            if project:  # GLU and the linear map
                gag = torch.ops.aten.glu_backward.grad_input(gout[b0:b1], a, -1, grad_input=ga[:g])
                if need_w:
                    zg = y if act == "identity" else _act(y, act, out=z[:g])
                    for i in range(g):
                        gw.addmm_(gag[i].T, zg[i].T)
                if need_b:
                    gb += gag.sum((0, 1))
                gz = torch.bmm(WT[:g], gag.transpose(1, 2), out=gz_all[:g])  # (g, H, L)
            else:
                gz = gout[b0:b1]
            if not (need_u or need_K):
                continue
            if need_K:
                ug = _to_channel_major(ut[:g], u[b0:b1])
            for h0, h1 in hs:
                rows = buf[:, :g, : h1 - h0]
                _act_backward(gz[:, h0:h1], y[:, h0:h1], act, out=rows[0, ..., :L])  # gy
                if need_K:
                    rows[1, ..., :L].copy_(ug[:, h0:h1])
                spectra = torch.fft.rfft(rows)
                G = spectra[0]
                if need_u:  # gu[s] = sum_t gy[t] Kc[(t - s) mod 2L]
                    gut[:g, h0:h1] = torch.fft.irfft(G * Kf_conj[h0:h1], n=n)[..., :L]
                if need_K:  # gKc[j] = sum_t gy[t] u[t - j], summed over the batch
                    U = spectra[1]
                    if g == 1:
                        gKf[h0:h1].addcmul_(G[0], U[0].conj())
                    else:
                        gKf[h0:h1] += (G * U.conj()).sum(0)
            if need_u:
                if g == 1:
                    gu[b0].copy_(gut[0].T)
                else:
                    gu[b0:b1].copy_(gut[:g].transpose(1, 2))
        gKc = torch.fft.irfft(gKf, n=n) if need_K else None
        return gu, gKc, gw, gb, None, None


def _check(u: Tensor, Kc: Tensor, activation: str) -> None:
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {FUSED_ACTIVATIONS}")
    if Kc.shape != (u.shape[2], 2 * u.shape[1]):
        raise ValueError(f"kernel shape {tuple(Kc.shape)} != (H, 2L) for input {tuple(u.shape)}")


def conv_act(
    u: Tensor, Kc: Tensor, activation: str = "identity", block: int | None = None
) -> Tensor:
    """act(y), y[b, t, h] = sum_{s < L} Kc[h, (t - s) mod 2L] u[b, s, h]: with
    Kc = circular_kernel(K, L) the same y as `fft_conv(u, K)`.

    u (B, L, H) real, Kc (H, 2L) -> (B, L, H), a transposed view of a channel-major
    (B, H, L) tensor. activation: one of FUSED_ACTIVATIONS (nn.GELU's exact erf form,
    nn.SiLU, identity). block: (batch, channel) rows per FFT block (default: 2^19 / 2L;
    tests set it small). Not twice differentiable.
    """
    _check(u, Kc, activation)
    return _ConvActGLU.apply(u, Kc.to(u.dtype), None, None, activation, block)


def conv_act_glu(
    u: Tensor,
    Kc: Tensor,
    weight: Tensor,
    bias: Tensor,
    activation: str = "identity",
    block: int | None = None,
) -> Tensor:
    """nn.GLU(dim=-1)(nn.functional.linear(conv_act(u, Kc, activation), weight, bias)):
    weight (2H, H), bias (2H,) -> (B, L, H) contiguous. Not twice differentiable."""
    _check(u, Kc, activation)
    if weight.shape != (2 * u.shape[2], u.shape[2]) or bias.shape != (2 * u.shape[2],):
        raise ValueError(f"GLU projection weight {tuple(weight.shape)} / bias {tuple(bias.shape)}")
    return _ConvActGLU.apply(u, Kc.to(u.dtype), weight, bias, activation, block)
