"""S4D and S5 layers: batch-first (B, L, H) -> (B, L, H) modules around the pure functions
of kernel.py. SSM parameters (dt, A, B) carry `_modx_ssm = True` so that optimisers can give
them their own learning rate and no weight decay (`ssm_param_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .fused import circular_kernel, conv_act, conv_act_glu
from .hippo import nplr
from .init import FULL_INITS, INITS, diagonal_init, ptd_for_init
from .kernel import discretize, dss_kernel, fft_conv, ssm_kernel

TRANSFORMS = ("exp", "relu", "softplus", "none")
_MIN_DECAY = 1e-4


def _real_param(re: Tensor, transform: str) -> Tensor:
    """Inverse of `_real_part`: the parameter that gives the (negative) real parts `re`."""
    decay = (-re).clamp_min(_MIN_DECAY)
    if transform == "exp":
        return decay.log()
    if transform == "relu":
        return decay
    if transform == "softplus":
        return decay + torch.log(-torch.expm1(-decay))  # softplus^{-1}, overflow-free
    if transform == "none":
        return -decay
    raise ValueError(f"unknown real-part transform {transform!r}; choose one of {TRANSFORMS}")


def _real_part(p: Tensor, transform: str) -> Tensor:
    """Re(A) < 0 from its parameter (PAPERS.md 3): -exp(p), -relu(p), -softplus(p), or p clamped."""
    if transform == "exp":
        return -torch.exp(p)
    if transform == "relu":
        return -torch.relu(p).clamp_min(_MIN_DECAY)
    if transform == "softplus":
        return -nn.functional.softplus(p)
    return p.clamp_max(-_MIN_DECAY)


def _compute_dtype(p: Tensor) -> torch.dtype:
    """float64 parameters compute in float64 (tests); anything else in float32."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _log_uniform(n: int, lo: float, hi: float) -> Tensor:
    return torch.rand(n) * (math.log(hi) - math.log(lo)) + math.log(lo)


def _activation(name: str) -> nn.Module:
    acts = {"gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; choose one of {tuple(acts)}")
    return acts[name]()


class HalfGLU(nn.Module):
    """S5's `half_glu1` output: x * sigmoid(W x + b), x (..., H) -> (..., H)."""

    def __init__(self, H: int) -> None:
        super().__init__()
        self.gate = nn.Linear(H, H)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.gate(x))  # autocast's dtype, as nn.GLU after a Linear
        return x.to(gate.dtype) * gate


OUTPUTS = ("glu", "half_glu1", "linear", "none")


def _output(name: str, H: int) -> nn.Module:
    """Position-wise output projection: 'glu' (linear to 2H, then GLU, as the S4D reference),
    'half_glu1' (x * sigmoid(W x + b), the S5 reference's default), 'linear', or 'none'."""
    if name == "glu":
        return nn.Sequential(nn.Linear(H, 2 * H), nn.GLU(dim=-1))
    if name == "half_glu1":
        return HalfGLU(H)
    if name == "linear":
        return nn.Linear(H, H)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown output {name!r}; choose one of {OUTPUTS}")


