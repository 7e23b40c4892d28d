"""Built-in datasets: real digits and textiles, procedural shapes; ensure_builtin is idempotent."""

from __future__ import annotations

import io
import json
import os
import tarfile
from functools import cache
from itertools import islice

import numpy as np
import pytest
from _data_helpers import fake_preprocess, fake_tokenizer
from PIL import Image
from scipy import ndimage

from modx.data import BUILTINS, STREAM, ensure_builtin, make_loader, shard_sizes
from modx.data.builtin import (
    VERSION,
    build_builtin,
    builtin_samples,
    check_classes,
    defect_place,
    digit_features,
    ensure_builtin_splits,
    subset_name,
    tercile_levels,
    textile_features,
)
from modx.data.cli import shards_main
from modx.data.sources import split_of
from modx.data.urls import parse_sources


@cache
def _test_split(name: str) -> tuple[dict, ...]:
    return tuple(s for s in builtin_samples(name) if split_of(s["__key__"], 0.1, 0) == "test")


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
    for s in _test_split("textiles"):
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
    first = _test_split("textiles")[0]
    assert first["json"]["class"] == "nominal" and "no defect" in first["txt"]


def test_ensure_builtin_builds_once_and_returns_brace_urls(tmp_path):
    train, test = ensure_builtin("digits", root=str(tmp_path), num_shards=2)
    assert train == f"{tmp_path}/digits/train-{{000000..000001}}.tar"
    assert test == f"{tmp_path}/digits/test-000000.tar"
    n_train = sum(shard_sizes(parse_sources(train)[0].urls))
    n_test = sum(shard_sizes(parse_sources(test)[0].urls))
    n_val = sum(shard_sizes(parse_sources(f"{tmp_path}/digits/val-000000.tar")[0].urls))
    assert n_train + n_val + n_test == 1797  # 10 % test, 10 % val split by key hash
    assert 100 < n_test < 260 and 100 < n_val < 260
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
    train1, test1 = ensure_builtin("digits", root=str(tmp_path), num_shards=1, test_fraction=0.0, val_fraction=0.0)
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
        "val": f"{out}/val-000000.tar",
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


@pytest.mark.parametrize("name, least", [("digits", 0.6), ("textiles", 0.6), ("shapes", 0.6)])
def test_most_test_images_have_their_own_caption(name, least):
    test = _test_split(name)
    distinct = len({s["txt"] for s in test}) / len(test)
    print(f"{name}: {distinct:.0%} distinct first captions among {len(test)} test images")
    assert distinct >= least  # measured: digits 72 %, textiles 77 %, shapes 75 %


def test_captions_carry_the_computed_attributes():
    for s in _test_split("digits")[:40]:
        meta = s["json"]
        for attr in ("weight", "slant", "position"):
            assert meta[attr] in s["txt"] and meta[attr] in meta["captions"][3]
    for s in _test_split("textiles")[:40]:
        meta = s["json"]
        for attr in ("brightness", "contrast", "grain", "darkest"):
            assert meta[attr] in s["txt"]
    for s in _test_split("shapes")[:40]:
        meta = s["json"]
        assert all(meta[a] in c for a in ("size", "place", "background") for c in meta["captions"])


def _members(path) -> list | bytes:
    if path.suffix != ".tar":
        return path.read_bytes()
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_builtin_shards_are_deterministic(tmp_path):
    a = build_builtin("digits", str(tmp_path / "a"), num_shards=2)
    b = build_builtin("digits", str(tmp_path / "b"), num_shards=2)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and len(names) == 6  # 2 train, val, test, 2 json
    for n in names:  # same members, same bytes (the tar headers differ only in mtime)
        assert _members(tmp_path / "a" / n) == _members(tmp_path / "b" / n), n
    assert a.train.replace("/a/", "/b/") == b.train
    again = [s for s in builtin_samples("textiles") if split_of(s["__key__"], 0.1, 0) == "test"]
    assert [s["json"] for s in again] == [s["json"] for s in _test_split("textiles")]


def test_tercile_levels_split_each_group_in_thirds():
    values = [5, 1, 3, 2, 6, 4, 30, 10, 20]
    assert tercile_levels(values[:6]).tolist() == [2, 0, 1, 0, 2, 1]
    groups = ["a"] * 6 + ["b"] * 3  # "b" is compared with itself only
    assert tercile_levels(values, groups).tolist() == [2, 0, 1, 0, 2, 1, 2, 0, 1]


def _stroke(width: int, shear: float = 0.0, shift: int = 0) -> np.ndarray:
    """An 8x8 vertical bar of ``width`` px, its top moved ``shear`` px per row to the right."""
    img = np.zeros((8, 8))
    for y in range(1, 7):
        x0 = 3 + shift + round(shear * (3.5 - y)) - width // 2
        img[y, max(0, x0) : x0 + width] = 16
    return img


