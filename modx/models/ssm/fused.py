"""S4D's FFT convolution + activation (+ GLU output projection) as one autograd Function that
works on a block of (batch, channel) rows at a time: 64 channels of one batch element at
L = 4096, whole batch elements at short L (`_plan`).

The same function as `fft_conv` -> activation -> nn.Linear(H, 2H) -> nn.GLU(dim=-1), to
float32 rounding. What changes is the memory traffic, which is what the composed version
spends its time on at long L on a CPU (BENCHMARKS.md, "S4D speed"):

- the FFT runs on (rows, 2L) blocks: the input block is gathered (transposed) into a
  zero-padded buffer, FFT'd, multiplied by the kernel's spectrum, inverse FFT'd and passed
  through the activation while it is in cache; no (B, H, 2L) padded copy ever exists;
- activations stay channel-major, (H, L) per batch element, and the projection reads them
  transposed through BLAS (a = z^T W^T + bias), so no layout copies are made;
- what backward needs is kept per group of batch elements: the pre-activation y and
  z = act(y) (g, H, L), the projection's a (g, L, 2H) and the input's spectrum per FFT
  block, tensors of a few MB that the allocator reuses from step to step, where
  (B, ...)-sized ones are fresh memory mappings, page-faulted in every step; backward FFTs
  only the output gradient and accumulates the kernel's gradient in the frequency domain;
- the groups run on torch.get_num_threads() worker threads with one torch thread each
  (`_map_groups`; when: `_workers`): the copies, FFTs and elementwise passes over 2 MB
  blocks gain little from torch's own threads, whole groups side by side scale with the
  cores (BENCHMARKS.md).
Memory is O(B H L): y, z, a, the input's spectrum, the output and the input's gradient.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from modx.threads import MAX_THREADS, map_one_thread_each

FUSED_ACTIVATIONS = ("gelu", "silu", "identity")
_BLOCK_ELEMS = 2**19  # one FFT block: (rows, 2L) float32, 2 MB (64 channels at L = 4096)
_MIN_ELEMS_SPINNING = 2**22  # B L H from which workers pay under the default wait policy


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


def _workers(n_groups: int, elems: int) -> int:
    """Threads for the groups of one call of `elems` = B L H input values: torch's thread
    count, at most one per group. What pays depends on OpenMP's wait policy (measured on 2
    cores, BENCHMARKS.md "S4D speed"):
    - PASSIVE (sleeping OpenMP threads, as modx's benchmarks run): workers win at every size;
    - unset (libgomp spins a while after each parallel region, then sleeps): the spinning
      threads of the main thread's ops take the workers' cores; workers win at L = 4096
      (B = 8, H = 256: 2^23 values), lose at L = 256, so they start at 2^22 values;
    - ACTIVE (always spinning): never (1.2x slower at L = 4096)."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    if policy == "ACTIVE" or (policy != "PASSIVE" and elems < _MIN_ELEMS_SPINNING):
        return 1
    return max(1, min(torch.get_num_threads(), n_groups, MAX_THREADS))


def _map_groups(work, plan: list, n_workers: int) -> list:  # noqa: ANN001
    """[work(share) for each worker's share of `plan`], the shares on `n_workers` threads with
    one torch thread each (`modx.threads`: no OpenMP wake-ups per op, and the copies, FFTs
    and elementwise passes that do not scale with torch's threads run side by side)."""
    return map_one_thread_each(work, [plan[k::n_workers] for k in range(n_workers)])


class _ConvActGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, Kc, weight, bias, activation, block):  # noqa: ANN001, ANN205
        Bsz, L, H = u.shape
        n = Kc.shape[-1]  # 2L
        project = weight is not None
        keep_spectra = ctx.needs_input_grad[1]  # the kernel's gradient needs u's spectrum
        plan = _plan(Bsz, H, L, block)
        Kf = torch.fft.rfft(Kc)  # (H, L + 1)
        out = u.new_empty(Bsz, L, H) if project else u.new_empty(Bsz, H, L)

        def work(groups: list) -> list[tuple]:
            g_max, h_max = max(b1 - b0 for b0, b1, _ in groups), groups[0][2][0][1]
            buf = u.new_zeros(g_max, h_max, n)  # the tail stays zero: the padding
            ut = u.new_empty(g_max, H, L)  # channel-major input
            saved = []
            for b0, b1, hs in groups:
                g = b1 - b0
                ug = _to_channel_major(ut[:g], u[b0:b1])
                y = u.new_empty(g, H, L)
                # z = act(y), kept for the weight gradient when projecting (not recomputed)
                z = (y if activation == "identity" else u.new_empty(g, H, L)) if project else out[b0:b1]
                spectra = []
                for h0, h1 in hs:
                    U = _padded_rfft(ug[:, h0:h1], buf)
                    y[:, h0:h1] = torch.fft.irfft(U * Kf[h0:h1], n=n)[..., :L]
                    if z is not y:
                        _act(y[:, h0:h1], activation, out=z[:, h0:h1])
                    if keep_spectra:
                        spectra.append(U)  # (g, rows, L + 1): backward's correlation with gy
                a = None
                if project:  # a = z^T W^T + bias (g, L, 2H); out = a1 sigmoid(a2), one pass
                    a = torch.baddbmm(bias, z.transpose(1, 2), weight.T.expand(g, H, 2 * H))
                    torch.ops.aten.glu.out(a, -1, out=out[b0:b1])
                saved.append((y, z if project else None, a, spectra))
            return saved

        shares = _map_groups(work, plan, _workers(len(plan), u.numel()))
        per_group = [None] * len(plan)  # back in plan order
        for k, share in enumerate(shares):
            per_group[k :: len(shares)] = share
        ctx.activation, ctx.project, ctx.plan, ctx.u_shape = activation, project, plan, u.shape
        # per group: y, then z and a when projecting, then the spectra when keep_spectra
        ctx.save_for_backward(
            Kf, weight, *(t for y, z, a, sp in per_group for t in (y, z, a, *sp) if t is not None)
        )
        return out if project else out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):  # noqa: ANN001, ANN205
        Kf, weight, *flat = ctx.saved_tensors
        Bsz, L, H = ctx.u_shape
        plan, act, project, n = ctx.plan, ctx.activation, ctx.project, 2 * L
        need_u, need_K, need_w, need_b = ctx.needs_input_grad[:4]
        saved, it = [], iter(flat)
        for _, _, hs in plan:  # (y, z, a, spectra) per group, as forward saved them
            y = next(it)
            z, a = (next(it), next(it)) if project else (None, None)
            saved.append((y, z, a, [next(it) for _ in hs] if need_K else []))
        gu = Kf.real.new_empty(Bsz, L, H) if need_u else None
        Kf_conj = Kf.conj().resolve_conj()  # once: a lazy conj in `*` is copied on every use
        if not project:
            gout = gout.transpose(1, 2)  # (B, H, L)

        def work(groups: list) -> tuple:
            g_max, h_max = max(b1 - b0 for (b0, b1, _), _ in groups), groups[0][0][2][0][1]
            gKf = torch.zeros_like(Kf) if need_K else None
            gw = torch.zeros_like(weight) if need_w else None
            gb = weight.new_zeros(2 * H) if need_b else None
            buf = Kf.real.new_zeros(g_max, h_max, n)  # gy, zero-padded
            gut = Kf.real.new_empty(g_max, H, L)  # channel-major gu
            if project:
                ga = Kf.real.new_empty(g_max, L, 2 * H)
                gz_all = Kf.real.new_empty(g_max, H, L)
                WT = weight.T.expand(g_max, H, 2 * H)
            for (b0, b1, hs), (y, z, a, spectra) in groups:
                g = b1 - b0
                if project:  # GLU and the linear map
                    gag = torch.ops.aten.glu_backward.grad_input(gout[b0:b1], a, -1, grad_input=ga[:g])
                    if need_w:
                        for i in range(g):
                            gw.addmm_(gag[i].T, z[i].T)
                    if need_b:
                        gb += gag.sum((0, 1))
                    gz = torch.bmm(WT[:g], gag.transpose(1, 2), out=gz_all[:g])  # (g, H, L)
                else:
                    gz = gout[b0:b1]
                if not (need_u or need_K):
                    continue
                for (h0, h1), U in zip(hs, spectra if need_K else [None] * len(hs)):
                    rows = buf[:g, : h1 - h0]
                    _act_backward(gz[:, h0:h1], y[:, h0:h1], act, out=rows[..., :L])  # gy
                    G = torch.fft.rfft(rows)
                    if need_u:  # gu[s] = sum_t gy[t] Kc[(t - s) mod 2L]
                        gut[:g, h0:h1] = torch.fft.irfft(G * Kf_conj[h0:h1], n=n)[..., :L]
                    if need_K:  # gKc[j] = sum_t gy[t] u[t - j], summed over the batch
                        if g == 1:
                            gKf[h0:h1].addcmul_(G[0], U[0].conj())
                        else:
                            gKf[h0:h1] += (G * U.conj()).sum(0)
                if need_u:
                    if g == 1:
                        gu[b0].copy_(gut[0].T)
                    else:
                        gu[b0:b1].copy_(gut[:g].transpose(1, 2))
            return gKf, gw, gb

        groups = list(zip(plan, saved))
        parts = _map_groups(work, groups, _workers(len(groups), Bsz * L * H))
        gKf, gw, gb = (_sum([p[k] for p in parts]) for k in range(3))
        gKc = torch.fft.irfft(gKf, n=n) if need_K else None
        return gu, gKc, gw, gb, None, None


def _sum(parts: list) -> Tensor | None:
    """The workers' partial sums added in worker order (None when not computed)."""
    if parts[0] is None:
        return None
    total = parts[0]
    for p in parts[1:]:
        total += p
    return total


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
