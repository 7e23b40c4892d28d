"""How faithful are the diagonal SSM initialisations to HiPPO-LegS? (PAPERS.md 3-4)

(a) S4D-LegS -> S4-LegS: relative L2 error of the ZOH-discretised kernels of the first
    basis functions (C = e_n, n < 4) as the state size N grows (the theory's B~ = V^* B / 2).
(b) Transfer functions G(i w) = C (i w - A)^{-1} B of HiPPO-LegS, its S4D diagonal restriction
    and PTD (both named settings), over frequency: S4D spikes at its eigenfrequencies, PTD
    stays uniformly close.
(c) PTD per named setting and N: eigenvector condition number, ||E||/||A||, spectrum, solver
    time, transfer-function error, and the S4D-PTD kernel error vs the dense LegS kernel with
    C~ = C V and with an i.i.d. C~; plus cond(V) vs ||E||/||A|| for random E and a gamma sweep.

    python eval/ssm_fidelity.py [--out-dir docs/figures] [--quick]

Writes ssm_kernel_convergence.png, ssm_transfer.png, ssm_ptd_condition.png and
ssm_fidelity.json into --out-dir and prints the numbers. All math in float64 numpy; the PTD
solver runs uncached here (to time it).
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
from modx.models.ssm.init import (  # noqa: E402
    PTD_SETTINGS,
    diagonal_init,
    perturb_then_diagonalize,
)

THEORY_B = {"B_clip": None, "B_scale": 0.5}  # S4D-LegS as the theory has it (modx's earlier init)


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
            Lam, Bt = diagonal_init("legs", N, **THEORY_B)
            C = np.eye(N)[:4]
            K = s4_kernel(A, B, C, dt, L)
            Kd = s4d_kernel(Lam, Bt, C @ V, dt, L)
            rows.append((np.linalg.norm(K - Kd, axis=1) / np.linalg.norm(K, axis=1)).tolist())
        out["error"][str(dt)] = rows  # [N][basis]
    return out


def _transfer(C: np.ndarray, A: np.ndarray, B: np.ndarray, w: np.ndarray) -> np.ndarray:
    """G(i w) = C (i w I - A)^{-1} B by dense solves, one per frequency."""
    eye = np.eye(len(A))
    return np.array([C @ np.linalg.solve(1j * x * eye - A, B) for x in w])


def _ptd(A: np.ndarray, B: np.ndarray, setting: str) -> dict:
    """Run the PTD solver with a named setting (timed) and reflect Re > 0 as `ptd_init` does."""
    t = time.perf_counter()
    Lam, V, Vinv, E = perturb_then_diagonalize(A, B, **PTD_SETTINGS[setting])
    seconds = time.perf_counter() - t
    Lam_init = -np.maximum(np.abs(Lam.real), 1e-4) + 1j * Lam.imag
    return {"Lam": Lam_init, "V": V, "Vinv": Vinv, "E": E, "seconds": seconds,
            "max_real_eig": float(Lam.real.max())}


def transfer_functions(N: int, n_freq: int, ptd: dict, seed: int = 0) -> tuple[dict, dict]:
    """(b): |G(i w)| of LegS (dense solve), S4D-LegS (B~ = V^* B / 2) and the PTD settings;
    errors relative to max |G|, and below w = 1 relative to |G(i w)| itself."""
    A, B = transition("legs", N)
    C = np.random.default_rng(seed).standard_normal(N)
    _, V, _, _ = nplr("legs", N)
    Lam_d, Bt_d = diagonal_init("legs", N, **THEORY_B)
    # a log grid plus the resonances of each diagonal system, where spikes would sit
    w = np.unique(
        np.concatenate(
            [np.logspace(-1, np.log10(3 * N * N), n_freq), Lam_d.imag]
            + [np.abs(p["Lam"].imag) for p in ptd.values()]
        )
    )
    G = _transfer(C, A, B, w)
    Cd = C @ V

    def diag_tf(Ct, Lam, Bt, paired):
        g = np.array([Ct @ (Bt / (1j * x - Lam)) for x in w])
        if paired:
            g = g + np.array([Ct.conj() @ (Bt.conj() / (1j * x - Lam.conj())) for x in w])
        return g

    curves = {"S4D-LegS": diag_tf(Cd, Lam_d, Bt_d, True)}
    for name, p in ptd.items():
        curves[f"PTD {name}"] = diag_tf(C @ p["V"], p["Lam"], p["Vinv"] @ B, False)
    scale = np.abs(G).max()
    stats = {"N": N, "n_freq": int(w.size), "max_abs_G": float(scale)}
    low = w < 1.0
    for name, g in curves.items():
        err = np.abs(g - G) / scale
        stats[name] = {
            "max_rel_error": float(err.max()),
            "median_rel_error": float(np.median(err)),
            "worst_frequency": float(w[err.argmax()]),
            "max_rel_error_below_w1": float((np.abs(g - G)[low] / np.abs(G)[low]).max()),
        }
    return stats, {"w": w, "LegS": G, **curves}


def kernel_errors(N: int, p: dict, dt: float = 0.01, L: int = 512, n_c: int = 64) -> dict:
    """Relative RMS error of the S4D-PTD kernel vs the dense LegS kernel over n_c real C,
    with C~ = C V (the authors' init) and with an i.i.d. complex normal C~ (modx's earlier)."""
    A, B = transition("legs", N)
    rng = np.random.default_rng(0)
    C = rng.standard_normal((n_c, N))
    C_iid = (rng.standard_normal((n_c, N)) + 1j * rng.standard_normal((n_c, N))) / np.sqrt(2)
    K = s4_kernel(A, B, C, dt, L)
    Lam, Bt = p["Lam"], p["Vinv"] @ B
    z = np.exp(dt * Lam)
    powers = z[:, None] ** np.arange(L)

    def rel(Ct):
        Kd = np.real((Ct * (z - 1) / Lam * Bt) @ powers)
        return float(np.sqrt(np.mean((Kd - K) ** 2) / np.mean(K**2)))

    return {"dt": dt, "L": L, "kernel_rel_rms_CV": rel(C @ p["V"]), "kernel_rel_rms_iid": rel(C_iid)}


def ptd_settings_table(Ns: list[int], n_freq: int) -> list[dict]:
    """(c): every named optimised PTD setting at every N: conditioning, size, spectrum, time,
    transfer-function error (random C, log grid plus resonances) and kernel errors."""
    rows = []
    for N in Ns:
        A, B = transition("legs", N)
        C = np.random.default_rng(0).standard_normal(N)
        w = np.logspace(-1, np.log10(3 * N * N), n_freq)
        G = _transfer(C, A, B, w)
        for setting, kwargs in PTD_SETTINGS.items():
            if kwargs["method"] != "opt":
                continue
            p = _ptd(A, B, setting)
            w_all = np.concatenate([w, np.abs(p["Lam"].imag)])
            G_all = np.concatenate([G, _transfer(C, A, B, w_all[w.size :])])
            Bt = p["Vinv"] @ B
            Gp = np.array([(C @ p["V"]) @ (Bt / (1j * x - p["Lam"])) for x in w_all])
            rows.append({
                "N": N,
                "setting": setting,
                "E_over_A": float(np.linalg.norm(p["E"]) / np.linalg.norm(A)),
                "cond": float(np.linalg.cond(p["V"])),
                "max_real_eig": p["max_real_eig"],
                "transfer_max_rel_error": float(np.abs(Gp - G_all).max() / np.abs(G).max()),
                "seconds": p["seconds"],
                **kernel_errors(N, p),
            })
    return rows


def ptd_condition_sweep(N: int, eps_random: list[float], gammas: list[float], seeds: int) -> dict:
    """(c): cond(V) vs ||E||/||A|| for random (Ginibre) perturbations and for the converged
    optimiser with its penalty weight gamma swept."""
    A, B = transition("legs", N)
    _, V0 = np.linalg.eig(A)
    out: dict = {"N": N, "cond_unperturbed": float(np.linalg.cond(V0)), "random": [], "opt": []}
    norm_A = np.linalg.norm(A)
    for eps in eps_random:
        for seed in range(seeds):
            _, V, _, E = perturb_then_diagonalize(A, B, eps=eps, method="random", seed=seed)
            out["random"].append(
                {"E_over_A": float(np.linalg.norm(E) / norm_A), "cond": float(np.linalg.cond(V))}
            )
    for gamma in gammas:
        kwargs = {**PTD_SETTINGS["converged"], "gamma": gamma}
        Lam, V, _, E = perturb_then_diagonalize(A, B, **kwargs)
        out["opt"].append({
            "gamma": gamma,
            "E_over_A": float(np.linalg.norm(E) / norm_A),
            "cond": float(np.linalg.cond(V)),
            "max_real_eig": float(Lam.real.max()),
        })
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
    names = [k for k in curves if k not in ("w", "LegS")]
    for name, color in zip(names, ("C3", "C0", "C2")):
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
        [p["E_over_A"] for p in o], [p["cond"] for p in o], "s-",
        label="optimised E, converged setting (gamma sweep)"
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
    N_tf = 32 if quick else 64
    A_tf, B_tf = transition("legs", N_tf)
    ptd = {name: _ptd(A_tf, B_tf, name) for name in ("converged", "robust")}
    tf_stats, curves = transfer_functions(N_tf, 500 if quick else 4000, ptd)
    settings = ptd_settings_table([16, 32] if quick else [32, 64, 128], 200 if quick else 1000)
    cond = ptd_condition_sweep(
        32 if quick else 64,
        eps_random=list(np.logspace(-4, 0, 5 if quick else 9)),
        gammas=[10, 40] if quick else [5, 10, 20, 40, 80, 160],
        seeds=2 if quick else 3,
    )
    plot_convergence(conv, args.out_dir / "ssm_kernel_convergence.png")
    plot_transfer(curves, tf_stats, args.out_dir / "ssm_transfer.png")
    plot_condition(cond, args.out_dir / "ssm_ptd_condition.png")
    results = {"kernel_convergence": conv, "transfer": tf_stats, "ptd_settings": settings,
               "ptd_condition": cond}
    (args.out_dir / "ssm_fidelity.json").write_text(json.dumps(results, indent=1))

    print("(a) S4D-LegS (B/2) vs S4-LegS kernel, relative L2 error (mean over basis 0-3)")
    print("    N     " + "  ".join(f"dt={dt:<7}" for dt in conv["error"]))
    for i, N in enumerate(conv["N"]):
        print(
            f"    {N:<5} "
            + "  ".join(f"{np.mean(rows[i]):<10.4f}" for rows in conv["error"].values())
        )
    print(f"(b) transfer functions, N = {tf_stats['N']}, error relative to max|G_LegS|")
    for name in curves:
        if name in ("w", "LegS"):
            continue
        st = tf_stats[name]
        print(
            f"    {name:<14} max {st['max_rel_error']:.3g} at w={st['worst_frequency']:.4g}, "
            f"median {st['median_rel_error']:.3g}, "
            f"max relative error below w=1 {st['max_rel_error_below_w1']:.3g}"
        )
    print("(c) PTD settings: N, setting, ||E||/||A||, cond(V), max Re(lambda) before reflection,")
    print("    transfer max error, kernel rel. RMS error with C V / i.i.d. C (dt 0.01, L 512), time")
    for r in settings:
        print(
            f"    {r['N']:<4} {r['setting']:<9} {r['E_over_A']:.4f}  cond {r['cond']:<6.3g} "
            f"maxRe {r['max_real_eig']:<7.3g} tf {r['transfer_max_rel_error']:<7.3g} "
            f"kernel {r['kernel_rel_rms_CV']:.3f} / {r['kernel_rel_rms_iid']:.3f}  "
            f"{r['seconds']:.1f} s"
        )
    print(f"    N = {cond['N']}, unperturbed cond(V) = {cond['cond_unperturbed']:.3g}")
    for p in cond["random"][:: 2 if quick else 3]:
        print(f"    random  ||E||/||A|| = {p['E_over_A']:.3g}: cond {p['cond']:.3g}")
    for p in cond["opt"]:
        print(
            f"    converged gamma={p['gamma']:<5g} ||E||/||A|| = {p['E_over_A']:.3g}: "
            f"cond {p['cond']:.3g}, max Re(lambda) {p['max_real_eig']:.3g}"
        )
    return results


if __name__ == "__main__":
    main()