def test_digit_features_tell_weight_slant_and_position():
    thin, bold = digit_features(_stroke(1)), digit_features(_stroke(3))
    assert bold["ink"] > 2 * thin["ink"]
    assert abs(thin["slant"]) < 1e-9 and abs(bold["slant"]) < 1e-9
    right, left = digit_features(_stroke(1, shear=0.6)), digit_features(_stroke(1, shear=-0.6))
    assert right["slant"] > 0.3 and left["slant"] < -0.3
    assert digit_features(_stroke(1, shift=-2))["x"] < -0.2
    assert digit_features(_stroke(1, shift=2))["x"] > 0.2
    levels = tercile_levels([digit_features(_stroke(w))["ink"] for w in (2, 1, 3)])
    assert levels.tolist() == [1, 0, 2]  # regular, thin, bold


def test_textile_features_tell_brightness_contrast_grain_and_shading():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, (64, 64))
    dark, light = textile_features(80 + 20 * noise), textile_features(180 + 20 * noise)
    assert dark["brightness"] < 90 < 170 < light["brightness"]
    assert textile_features(128 + 5 * noise)["contrast"] < 10
    assert textile_features(128 + 40 * noise)["contrast"] > 30
    coarse = ndimage.gaussian_filter(noise, 3)
    coarse *= 20 / coarse.std()
    assert textile_features(128 + coarse)["grain"] < 0.2 < 0.6 < dark["grain"]
    shaded = 128 + 20 * noise
    shaded[32:, 32:] -= 15
    assert textile_features(shaded)["darkest"] == "bottom right"


def test_ensure_builtin_rebuilds_shards_of_an_older_data_version(tmp_path):
    ensure_builtin("shapes", root=str(tmp_path), num_shards=1)
    marker = tmp_path / "shapes" / "builtin.json"
    info = json.loads(marker.read_text())
    info["options"]["version"] = VERSION - 1
    marker.write_text(json.dumps(info))
    (tmp_path / "shapes" / "stale").write_text("")
    ensure_builtin("shapes", root=str(tmp_path), num_shards=1)
    assert json.loads(marker.read_text())["options"]["version"] == VERSION
    assert not (tmp_path / "shapes" / "stale").exists()


def _keys(urls: str | None) -> list[str]:
    """The sample keys of the shards at `urls`."""
    keys = []
    for url in parse_sources(urls)[0].urls if urls else []:
        with tarfile.open(url) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


def test_val_split_is_disjoint_from_train_and_test_and_leaves_test_as_it_was(tmp_path):
    splits = ensure_builtin_splits("digits", root=str(tmp_path), num_shards=2)
    train, val, test = (_keys(u) for u in splits)
    assert len(set(train)) == len(train) and len(set(val)) == len(val) and len(set(test)) == len(test)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    everything = [s["__key__"] for s in builtin_samples("digits")]
    assert sorted(train + val + test) == sorted(everything)
    # the test keys are those of the split before val splits existed (test_fraction 0.1 only)
    assert set(test) == {k for k in everything if split_of(k, 0.1, 0) == "test"}
    assert set(val) == {k for k in everything if split_of(k, 0.1, 0, 0.1) == "val"}
    assert 100 < len(val) < 260
    assert ensure_builtin("digits", root=str(tmp_path), num_shards=2) == (splits.train, splits.test)


def test_split_of_carves_val_from_train_only():
    keys = [f"k{i}" for i in range(2000)]
    before = {k: split_of(k, 0.2, 3) for k in keys}
    after = {k: split_of(k, 0.2, 3, 0.15) for k in keys}
    assert all(after[k] == "test" for k in keys if before[k] == "test")
    assert all(before[k] == "train" for k in keys if after[k] == "val")
    assert 200 < sum(v == "val" for v in after.values()) < 400


def test_class_subset_keeps_each_split_of_those_classes(tmp_path):
    full = ensure_builtin_splits("digits", root=str(tmp_path), num_shards=2)
    sub = ensure_builtin_splits("digits", root=str(tmp_path), classes=["one", "zero"], num_shards=2)
    assert sub.train.startswith(f"{tmp_path}/digits.zero+one/")  # classes in label order
    for split, (a, b) in zip(("train", "val", "test"), zip(full, sub)):
        keys = set(_keys(b))
        assert keys and keys <= set(_keys(a)), split
        for url in parse_sources(b)[0].urls:
            with tarfile.open(url) as tar:
                classes = {json.load(tar.extractfile(m))["class"] for m in tar.getmembers() if m.name.endswith(".json")}
            assert classes <= {"zero", "one"}, split
    wanted = {s["__key__"] for s in builtin_samples("digits") if s["json"]["class"] in ("zero", "one")}
    assert set(_keys(sub.train)) | set(_keys(sub.val)) | set(_keys(sub.test)) == wanted
    mtime = os.path.getmtime(parse_sources(sub.test)[0].urls[0])
    assert ensure_builtin_splits("digits", root=str(tmp_path), classes=["zero", "one"], num_shards=2) == sub
    assert os.path.getmtime(parse_sources(sub.test)[0].urls[0]) == mtime  # not rebuilt


def test_class_subset_names_an_unknown_class():
    with pytest.raises(ValueError, match="'digits' has no class 'ten'; its classes are"):
        check_classes("digits", ["one", "ten"])
    with pytest.raises(ValueError, match="an empty class list"):
        check_classes("digits", [])
    assert subset_name("shapes", ["star", "circle"]) == "shapes.circle+star"
