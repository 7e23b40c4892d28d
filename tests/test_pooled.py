"""modx.models.pooled: the last block at the pooled row gives open_clip's features and gradients."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import MICRO_MODEL
from open_clip.model import CLIP
from open_clip.transformer import TextTransformer, VisionTransformer

from modx.models import create_model, trim_padding, trims_padding
from modx.models.pooled import pools_last_block

BASE = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
CAPTIONS = ["a digit", "a photo of the handwritten digit seven, in black ink!", "three", "a red circle"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cfg(vision: dict | None = None, text: dict | None = None) -> dict:
    return {**BASE, "vision_cfg": {**BASE["vision_cfg"], **(vision or {})},
            "text_cfg": {**BASE["text_cfg"], **(text or {})}}


def _reference(model, image, text):
    """open_clip's own forward (the class methods, not the instance's)."""
    image_features = VisionTransformer.forward(model.visual, image)
    if isinstance(model, CLIP):
        text_features = CLIP.encode_text(model, text)
    else:
        text_features = TextTransformer.forward(model.text, text)
    return image_features, text_features


def _grads(model, features):
    g = torch.Generator().manual_seed(1)
    loss = sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum() for f in features)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("cfg, towers", [
    (_cfg(), {"vision": True, "text": True}),
    (_cfg(vision={"ls_init_value": 0.5}, text={"ls_init_value": 0.5}), {"vision": True, "text": True}),
    (_cfg(vision={"final_ln_after_pool": True}, text={"pool_type": "eos", "eos_id": 49407}), {"vision": True, "text": True}),
    (_cfg(vision={"pool_type": "avg"}, text={"pool_type": "last"}), {"vision": False, "text": False}),
    (_cfg(text={"no_causal_mask": True}), {"vision": True, "text": False}),
    (MICRO_MODEL, {"vision": False, "text": True}),  # average pooling: open_clip's forward
    ({**_cfg(), "custom_text": True}, {"vision": True, "text": True}),  # CustomTextCLIP's TextTransformer
], ids=["clip", "layer-scale", "ln-after-pool+eos", "avg+last", "bidirectional-text", "modx-towers", "custom-text"])
def test_pooled_last_block_matches_open_clip(cfg, towers):
    torch.manual_seed(0)
    model, _, _, tokenizer = create_model(cfg)
    assert pools_last_block(model) == towers
    size = cfg["vision_cfg"]["image_size"]
    image, text = torch.randn(4, 3, size, size, dtype=torch.float64), tokenizer(CAPTIONS)
    model.double().train()  # float64: the two computations agree to ~1e-15
    want = _reference(model, image, text)
    got = (model.encode_image(image), model.encode_text(text))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for g, w in zip(_grads(model, got), _grads(model, want)):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    if towers["text"]:  # a batch cut to its longest caption too
        torch.testing.assert_close(model.encode_text(trim_padding(text)), want[1], rtol=1e-10, atol=1e-12)


def test_pooled_last_block_with_gradient_checkpointing_and_output_tokens():
    torch.manual_seed(0)
    model, _, _, tokenizer = create_model(_cfg())
    image, text = torch.randn(2, 3, 16, 16), tokenizer(CAPTIONS[:2])
    want = _reference(model, image, text)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model.encode_image(image), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encode_text(text), want[1], rtol=1e-5, atol=1e-6)
    model.set_grad_checkpointing(False)
    model.visual.output_tokens = True  # tokens wanted: open_clip's whole forward
    pooled, tokens = model.visual(image)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(pooled, want[0], rtol=1e-5, atol=1e-6)


def test_a_whole_model_saved_with_torch_save_loads_with_its_shortcuts(tmp_path):
    torch.manual_seed(0)
    model, _, _, tokenizer = create_model(_cfg())
    model.eval()
    image, text = torch.randn(2, 3, 16, 16), tokenizer(CAPTIONS[:2])
    torch.save(model, tmp_path / "model.pt")  # pickles the bound shortcuts by reference
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    assert pools_last_block(again) == {"vision": True, "text": True} and trims_padding(again)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(image), model.encode_image(image), rtol=0, atol=0)
        torch.testing.assert_close(again.encode_text(trim_padding(text)), model.encode_text(text), rtol=1e-5, atol=1e-6)
        again.visual.proj.zero_()  # bound to the loaded tower, not to the saved one
        assert not again.encode_image(image).any() and model.encode_image(image).any()
