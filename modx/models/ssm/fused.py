"""S4D's FFT convolution + activation (+ GLU output projection) as one autograd Function that
works on one batch element and a block of channels at a time.

The same function as `fft_conv` -> activation -> nn.Linear(H, 2H) -> nn.GLU(dim=-1), to
float32 rounding. What changes is the memory traffic, which is what the composed version
spends its time on at long L on a CPU (BENCHMARKS.md, "S4D speed"):

- the FFT runs on (channels, 2L) blocks of one batch element: the input block is gathered
  (transposed) into a zero-padded buffer, FFT'd, multiplied by the kernel's spectrum, inverse
  FFT'd and passed through the activation while it is in cache; no (B, H, L + 1) spectrum
  and no (B, H, 2L) padded copy ever exist;
- activations stay channel-major, (H, L) per batch element, and the projection reads them
  transposed through BLAS (a = z^T W^T + bias), so no layout copies are made;
- what backward needs is kept per batch element, the pre-activation y (H, L) and the
  projection's a (L, 2H): tensors of a few MB that the allocator reuses from step to step,
  where (B, ...)-sized ones are fresh memory mappings, page-faulted in on every step;
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
_BLOCK = 64  # channels per FFT block: (64, 2L) buffers, 2 MB at L = 4096


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


def _blocks(H: int, block: int) -> list[tuple[int, int]]:
    return [(h, min(h + block, H)) for h in range(0, H, block)]


def _padded_rfft(x: Tensor, buf: Tensor) -> Tensor:
    """rfft of the rows of x (rows, L) zero-padded to buf's length (buf's tail is zero)."""
    rows = buf[: x.shape[0]]
    rows[:, : x.shape[1]].copy_(x)
    return torch.fft.rfft(rows)


def _rfft_of_act_backward(g: Tensor, y: Tensor, name: str, buf: Tensor) -> Tensor:
    """rfft of g * act'(y) (rows, L), zero-padded to buf's length."""
    rows = buf[: g.shape[0]]
    _act_backward(g, y, name, out=rows[:, : g.shape[1]])
    return torch.fft.rfft(rows)


class _ConvActGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, Kc, weight, bias, activation, block):  # noqa: ANN001, ANN205
        Bsz, L, H = u.shape
        n = Kc.shape[-1]  # 2L
        project = weight is not None
        Kf = torch.fft.rfft(Kc)  # (H, L + 1)
        buf = u.new_zeros(min(block, H), n)  # the tail stays zero: the padding
        if project:
            out = u.new_empty(Bsz, L, H)
            z = u.new_empty(H, L)
        else:
            out = u.new_empty(Bsz, H, L)  # act(y), channel-major
        ut = u.new_empty(H, L)
        ys, As = [], []
        for b in range(Bsz):
            ut.copy_(u[b].T)  # one whole-matrix transpose: 3x faster than per channel block
            y = u.new_empty(H, L)
            for h0, h1 in _blocks(H, block):
                y[h0:h1] = torch.fft.irfft(_padded_rfft(ut[h0:h1], buf) * Kf[h0:h1], n=n)[:, :L]
                if project and activation != "identity":
                    _act(y[h0:h1], activation, out=z[h0:h1])
                elif not project:
                    _act(y[h0:h1], activation, out=out[b, h0:h1])
            ys.append(y)
            if project:
                a = torch.addmm(bias, (y if activation == "identity" else z).T, weight.T)
                torch.sigmoid(a[:, H:], out=a[:, H:])  # kept for backward: a1, sigmoid(a2)
                torch.mul(a[:, :H], a[:, H:], out=out[b])  # GLU
                As.append(a)
        ctx.activation, ctx.block, ctx.project, ctx.n_batch = activation, block, project, Bsz
        ctx.save_for_backward(u, Kf, weight, *ys, *As)
        return out if project else out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # noqa: ANN001, ANN205
        u, Kf, weight, *saved = ctx.saved_tensors
        ys, As = saved[: ctx.n_batch], saved[ctx.n_batch :]
        Bsz, L, H = u.shape
        n, act, project = 2 * L, ctx.activation, ctx.project
        need_u, need_K, need_w, need_b = ctx.needs_input_grad[:4]
        gu = u.new_empty(Bsz, L, H) if need_u else None
        gKf = torch.zeros_like(Kf) if need_K else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = weight.new_zeros(2 * H) if need_b else None
        Kf_conj = Kf.conj().resolve_conj()  # once: a lazy conj in `*` is copied on every use
        buf = u.new_zeros(min(ctx.block, H), n)
        ubuf = u.new_zeros(min(ctx.block, H), n) if need_K else None
        ut, gut = u.new_empty(H, L), u.new_empty(H, L)  # channel-major u[b], gu[b]
        if not project:
            g = g.transpose(1, 2)  # (B, H, L)
        for b in range(Bsz):
            y = ys[b]
            if project:  # GLU and the linear map, per batch element
                a1, s = As[b][:, :H], As[b][:, H:]  # a1, sigmoid(a2)
                ga = torch.empty_like(As[b])
                torch.mul(g[b], s, out=ga[:, :H])  # d out / d a1 = sigmoid(a2)
                t = ga[:, :H] * a1
                torch.addcmul(t, t, s, value=-1, out=ga[:, H:])  # d out / d a2 = a1 s (1 - s)
                if need_w:
                    z = y if act == "identity" else _act(y, act, out=torch.empty_like(y))
                    gw.addmm_(ga.T, z.T)
                if need_b:
                    gb += ga.sum(0)
                gz = torch.mm(weight.T, ga.T)  # (H, L): channel-major
            else:
                gz = g[b]
            if not (need_u or need_K):
                continue
            if need_K:
                ut.copy_(u[b].T)
            for h0, h1 in _blocks(H, ctx.block):
                G = _rfft_of_act_backward(gz[h0:h1], y[h0:h1], act, buf)
                if need_u:  # gu[s] = sum_t gy[t] Kc[(t - s) mod 2L]
                    gut[h0:h1] = torch.fft.irfft(G * Kf_conj[h0:h1], n=n)[:, :L]
                if need_K:  # gKc[j] = sum_t gy[t] u[t - j], summed over the batch
                    gKf[h0:h1].addcmul_(G, _padded_rfft(ut[h0:h1], ubuf).conj())
            if need_u:
                gu[b].copy_(gut.T)
        gKc = torch.fft.irfft(gKf, n=n) if need_K else None
        return gu, gKc, gw, gb, None, None


def _check(u: Tensor, Kc: Tensor, activation: str) -> None:
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {FUSED_ACTIVATIONS}")
    if Kc.shape != (u.shape[2], 2 * u.shape[1]):
        raise ValueError(f"kernel shape {tuple(Kc.shape)} != (H, 2L) for input {tuple(u.shape)}")


def conv_act(u: Tensor, Kc: Tensor, activation: str = "identity", block: int = _BLOCK) -> Tensor:
    """act(y), y[b, t, h] = sum_{s < L} Kc[h, (t - s) mod 2L] u[b, s, h]: with
    Kc = circular_kernel(K, L) the same y as `fft_conv(u, K)`.

    u (B, L, H) real, Kc (H, 2L) -> (B, L, H), a transposed view of a channel-major
    (B, H, L) tensor. activation: one of FUSED_ACTIVATIONS (nn.GELU's exact erf form,
    nn.SiLU, identity). Not twice differentiable.
    """
    _check(u, Kc, activation)
    return _ConvActGLU.apply(u, Kc.to(u.dtype), None, None, activation, block)


def conv_act_glu(
    u: Tensor,
    Kc: Tensor,
    weight: Tensor,
    bias: Tensor,
    activation: str = "identity",
    block: int = _BLOCK,
) -> Tensor:
    """nn.GLU(dim=-1)(nn.functional.linear(conv_act(u, Kc, activation), weight, bias)):
    weight (2H, H), bias (2H,) -> (B, L, H) contiguous. Not twice differentiable."""
    _check(u, Kc, activation)
    if weight.shape != (2 * u.shape[2], u.shape[2]) or bias.shape != (2 * u.shape[2],):
        raise ValueError(f"GLU projection weight {tuple(weight.shape)} / bias {tuple(bias.shape)}")
    return _ConvActGLU.apply(u, Kc.to(u.dtype), weight, bias, activation, block)
