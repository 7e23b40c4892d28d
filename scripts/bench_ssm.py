"""Forward+backward time and peak memory of S4D, S5 and softmax attention layers.

    python scripts/bench_ssm.py [--lengths 77 256 1024 4096] [--repeats 3] [--out runs/bench_ssm.json]
    python scripts/bench_ssm.py --interleave --layers s4d s4d-unfused attention --lengths 4096

--interleave: all layers in this one process, one timed step of each in turn (after one
warm-up step each), so that a shared machine's load hits every layer alike; reports the
minimum and median wall time and the minimum process CPU time of --repeats steps, no memory.

Each layer maps (batch, L, H) -> (batch, L, H). Backward starts from a fixed random gradient
of the output (`y.backward(g)`, --loss grad, the default): the layer's own forward+backward;
--loss square-mean times `y.square().mean().backward()` instead, which adds that loss's two
(batch, L, H) passes and their fresh 32 MB tensors at L = 4096 (the runs before 2026-12).
Every (layer, L) runs in a fresh subprocess so that peak memory is its own: on CUDA
torch.cuda.max_memory_allocated, on CPU the growth of the peak resident set size over the
process after the model and input were built. Time is the median of --repeats timed
iterations after one warm-up; a configuration whose warm-up alone exceeds --max-seconds is
reported from that single iteration ("runs" = 1). Workers run with OMP_WAIT_POLICY=PASSIVE
unless the environment sets it (spinning threads make shared-machine timings meaningless). Prints a table and writes JSON, with the
machine and its load average (CPU timings on a shared machine are only as good as its load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modx.models.ssm import S4D, S5  # noqa: E402
from modx.models.ssm.kernel import chunked_ssm_conv, fft_conv  # noqa: E402

LAYERS = ("s4d", "s4d-unfused", "s4d-chunked", "s5", "attention")


class S4DUnfused(S4D):
    """S4D composed from modules, as before the fused path (modx.models.ssm.fused): one FFT
    convolution over the whole (B, L, H) batch, then nn.GELU, nn.Dropout, nn.Linear, nn.GLU."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        L = u.shape[1]
        K = self.kernel(L)[0]
        K = K + F.pad(self.D.to(K.dtype)[:, None], (0, L - 1))  # D u as the lag-0 tap
        return self.output(self.dropout(self.activation(fft_conv(u, K))))


class S4DChunked(S4D):
    """S4D with `chunked_ssm_conv` (chunked matmuls + a state scan) instead of the FFT."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        A, B, C, dt = self.ssm()
        y = chunked_ssm_conv(u, A, B, C, dt, self.D, self.disc, self.conj_sym)
        return self.output(self.dropout(self.activation(y)))


class Attention(nn.Module):
    """Softmax self-attention (non-causal) with QKV and output projections."""

    def __init__(self, d_model: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H)
        B, L, H = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, H/heads)
        return self.out(y.transpose(1, 2).reshape(B, L, H))


def build(layer: str, d_model: int, d_state: int) -> nn.Module:
    if layer == "s4d":
        return S4D(d_model, d_state)
    if layer == "s4d-unfused":
        return S4DUnfused(d_model, d_state)
    if layer == "s4d-chunked":
        return S4DChunked(d_model, d_state)
    if layer == "s5":
        return S5(d_model, d_state, output="glu")  # the same projection as S4D
    if layer == "attention":
        return Attention(d_model)
    raise ValueError(f"unknown layer {layer!r}; choose from {LAYERS}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


LOSSES = ("grad", "square-mean")


def fwd_bwd(model: nn.Module, x: torch.Tensor, grad: torch.Tensor | None) -> None:
    """One forward+backward: from the output gradient `grad`, or through the mean square."""
    y = model(x)
    if grad is None:
        y.square().mean().backward()
    else:
        y.backward(grad)


def measure(layer: str, L: int, args: argparse.Namespace) -> dict:
    """One (layer, L) configuration in this process: time and peak memory of fwd+bwd."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(layer, args.d_model, args.d_state).to(device)
    x = torch.randn(args.batch, L, args.d_model, device=device, requires_grad=True)
    grad = torch.randn_like(x) if args.loss == "grad" else None
    cuda = device.type == "cuda"

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fwd_bwd(model, x, grad)
        if cuda:
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        x.grad = None
        return time.perf_counter() - t

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    warm = step()
    times = [warm] if warm > args.max_seconds else [step() for _ in range(args.repeats)]
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "layer": layer,
        "L": L,
        "ms": 1000 * statistics.median(times),
        "runs": len(times),
        "peak_mib": max(0, peak - base) / 2**20,
        "params": sum(p.numel() for p in model.parameters()),
    }


