"""The fused S4D path (modx.models.ssm.fused): blocked FFT convolution + activation (+ GLU
projection) against a direct double loop, torch's own autograd of the composed modules, finite
differences (gradcheck) and the float64 recurrence."""

import math
import os

import pytest
import torch
from torch import nn

from modx.models.ssm import S4D, diagonal_init, ssm_kernel
from modx.models.ssm.fused import circular_kernel, conv_act, conv_act_glu
from modx.models.ssm.kernel import (
    cexp,
    discretize,
    fft_conv,
    ssm_recurrence,
    vandermonde_blocked,
)

ACTS = {"gelu": nn.GELU(), "silu": nn.SiLU(), "identity": nn.Identity()}


def _loop_conv(u, K):
    """y[b, t, h] = sum_s K[0, h, t - s] u[b, s, h] (s <= t) + K[1, h, s - t - 1] u[b, s, h]
    (s > t, bidirectional only), one (t, s) pair at a time."""
    K = K if K.dim() == 3 else K[None]
    y = torch.zeros_like(u)
    for t in range(u.shape[1]):
        for s in range(u.shape[1]):
            if s <= t:
                y[:, t] += K[0, :, t - s] * u[:, s]
            elif K.shape[0] == 2:
                y[:, t] += K[1, :, s - t - 1] * u[:, s]
    return y


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bidirectional", [False, True])
# rows per FFT block: channel slices of 2, 2, 1; 1 batch element; 2 + 1 batch elements; default
@pytest.mark.parametrize("block", [2, 5, 11, None])
def test_conv_act_equals_a_double_loop(act, bidirectional, block):
    torch.manual_seed(0)
    B, L, H = 3, 11, 5
    u = torch.randn(B, L, H, dtype=torch.float64)
    K = torch.randn(2, H, L, dtype=torch.float64) if bidirectional else torch.randn(H, L).double()
    y = conv_act(u, circular_kernel(K, L), act, block=block)
    assert y.shape == (B, L, H)
    torch.testing.assert_close(y, ACTS[act](_loop_conv(u, K)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("block", [2, 7])  # channel slices; 2 batch elements per block
def test_fused_gradients_pass_gradcheck(act, project, block):
    torch.manual_seed(0)
    B, L, H = 2, 6, 3
    u = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    Kc = torch.randn(H, 2 * L, dtype=torch.float64, requires_grad=True)
    if project:
        W = torch.randn(2 * H, H, dtype=torch.float64, requires_grad=True)
        b = torch.randn(2 * H, dtype=torch.float64, requires_grad=True)
        fn, inputs = (lambda u, Kc, W, b: conv_act_glu(u, Kc, W, b, act, block)), (u, Kc, W, b)
    else:
        fn, inputs = (lambda u, Kc: conv_act(u, Kc, act, block)), (u, Kc)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("block", [3, 16, None])  # channel slices; 2 + 1 batch elements; all
def test_fused_projection_equals_the_composed_modules_with_gradients(act, block):
    torch.manual_seed(0)
    B, L, H = 3, 19, 8
    u = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    K = torch.randn(2, H, L, dtype=torch.float64, requires_grad=True)
    lin = nn.Linear(H, 2 * H).double()
    g = torch.randn(B, L, H, dtype=torch.float64)
    fused = conv_act_glu(u, circular_kernel(K, L), lin.weight, lin.bias, act, block)
    ref = nn.functional.glu(lin(ACTS[act](fft_conv(u, K))), dim=-1)
    torch.testing.assert_close(fused, ref)
    params = [u, K, lin.weight, lin.bias]
    for a, b in zip(torch.autograd.grad(fused, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


def test_fused_functions_reject_bad_shapes_and_activations():
    u = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="kernel shape"):
        conv_act(u, torch.randn(2, 4))
    with pytest.raises(ValueError, match="activation"):
        conv_act(u, torch.randn(2, 8), "relu")
    with pytest.raises(ValueError, match="GLU projection"):
        conv_act_glu(u, torch.randn(2, 8), torch.randn(2, 2), torch.randn(4))


def _system(H, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    A, B = (torch.as_tensor(x).repeat(H, 1) for x in diagonal_init("legs", 2 * N))
    C = torch.randn(H, N, dtype=torch.complex128, generator=g)
    dt = torch.exp(torch.rand(H, dtype=torch.float64, generator=g) * math.log(100) + math.log(1e-3))
    return A, B, C, dt


def test_real_blocked_vandermonde_and_cexp_equal_the_complex_forms():
    A, B, C, dt = _system(H=3, N=4)
    _, dB, log_dA = discretize(A, B, dt[:, None])
    for L in (1, 7, 50, 101):
        torch.testing.assert_close(
            vandermonde_blocked(C * dB, log_dA, L, real=True),
            vandermonde_blocked(C * dB, log_dA, L).real,
            rtol=1e-12,
            atol=1e-13,
        )
    z = torch.complex(-torch.rand(50).double() * 5, torch.randn(50).double() * 100)
    torch.testing.assert_close(cexp(z), torch.exp(z), rtol=1e-13, atol=1e-15)


def test_float32_fused_layer_matches_the_float64_recurrence_at_long_length():
    """The float32 path (kernel, FFT of length 2L, projection) stays within float32 tolerance of
    the float64 step-by-step recurrence at L = 1024."""
    torch.manual_seed(0)
    m = S4D(8, 16)
    u = torch.randn(2, 1024, 8)
    y = m(u)
    m64 = S4D(8, 16).double()
    m64.load_state_dict(m.state_dict())
    A, B, C, dt = m64.ssm()
    u64 = u.double()
    y_rec = ssm_recurrence(A, B, C[0], dt, u64) + u64 * m64.D
    y_ref = m64.output(m64.activation(y_rec))
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)


def test_layer_gradients_equal_the_recurrence_in_float64():
    torch.manual_seed(0)
    m = S4D(4, 8, bidirectional=False).double()
    u = torch.randn(2, 13, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 13, 4, dtype=torch.float64)
    params = [u, *m.parameters()]
    fused = torch.autograd.grad(m(u), params, g)
    A, B, C, dt = m.ssm()
    y = ssm_recurrence(A, B, C[0], dt, u) + u * m.D
    ref = torch.autograd.grad(m.output(m.activation(y)), params, g)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dropout": 0.2},  # training with dropout: conv_act, then nn.Dropout and the modules
        {"output": "linear"},
        {"output": "half_glu1", "activation": "silu"},
        {"output": "none", "bidirectional": True},
    ],
)
def test_layer_paths_without_the_fused_projection_equal_the_composed_modules(kwargs):
    torch.manual_seed(0)
    m = S4D(6, 8, **kwargs).double()
    u = torch.randn(2, 15, 6, dtype=torch.float64, requires_grad=True)
    L = u.shape[1]
    K = m.kernel(L)
    K_fwd = K[0] + nn.functional.pad(m.D[:, None], (0, L - 1))
    K = torch.stack([K_fwd, K[1]]) if m.bidirectional else K_fwd
    torch.manual_seed(1)
    ref = m.output(m.dropout(m.activation(fft_conv(u, K))))
    torch.manual_seed(1)
    y = m(u)
    if m.dropout.p == 0:
        torch.testing.assert_close(y, ref)
    else:  # the mask is drawn on another memory layout: compare without it (eval mode)
        assert y.shape == ref.shape and torch.isfinite(y).all()
        m.eval()
        torch.testing.assert_close(m(u), m.output(m.activation(fft_conv(u, K))))


def test_kernel_is_unchanged_by_the_real_vandermonde():
    A, B, C, dt = _system(H=2, N=4)
    dA, dB, _ = discretize(A, B, dt[:, None])
    L = 30
    powers = dA[..., None] ** torch.arange(L, dtype=torch.float64)  # explicit powers
    K_ref = 2 * torch.einsum("hn,hnl->hl", C * dB, powers).real
    torch.testing.assert_close(ssm_kernel(A, B, C, dt, L), K_ref, rtol=1e-10, atol=1e-12)


@pytest.fixture
def three_threads(monkeypatch):
    """Three torch threads, and OpenMP's passive policy so that small calls use workers."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(threads)


def _fused_and_grads(act, project, block, seed=0):
    torch.manual_seed(seed)
    B, L, H = 5, 13, 6
    u = torch.randn(B, L, H, requires_grad=True)
    Kc = torch.randn(H, 2 * L, requires_grad=True)
    W = torch.randn(2 * H, H, requires_grad=True)
    b = torch.randn(2 * H, requires_grad=True)
    out = conv_act_glu(u, Kc, W, b, act, block) if project else conv_act(u, Kc, act, block)
    params = [u, Kc, W, b] if project else [u, Kc]
    return out, torch.autograd.grad(out, params, torch.randn_like(out))


@pytest.mark.parametrize("act", ["gelu", "identity"])
@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("block", [4, 6, 12])  # channel slices; 1 and 2 batch elements per group
def test_worker_threads_give_the_one_thread_results(three_threads, act, project, block):
    """Groups of batch elements run on torch.get_num_threads() worker threads: each group's
    output and input gradient are bit-identical to one thread; the parameter gradients are
    the workers' partial sums, equal to rounding. torch's thread count is restored."""
    threaded = _fused_and_grads(act, project, block)
    assert torch.get_num_threads() == 3
    torch.set_num_threads(1)
    single = _fused_and_grads(act, project, block)
    torch.set_num_threads(3)
    assert torch.equal(threaded[0], single[0])
    assert torch.equal(threaded[1][0], single[1][0])  # the input's gradient
    for a, b in zip(threaded[1][1:], single[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_forked_child_starts_its_own_worker_pool(three_threads):
    """The parent's pool threads do not exist in a fork: a child that reused the parent's pool
    would wait forever on its first call."""
    import multiprocessing as mp

    from modx import threads

    _fused_and_grads("gelu", True, 6)  # 5 batch elements, 3 threads: the pool is running
    assert threads._POOL is not None
    child = mp.get_context("fork").Process(target=lambda: os._exit(0 if threads._POOL is None else 3))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert threads._POOL is not None  # the parent keeps its own


def test_worker_count_follows_the_openmp_wait_policy(monkeypatch, three_threads):
    from modx.models.ssm.fused import _MIN_ELEMS_SPINNING as big
    from modx.models.ssm.fused import _workers

    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # sleeping OpenMP threads: always
    assert _workers(8, 10) == 3 and _workers(2, 10) == 2 and _workers(1, big) == 1
    monkeypatch.delenv("OMP_WAIT_POLICY")  # libgomp's spin-then-sleep: large calls only
    assert _workers(8, big - 1) == 1 and _workers(8, big) == 3
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # spinning OpenMP threads: never
    assert _workers(8, 4 * big) == 1