def lecun_normal(*shape: int, fan_in: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """jax.nn.initializers.lecun_normal: a normal truncated to +-2 standard deviations and
    rescaled so that the variance is 1 / fan_in (the S5 reference's B and C)."""
    std = (1.0 / fan_in) ** 0.5 / 0.87962566103423978  # the truncation's std correction
    return nn.init.trunc_normal_(torch.empty(shape, dtype=dtype), std=std, a=-2 * std, b=2 * std)


class _SSMBase(nn.Module):
    """Keeps the `_modx_ssm` (and `_modx_ssm_lr`) tags on the SSM parameters, also through
    deepcopy / pickling and `.to()` conversions that create new Parameter objects."""

    def _register_ssm(self, names: tuple[str, ...], lr: float | None) -> None:
        self._ssm_tags = dict.fromkeys(names, lr)
        self._retag()

    def _retag(self) -> None:
        for name, lr in getattr(self, "_ssm_tags", {}).items():
            p = getattr(self, name)
            p._modx_ssm = True
            if lr is not None:
                p._modx_ssm_lr = lr

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._retag()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        out = super()._apply(fn, recurse)
        self._retag()
        return out

    def ssm_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters (dt, A, B) that want their own learning rate and no weight decay."""
        self._retag()
        return (getattr(self, name) for name in self._ssm_tags)

    def param_groups(
        self, lr: float, weight_decay: float, ssm_lr: float | None = None
    ) -> list[dict]:
        """Optimiser groups of this layer; see `ssm_param_groups`."""
        return ssm_param_groups(self, lr, weight_decay, ssm_lr)


class S4D(_SSMBase):
    """Diagonal state space layer (Gu et al. 2022; PAPERS.md 3), H independent channels.

    y = act(causal_conv(u, K) + D u) -> dropout -> output projection, with K = ssm_kernel
    (or dss_kernel for init="dss"). bidirectional=True adds an anti-causal kernel with its own
    C (shared A, B, dt) so every position sees the whole sequence. init: a name of
    modx.models.ssm.init.diagonal_init (B_clip, B_scale: its options for the NPLR inits).
    C is complex standard normal; for "ptd", "ptd-robust", "ptd-random" (all d_state modes
    kept) it is C~ = C V with C real standard normal, as the authors' S4-PTD, so that the
    diagonal system is the perturbed HiPPO-LegS system (PAPERS.md 4).
    Kernel and FFT run in float32 (float64 if the parameters are) with autocast disabled.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        init: str = "legs",
        disc: str = "zoh",
        bidirectional: bool = False,
        transform: str = "exp",
        dropout: float = 0.0,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr: float | None = None,
        activation: str = "gelu",
        output: str = "glu",
        B_clip: float | None = 2.0,
        B_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown S4D init {init!r}; choose one of {INITS}")
        if transform not in TRANSFORMS:
            raise ValueError(
                f"unknown real-part transform {transform!r}; choose one of {TRANSFORMS}"
            )
        H = d_model
        self.d_model, self.d_state, self.init, self.disc = H, d_state, init, disc
        self.bidirectional = bidirectional
        self.conj_sym = init not in FULL_INITS
        self.transform = "none" if init == "dss" else transform
        n_dir = 2 if bidirectional else 1
        if self.conj_sym:
            A, B = (torch.as_tensor(x) for x in diagonal_init(init, d_state, B_clip, B_scale))
            C = torch.randn(n_dir, H, d_state // 2, dtype=torch.complex128)  # E|C|^2 = 1
        else:
            Lam, V, _, Bt = (torch.as_tensor(x) for x in ptd_for_init(init, d_state))
            A, B = Lam, Bt  # (N,) complex128
            C = torch.randn(n_dir, H, d_state, dtype=torch.float64).to(V.dtype) @ V  # C~ = C V
        A, B = A.repeat(H, 1), B.repeat(H, 1)  # (H, N')
        self.log_dt = nn.Parameter(_log_uniform(H, dt_min, dt_max))  # (H,)
        if init == "dss":
            self.A_re = nn.Parameter(A.real.float())  # raw real parts, no transform
        else:
            self.A_re = nn.Parameter(_real_param(A.real, self.transform).float())
        self.A_im = nn.Parameter(A.imag.float())  # (H, N')
        self.B = nn.Parameter(torch.view_as_real(B).float())  # (H, N', 2)
        self._register_ssm(("log_dt", "A_re", "A_im", "B"), lr)
        self.C = nn.Parameter(torch.view_as_real(C).float())  # (dirs, H, N', 2)
        self.D = nn.Parameter(torch.randn(H))
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.output = _output(output, H)

    def ssm(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A, B, C, dt) of the diagonal SSM: A, B (H, N'), C (dirs, H, N') complex, dt (H,)."""
        dtype = _compute_dtype(self.A_re)
        A_re = (
            self.A_re.to(dtype)
            if self.init == "dss"
            else _real_part(self.A_re.to(dtype), self.transform)
        )
        A = torch.complex(A_re, self.A_im.to(dtype))
        B = torch.view_as_complex(self.B.to(dtype))
        C = torch.view_as_complex(self.C.to(dtype))
        return A, B, C, torch.exp(self.log_dt.to(dtype))

    def kernel(self, L: int) -> Tensor:
        """Convolution kernel (dirs, H, L)."""
        A, B, C, dt = self.ssm()
        if self.init == "dss":
            return dss_kernel(A, C * B, dt, L, conj_sym=self.conj_sym)
        return ssm_kernel(A, B, C, dt, L, disc=self.disc, conj_sym=self.conj_sym)

    def forward(self, u: Tensor) -> Tensor:  # (B, L, H) -> (B, L, H)
        autocast = torch.is_autocast_enabled(u.device.type)
        with torch.autocast(device_type=u.device.type, enabled=False):
            L = u.shape[1]
            K = self.kernel(L)  # (dirs, H, L)
            # the skip D u is the lag-0 tap of the causal kernel: one convolution does both
            K_fwd = K[0] + nn.functional.pad(self.D.to(K.dtype)[:, None], (0, L - 1))
            K = torch.stack([K_fwd, K[1]]) if self.bidirectional else K_fwd
            act = _fused_activation(self.activation)
            # CPU only: on a GPU one cuFFT over the whole batch needs no blocking (untested)
            fused = act is not None and u.dtype == K.dtype and u.device.type == "cpu"
            if fused:
                Kc = circular_kernel(K, L)  # (H, 2L)
                drop = self.training and self.dropout.p > 0
                glu = self.output[0] if _is_glu(self.output) else None
                if glu is not None and not autocast and not drop and glu.weight.dtype == K.dtype:
                    # convolution, activation and GLU projection per batch element
                    return conv_act_glu(u, Kc, glu.weight, glu.bias, act)
                y = conv_act(u, Kc, act)  # (B, L, H) view of a channel-major (B, H, L)
            else:
                y = fft_conv(u.to(K.dtype), K)  # (B, L, H)
        y = self.dropout(y if fused else self.activation(y.to(u.dtype)))
        return self.output(y)


def _fused_activation(module: nn.Module) -> str | None:
    """The `conv_act` name of an activation module, None if it has no fused form."""
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.Identity:
        return "identity"
    return None


def _is_glu(module: nn.Module) -> bool:
    """Is `module` the 'glu' output, nn.Sequential(nn.Linear(H, 2H), nn.GLU(dim=-1))?"""
    return (
        type(module) is nn.Sequential
        and len(module) == 2
        and type(module[0]) is nn.Linear
        and module[0].bias is not None
        and type(module[1]) is nn.GLU
        and module[1].dim == -1
    )


def linear_scan(log_dA: Tensor, b: Tensor) -> Tensor:
    """x_t = dA x_{t-1} + b_t (x_{-1} = 0) along dim 1 by log-depth doubling (Hillis-Steele).

    The S5 associative scan (Smith et al. 2023) with a time-invariant dA = exp(log_dA):
    after the step with offset d, b_t holds sum_{k<2d} dA^k b_{t-k}; ceil(log2 L) steps, each
    one vectorised elementwise update. log_dA (P,), b (B, L, P) complex -> x (B, L, P).
    """
    L, d = b.shape[1], 1
    while d < L:
        a_d = torch.exp(log_dA * d)  # dA^d (P,)
        b = torch.cat([b[:, :d], b[:, d:] + a_d * b[:, :-d]], dim=1)
        d *= 2
    return b


def sequential_scan(log_dA: Tensor, b: Tensor) -> Tensor:
    """Reference for `linear_scan`: one Python step per time index (tests only)."""
    dA = torch.exp(log_dA)
    x = torch.zeros_like(b[:, 0])
    xs = []
    for t in range(b.shape[1]):
        x = dA * x + b[:, t]
        xs.append(x)
    return torch.stack(xs, dim=1)


def _block_diag_init(init: str, P: int, blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S5 init (PAPERS.md 5): Lambda (P',), V (P, P'), Vinv (P', P) from `blocks` copies of the
    HiPPO-N (normal part of LegS) or PTD eigen-decomposition of a (P/blocks)-state block."""
    if P % blocks:
        raise ValueError(f"S5 d_state {P} must be divisible by blocks {blocks}")
    Pb = P // blocks
    if init in ("legs", "hippo-n"):
        W, V, _, _ = nplr("legs", Pb)  # (Pb/2,), (Pb, Pb/2), V^* V = I
        Vinv = V.conj().T
    elif init in FULL_INITS:
        W, V, Vinv, _ = ptd_for_init(init, Pb)
    else:
        raise ValueError(
            f"unknown S5 init {init!r}; choose 'legs' (HiPPO-N) or one of {FULL_INITS}"
        )
    return (
        np.tile(W, blocks),
        np.kron(np.eye(blocks), V),
        np.kron(np.eye(blocks), Vinv),
    )


class S5(_SSMBase):
    """Multi-input multi-output diagonal SSM (Smith et al. 2023; PAPERS.md 5).

    x_t = dA x_{t-1} + dB u_t (state P' complex), y_t = Re(C~ x_t) (x2 with conjugate pairs)
    + D u_t, computed with `linear_scan`; then activation, dropout, output projection.
    Lambda from block-diagonal HiPPO-N (init="legs") or PTD, one dt per state. As the S5
    reference (`C_init="trunc_standard_normal"`): B~ = V^{-1} B with B (P, H) lecun-normal
    (std 1/sqrt(P)), C~ = C V with C (H, P) complex, real and imaginary parts lecun-normal
    (std 1/sqrt(P) each); output `half_glu1`; Re(Lambda) clipped at -1e-4 only with
    clip_eigs=True (transform "none"; the other transforms are negative anyway).
    bidirectional=True adds a reverse-time scan with its own C~.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        init: str = "legs",
        blocks: int = 1,
        disc: str = "zoh",
        bidirectional: bool = False,
        transform: str = "none",
        dropout: float = 0.0,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr: float | None = None,
        activation: str = "gelu",
        output: str = "half_glu1",
        clip_eigs: bool = False,
    ) -> None:
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(
                f"unknown real-part transform {transform!r}; choose one of {TRANSFORMS}"
            )
        H, P = d_model, d_state
        self.d_model, self.d_state, self.init, self.disc = H, P, init, disc
        self.bidirectional, self.transform, self.clip_eigs = bidirectional, transform, clip_eigs
        self.conj_sym = init not in FULL_INITS
        Lam, V, Vinv = (torch.as_tensor(x) for x in _block_diag_init(init, P, blocks))
        n_modes = Lam.shape[0]
        B = lecun_normal(P, H, fan_in=P)  # (P, H), fan in P as jax's lecun_normal of (P, H)
        n_dir = 2 if bidirectional else 1
        C = torch.complex(*(lecun_normal(n_dir, H, P, fan_in=P) for _ in range(2)))  # (dirs, H, P)
        self.Lambda_re = nn.Parameter(_real_param(Lam.real, transform).float())  # (P',)
        self.Lambda_im = nn.Parameter(Lam.imag.float())
        self.log_dt = nn.Parameter(_log_uniform(n_modes, dt_min, dt_max))  # (P',)
        self.B = nn.Parameter(torch.view_as_real(Vinv @ B.to(Vinv.dtype)).float())  # (P', H, 2)
        self._register_ssm(("Lambda_re", "Lambda_im", "log_dt", "B"), lr)
        self.C = nn.Parameter(torch.view_as_real(C @ V).float())  # (dirs, H, P', 2)
        self.D = nn.Parameter(torch.randn(H))
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.output = _output(output, H)

    def ssm(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Discretised (log dA (P',), dA (P',), dB (P', H), C~ (dirs, H, P')), complex."""
        dtype = _compute_dtype(self.Lambda_re)
        re = self.Lambda_re.to(dtype)
        if self.transform != "none" or self.clip_eigs:
            re = _real_part(re, self.transform)
        Lam = torch.complex(re, self.Lambda_im.to(dtype))
        B = torch.view_as_complex(self.B.to(dtype))
        dt = torch.exp(self.log_dt.to(dtype))
        dA, dB, log_dA = discretize(Lam[:, None], B, dt[:, None], self.disc)  # (P', 1), (P', H)
        return log_dA[:, 0], dA[:, 0], dB, torch.view_as_complex(self.C.to(dtype))

    def forward(self, u: Tensor) -> Tensor:  # (B, L, H) -> (B, L, H)
        with torch.autocast(device_type=u.device.type, enabled=False):
            log_dA, _, dB, C = self.ssm()
            v = u.to(dB.real.dtype)
            Bu = torch.complex(v @ dB.real.T, v @ dB.imag.T)  # (B, L, P')
            x = linear_scan(log_dA, Bu)  # (B, L, P')
            y = x.real @ C[0].real.T - x.imag @ C[0].imag.T  # Re(x C~^T) (B, L, H)
            if self.bidirectional:
                xb = linear_scan(log_dA, Bu.flip(1)).flip(1)
                y = y + xb.real @ C[1].real.T - xb.imag @ C[1].imag.T
            y = (2 * y if self.conj_sym else y) + v * self.D.to(v.dtype)
        y = self.dropout(self.activation(y.to(u.dtype)))
        return self.output(y)


def ssm_param_groups(
    module: nn.Module, lr: float, weight_decay: float, ssm_lr: float | None = None
) -> list[dict]:
    """AdamW parameter groups: everything else at (lr, weight_decay); parameters tagged
    `_modx_ssm` with weight decay 0 and the learning rate their layer was given (`lr=`), else
    `ssm_lr`, else min(lr, 1e-3) (PAPERS.md 3, "Optimisation")."""
    default_ssm_lr = ssm_lr if ssm_lr is not None else min(lr, 1e-3)
    rest: list[nn.Parameter] = []
    by_lr: dict[float, list[nn.Parameter]] = {}
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "_modx_ssm", False):
            by_lr.setdefault(getattr(p, "_modx_ssm_lr", default_ssm_lr), []).append(p)
        else:
            rest.append(p)
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}] if rest else []
    groups += [{"params": ps, "lr": g_lr, "weight_decay": 0.0} for g_lr, ps in by_lr.items()]
    return groups
