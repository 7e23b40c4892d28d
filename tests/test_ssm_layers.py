"""SSM kernels, convolutions, scans and the S4D / S5 layers against step-by-step
float64 references (PAPERS.md sections 3-5)."""

import cmath
import copy
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from modx.models.ssm import S4D, S5, diagonal_init, ssm_kernel, ssm_param_groups
from modx.models.ssm.kernel import (
    discretize,
    dss_kernel,
    fft_conv,
    ssm_recurrence,
    vandermonde,
    vandermonde_blocked,
)
from modx.models.ssm.layers import linear_scan, sequential_scan


def _system(H=3, N=8, init="legs", seed=0):
    g = torch.Generator().manual_seed(seed)
    A, B = (torch.as_tensor(x).repeat(H, 1) for x in diagonal_init(init, 2 * N))
    A, B = A[:, :N], B[:, :N]  # ptd returns 2N modes: keep N of them
    C = torch.randn(H, N, dtype=torch.complex128, generator=g)
    dt = torch.exp(torch.rand(H, dtype=torch.float64, generator=g) * math.log(100) + math.log(1e-3))
    return A, B, C, dt


def _naive_kernel(A, B, C, dt, L, disc):
    """K[h, l] = sum_n C dB dA^l with explicit powers, one (h, l) at a time."""
    H, N = A.shape
    K = torch.zeros(H, L, dtype=torch.float64)
    for h in range(H):
        for n in range(N):
            a, b = A[h, n].item(), B[h, n].item()
            d = dt[h].item()
            if disc == "zoh":
                dA = cmath.exp(d * a)
                dB = (dA - 1) / a * b
            else:
                dA, dB = (1 + d * a / 2) / (1 - d * a / 2), d / (1 - d * a / 2) * b
            for ell in range(L):
                K[h, ell] += (C[h, n].item() * dB * dA**ell).real
    return K


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
@pytest.mark.parametrize("conj_sym", [True, False])
def test_kernel_equals_explicit_powers_in_float64(disc, conj_sym):
    A, B, C, dt = _system()
    K = ssm_kernel(A, B, C, dt, 20, disc=disc, conj_sym=conj_sym)
    K_ref = _naive_kernel(A, B, C, dt, 20, disc)
    assert K.shape == (3, 20) and K.dtype == torch.float64
    torch.testing.assert_close(K, K_ref * (2 if conj_sym else 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
@pytest.mark.parametrize("init", ["legs", "inv", "ptd"])
def test_fft_convolution_equals_the_recurrence(disc, init):
    A, B, C, dt = _system(init=init)
    u = torch.randn(2, 37, 3, dtype=torch.float64)
    conj_sym = init != "ptd"
    y = fft_conv(u, ssm_kernel(A, B, C, dt, 37, disc=disc, conj_sym=conj_sym))
    y_ref = ssm_recurrence(A, B, C, dt, u, disc=disc, conj_sym=conj_sym)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)


def test_blocked_vandermonde_equals_the_plain_product():
    A, B, C, dt = _system(H=2, N=4)
    _, dB, log_dA = discretize(A, B, dt[:, None])
    for L in (1, 7, 50, 101):
        torch.testing.assert_close(
            vandermonde_blocked(C * dB, log_dA, L),
            vandermonde(C * dB, log_dA, L),
            rtol=1e-10,
            atol=1e-12,
        )


def test_bidirectional_fft_conv_equals_a_double_loop():
    L, H = 9, 2
    u = torch.randn(1, L, H, dtype=torch.float64)
    K = torch.randn(2, H, L, dtype=torch.float64)
    y = fft_conv(u, K)
    y_ref = torch.zeros_like(u)
    for t in range(L):
        for s in range(L):
            k = K[0, :, t - s] if s <= t else K[1, :, s - t - 1]
            y_ref[0, t] += k * u[0, s]
    torch.testing.assert_close(y, y_ref)


def test_dss_kernel_equals_the_softmax_formula():
    A, _, C, dt = _system(H=2, N=3)
    A = A + 0.3  # DSS allows positive real parts
    L = 12
    K = dss_kernel(A, C, dt, L)
    K_ref = torch.zeros(2, L, dtype=torch.float64)
    for h in range(2):
        for n in range(3):
            z = torch.exp(A[h, n] * dt[h] * torch.arange(L, dtype=torch.float64))
            K_ref[h] += 2 * (C[h, n] / A[h, n] * z / z.sum()).real
    torch.testing.assert_close(K, K_ref)


def test_log_depth_scan_equals_the_sequential_loop():
    g = torch.Generator().manual_seed(0)
    log_dA = torch.complex(
        -torch.rand(5, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g, dtype=torch.float64),
    )
    for L in (1, 2, 13, 64):
        b = torch.randn(3, L, 5, dtype=torch.complex128, generator=g)
        torch.testing.assert_close(linear_scan(log_dA, b), sequential_scan(log_dA, b))


def _s4d_reference(m, u):
    A, B, C, dt = m.ssm()
    y = ssm_recurrence(A, B, C[0], dt, u, disc=m.disc, conj_sym=m.conj_sym) + u * m.D
    return m.output(m.activation(y))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"disc": "bilinear", "transform": "softplus"},
        {"init": "ptd", "transform": "relu"},
        {"init": "lin"},
    ],
)
def test_s4d_layer_equals_recurrence_plus_skip_activation_and_projection(kwargs):
    torch.manual_seed(0)
    m = S4D(4, 8, **kwargs).double()
    u = torch.randn(2, 17, 4, dtype=torch.float64)
    torch.testing.assert_close(m(u), _s4d_reference(m, u))


