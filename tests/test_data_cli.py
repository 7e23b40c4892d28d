"""modx-shards / scripts/make_shards.py and modx-data check: outputs and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _data_helpers import make_shards, png, truncate_inside, write_tar

from modx.data import parse_sources, shard_sizes
from modx.data.cli import data_main, shards_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(directory, n):
    os.makedirs(directory, exist_ok=True)
    for i in range(n):
        with open(os.path.join(directory, f"img{i}.png"), "wb") as f:
            f.write(png(i))


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_shards_from_csv_with_split_and_check(tmp_path, capsys):
    _images(tmp_path / "imgs", 20)
    rows = ["image,caption"] + [f"imgs/img{i}.png,a picture number {i}" for i in range(20)]
    rows.append("imgs/missing.png,a row whose image is gone")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    out_dir = tmp_path / "shards"
    argv = [str(tmp_path / "data.csv"), "--out", str(out_dir), "--shard-size", "6"]
    assert shards_main(argv + ["--test-fraction", "0.25", "--quiet"]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["samples"] == 20 and result["reasons"] == {"missing_image": 1}
    train = parse_sources(result["train"])[0].urls
    test = parse_sources(result["test"])[0].urls
    assert sum(shard_sizes(train)) + sum(shard_sizes(test)) == 20
    assert 0 < sum(shard_sizes(test)) < 10
    # the split is a function of the keys: a second run writes the same shards
    sizes = (out_dir / "sizes.json").read_text()
    assert shards_main(argv + ["--test-fraction", "0.25", "--quiet"]) == 0
    assert (out_dir / "sizes.json").read_text() == sizes
    capsys.readouterr()
    assert (
        data_main(["check", f"{result['train']}::{result['test']}", "--json", "--workers", "0"])
        == 0
    )
    assert _last_json(capsys.readouterr().out) == {"samples": 20, "skipped": 0, "reasons": {}}


def test_shards_from_jsonl_with_caption_lists(tmp_path, capsys):
    _images(tmp_path, 3)
    lines = [
        json.dumps({"image": f"img{i}.png", "captions": [f"one {i}", f"two {i}"]}) for i in range(3)
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    assert shards_main([str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert _last_json(capsys.readouterr().out)["train"] == str(tmp_path / "o" / "train-000000.tar")
    from modx.data import make_loader

    batch = next(
        iter(
            make_loader(
                str(tmp_path / "o" / "train-000000.tar"),
                mode="eval",
                batch_size=3,
                preprocess=None,
                tokenizer=None,
                workers=0,
                rank=0,
                world_size=1,
                captions="all",
            )
        )
    )
    assert batch["text"] == ["one 0", "two 0", "one 1", "two 1", "one 2", "two 2"]


def test_shards_from_folder_with_sidecar_txt(tmp_path, capsys):
    _images(tmp_path / "f", 4)
    for i in range(3):  # img3 has no caption: counted, not written
        (tmp_path / "f" / f"img{i}.txt").write_text(f"first caption {i}\nsecond caption {i}\n")
    assert shards_main([str(tmp_path / "f"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["samples"] == 3 and result["reasons"] == {"missing_caption": 1}


def test_check_reports_skips_by_reason(tmp_path, capsys):
    (path,) = make_shards(str(tmp_path), "c", 1, 5)
    truncate_inside(path, "c_0_3")
    write_tar(str(tmp_path / "c-000001.tar"), [{"__key__": "x", "png": b"broken", "txt": "t"}])
    urls = f"{tmp_path}/c-{{000000..000001}}.tar"
    assert data_main(["check", urls, "--json", "--workers", "2"]) == 0
    assert _last_json(capsys.readouterr().out) == {
        "samples": 3,
        "skipped": 2,
        "reasons": {"truncated_tar": 1, "bad_image": 1},
    }
    assert data_main(["check", urls, "--strict", "--quiet", "--workers", "0"]) == 1
    assert "samples: 3  skipped: 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "{tmp}/none-{{000000..000009}}.tar"], "no shards matched"),
        (["check", "{tmp}/c-{{000000..000002}}.tar"], "1 of 3 shards"),
        (["builtin", "nosuchset", "--root", "{tmp}"], "unknown built-in dataset"),
    ],
)
def test_data_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    make_shards(str(tmp_path), "c", 2, 1)
    code = data_main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("modx-data: error:") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "content, argv, message",
    [
        (None, ["{tmp}/nope.csv"], "no such file or folder"),
        ("img,text\na.png,hello\n", ["{tmp}/t.csv"], "needs columns 'image' and 'caption'"),
        ("image,caption\n", ["{tmp}/t.csv"], "no rows"),
        ("image,caption\n", ["{tmp}/t.csv", "--builtin", "digits"], "exactly one of"),
        ("{not json\n", ["{tmp}/t.jsonl"], "not a JSON object"),
        ("a\n", ["{tmp}/t.parquet"], "unknown table type"),
    ],
)
def test_shards_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, content, argv, message):
    if content is not None:
        (tmp_path / os.path.basename(argv[0])).write_text(content)
    code = shards_main([a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("modx-shards: error:") and message in err and len(err.splitlines()) == 1


def test_console_scripts_run_as_commands(tmp_path):
    _images(tmp_path / "f", 2)
    for i in range(2):
        (tmp_path / "f" / f"img{i}.txt").write_text(f"caption {i}")
    script = os.path.join(ROOT, "scripts", "make_shards.py")
    made = subprocess.run(
        [sys.executable, script, str(tmp_path / "f"), "--out", str(tmp_path / "o"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    checked = subprocess.run(
        ["modx-data", "check", _last_json(made.stdout)["train"], "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr
    assert _last_json(checked.stdout) == {"samples": 2, "skipped": 0, "reasons": {}}
    bad = subprocess.run(
        ["modx-data", "check", str(tmp_path / "missing-{0..3}.tar")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("modx-data: error: no shards matched")
