"""Built-in datasets: real digits and textiles, procedural shapes; ensure_builtin is idempotent."""

from __future__ import annotations

import io
import json
import os
from itertools import islice

import numpy as np
import pytest
from _data_helpers import fake_preprocess, fake_tokenizer
from PIL import Image
from scipy import ndimage

from modx.data import BUILTINS, STREAM, ensure_builtin, make_loader, shard_sizes
from modx.data.builtin import builtin_samples, defect_place
from modx.data.cli import shards_main
from modx.data.urls import parse_sources


def test_three_domains_in_stream_order():
    assert set(STREAM) == set(BUILTINS) and len(STREAM) >= 3


@pytest.mark.parametrize("name, size", [("digits", 32), ("textiles", 64), ("shapes", 32)])
def test_images_are_small_and_have_several_captions(name, size):
    for s in islice(builtin_samples(name), 0, 600, 50):
        caps = s["json"]["captions"]
        assert len(set(caps)) >= 3 and s["txt"] == caps[0]
        assert Image.open(io.BytesIO(s["png"])).size == (size, size)


def test_captions_name_the_content():
    for s in islice(builtin_samples("digits"), 0, 300, 7):
        meta = s["json"]
        assert all(str(meta["label"]) in c or meta["class"] in c for c in meta["captions"])
    for s in islice(builtin_samples("shapes"), 0, 300, 7):
        meta = s["json"]
        assert all(meta["shape"] in c and meta["colour"] in c for c in meta["captions"])
    by_class: dict[str, set[str]] = {}
    for s in islice(builtin_samples("textiles"), 0, None, 40):
        by_class.setdefault(s["json"]["class"], set()).update(s["json"]["captions"])
    assert sorted(by_class) == ["global", "local", "nominal"]
    nominal, local, global_ = by_class["nominal"], by_class["local"], by_class["global"]
    assert not (
        nominal & local or nominal & global_ or local & global_
    )  # captions tell classes apart


def test_textiles_come_from_the_package_with_three_classes():
    import conformal_clip_data as ccd

    counts = {
        c: len(os.listdir(d))
        for c, d in [
            ("nominal", ccd.nominal_dir()),
            ("local", ccd.local_dir()),
            ("global", ccd.global_dir()),
        ]
    }
    assert counts == {"nominal": 1000, "local": 500, "global": 500}
    first = next(builtin_samples("textiles"))
    assert first["json"]["class"] == "nominal" and "no defect" in first["txt"]


def test_ensure_builtin_builds_once_and_returns_brace_urls(tmp_path):
    train, test = ensure_builtin("digits", root=str(tmp_path), num_shards=2)
    assert train == f"{tmp_path}/digits/train-{{000000..000001}}.tar"
    assert test == f"{tmp_path}/digits/test-000000.tar"
    n_train = sum(shard_sizes(parse_sources(train)[0].urls))
    n_test = sum(shard_sizes(parse_sources(test)[0].urls))
    assert n_train + n_test == 1797 and 100 < n_test < 260  # 10 % test split by key hash
    mtime = os.path.getmtime(f"{tmp_path}/digits/train-000000.tar")
    assert ensure_builtin("digits", root=str(tmp_path), num_shards=2) == (train, test)
    assert os.path.getmtime(f"{tmp_path}/digits/train-000000.tar") == mtime  # not rebuilt
    loader = make_loader(
        test,
        mode="eval",
        batch_size=64,
        preprocess=fake_preprocess,
        tokenizer=fake_tokenizer,
        workers=0,
        rank=0,
        world_size=1,
        captions="all",
    )
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == len(set(keys)) == n_test
    assert loader.stats.as_dict()["skipped"] == 0
    # other options rebuild; no test split means no eval URL
    train1, test1 = ensure_builtin("digits", root=str(tmp_path), num_shards=1, test_fraction=0.0)
    assert (train1, test1) == (f"{tmp_path}/digits/train-000000.tar", None)
    assert sorted(os.listdir(tmp_path / "digits")) == [
        "builtin.json",
        "sizes.json",
        "train-000000.tar",
    ]


def test_modx_shards_builtin_is_reused_by_ensure_builtin(tmp_path, capsys):
    out = str(tmp_path / "shapes")
    assert shards_main(["--builtin", "shapes", "--out", out, "--num-shards", "3", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {
        "train": f"{out}/train-{{000000..000002}}.tar",
        "test": f"{out}/test-000000.tar",
    }
    mtime = os.path.getmtime(f"{out}/test-000000.tar")
    assert ensure_builtin("shapes", root=str(tmp_path), num_shards=3) == (
        printed["train"],
        printed["test"],
    )
    assert os.path.getmtime(f"{out}/test-000000.tar") == mtime


def test_ensure_builtin_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown built-in dataset 'mnist'"):
        ensure_builtin("mnist", root=str(tmp_path))


@pytest.mark.parametrize(
    "y, x, place", [(20, 20, "top left"), (125, 230, "right"), (125, 125, "centre")]
)
def test_defect_place_finds_a_spot_in_texture(y, x, place):
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(rng.normal(128, 40, (250, 250)), 2)  # smooth fabric
    texture[y - 5 : y + 5, x - 5 : x + 5] = rng.integers(0, 255, (10, 10))  # speckled flaw
    assert defect_place(texture) == place
    assert defect_place(ndimage.gaussian_filter(rng.normal(128, 40, (250, 250)), 2)) is None
