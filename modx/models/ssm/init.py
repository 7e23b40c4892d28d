"""Diagonal initialisations of (A, B) for S4D / S5 (PAPERS.md sections 3-5).

Each initialiser returns complex128 numpy arrays. The conjugate-symmetric ones (legs, inv,
lin, real, dss, legt, fout) keep N//2 modes and stand for N real states through the
"2 Re" trick of the kernel; PTD keeps all N modes, because its perturbed spectrum is not
conjugate-paired.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .hippo import nplr, transition

CONJ_INITS = ("legs", "inv", "lin", "real", "dss", "legt", "fout")
FULL_INITS = ("ptd", "ptd-random")
INITS = CONJ_INITS + FULL_INITS


def diagonal_init(name: str, N: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) complex128, length N//2 (conjugate-symmetric inits) or N (ptd, ptd-random).

    - legs / dss: eigenvalues of the normal part of HiPPO-LegS (Re = -1/2), B~ = V^* B / 2
      (the 1/2 makes the diagonal transfer function approach the full LegS one; S4D sec. 3).
    - inv: A_n = -1/2 + i (N/pi)(N/(2n+1) - 1); lin: A_n = -1/2 + i pi n;
      real: A_n = -(n+1); B = 1 for all three (S4D sec. 4).
    - legt / fout: the normal parts of these measures are skew (Re = 0); as S4D-Lin does
      for FouT, the real part is set to -1/2. B~ = V^* B / 2.
    - ptd: eigen-decomposition of HiPPO-LegS + E with the optimised perturbation E;
      ptd-random: a random complex Gaussian E (PTD paper); B~ = V^{-1} B, Re(Lambda) < 0.
    """
    if N < 2 or N % 2:
        raise ValueError(f"d_state N must be a positive even number, got {N}")
    n = np.arange(N // 2, dtype=np.float64)
    if name in ("legs", "dss", "legt", "fout"):
        W, _, Bt, _ = nplr("legs" if name == "dss" else name, N)
        if name in ("legt", "fout"):
            W = -0.5 + 1j * W.imag
        return W.astype(np.complex128), (0.5 * Bt).astype(np.complex128)
    if name == "inv":
        A = -0.5 + 1j * (N / np.pi) * (N / (2 * n + 1) - 1)
    elif name == "lin":
        A = -0.5 + 1j * np.pi * n
    elif name == "real":
        A = -(n + 1) + 0j
    elif name in FULL_INITS:
        Lambda, _, _, Bt = ptd_init("legs", N, method="opt" if name == "ptd" else "random")
        return Lambda.copy(), Bt.copy()
    else:
        raise ValueError(f"unknown diagonal init {name!r}; choose one of {INITS}")
    return A.astype(np.complex128), np.ones(N // 2, dtype=np.complex128)


def perturb_then_diagonalize(
    A: np.ndarray,
    B: np.ndarray | None = None,
    eps: float = 0.02,
    method: str = "opt",
    gamma: float = 300.0,
    steps: int = 100,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PTD (Yu et al., ICLR 2024, PAPERS.md 4): A + E = V diag(Lambda) V^{-1}, V well conditioned.

    method "random": E = eps ||A||_F G / ||G||_F with G complex Gaussian (Ginibre), so
    ||E||/||A|| = eps and cond(V) ~ 1/eps. method "opt": start from that random E and minimise
    log cond(V) + gamma ||E||_F / ||A||_F with Adam for `steps` steps (the paper's objective:
    condition number of the eigenvectors plus a penalty on the perturbation size), in float64.
    The defaults (gamma = 300) give cond(V) ~ 50-60 with ||E||/||A|| < 0.005 and a spectrum in
    the left half-plane for N <= 128, and a transfer function within 0.1 max|G| of HiPPO-LegS
    at N = 64; gamma ~ 10 reaches the paper's cond ~ 10-25 with ||E||/||A|| ~ 0.02-0.04, at
    the price of eigenvalues with Re > 0 and a worse transfer function (docs/ssm.md).
    B is accepted for symmetry with the paper's (A, B) interface; project it with Vinv @ B.
    Returns (Lambda (N,), V (N, N), Vinv (N, N), E (N, N)), all complex128; deterministic in seed.
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
        E = _minimise_condition(torch.as_tensor(A, dtype=torch.complex128), E, gamma, steps)
    elif method != "random":
        raise ValueError(f"unknown PTD method {method!r}; choose 'opt' or 'random'")
    E = E.numpy()
    Lambda, V = np.linalg.eig(A + E)
    order = np.argsort(Lambda.imag, kind="stable")
    Lambda, V = Lambda[order], V[:, order]
    return Lambda, V, np.linalg.inv(V), E


def _minimise_condition(A: torch.Tensor, E: torch.Tensor, gamma: float, steps: int) -> torch.Tensor:
    """Adam on E for log cond(V(A + E)) + gamma ||E||_F / ||A||_F; returns the final E.

    Runs single-threaded: these (N, N) eigen-solves are too small to gain from threads, and
    on a busy machine a threaded LAPACK loses an order of magnitude to oversubscription.
    """
    norm_A = torch.linalg.norm(A).item()
    E = E.clone().requires_grad_(True)
    opt = torch.optim.Adam([E], lr=0.05 * torch.linalg.norm(E).item() / A.shape[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            _, V = torch.linalg.eig(A + E)  # unit-norm eigenvector columns
            s = torch.linalg.svdvals(V)
            loss = torch.log(s[0] / s[-1]) + gamma * torch.linalg.norm(E) / norm_A
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return E.detach()


@functools.lru_cache(maxsize=32)
def ptd_init(
    measure: str = "legs", N: int = 64, eps: float = 0.02, method: str = "opt"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cached PTD init of a HiPPO measure: (Lambda (N,), V, Vinv (N, N), B~ = Vinv B (N,)).

    Real parts are reflected to -|Re Lambda| (floored at 1e-4) so that every mode decays
    (PAPERS.md 4, "force Re(Lambda) < 0"). The arrays are shared by the cache: copy before
    modifying them.
    """
    A, B = transition(measure, N)
    Lambda, V, Vinv, _ = perturb_then_diagonalize(A, B, eps=eps, method=method)
    Lambda = -np.maximum(np.abs(Lambda.real), 1e-4) + 1j * Lambda.imag
    return Lambda, V, Vinv, Vinv @ B