def _s5_reference(m, u):
    """Sequential MIMO loop: x_t = dA x_{t-1} + dB u_t, y_t = Re(C~ x_t) (x2) + D u_t."""
    _, dA, dB, C = m.ssm()
    x = torch.zeros(u.shape[0], dA.shape[0], dtype=dA.dtype)
    ys = []
    for t in range(u.shape[1]):
        x = dA * x + u[:, t].to(dB.dtype) @ dB.T
        ys.append((x @ C[0].T).real)
    y = torch.stack(ys, 1) * (2 if m.conj_sym else 1) + u * m.D
    return m.output(m.activation(y))


@pytest.mark.parametrize(
    "kwargs", [{}, {"blocks": 2, "disc": "bilinear"}, {"init": "ptd", "blocks": 2}]
)
def test_s5_layer_equals_a_sequential_mimo_loop(kwargs):
    torch.manual_seed(0)
    m = S5(4, 8, **kwargs).double()
    u = torch.randn(2, 19, 4, dtype=torch.float64)
    torch.testing.assert_close(m(u), _s5_reference(m, u))


def test_s5_block_diagonal_init_repeats_the_hippo_n_block():
    m = S5(4, 16, blocks=4)  # transform "none": Lambda_re holds Re(Lambda) itself
    block = torch.as_tensor(diagonal_init("legs", 4)[0])
    torch.testing.assert_close(m.Lambda_im.double(), block.imag.repeat(4), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.Lambda_re.double(), block.real.repeat(4), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [S4D, S5])
def test_bidirectional_layers_see_the_future_and_causal_ones_do_not(cls):
    torch.manual_seed(0)
    u = torch.randn(1, 12, 4, dtype=torch.float64)
    v = u.clone()
    v[0, 8] += 1.0  # change the input at t = 8 only
    causal, bidir = cls(4, 8).double(), cls(4, 8, bidirectional=True).double()
    with torch.no_grad():
        # FFT round-off is the only way the future may reach the past of a causal layer
        assert (causal(u)[0, :8] - causal(v)[0, :8]).abs().max() < 1e-12
        assert (causal(u)[0, 8:] - causal(v)[0, 8:]).abs().amax(-1).min() > 1e-6
        assert (bidir(u)[0, :8] - bidir(v)[0, :8]).abs().amax(-1).min() > 1e-6


