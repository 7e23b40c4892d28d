"""Diagonal SSM convolution kernels, FFT convolution and a recurrent reference.

PAPERS.md section 3 (S4D): with dA, dB the discretised diagonal state matrix and input
vector, the length-L kernel is the Vandermonde product

    K[h, l] = sum_n C[h, n] dB[h, n] dA[h, n]^l,   l = 0..L-1,

taken as 2 Re(...) when the N' modes stand for conjugate pairs, Re(...) otherwise.
The math is in `discretize` and `vandermonde`; `ssm_kernel` evaluates the same product
blocked (`vandermonde_blocked`), which never materialises (H, N', L) and needs ~2 sqrt(L)
instead of L complex exponentials per mode (3x faster at L = 77, 20x at L = 1024 on CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

DISCS = ("zoh", "bilinear")


def discretize(
    A: Tensor, B: Tensor, dt: Tensor, disc: str = "zoh"
) -> tuple[Tensor, Tensor, Tensor]:
    """Discretise x' = A x + B u with step dt (PAPERS.md 3). A, B (..., N), dt broadcastable.

    ZOH: dA = exp(dt A), dB = (exp(dt A) - 1) / A * B.
    Bilinear: dA = (1 + dt A/2) / (1 - dt A/2), dB = dt / (1 - dt A/2) * B.
    Returns (dA, dB, log dA); log dA = dt A exactly for ZOH (no branch cut).
    """
    dtA = dt * A
    if disc == "zoh":
        dA = torch.exp(dtA)
        return dA, (dA - 1) / A * B, dtA
    if disc == "bilinear":
        denom = 1 - dtA / 2
        dA = (1 + dtA / 2) / denom
        return dA, dt / denom * B, torch.log(dA)
    raise ValueError(f"unknown discretisation {disc!r}; choose one of {DISCS}")


def vandermonde(CB: Tensor, log_dA: Tensor, L: int) -> Tensor:
    """sum_n CB[..., h, n] exp(l log_dA[h, n]) for l < L -> complex (..., H, L)."""
    pos = torch.arange(L, device=log_dA.device, dtype=log_dA.real.dtype)
    Z = torch.exp(log_dA.unsqueeze(-1) * pos)  # (H, N', L)
    return torch.einsum("...hn,hnl->...hl", CB, Z)


def cexp(z: Tensor) -> Tensor:
    """exp of a complex tensor as exp(Re z) (cos Im z + i sin Im z): the same values as
    torch.exp, 5x faster on CPU (real exp, cos and sin are vectorised, complex exp is not)."""
    return torch.polar(torch.exp(z.real), z.imag)


def vandermonde_blocked(CB: Tensor, log_dA: Tensor, L: int, real: bool = False) -> Tensor:
    """The same product, blocked: l = j M + r, dA^l = (dA^M)^j dA^r, so that only
    (H, N', J) and (H, N', M) with J M >= L are materialised (J, M ~ sqrt(L)).
    real=True: only the real part, as one real matmul over [Re, Im] (half the flops)."""
    M = max(1, int(L**0.5))
    J = -(-L // M)
    r = torch.arange(M, device=log_dA.device, dtype=log_dA.real.dtype)
    j = torch.arange(J, device=log_dA.device, dtype=log_dA.real.dtype) * M
    inner = cexp(log_dA.unsqueeze(-1) * r)  # (H, N', M)
    outer = CB.unsqueeze(-1) * cexp(log_dA.unsqueeze(-1) * j)  # (..., H, N', J)
    if real:  # Re(sum_n P Q) = sum_n Re P Re Q - Im P Im Q
        P = torch.cat([outer.real, -outer.imag], dim=-2)  # (..., H, 2N', J)
        K = P.transpose(-1, -2) @ torch.cat([inner.real, inner.imag], dim=-2)  # (..., H, J, M)
    else:
        K = torch.einsum("...hnj,hnm->...hjm", outer, inner)  # (..., H, J, M)
    return K.flatten(-2)[..., :L]


def ssm_kernel(
    A: Tensor,
    B: Tensor,
    C: Tensor,
    dt: Tensor,
    L: int,
    disc: str = "zoh",
    conj_sym: bool = True,
) -> Tensor:
    """Real SSM convolution kernel (H, L) of a diagonal SSM (PAPERS.md 3, "Kernel").

    A, B (H, N') complex; C (H, N') or (..., H, N') complex (leading dims, e.g. the two
    directions of a bidirectional layer, give (..., H, L)); dt (H,) positive.
    conj_sym=True: K = 2 Re(sum over the N' modes), which stand for 2 N' states in
    conjugate pairs; conj_sym=False: K = Re(sum), all modes given explicitly.
    """
    dA, dB, log_dA = discretize(A, B, dt.unsqueeze(-1), disc)  # (H, N')
    CB = C * dB  # (..., H, N')
    K = vandermonde_blocked(CB, log_dA, L, real=True)  # (..., H, L)
    return 2 * K if conj_sym else K


def dss_kernel(A: Tensor, C: Tensor, dt: Tensor, L: int, conj_sym: bool = True) -> Tensor:
    """DSS-softmax kernel (Gupta et al. 2022; PAPERS.md 3, "DSS").

    K[h, l] = sum_n C[h, n] / A[h, n] * softmax_l(A[h, n] dt[h] l), the softmax over
    l = 0..L-1 taken on complex numbers: it normalises exp(A dt l) by its sum, so any real
    part of A gives a bounded kernel (no real-part transform needed). A, C (H, N') -> (H, L).
    """
    pos = torch.arange(L, device=A.device, dtype=A.real.dtype)
    P = (dt.unsqueeze(-1) * A).unsqueeze(-1) * pos  # (H, N', L)
    P = P - P.real.amax(dim=-1, keepdim=True)  # stabilise: largest real part -> 0
    S = torch.exp(P)
    S = S / S.sum(dim=-1, keepdim=True)
    K = torch.einsum("...hn,hnl->...hl", C / A, S).real
    return 2 * K if conj_sym else K


def fft_conv(u: Tensor, K: Tensor, D: Tensor | None = None) -> Tensor:
    """Causal convolution y[b, t, h] = sum_{s<=t} K[h, t-s] u[b, s, h] (+ D[h] u[b, t, h]).

    u (B, L, H), K (H, L) -> (B, L, H). FFT of length 2L, so nothing wraps around.
    For a bidirectional kernel pass K (2, H, L): forward and backward (anti-causal) halves;
    y[t] then also gets sum_{s>t} K[1, h, s-t-1] u[s].
    """
    L = u.shape[1]
    if K.dim() == 3:  # (2, H, L): place the backward kernel at negative lags (circularly)
        K = torch.nn.functional.pad(K[0], (0, L)) + torch.nn.functional.pad(K[1].flip(-1), (L, 0))
    n = 2 * L
    u_f = torch.fft.rfft(u.transpose(1, 2), n=n)  # (B, H, L+1): FFT along the contiguous axis
    k_f = torch.fft.rfft(K, n=n)  # (H, L+1)
    y = torch.fft.irfft(u_f * k_f, n=n)[..., :L].transpose(1, 2)  # (B, L, H)
    return y if D is None else y + u * D


def chunked_ssm_conv(
    u: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    dt: Tensor,
    D: Tensor | None = None,
    disc: str = "zoh",
    conj_sym: bool = True,
    chunk: int = 64,
) -> Tensor:
    """``fft_conv(u, ssm_kernel(A, B, C, dt, L), D)`` without the FFT (the same y to float32
    rounding): matmuls over chunks of T = ``chunk`` steps, O(B L H (T + N')) flops and
    O(B L H) memory. u (B, L, H) real; A, B, C (H, N') complex; dt (H,) -> (B, L, H).

    Cut the sequence into chunks c of T steps, t the position inside a chunk:
        within a chunk:  y[c, t] = sum_{s<=t} K[t - s] u[c, s]          (T x T Toeplitz)
        chunk states:    x_c = dA^T x_{c-1} + sum_s dA^(T-1-s) dB u[c, s]
        from the past:   y[c, t] += Re(sum_n C dA^(t+1) x_{c-1})         (x2 if conj_sym)
    so every product is a batched matmul over channels; the scan runs over L / T chunks.
    """
    if C.dim() == 3:  # (dirs, H, N')
        y = chunked_ssm_conv(u, A, B, C[0], dt, D, disc, conj_sym, chunk)
        if C.shape[0] == 1:
            return y
        # anti-causal: y[t] += sum_{s>t} K1[s-t-1] u[s] = the causal conv of the flipped
        # sequence, delayed one step, flipped back
        z = chunked_ssm_conv(u.flip(1), A, B, C[1], dt, None, disc, conj_sym, chunk)
        return y + torch.nn.functional.pad(z, (0, 0, 1, 0))[:, : u.shape[1]].flip(1)
    Bsz, L, H = u.shape
    T = max(1, min(chunk, L))
    n_chunks = -(-L // T)
    uc = torch.nn.functional.pad(u, (0, 0, 0, n_chunks * T - L)).view(Bsz, n_chunks, T, H)
    dA, dB, log_dA = discretize(A, B, dt.unsqueeze(-1), disc)  # (H, N')
    scale = 2.0 if conj_sym else 1.0
    pos = torch.arange(T, device=u.device, dtype=log_dA.real.dtype)

    K = scale * vandermonde(C * dB, log_dA, T).real  # (H, T): the first T taps
    if D is not None:
        K = K + torch.nn.functional.pad(D.to(K.dtype)[:, None], (0, T - 1))
    lag = pos[:, None] - pos[None, :]  # (T, T): t - s
    toeplitz = torch.where(lag >= 0, K[:, lag.clamp(min=0).long()], 0.0)  # (H, T, T)
    y = torch.einsum("hts,bcsh->bcth", toeplitz, uc)  # (B, n_chunks, T, H)
    if n_chunks == 1:
        return y.reshape(Bsz, T, H)[:, :L]

    W = dB.unsqueeze(-1) * torch.exp(log_dA.unsqueeze(-1) * (T - 1 - pos))  # (H, N', T)
    S = torch.einsum("hns,bcsh->bchn", torch.cat([W.real, W.imag], 1), uc)  # (B, nc, H, 2N')
    S = torch.complex(*S.chunk(2, dim=-1))  # (B, n_chunks, H, N'): each chunk's own state
    dA_T = torch.exp(log_dA * T)  # (H, N')
    own = S.unbind(1)  # one backward for all chunks (indexing S[:, c] would zero-fill each)
    states = [torch.zeros_like(own[0])]  # x_{c-1} for c = 0, 1, ...
    for c in range(n_chunks - 1):
        states.append(dA_T * states[-1] + own[c])
    X = torch.stack(states, dim=1)  # (B, n_chunks, H, N')
    V = scale * C.unsqueeze(-1) * torch.exp(log_dA.unsqueeze(-1) * (pos + 1))  # (H, N', T)
    past = torch.einsum("hnt,bchn->bcth", torch.cat([V.real, -V.imag], 1), torch.cat([X.real, X.imag], -1))
    return (y + past).reshape(Bsz, n_chunks * T, H)[:, :L]


def ssm_recurrence(
    A: Tensor, B: Tensor, C: Tensor, dt: Tensor, u: Tensor, disc: str = "zoh", conj_sym: bool = True
) -> Tensor:
    """Reference: step the diagonal SSM x_t = dA x_{t-1} + dB u_t, y_t = Re(C x_t), one step a
    Python iteration (for tests; slow). u (B, L, H) real, A, B, C (H, N') -> y (B, L, H)."""
    dA, dB, _ = discretize(A, B, dt.unsqueeze(-1), disc)  # (H, N')
    x = torch.zeros(u.shape[0], *dA.shape, dtype=dA.dtype, device=u.device)  # (B, H, N')
    ys = []
    for t in range(u.shape[1]):
        x = dA * x + dB * u[:, t, :, None]
        ys.append((C * x).sum(-1).real)  # (B, H)
    y = torch.stack(ys, dim=1)
    return 2 * y if conj_sym else y
