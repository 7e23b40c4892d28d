"""HiPPO transition matrices and their normal-plus-low-rank (NPLR) decomposition.

Gu et al., "How to Train Your HiPPO" (ICLR 2023) and "Efficiently Modeling Long
Sequences with Structured State Spaces" (ICLR 2022); PAPERS.md section 5.
Everything here is float64 / complex128 numpy: these matrices are computed once at
initialisation, and their eigen-decompositions need the precision.
"""

from __future__ import annotations

import numpy as np

MEASURES = ("legs", "legt", "fout", "lagt")


def transition(measure: str, N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO state matrix A (N, N) and input matrix B (N,) of the ODE x' = A x + B u.

    - legs (PAPERS.md 5): A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k);
      B_n = sqrt(2n+1).
    - legt: A_nk = -(1/2) sqrt(2n+1) sqrt(2k+1) * (1 if n >= k else (-1)^(n-k)); B_n = sqrt(2n+1)/2.
    - fout: A = pi (-diag(d, 1) + diag(d, -1)) - B B^T, d = [0, 0, 1, 0, 2, 0, 3, ...];
      B = [1, 0, sqrt2, 0, sqrt2, 0, ...].
    - lagt (Laguerre, translated): A = I/2 - tril(ones); B = ones.
    """
    if N < 1:
        raise ValueError(f"HiPPO state size N must be positive, got {N}")
    n = np.arange(N, dtype=np.float64)
    r = np.sqrt(2 * n + 1)  # (N,)
    i, k = np.meshgrid(n, n, indexing="ij")  # row index n, column index k
    if measure == "legs":
        A = -np.where(i > k, np.outer(r, r), 0.0) - np.diag(n + 1)
        B = r.copy()
    elif measure == "legt":
        sign = np.where(i >= k, 1.0, (-1.0) ** (i - k))
        A = -0.5 * np.outer(r, r) * sign
        B = 0.5 * r
    elif measure == "fout":
        freqs = np.arange(N // 2, dtype=np.float64)
        d = np.stack([np.zeros(N // 2), freqs], axis=-1).reshape(-1)[1:]  # (N-1,) for even N
        d = np.concatenate([d, np.zeros(N - 1 - d.size)])  # odd N: pad the last state
        A = np.pi * (-np.diag(d, 1) + np.diag(d, -1))
        B = np.zeros(N)
        B[0::2] = np.sqrt(2.0)
        B[0] = 1.0
        A = A - np.outer(B, B)
    elif measure == "lagt":
        A = np.eye(N) / 2 - np.tril(np.ones((N, N)))
        B = np.ones(N)
    else:
        raise ValueError(f"unknown HiPPO measure {measure!r}; choose one of {MEASURES}")
    return A, B


def rank_correction(measure: str, N: int) -> np.ndarray:
    """Low-rank term P (r, N) such that A + P^T P is normal (PAPERS.md 5).

    legs: P = sqrt(n + 1/2) (rank 1); legt: rank 2 (even / odd entries of sqrt((2n+1)/2));
    fout: P = B; lagt: P = sqrt(1/2) ones.
    """
    n = np.arange(N, dtype=np.float64)
    if measure == "legs":
        return np.sqrt(n + 0.5)[None, :]
    if measure == "legt":
        p = np.sqrt((2 * n + 1) / 2)
        p0, p1 = p.copy(), p.copy()
        p0[0::2] = 0.0
        p1[1::2] = 0.0
        return np.stack([p0, p1])
    if measure == "fout":
        return transition("fout", N)[1][None, :]
    if measure == "lagt":
        return np.sqrt(0.5) * np.ones((1, N))
    raise ValueError(f"unknown HiPPO measure {measure!r}; choose one of {MEASURES}")


def normal_part(measure: str, N: int) -> np.ndarray:
    """S = A + P^T P (N, N): the normal part of the NPLR form A = S - P^T P."""
    A, _ = transition(measure, N)
    P = rank_correction(measure, N)
    return A + P.T @ P


def nplr(measure: str, N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Diagonalise the normal part S of a HiPPO matrix, keeping one of each conjugate pair.

    S = W_re I + (skew-symmetric): its eigenvalues are W_re + i w with w from the Hermitian
    eigen-problem of -i (S - W_re I) (PAPERS.md 5, "NPLR"). Returns
    W (N//2,) complex eigenvalues with Im >= 0 sorted by imaginary part, V (N, N//2) their
    orthonormal eigenvectors, B~ = V^* B (N//2,) and P~ = V^* P^T (N//2, r), so that
    S = V diag(W) V^* + conj(V diag(W) V^*) and A = S - P^T P.
    """
    if N % 2:
        raise ValueError(f"the NPLR form keeps conjugate pairs: N must be even, got {N}")
    A, B = transition(measure, N)
    P = rank_correction(measure, N)
    S = A + P.T @ P
    w_re = np.mean(np.diag(S))
    skew = S - w_re * np.eye(N)
    if not np.allclose(skew, -skew.T, atol=1e-8 * max(1.0, np.abs(skew).max())):
        raise AssertionError(f"{measure}: A + P^T P is not diagonal-plus-skew")
    w_im, V = np.linalg.eigh(-1j * skew)  # ascending imaginary parts
    W = w_re + 1j * w_im[N // 2 :]
    V = V[:, N // 2 :]
    zero = np.abs(w_im[N // 2 :]) < 1e-9
    if zero.any():
        # a zero-frequency pair: take the real null space {u1, u2} of the skew part and keep
        # (u1 + i u2)/sqrt2, whose conjugate is the dropped partner, so that 2 Re stays exact.
        _, s, vt = np.linalg.svd(skew)
        null = vt[s < 1e-9 * max(1.0, s.max())]  # (2m, N) real
        if zero.sum() * 2 != null.shape[0]:
            raise AssertionError(f"{measure}: odd-dimensional null space in the normal part")
        pairs = (null[0::2] + 1j * null[1::2]) / np.sqrt(2.0)
        V[:, np.flatnonzero(zero)] = pairs.T
    Bt = V.conj().T @ B
    Pt = V.conj().T @ P.T
    return W, V, Bt, Pt
