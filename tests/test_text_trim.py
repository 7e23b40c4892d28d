"""modx.models.text: text batches cut to their longest caption give the same features."""

from __future__ import annotations

import copy

import pytest
import torch
from _train_helpers import MICRO_MODEL

from modx.models import create_model, trim_padding, trims_padding
from modx.train.data import TimedBatches

TINY_OPEN_CLIP = {  # a plain open_clip config: open_clip's own CLIP class
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}
SMALL = {"width": 16, "layers": 2, "ssm": {"d_state": 8}}
CAPTIONS = ["a digit", "a photo of the handwritten digit seven, in black ink!", "three", "a red circle"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("arch, overrides", [
    (TINY_OPEN_CLIP, {}),  # open_clip CLIP: transformer text tower, argmax pooling
    (MICRO_MODEL, {}),  # ModxCLIP: attention backbone in modx's sequence tower
    ("modx-tiny-s4d", {"embed_dim": 16, "vision_cfg": SMALL, "text_cfg": SMALL}),  # causal S4D text tower
    ("modx-tiny-s5", {"embed_dim": 16, "vision_cfg": SMALL, "text_cfg": SMALL}),
])
def test_trimmed_text_gives_the_features_of_the_padded_text(arch, overrides):
    torch.manual_seed(0)
    model, _, _, tokenizer = create_model(arch, **overrides)
    model.eval()
    text = tokenizer(CAPTIONS)
    short = trim_padding(text)
    assert trims_padding(model)
    assert short.shape[1] < text.shape[1] and torch.equal(short, text[:, : short.shape[1]])
    assert (text[:, short.shape[1]:] == 0).all() and (short[:, -1] != 0).any()
    with torch.no_grad():
        full, cut = model.encode_text(text), model.encode_text(short)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.encode_text(text[:, :3]), full)  # a cut into the captions does change them
    twin = copy.deepcopy(model)  # the old model of Mod-X: a copy, encoding with its own weights
    with torch.no_grad():
        twin.logit_scale.zero_()
        for p in twin.parameters():
            p.mul_(0.5)
        assert trims_padding(twin)
        torch.testing.assert_close(twin.encode_text(short), twin.encode_text(text), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(twin.encode_text(short), full)


def test_towers_that_see_the_padding_are_never_trimmed():
    bidirectional = {**TINY_OPEN_CLIP, "text_cfg": {**TINY_OPEN_CLIP["text_cfg"], "no_causal_mask": True}}
    last_token = {**TINY_OPEN_CLIP, "text_cfg": {**TINY_OPEN_CLIP["text_cfg"], "pool_type": "last"}}
    for cfg in (bidirectional, last_token):
        model = create_model(cfg)[0]
        assert not trims_padding(model)


def test_trim_padding_keeps_one_column_of_an_all_padding_batch():
    assert trim_padding(torch.zeros(3, 8, dtype=torch.long)).shape == (3, 1)
    text = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    assert torch.equal(trim_padding(text), text[:, :2])
    full = torch.tensor([[5, 6, 7, 8]])
    assert trim_padding(full) is full


def test_timed_batches_trim_only_when_asked():
    text = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])

    class Loader(list):
        def set_epoch(self, epoch):
            pass

    batches = [{"image": torch.zeros(2, 1), "text": text.clone(), "key": ["a", "b"]}]
    assert next(TimedBatches(Loader(batches), torch.device("cpu"), trim=True))["text"].shape == (2, 2)
    assert next(TimedBatches(Loader(batches), torch.device("cpu")))["text"].shape == (2, 4)
