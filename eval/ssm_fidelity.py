"""How faithful are the diagonal SSM initialisations to HiPPO-LegS? (PAPERS.md 3-4)

(a) S4D-LegS -> S4-LegS: relative L2 error of the ZOH-discretised kernels of the first
    basis functions (C = e_n, n < 4) as the state size N grows.
(b) Transfer functions G(i w) = C (i w - A)^{-1} B of HiPPO-LegS, its S4D diagonal restriction
    and PTD, over frequency: S4D spikes at its eigenfrequencies, PTD stays uniformly close.
(c) PTD eigenvector condition number vs perturbation size ||E||/||A||, random and optimised.

    python eval/ssm_fidelity.py [--out-dir docs/figures] [--quick]

Writes ssm_kernel_convergence.png, ssm_transfer.png, ssm_ptd_condition.png and
ssm_fidelity.json into --out-dir and prints the numbers. All math in float64 numpy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg as sla  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modx.models.ssm.hippo import nplr, transition  # noqa: E402
from modx.models.ssm.init import diagonal_init, perturb_then_diagonalize  # noqa: E402


def s4_kernel(A: np.ndarray, B: np.ndarray, C: np.ndarray, dt: float, L: int) -> np.ndarray:
    """Dense ZOH kernel K[c, l] = C dA^l dB, dA = expm(dt A), dB = A^{-1}(dA - I) B. -> (c, L)."""
    dA = sla.expm(dt * A)
    x = np.linalg.solve(A, (dA - np.eye(len(A))) @ B)
    K = np.empty((C.shape[0], L))
    for ell in range(L):
        K[:, ell] = C @ x
        x = dA @ x
    return K


def s4d_kernel(Lam: np.ndarray, Bt: np.ndarray, Ct: np.ndarray, dt: float, L: int) -> np.ndarray:
    """Diagonal ZOH kernel 2 Re(C~ dB~ dA^l) over conjugate-paired modes. Ct (c, N') -> (c, L)."""
    dA = np.exp(dt * Lam)
    dB = (dA - 1) / Lam * Bt
    return 2 * np.real((Ct * dB) @ (dA[:, None] ** np.arange(L)))


def kernel_convergence(Ns: list[int], dts: list[float], horizon: float = 10.0) -> dict:
    """(a): relative L2 kernel error of S4D-LegS (normal part, B/2) vs S4-LegS per (dt, N)."""
    out: dict = {"N": Ns, "basis": [0, 1, 2, 3], "horizon": horizon, "error": {}}
    for dt in dts:
        L = int(round(horizon / dt))
        rows = []
        for N in Ns:
            A, B = transition("legs", N)
            _, V, _, _ = nplr("legs", N)
            Lam, Bt = diagonal_init("legs", N)
            C = np.eye(N)[:4]
            K = s4_kernel(A, B, C, dt, L)
            Kd = s4d_kernel(Lam, Bt, C @ V, dt, L)
            rows.append((np.linalg.norm(K - Kd, axis=1) / np.linalg.norm(K, axis=1)).tolist())
        out["error"][str(dt)] = rows  # [N][basis]
    return out


def transfer_functions(N: int, n_freq: int, seed: int = 0) -> tuple[dict, dict]:
    """(b): |G(i w)| of LegS (dense solve), S4D-LegS and PTD; errors relative to max |G|, and
    below w = 1 relative to |G(i w)| itself (the low-frequency gain)."""
    A, B = transition("legs", N)
    C = np.random.default_rng(seed).standard_normal(N)
    _, V, _, _ = nplr("legs", N)
    Lam_d, Bt_d = diagonal_init("legs", N)
    Lam_p, Vp, Vinv_p, E = perturb_then_diagonalize(A, B)
    # a log grid plus the resonances of each diagonal system, where spikes would sit
    w = np.unique(
        np.concatenate(
            [np.logspace(-1, np.log10(3 * N * N), n_freq), Lam_d.imag, np.abs(Lam_p.imag)]
        )
    )
    eye = np.eye(N)
    G = np.array([C @ np.linalg.solve(1j * x * eye - A, B) for x in w])
    Cd, Cp = C @ V, C @ Vp

    def diag_tf(Ct, Lam, Bt, paired):
        g = np.array([Ct @ (Bt / (1j * x - Lam)) for x in w])
        if paired:
            g = g + np.array([Ct.conj() @ (Bt.conj() / (1j * x - Lam.conj())) for x in w])
        return g

    curves = {
        "S4D-LegS": diag_tf(Cd, Lam_d, Bt_d, True),
        "PTD": diag_tf(Cp, Lam_p, Vinv_p @ B, False),
    }
    scale = np.abs(G).max()
    stats = {"N": N, "n_freq": int(w.size), "max_abs_G": float(scale)}
    for name, g in curves.items():
        err = np.abs(g - G) / scale
        stats[name] = {
            "max_rel_error": float(err.max()),
            "median_rel_error": float(np.median(err)),
            "worst_frequency": float(w[err.argmax()]),
        }
    stats["PTD"]["cond_V"] = float(np.linalg.cond(Vp))
    stats["PTD"]["E_over_A"] = float(np.linalg.norm(E) / np.linalg.norm(A))
    stats["PTD"]["max_real_eig"] = float(Lam_p.real.max())  # < 0: the init uses Lambda as is
    low = w < 1.0
    for name, g in curves.items():
        stats[name]["max_rel_error_below_w1"] = float((np.abs(g - G)[low] / np.abs(G)[low]).max())
    return stats, {"w": w, "LegS": G, **curves}


def ptd_condition_sweep(N: int, eps_random: list[float], gammas: list[float], seeds: int) -> dict:
    """(c): cond(V) vs ||E||/||A|| for random (Ginibre) and optimised perturbations."""
    A, B = transition("legs", N)
    _, V0 = np.linalg.eig(A)
    out: dict = {"N": N, "cond_unperturbed": float(np.linalg.cond(V0)), "random": [], "opt": []}
    norm_A = np.linalg.norm(A)
    C = np.random.default_rng(0).standard_normal(N)
    w = np.logspace(-1, np.log10(3 * N * N), 400)
    G = np.array([C @ np.linalg.solve(1j * x * np.eye(N) - A, B) for x in w])
    for eps in eps_random:
        for seed in range(seeds):
            _, V, _, E = perturb_then_diagonalize(A, B, eps=eps, method="random", seed=seed)
            out["random"].append(
                {"E_over_A": float(np.linalg.norm(E) / norm_A), "cond": float(np.linalg.cond(V))}
            )
    for gamma in gammas:
        t = time.perf_counter()
        Lam, V, Vinv, E = perturb_then_diagonalize(A, B, gamma=gamma)
        seconds = time.perf_counter() - t
        w_all = np.concatenate([w, np.abs(Lam.imag)])  # include the resonances
        G_all = np.concatenate(
            [G, [C @ np.linalg.solve(1j * x * np.eye(N) - A, B) for x in w_all[w.size :]]]
        )
        Gp = np.array([(C @ V) @ (Vinv @ B / (1j * x - Lam)) for x in w_all])
        out["opt"].append(
            {
                "gamma": gamma,
                "E_over_A": float(np.linalg.norm(E) / norm_A),
                "cond": float(np.linalg.cond(V)),
                "max_real_eig": float(Lam.real.max()),
                "transfer_max_rel_error": float(np.abs(Gp - G_all).max() / np.abs(G).max()),
                "seconds": seconds,
            }
        )
    return out


def plot_convergence(res: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    Ns = np.array(res["N"])
    for dt, rows in res["error"].items():
        ax.loglog(Ns, np.mean(rows, axis=1), "o-", label=f"dt = {dt}")
    ax.loglog(
        Ns,
        np.mean(res["error"][next(iter(res["error"]))][0]) * Ns[0] / Ns,
        "k--",
        lw=1,
        label="1/N",
    )
    ax.set_xticks(Ns, [str(n) for n in Ns])
    ax.minorticks_off()
    ax.set_xlabel("state size N")
    ax.set_ylabel("relative L2 kernel error (mean of basis 0-3)")
    ax.set_title("S4D-LegS kernel -> S4-LegS kernel")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_transfer(curves: dict, stats: dict, path: Path) -> None:
    w = curves["w"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax.loglog(w, np.abs(curves["LegS"]), "k", lw=2, label="HiPPO-LegS (S4)")
    styles = {"S4D-LegS": "C3", "PTD": "C0"}
    for name, color in styles.items():
        ax.loglog(w, np.abs(curves[name]), color=color, lw=0.8, label=name)
        ax2.loglog(
            w,
            np.abs(curves[name] - curves["LegS"]) / stats["max_abs_G"],
            color=color,
            lw=0.8,
            label=name,
        )
    ax.set_ylabel("|G(i w)|")
    ax.set_title(f"transfer functions, N = {stats['N']}, random C")
    ax.legend(fontsize=8)
    ax2.set_ylabel("|G - G_LegS| / max|G_LegS|")
    ax2.set_xlabel("frequency w")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_condition(res: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    r = res["random"]
    ax.loglog(
        [p["E_over_A"] for p in r],
        [p["cond"] for p in r],
        "o",
        ms=4,
        alpha=0.6,
        label="random (Ginibre) E",
    )
    o = res["opt"]
    ax.loglog(
        [p["E_over_A"] for p in o], [p["cond"] for p in o], "s-", label="optimised E (gamma sweep)"
    )
    for p in o:
        ax.annotate(f"{p['gamma']:g}", (p["E_over_A"], p["cond"]), fontsize=7)
    ax.axhline(
        res["cond_unperturbed"],
        color="k",
        ls=":",
        label=f"E = 0: cond {res['cond_unperturbed']:.1e}",
    )
    ax.set_xlabel("||E||_F / ||A||_F")
    ax.set_ylabel("cond(V)")
    ax.set_title(f"PTD on HiPPO-LegS, N = {res['N']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("docs/figures"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    Ns = [16, 32, 64] if quick else [16, 32, 64, 128, 256, 512]
    conv = kernel_convergence(Ns, [0.01, 0.1])
    tf_stats, curves = transfer_functions(32 if quick else 64, 500 if quick else 4000)
    cond = ptd_condition_sweep(
        32 if quick else 64,
        eps_random=list(np.logspace(-4, 0, 5 if quick else 9)),
        gammas=[10, 100] if quick else [3, 10, 30, 100, 300, 1000],
        seeds=2 if quick else 3,
    )
    plot_convergence(conv, args.out_dir / "ssm_kernel_convergence.png")
    plot_transfer(curves, tf_stats, args.out_dir / "ssm_transfer.png")
    plot_condition(cond, args.out_dir / "ssm_ptd_condition.png")
    results = {"kernel_convergence": conv, "transfer": tf_stats, "ptd_condition": cond}
    (args.out_dir / "ssm_fidelity.json").write_text(json.dumps(results, indent=1))

    print("(a) S4D-LegS vs S4-LegS kernel, relative L2 error (mean over basis functions 0-3)")
    print("    N     " + "  ".join(f"dt={dt:<7}" for dt in conv["error"]))
    for i, N in enumerate(conv["N"]):
        print(
            f"    {N:<5} "
            + "  ".join(f"{np.mean(rows[i]):<10.4f}" for rows in conv["error"].values())
        )
    print(f"(b) transfer functions, N = {tf_stats['N']}, error relative to max|G_LegS|")
    for name in ("S4D-LegS", "PTD"):
        s = tf_stats[name]
        print(
            f"    {name:<9} max {s['max_rel_error']:.3g} at w={s['worst_frequency']:.4g}, "
            f"median {s['median_rel_error']:.3g}, max relative error below w=1 {s['max_rel_error_below_w1']:.3g}"
        )
    print(
        f"(c) PTD condition numbers, N = {cond['N']}; unperturbed cond(V) = {cond['cond_unperturbed']:.3g}"
    )
    for p in cond["random"][:: 2 if quick else 3]:
        print(f"    random  ||E||/||A|| = {p['E_over_A']:.3g}: cond {p['cond']:.3g}")
    for p in cond["opt"]:
        print(
            f"    opt gamma={p['gamma']:<5g} ||E||/||A|| = {p['E_over_A']:.3g}: cond {p['cond']:.3g}, "
            f"max Re(lambda) {p['max_real_eig']:.3g}, transfer max error {p['transfer_max_rel_error']:.3g}, "
            f"{p['seconds']:.1f} s"
        )
    return results


if __name__ == "__main__":
    main()
