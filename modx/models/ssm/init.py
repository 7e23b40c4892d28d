"""Diagonal initialisations of (A, B) for S4D / S5 (PAPERS.md sections 3-5).

Each initialiser returns complex128 numpy arrays. The conjugate-symmetric ones (legs, inv,
lin, real, dss, legt, fout) keep N//2 modes and stand for N real states through the
"2 Re" trick of the kernel; the PTD ones keep all N modes, because a perturbed spectrum is
not conjugate-paired.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .hippo import nplr, transition

CONJ_INITS = ("legs", "inv", "lin", "real", "dss", "legt", "fout")
FULL_INITS = ("ptd", "ptd-robust", "ptd-random")
INITS = CONJ_INITS + FULL_INITS

# Named settings of the PTD optimiser (keyword arguments of `perturb_then_diagonalize`).
# converged (default): the paper's operating point, cond(V) ~ 6.5 at ||E||/||A|| ~ 0.04 for
#   N = 32, 64, 128, the spectrum held left of Re = -1/2; 300 eigen-solves (seconds at N = 64).
# robust: modx's earlier default (Adam, 100 steps, gamma 300), a 10x smaller E with
#   cond ~ 60, whose transfer function stays closest to HiPPO-LegS (docs/ssm.md, "PTD").
# random: a random complex Gaussian E with ||E||/||A|| = 0.02 (cond ~ 1/eps, no optimiser).
PTD_SETTINGS: dict[str, dict] = {
    "converged": {"method": "opt", "eps": 1e-3, "gamma": 20.0, "steps": 300,
                  "optimizer": "momentum", "lr": 1e-3, "stability": 1.0},
    "robust": {"method": "opt", "eps": 0.02, "gamma": 300.0, "steps": 100, "optimizer": "adam",
               "lr": 0.05, "stability": 0.0},
    "random": {"method": "random", "eps": 0.02},
}
_PTD_BY_INIT = {"ptd": "converged", "ptd-robust": "robust", "ptd-random": "random"}
_CACHE_VERSION = 1


def diagonal_init(
    name: str, N: int, B_clip: float | None = 2.0, B_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) complex128, length N//2 (conjugate-symmetric inits) or N (PTD inits).

    - legs / dss: eigenvalues of the normal part of HiPPO-LegS (Re = -1/2) and B~ = V^* B with
      Im(B~) clipped to [-B_clip, B_clip], as the S4 reference (`hippo.nplr(..., B_clip=2.0)`,
      without the 1/2 that theory asks for: "we drop this 0.5 factor for simplicity").
      B_scale=0.5, B_clip=None is the theory's (and modx's earlier) S4D-LegS, whose
      transfer function approaches HiPPO-LegS at low frequency (tested).
    - inv: A_n = -1/2 + i (N/pi)(N/(2n+1) - 1); lin: A_n = -1/2 + i pi n;
      real: A_n = -(n+1); B = 1 for all three (S4D sec. 4).
    - legt / fout: the normal parts of these measures are skew (Re = 0); as S4D-Lin does
      for FouT, the real part is set to -1/2. B~ = V^* B, clipped as for legs.
    - ptd / ptd-robust: Lambda and B~ = V^{-1} B of HiPPO-LegS + E, E optimised with the
      named PTD setting ("converged" / "robust"); ptd-random: a random complex Gaussian E.
      B_clip and B_scale do not apply (see `ptd_init`).
    B is multiplied by B_scale for every conjugate-symmetric init (1 by default, as the
    reference's `B_scale`).
    """
    if N < 2 or N % 2:
        raise ValueError(f"d_state N must be a positive even number, got {N}")
    n = np.arange(N // 2, dtype=np.float64)
    if name in FULL_INITS:
        Lambda, _, _, Bt = ptd_for_init(name, N)
        return Lambda.copy(), Bt.copy()
    if name in ("legs", "dss", "legt", "fout"):
        W, _, Bt, _ = nplr("legs" if name == "dss" else name, N)
        if name in ("legt", "fout"):
            W = -0.5 + 1j * W.imag
        if B_clip is not None:
            Bt = Bt.real + 1j * np.clip(Bt.imag, -B_clip, B_clip)
        return W.astype(np.complex128), (B_scale * Bt).astype(np.complex128)
    if name == "inv":
        A = -0.5 + 1j * (N / np.pi) * (N / (2 * n + 1) - 1)
    elif name == "lin":
        A = -0.5 + 1j * np.pi * n
    elif name == "real":
        A = -(n + 1) + 0j
    else:
        raise ValueError(f"unknown diagonal init {name!r}; choose one of {INITS}")
    return A.astype(np.complex128), np.full(N // 2, B_scale, dtype=np.complex128)


def perturb_then_diagonalize(
    A: np.ndarray,
    B: np.ndarray | None = None,
    eps: float = 1e-3,
    method: str = "opt",
    gamma: float = 20.0,
    steps: int = 300,
    seed: int = 0,
    optimizer: str = "momentum",
    lr: float = 1e-3,
    stability: float = 1.0,
    margin: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PTD (Yu et al., ICLR 2024, PAPERS.md 4): A + E = V diag(Lambda) V^{-1}, V well conditioned.

    method "random": E = eps ||A||_F G / ||G||_F with G complex Gaussian (Ginibre), so
    ||E||/||A|| = eps and cond(V) ~ 1/eps. method "opt": start from that random E and minimise

        log cond(V) + gamma ||E||_F / ||A||_F + stability * sum_n relu(Re lambda_n + margin)^2,

    the paper's objective (eigenvector conditioning plus a penalty on the perturbation size)
    with the spectrum held left of Re = -margin, where the authors reflect it afterwards.
    optimizer "momentum" (default): heavy-ball steps along the Frobenius-normalised gradient,
    step length lr ||A||_F cosine-annealed to 0; it moves E only where the objective asks
    (the first, slowest LegS state is barely touched), which keeps the kernel close to LegS.
    optimizer "adam": Adam at lr ||E_0||_F / N (the "robust" setting's optimiser).
    The defaults are `PTD_SETTINGS["converged"]`. B is accepted for symmetry with the
    paper's (A, B) interface; project it with Vinv @ B. Float64, single-threaded.
    Returns (Lambda (N,), V (N, N), Vinv (N, N), E (N, N)), all complex128, Lambda sorted by
    imaginary part; deterministic in seed.
    """
    del B
    A = np.asarray(A, dtype=np.float64)
    N = A.shape[0]
    norm_A = float(np.linalg.norm(A))
    g = torch.Generator().manual_seed(seed)
    G = torch.complex(
        torch.randn(N, N, generator=g, dtype=torch.float64),
        torch.randn(N, N, generator=g, dtype=torch.float64),
    )
    E = eps * norm_A * G / torch.linalg.norm(G)  # (N, N) complex
    if method == "opt":
        if optimizer not in ("momentum", "adam"):
            raise ValueError(f"unknown PTD optimizer {optimizer!r}; choose 'momentum' or 'adam'")
        A_t = torch.as_tensor(A, dtype=torch.complex128)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # (N, N) eigen-solves gain nothing from threads
        try:
            step = _momentum_steps if optimizer == "momentum" else _adam_steps
            E = step(A_t, E, int(steps), lr, lambda E_: _ptd_objective(A_t, E_, gamma, stability, margin))
        finally:
            torch.set_num_threads(threads)
    elif method != "random":
        raise ValueError(f"unknown PTD method {method!r}; choose 'opt' or 'random'")
    return _diagonalize(A, E.numpy())


def _ptd_objective(A: Tensor, E: Tensor, gamma: float, stability: float, margin: float) -> Tensor:
    """log cond(V(A + E)) + gamma ||E||/||A|| + stability sum relu(Re lambda + margin)^2."""
    lam, V = torch.linalg.eig(A + E)  # unit-norm eigenvector columns
    s = torch.linalg.svdvals(V)
    loss = torch.log(s[0] / s[-1]) + gamma * torch.linalg.norm(E) / torch.linalg.norm(A)
    if stability:
        loss = loss + stability * torch.relu(lam.real + margin).square().sum()
    return loss


def _momentum_steps(A: Tensor, E: Tensor, steps: int, lr: float, objective) -> Tensor:
    """Heavy ball (0.9) on the normalised gradient, step lr ||A|| (1 + cos(pi t / steps)) / 2."""
    E = E.clone().requires_grad_(True)
    velocity = torch.zeros_like(E)
    for t in range(steps):
        (grad,) = torch.autograd.grad(objective(E), E)
        velocity = 0.9 * velocity + grad / torch.linalg.norm(grad)
        with torch.no_grad():
            E -= lr * torch.linalg.norm(A) * 0.5 * (1 + math.cos(math.pi * t / steps)) * velocity
    return E.detach()


def _adam_steps(A: Tensor, E: Tensor, steps: int, lr: float, objective) -> Tensor:
    """Adam at the constant rate lr ||E_0|| / N (modx's earlier PTD optimiser)."""
    E = E.clone().requires_grad_(True)
    opt = torch.optim.Adam([E], lr=lr * torch.linalg.norm(E).item() / A.shape[0])
    for _ in range(steps):
        loss = objective(E)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return E.detach()


def _diagonalize(A: np.ndarray, E: np.ndarray) -> tuple[np.ndarray, ...]:
    """(Lambda, V, Vinv, E) of A + E, eigenvalues sorted by imaginary part."""
    Lambda, V = np.linalg.eig(A + E)
    order = np.argsort(Lambda.imag, kind="stable")
    Lambda, V = Lambda[order], V[:, order]
    return Lambda, V, np.linalg.inv(V), E


def cache_dir() -> Path:
    """Where optimised PTD perturbations are kept: $MODX_CACHE_DIR, else ~/.cache/modx."""
    return Path(os.environ.get("MODX_CACHE_DIR") or Path.home() / ".cache" / "modx")


def _perturbation(measure: str, N: int, setting: str) -> np.ndarray:
    """E for `ptd_init`, read from / written to the on-disk cache (a failed write is ignored:
    the cache only saves time; the solver is deterministic)."""
    A, _ = transition(measure, N)
    kwargs = PTD_SETTINGS[setting]
    key = json.dumps([_CACHE_VERSION, measure, N, kwargs], sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    path = cache_dir() / "ptd" / f"{measure}-N{N}-{setting}-{digest}.npy"
    if path.is_file():
        try:
            E = np.load(path)
            if E.shape == (N, N):
                return E
        except (OSError, ValueError):
            pass
    E = perturb_then_diagonalize(A, **kwargs)[3]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, E)
        tmp.replace(path)
    except OSError:
        pass
    return E


@functools.lru_cache(maxsize=32)
def ptd_init(
    measure: str = "legs", N: int = 64, setting: str = "converged"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cached PTD init of a HiPPO measure: (Lambda (N,), V, Vinv (N, N), B~ = Vinv B (N,)).

    setting names one of `PTD_SETTINGS` ("converged", "robust", "random"); its E is cached in
    memory and on disk (`cache_dir()/ptd/`, keyed by measure, N and the setting's values).
    Real parts are reflected to -|Re Lambda| (floored at 1e-4), as the authors do, so that
    every mode decays (PAPERS.md 4; a no-op for "converged", whose penalty keeps Re < -1/2).
    The arrays are shared by the cache: copy before modifying them.
    """
    if setting not in PTD_SETTINGS:
        raise ValueError(f"unknown PTD setting {setting!r}; choose one of {tuple(PTD_SETTINGS)}")
    A, B = transition(measure, N)
    Lambda, V, Vinv, _ = _diagonalize(A, _perturbation(measure, N, setting))
    Lambda = -np.maximum(np.abs(Lambda.real), 1e-4) + 1j * Lambda.imag
    return Lambda, V, Vinv, Vinv @ B


def ptd_for_init(name: str, N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`ptd_init` of HiPPO-LegS for an init in FULL_INITS: ptd (converged), ptd-robust,
    ptd-random."""
    if name not in _PTD_BY_INIT:
        raise ValueError(f"unknown PTD init {name!r}; choose one of {FULL_INITS}")
    return ptd_init("legs", N, _PTD_BY_INIT[name])
