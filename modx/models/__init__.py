"""CLIP models for modx: open_clip architectures and diagonal-SSM towers behind one factory.

    model, preprocess_train, preprocess_eval, tokenizer = create_model("modx-tiny-s4d")
"""

from modx.models.checkpoint import (
    ModelLoadError,
    export_model,
    load_weights,
    plain_state_dict,
    read_state_dict,
)
from modx.models.factory import (
    add_model_config,
    create_model,
    get_model_config,
    get_tokenizer,
    list_models,
    swap_tower,
)
from modx.models.model import ModxCLIP, build_model
from modx.models.optim import is_ssm_parameter, model_param_groups
from modx.models.text import trim_padding, trims_padding

__all__ = [
    "ModelLoadError",
    "ModxCLIP",
    "add_model_config",
    "build_model",
    "create_model",
    "export_model",
    "get_model_config",
    "get_tokenizer",
    "is_ssm_parameter",
    "list_models",
    "load_weights",
    "model_param_groups",
    "plain_state_dict",
    "read_state_dict",
    "swap_tower",
    "trim_padding",
    "trims_padding",
]
