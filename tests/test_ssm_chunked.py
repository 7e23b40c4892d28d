"""The chunked (matmul) SSM convolution against the FFT convolution and the float64
recurrence, and the S4D layer's CPU path against its FFT path."""

import math

import pytest
import torch

from modx.models.ssm import S4D, diagonal_init, ssm_kernel
from modx.models.ssm.kernel import chunked_ssm_conv, fft_conv, ssm_recurrence


def _system(H=3, N=8, init="legs", seed=0):
    g = torch.Generator().manual_seed(seed)
    A, B = (torch.as_tensor(x).repeat(H, 1) for x in diagonal_init(init, 2 * N))
    A, B = A[:, :N], B[:, :N]
    C = torch.randn(2, H, N, dtype=torch.complex128, generator=g)
    dt = torch.exp(torch.rand(H, dtype=torch.float64, generator=g) * math.log(100) + math.log(1e-3))
    D = torch.randn(H, dtype=torch.float64, generator=g)
    return A, B, C, dt, D


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
@pytest.mark.parametrize("init", ["legs", "ptd"])
@pytest.mark.parametrize("L, chunk", [(37, 8), (64, 16), (5, 64), (1, 4), (100, 1)])
def test_chunked_conv_equals_the_recurrence_and_the_fft(disc, init, L, chunk):
    A, B, C, dt, D = _system(init=init)
    conj_sym = init != "ptd"
    u = torch.randn(2, L, 3, dtype=torch.float64)
    y = chunked_ssm_conv(u, A, B, C[0], dt, D, disc=disc, conj_sym=conj_sym, chunk=chunk)
    y_rec = ssm_recurrence(A, B, C[0], dt, u, disc=disc, conj_sym=conj_sym) + u * D
    K = ssm_kernel(A, B, C[0], dt, L, disc=disc, conj_sym=conj_sym)
    torch.testing.assert_close(y, y_rec, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(y, fft_conv(u, K, D), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("L, chunk", [(23, 4), (6, 16)])
def test_chunked_bidirectional_conv_equals_the_fft(L, chunk):
    A, B, C, dt, D = _system()
    u = torch.randn(2, L, 3, dtype=torch.float64)
    K = ssm_kernel(A, B, C, dt, L)  # (2, H, L)
    K = torch.stack([K[0] + torch.nn.functional.pad(D[:, None], (0, L - 1)), K[1]])
    y = chunked_ssm_conv(u, A, B, C, dt, D, chunk=chunk)
    torch.testing.assert_close(y, fft_conv(u, K), rtol=1e-9, atol=1e-10)


def _fft_forward(m: S4D, u: torch.Tensor) -> torch.Tensor:
    """The layer with its FFT convolution (the path used off the CPU)."""
    L = u.shape[1]
    K = m.kernel(L)
    K_fwd = K[0] + torch.nn.functional.pad(m.D[:, None], (0, L - 1))
    K = torch.stack([K_fwd, K[1]]) if m.bidirectional else K_fwd
    return m.output(m.dropout(m.activation(fft_conv(u, K))))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_s4d_cpu_path_matches_its_fft_path_in_value_and_gradient(bidirectional):
    torch.manual_seed(0)
    m = S4D(8, 16, bidirectional=bidirectional)
    u = torch.randn(2, 150, 8, requires_grad=True)  # several chunks of the default 64 steps
    y = m(u)
    grads = torch.autograd.grad(y.square().sum(), [u, *m.parameters()])
    u2 = u.detach().clone().requires_grad_()
    y_ref = _fft_forward(m, u2)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [u2, *m.parameters()])
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-4)
