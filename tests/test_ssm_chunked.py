"""The chunked (matmul) SSM convolution against the FFT convolution and the float64
recurrence."""

import math

import pytest
import torch

from modx.models.ssm import diagonal_init, ssm_kernel
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
