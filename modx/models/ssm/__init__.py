"""Diagonal state-space layers (S4D, S5) with HiPPO and PTD initialisations; see docs/ssm.md."""

from .hippo import nplr, transition
from .init import diagonal_init, perturb_then_diagonalize
from .kernel import fft_conv, ssm_kernel
from .layers import S4D, S5, ssm_param_groups

__all__ = [
    "S4D",
    "S5",
    "diagonal_init",
    "fft_conv",
    "nplr",
    "perturb_then_diagonalize",
    "ssm_kernel",
    "ssm_param_groups",
    "transition",
]