@pytest.mark.parametrize("cls", [S4D, S5])
def test_bf16_autocast_forward_backward_matches_float32(cls):
    torch.manual_seed(0)
    m = cls(16, 16, bidirectional=True)
    u = torch.randn(2, 77, 16)  # 77 is not a power of two: the FFT must run in float32
    y32 = m(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(u)
    assert y16.dtype == torch.bfloat16
    y16.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()


@pytest.mark.parametrize("cls", [S4D, S5])
@pytest.mark.parametrize("init", ["legs", "ptd"])
def test_gradients_are_finite_and_reach_every_parameter(cls, init):
    torch.manual_seed(0)
    m = cls(8, 16, init=init, dropout=0.1)
    m(torch.randn(3, 40, 8)).square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", [S4D, S5])
def test_gradient_checkpointing_gives_the_same_gradients(cls):
    torch.manual_seed(0)
    m = cls(8, 8, bidirectional=True)
    u = torch.randn(2, 10, 8, requires_grad=True)
    m(u).sum().backward()
    plain = [p.grad.clone() for p in m.parameters()] + [u.grad.clone()]
    m.zero_grad()
    u.grad = None
    checkpoint(m, u, use_reentrant=False).sum().backward()
    for a, b in zip(plain, [p.grad for p in m.parameters()] + [u.grad]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [S4D, S5])
def test_ssm_parameters_are_tagged_and_get_their_own_group(cls):
    model = torch.nn.Sequential(cls(8, 8, lr=1e-4), torch.nn.Linear(8, 8), cls(8, 8))
    tagged = {id(p) for p in model.parameters() if getattr(p, "_modx_ssm", False)}
    assert tagged == {id(p) for layer in (model[0], model[2]) for p in layer.ssm_parameters()}
    assert len(tagged) == 8  # dt, Re A, Im A, B in each layer
    groups = ssm_param_groups(model, lr=5e-4, weight_decay=0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    ssm_groups = [g for g in groups if {id(p) for p in g["params"]} <= tagged]
    other = [g for g in groups if not {id(p) for p in g["params"]} & tagged]
    assert len(ssm_groups) + len(other) == len(groups)
    assert all(g["weight_decay"] == 0.0 for g in ssm_groups)
    # layer 0 asked for lr=1e-4; layer 2 gets the default min(lr, 1e-3)
    assert sorted(g["lr"] for g in ssm_groups) == [1e-4, 5e-4]
    assert [(g["lr"], g["weight_decay"]) for g in other] == [(5e-4, 0.1)]


@pytest.mark.parametrize("cls", [S4D, S5])
def test_ssm_tags_survive_deepcopy_and_dtype_conversion(cls):
    # the Mod-X old model and EMA copies are deep copies; Parameter.__deepcopy__ drops attributes
    copied = copy.deepcopy(cls(8, 8, lr=1e-4)).double()
    tagged = [p for p in copied.parameters() if getattr(p, "_modx_ssm", False)]
    assert len(tagged) == 4 and all(p._modx_ssm_lr == 1e-4 for p in tagged)
    assert {id(p) for p in tagged} == {id(p) for p in copied.ssm_parameters()}


@pytest.mark.parametrize("transform", ["exp", "relu", "softplus", "none"])
def test_real_part_transforms_start_at_the_init_and_stay_negative(transform):
    m = S4D(2, 8, init="inv", transform=transform).double()
    A, _, _, _ = m.ssm()
    torch.testing.assert_close(A.real, torch.full_like(A.real, -0.5))
    with torch.no_grad():
        for value in (-5.0, 0.0, 5.0):  # any parameter value must give a decaying mode
            m.A_re.fill_(value)
            assert (m.ssm()[0].real < 0).all()


@pytest.mark.parametrize("transform", ["exp", "relu", "softplus", "none"])
def test_ptd_init_survives_every_transform(transform):
    # PTD decay rates reach hundreds: the inverse transforms must not overflow
    m = S4D(2, 16, init="ptd", transform=transform).double()
    A, B, _, _ = m.ssm()
    A_ref, B_ref = (torch.as_tensor(x) for x in diagonal_init("ptd", 16))
    torch.testing.assert_close(A[0], A_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(B[1], B_ref, rtol=1e-6, atol=1e-6)


def test_s4d_ptd_output_matrix_is_a_real_gaussian_times_v():
    # the authors' S4-PTD: C~ = C V with C real standard normal, so C~ V^-1 is real
    from modx.models.ssm.init import ptd_init

    torch.manual_seed(0)
    m = S4D(64, 16, init="ptd", bidirectional=True).double()
    _, V, Vinv, Bt = (torch.as_tensor(x) for x in ptd_init("legs", 16))
    _, B, C, _ = m.ssm()
    C0 = C @ Vinv  # (2, 64, 16)
    assert C0.imag.abs().max() < 1e-5 * C0.real.abs().max()
    assert C0.real.std().item() == pytest.approx(1.0, rel=0.05)
    torch.testing.assert_close(B[0], Bt, rtol=1e-5, atol=1e-5)


def test_s4d_legs_b_defaults_to_the_reference_and_keeps_the_halved_option():
    m = S4D(2, 64)
    m_half = S4D(2, 64, B_clip=None, B_scale=0.5)
    for layer, kwargs in ((m, {}), (m_half, {"B_clip": None, "B_scale": 0.5})):
        B_ref = torch.as_tensor(diagonal_init("legs", 64, **kwargs)[1]).to(torch.complex64)
        torch.testing.assert_close(torch.view_as_complex(layer.B)[1], B_ref)
    assert torch.view_as_complex(m.B).imag.abs().max() <= 2.0


def test_lecun_normal_is_jax_truncated_normal_with_variance_one_over_fan_in():
    from modx.models.ssm.layers import lecun_normal

    torch.manual_seed(0)
    x = lecun_normal(400, 500, fan_in=25)
    assert x.std().item() == pytest.approx(1 / 5, rel=0.01)
    assert x.abs().max().item() <= 2 / 5 / 0.87962566103423978 + 1e-12  # cut at 2 std


def test_s5_b_and_c_have_the_reference_scales():
    # S5 reference: B (P, H) lecun-normal (variance 1/P), B~ = V^-1 B; C (H, P) complex with
    # real and imaginary parts lecun-normal (variance 1/P each), C~ = C V. With the orthonormal
    # HiPPO-N eigenvectors: E|B~|^2 = 1/P and E|C~|^2 = 2/P (not 1/H, 1/P as modx had).
    torch.manual_seed(0)
    H, P = 256, 16
    m = S5(H, P)
    B = torch.view_as_complex(m.B)  # (P/2, H)
    C = torch.view_as_complex(m.C)[0]  # (H, P/2)
    assert B.abs().square().mean().item() == pytest.approx(1 / P, rel=0.1)
    assert C.abs().square().mean().item() == pytest.approx(2 / P, rel=0.1)
    assert C.imag.abs().mean() > 0.5 * C.real.abs().mean()  # C is complex before V too


def test_s5_half_glu1_output_and_optional_eigenvalue_clipping():
    from modx.models.ssm.layers import HalfGLU

    m = S5(4, 8)
    assert isinstance(m.output, HalfGLU)  # the reference's default activation_fn
    x = torch.randn(3, 4)
    torch.testing.assert_close(m.output(x), x * torch.sigmoid(x @ m.output.gate.weight.T + m.output.gate.bias))
    with torch.no_grad():
        m.Lambda_re[0] = 0.3
    assert m.ssm()[0][0].real.item() == pytest.approx(0.3 * math.exp(m.log_dt[0].item()), rel=1e-5)
    clipped = S5(4, 8, clip_eigs=True)
    with torch.no_grad():
        clipped.Lambda_re[0] = 0.3
    assert clipped.ssm()[0][0].real.item() < 0  # clip_eigs: Re(Lambda) <= -1e-4