def interleaved(args: argparse.Namespace) -> list[dict]:
    """Every (layer, L) in this process, one timed step of each layer in turn."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rows = []
    print(f"{'layer':<12} {'L':>5} {'min ms':>9} {'median ms':>10} {'min CPU ms':>11} {'runs':>4}")
    for L in args.lengths:
        torch.manual_seed(0)
        models = {layer: build(layer, args.d_model, args.d_state).to(device) for layer in args.layers}
        x = torch.randn(args.batch, L, args.d_model, device=device, requires_grad=True)
        grad = torch.randn_like(x) if args.loss == "grad" else None

        def step(
            model: nn.Module, x: torch.Tensor = x, grad: torch.Tensor | None = grad
        ) -> tuple[float, float]:
            if cuda:
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            fwd_bwd(model, x, grad)
            if cuda:
                torch.cuda.synchronize()
            t, c = time.perf_counter() - t, time.process_time() - c
            model.zero_grad(set_to_none=True)
            x.grad = None
            return t, c

        for model in models.values():
            step(model)
        times: dict[str, list[tuple[float, float]]] = {layer: [] for layer in models}
        for _ in range(args.repeats):
            for layer, model in models.items():
                times[layer].append(step(model))
        for layer, ts in times.items():
            row = {
                "layer": layer,
                "L": L,
                "ms": 1000 * min(t for t, _ in ts),
                "median_ms": 1000 * statistics.median(t for t, _ in ts),
                "cpu_ms": 1000 * min(c for _, c in ts),
                "runs": len(ts),
            }
            rows.append(row)
            print(
                f"{layer:<12} {L:>5} {row['ms']:>9.1f} {row['median_ms']:>10.1f} "
                f"{row['cpu_ms']:>11.1f} {row['runs']:>4}"
            )
    return rows


def _loadavg() -> float | None:
    """1-minute load average: other processes on the machine distort CPU timings."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine(device: str) -> dict:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[77, 256, 1024, 4096])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--loss", choices=LOSSES, default="grad", help="where backward starts (see above)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=5.0, help="warm-up longer than this: report it alone"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_ssm.json"))
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="all layers in one process, alternating steps (min / median of --repeats)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("LAYER", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), args)))
        return []

    passthrough = [
        f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("d_model", "d_state", "batch")
    ]
    passthrough += [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("repeats", "max_seconds", "device", "loss")
    ]
    if args.threads:
        passthrough.append(f"--threads={args.threads}")
    load_before = _loadavg()
    if args.interleave:
        if "OMP_WAIT_POLICY" not in os.environ and argv is None:  # as the workers below
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
            os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
        rows = interleaved(args)
        env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)")}
        return _write(args, argv, rows, load_before, env)
    # spinning OpenMP threads collapse on a shared machine (10x slower at load 10 on 2 cores);
    # passive waiting costs little on an idle one. An explicit setting in the environment wins.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    rows = []
    print(f"{'layer':<10} {'L':>5} {'fwd+bwd ms':>11} {'runs':>4} {'peak MiB':>9}")
    for L in args.lengths:
        for layer in args.layers:
            cmd = [sys.executable, __file__, "--worker", layer, str(L), *passthrough]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                row = {"layer": layer, "L": L, "error": proc.stderr.strip().splitlines()[-1:]}
                print(f"{layer:<10} {L:>5}  failed: {row['error']}")
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(
                    f"{layer:<10} {L:>5} {row['ms']:>11.1f} {row['runs']:>4} {row['peak_mib']:>9.1f}"
                )
            rows.append(row)
    return _write(args, argv, rows, load_before, env)


def _write(
    args: argparse.Namespace,
    argv: list[str] | None,
    rows: list[dict],
    load_before: float | None,
    env: dict,
) -> list[dict]:
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "machine": {
            **machine(args.device),
            "loadavg_1min_before_after": [load_before, _loadavg()],
            "OMP_WAIT_POLICY": env["OMP_WAIT_POLICY"],
        },
        "command": " ".join(
            ["python", "scripts/bench_ssm.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
