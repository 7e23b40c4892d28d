"""modx.eval.embed + eval/retrieval.py + eval/disorder.py on a tiny model and tiny shards."""

import importlib.util
import io
import json
from pathlib import Path
from types import SimpleNamespace

import accelerate.utils
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from modx.data import write_shards
from modx.eval.embed import embed_dataset
from modx.eval.retrieval import retrieval_metrics
from modx.models import create_model, export_model

ROOT = Path(__file__).resolve().parents[1]
N = 11


def captions(i):
    return [f"a photo number {i} variant {k}" for k in range(1 + i % 3)]  # 1..3 captions


def _png(i):
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    samples = [
        {
            "__key__": f"k{i:03d}",
            "png": _png(i),
            "txt": captions(i)[0],
            "json": {"captions": captions(i)},
        }
        for i in reversed(range(N))  # written out of key order
    ]
    write_shards(samples, str(root / "shards"), "test", maxcount=4)
    urls = str(root / "shards" / "test-{000000..000002}.tar")
    torch.manual_seed(0)
    small = {"layers": 1, "width": 32, "ssm": {"d_state": 8}}  # seconds, even on a busy CPU
    model, _, preprocess, tokenizer = create_model(
        "modx-tiny-s4d", embed_dim=8, vision_cfg=small, text_cfg=small
    )
    model.eval()
    export_model(model, root / "run" / "checkpoints" / "phase-0")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_model(model, root / "run" / "checkpoints" / "phase-1")  # the newest: phase-1
    return SimpleNamespace(root=root, urls=urls, model=model, pre=preprocess, tok=tokenizer)


def test_every_image_and_caption_once_in_key_order(setup):
    emb = embed_dataset(setup.model, setup.urls, preprocess=setup.pre, tokenizer=setup.tok,
                        batch_size=4, progress=False)  # fmt: skip
    assert emb.keys == [f"k{i:03d}" for i in range(N)]
    assert emb.text_image_ids.tolist() == [i for i in range(N) for _ in captions(i)]
    assert emb.stats["samples"] == N and emb.stats["skipped"] == 0
    with torch.no_grad():
        expected = F.normalize(
            setup.model.encode_text(setup.tok([c for i in range(N) for c in captions(i)])), dim=-1
        )
    torch.testing.assert_close(emb.text, expected, atol=1e-5, rtol=1e-5)
    assert emb.image.dtype == torch.float32
    torch.testing.assert_close(emb.image.norm(dim=1), torch.ones(N))


def test_workers_and_ranks_do_not_change_the_result(setup, monkeypatch):
    kw = {"preprocess": setup.pre, "tokenizer": setup.tok, "batch_size": 3, "progress": False}
    single = embed_dataset(setup.model, setup.urls, **kw)
    two_workers = embed_dataset(setup.model, setup.urls, workers=2, **kw)
    torch.testing.assert_close(two_workers.image, single.image, atol=1e-5, rtol=1e-5)
    assert two_workers.keys == single.keys

    # two ranks: rank 1 embeds its share first, then rank 0 "gathers" [its own, rank 1's]
    shares = []

    def acc(rank):
        return SimpleNamespace(process_index=rank, num_processes=2, device=torch.device("cpu"),
                               unwrap_model=lambda m: m)  # fmt: skip

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: shares.append(obj[0]) or obj)
    embed_dataset(setup.model, setup.urls, accelerator=acc(1), **kw)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: [obj[0], shares[0]])
    merged = embed_dataset(setup.model, setup.urls, accelerator=acc(0), **kw)
    assert 0 < len(shares[0]["keys"]) < N  # each rank got a part
    assert merged.keys == single.keys and merged.stats["samples"] == N
    torch.testing.assert_close(merged.text, single.text, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged.text_image_ids, single.text_image_ids)


def _script(name):
    spec = importlib.util.spec_from_file_location(
        f"modx_eval_script_{name}", ROOT / "eval" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retrieval_script_uses_the_newest_phase_and_reports_json(setup, capsys):
    script = _script("retrieval")
    assert (
        script.main(["--checkpoint", str(setup.root / "run"), "--data", setup.urls, "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"].endswith("phase-1") and out["n_images"] == N
    emb = embed_dataset(
        setup.model, setup.urls, preprocess=setup.pre, tokenizer=setup.tok, progress=False
    )
    expected = retrieval_metrics(emb.image, emb.text, emb.text_image_ids)
    assert out["metrics"] == pytest.approx(expected)
    table = script.format_table(out, [1, 5, 10])
    assert "image->text" in table and f"{expected['mean_recall']:8.2f}" in table


@pytest.mark.parametrize(
    ("checkpoint", "data", "message"),
    [
        ("missing-dir", "ok", "unknown model"),
        ("shards", "ok", "no exported model"),
        ("run", "nothing.tar", "no shards matched"),
        ("weights", "ok", "--pretrained"),
    ],
)
def test_retrieval_script_bad_input_exits_2(setup, capsys, checkpoint, data, message):
    paths = {"run": setup.root / "run", "shards": setup.root / "shards",
             "weights": setup.root / "run" / "checkpoints" / "phase-0" / "model.safetensors",
             "missing-dir": setup.root / "nope"}  # fmt: skip
    urls = setup.urls if data == "ok" else str(setup.root / data)
    assert _script("retrieval").main(["--checkpoint", str(paths[checkpoint]), "--data", urls]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval/retrieval.py: error:") and message in err


def test_disorder_script_between_two_phases(setup, capsys):
    script = _script("disorder")
    old = setup.root / "run" / "checkpoints" / "phase-0"
    args = ["--old", str(old), "--new", str(setup.root / "run"), "--data", setup.urls,
            "--probe", "10", "--json"]  # fmt: skip
    assert script.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new"].endswith("phase-1") and out["metrics"]["n_probe"] == 10
    assert 0 < out["metrics"]["rotation_image_deg"] < 90
    table = script.format_table(out)
    assert "rotation, image (deg, mean)" in table and "alignment flips t2i" in table
