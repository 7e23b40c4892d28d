"""Zero-shot classification: open_clip's classifier rule, the metrics, CLIP_benchmark's
webdataset layout, eval/zeroshot.py, and the built-in zero-shot sets."""

import importlib.util
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import accelerate.utils
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from modx.data import make_loader
from modx.data.benchmark import ensure_builtin_zeroshot, read_benchmark, write_benchmark
from modx.data.urls import DataError
from modx.eval.embed import embed_dataset, embed_labelled
from modx.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier, zeroshot_metrics
from modx.models import create_model, export_model

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "red car", "tree"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}", "{c}"]
N = 14


def _image(i, fmt):
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _write_clip_benchmark(root: Path, retrieval: bool = False) -> None:
    """A directory exactly as CLIP_benchmark's converter writes it (keys s%07d, %d.tar
    shards of at most 6 samples, .webp / .jpg images, .cls ints or newline-joined .txt)."""
    (root / "test").mkdir(parents=True)
    pattern = str(root / "test" / "%d.tar")
    with wds.ShardWriter(pattern, maxcount=6, verbose=0) as sink:
        for i in range(N):
            ext, fmt = ("webp", "WEBP") if i % 2 else ("jpg", "JPEG")
            sample = {"__key__": f"s{i:07d}", ext: _image(i, fmt)}
            if retrieval:
                sample["txt"] = "\n".join(f"caption {k} of image {i}" for k in range(1 + i % 3))
            else:
                sample["cls"] = i % len(CLASSES)
            sink.write(sample)
        shards = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    else:
        (root / "classnames.txt").write_text("".join(c + "\n" for c in CLASSES))
        (root / "zeroshot_classification_templates.txt").write_text("".join(t + "\n" for t in TEMPLATES))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    _write_clip_benchmark(root / "cls")
    _write_clip_benchmark(root / "ret", retrieval=True)
    torch.manual_seed(0)
    small = {"layers": 1, "width": 32, "ssm": {"d_state": 8}}
    model, _, preprocess, tokenizer = create_model("modx-tiny-s4d", embed_dim=8, vision_cfg=small, text_cfg=small)
    model.eval()
    export_model(model, root / "run" / "checkpoints" / "phase-0")
    return SimpleNamespace(root=root, model=model, pre=preprocess, tok=tokenizer)


def test_classifier_is_open_clips_rule(setup):
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    ours = zeroshot_classifier(setup.model, setup.tok, CLASSES, TEMPLATES, classes_per_batch=3)
    templates = [lambda c, t=t: t.format(c=c) for t in TEMPLATES]  # open_clip formats "{}" positionally
    theirs = build_zero_shot_classifier(setup.model, setup.tok, CLASSES, templates, num_classes_per_batch=2)
    assert ours.shape == (8, len(CLASSES))
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-5)
    # and by hand, one class at a time in float64
    with torch.no_grad():
        for j, c in enumerate(CLASSES):
            e = setup.model.encode_text(setup.tok([t.format(c=c) for t in TEMPLATES])).double()
            w = F.normalize(F.normalize(e, dim=-1).mean(0), dim=0)
            torch.testing.assert_close(ours[:, j].double(), w, atol=1e-5, rtol=1e-5)


def _naive(image, labels, w):
    logits = (image.double() @ w.double()).numpy()
    order = np.argsort(-logits, axis=1, kind="stable")
    y = labels.numpy()
    acc1 = np.mean([order[i, 0] == y[i] for i in range(len(y))])
    acc5 = np.mean([y[i] in order[i, :5] for i in range(len(y))])
    recalls = [np.mean(order[y == c, 0] == c) for c in np.unique(y)]
    return 100 * acc1, 100 * acc5, 100 * np.mean(recalls)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_metrics_match_a_naive_computation_at_any_chunk(chunk):
    from sklearn.metrics import balanced_accuracy_score

    g = torch.Generator().manual_seed(0)
    n_classes = 30
    w = F.normalize(torch.randn(16, n_classes, generator=g), dim=0)
    labels = torch.randint(0, 25, (200,), generator=g)  # classes 25..29 have no image
    image = F.normalize(w.T[labels] + 0.9 * torch.randn(200, 16, generator=g), dim=1)
    m = zeroshot_metrics(image, labels, w, chunk=chunk)
    acc1, acc5, mpcr = _naive(image, labels, w)
    assert m["acc1"] == pytest.approx(acc1) and m["acc5"] == pytest.approx(acc5)
    assert m["mean_per_class_recall"] == pytest.approx(mpcr)
    pred = (image @ w).argmax(1).numpy()
    assert m["mean_per_class_recall"] == pytest.approx(100 * balanced_accuracy_score(labels.numpy(), pred))
    assert 0 < m["acc1"] < m["acc5"] < 100 and m["n_images"] == 200 and m["n_classes"] == n_classes


def test_metrics_with_fewer_than_five_classes_and_bad_labels():
    """acc5 is NaN below 5 classes, as CLIP_benchmark reports it (a top-5 among fewer
    classes always hits); from 5 classes on it is the top-5 accuracy."""
    w = torch.eye(3)
    m = zeroshot_metrics(torch.eye(3)[[0, 1, 2, 1]], torch.tensor([0, 1, 1, 1]), w)
    assert m["acc1"] == 75.0 and math.isnan(m["acc5"])
    assert m["mean_per_class_recall"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    image = torch.eye(6)[:, :5] + 0.1 * torch.arange(5.0)  # (6, 5): image 5 ranks class 0 last
    five = zeroshot_metrics(image, torch.tensor([0, 1, 2, 3, 4, 0]), torch.eye(5))
    assert five["acc5"] == 100.0 and five["acc1"] == pytest.approx(500 / 6)
    with pytest.raises(ValueError, match="labels must lie in"):
        zeroshot_metrics(torch.eye(3), torch.tensor([0, 1, 3]), w)


def test_reads_clip_benchmark_classification_directory(setup):
    bench = read_benchmark(str(setup.root / "cls"))
    assert bench.kind == "classification" and list(bench.classnames) == CLASSES
    assert list(bench.templates) == TEMPLATES and len(bench.urls) == 3  # 6 + 6 + 2 samples
    emb = embed_labelled(setup.model, str(setup.root / "cls"), preprocess=setup.pre, batch_size=4, progress=False)
    assert emb.keys == [f"s{i:07d}" for i in range(N)] and emb.stats["skipped"] == 0
    assert emb.labels.tolist() == [i % len(CLASSES) for i in range(N)]
    result = evaluate_zeroshot(setup.model, str(setup.root / "cls"), preprocess=setup.pre, tokenizer=setup.tok, batch_size=5)
    w = zeroshot_classifier(setup.model, setup.tok, CLASSES, TEMPLATES)
    acc1, acc5, mpcr = _naive(emb.image, emb.labels, w)
    assert result["acc1"] == pytest.approx(acc1) and math.isnan(result["acc5"])  # 4 classes
    assert result["mean_per_class_recall"] == pytest.approx(mpcr)


def test_retrieval_directory_gives_one_caption_per_line(setup):
    emb = embed_dataset(setup.model, str(setup.root / "ret"), preprocess=setup.pre, tokenizer=setup.tok,
                        batch_size=4, progress=False)  # fmt: skip
    assert emb.keys == [f"s{i:07d}" for i in range(N)]
    assert emb.text_image_ids.tolist() == [i for i in range(N) for _ in range(1 + i % 3)]
    with torch.no_grad():
        expected = F.normalize(setup.model.encode_text(setup.tok(["caption 2 of image 2"])), dim=-1)
    first_of_2 = emb.text_image_ids.tolist().index(2)
    torch.testing.assert_close(emb.text[first_of_2 + 2 : first_of_2 + 3], expected, atol=1e-5, rtol=1e-5)
    assert read_benchmark(str(setup.root / "ret")).kind == "retrieval"


def test_two_ranks_give_the_metrics_of_one(setup, monkeypatch):
    """Rank 1 encodes its share of classes and images first; rank 0 then 'gathers'."""
    kw = {"preprocess": setup.pre, "tokenizer": setup.tok, "batch_size": 3}
    root = str(setup.root / "cls")
    single = evaluate_zeroshot(setup.model, root, **kw)
    shares = []

    def acc(rank):
        return SimpleNamespace(process_index=rank, num_processes=2, device=torch.device("cpu"),
                               unwrap_model=lambda m: m)  # fmt: skip

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: shares.append(obj[0]) or obj)
    assert evaluate_zeroshot(setup.model, root, accelerator=acc(1), **kw) is None
    it = iter(shares)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: [obj[0], next(it)])
    merged = evaluate_zeroshot(setup.model, root, accelerator=acc(0), **kw)
    assert len(shares[0]) == 1 and shares[0][0].shape == (8, 2)  # rank 1: classes 2 and 3
    assert 0 < len(shares[1]["keys"]) < N
    for k in ("acc1", "mean_per_class_recall", "n_images"):
        assert merged[k] == pytest.approx(single[k]), k
    assert math.isnan(merged["acc5"]) and math.isnan(single["acc5"])  # 4 classes


def test_bad_directories_are_named():
    with pytest.raises(DataError, match="not found"):
        read_benchmark("/nonexistent/dir")


def test_write_benchmark_round_trips(tmp_path):
    samples = [{"__key__": f"k{i}", "png": _image(i, "PNG"), "cls": i % 2} for i in range(5)]
    bench = write_benchmark(str(tmp_path / "b"), samples, classnames=["a", "b"], templates=["{c}!"], maxcount=2)
    assert len(bench.urls) == 3 and bench.classnames == ("a", "b")
    loader = make_loader(str(tmp_path / "b"), mode="eval", batch_size=8, preprocess=None, tokenizer=None, labels=True)
    assert sorted(x for b in loader for x in b["label"].tolist()) == [0, 0, 0, 1, 1]
    with pytest.raises(DataError, match=r"has no \{c\}"):
        (tmp_path / "b" / "zeroshot_classification_templates.txt").write_text("no class here\n")
        read_benchmark(str(tmp_path / "b"))


def test_builtin_zero_shot_set_labels_follow_the_class_names(tmp_path):
    from modx.data.builtin import ZEROSHOT, ensure_builtin
    from modx.data.samples import tar_samples
    from modx.data.stats import SkipStats

    root = ensure_builtin_zeroshot("digits", str(tmp_path))
    assert ensure_builtin_zeroshot("digits", str(tmp_path)) == root  # built once
    bench = read_benchmark(root)
    assert list(bench.classnames) == ZEROSHOT["digits"][1]
    meta = {s["__key__"]: json.loads(s["json"]) for s in
            tar_samples(({"url": u} for u in [ensure_builtin("digits", str(tmp_path))[1]]), SkipStats())}  # fmt: skip
    loader = make_loader(root, mode="eval", batch_size=64, preprocess=None, tokenizer=None, labels=True)
    got = {k: y for b in loader for k, y in zip(b["key"], b["label"].tolist())}
    assert got.keys() == meta.keys()
    assert all(bench.classnames[y] == meta[k]["class"] for k, y in got.items())



def test_builtin_zero_shot_subset_holds_only_its_classes(tmp_path):
    from modx.data.builtin import ensure_builtin
    from modx.data.samples import tar_samples
    from modx.data.stats import SkipStats

    root = ensure_builtin_zeroshot("digits", str(tmp_path), classes=["nine", "seven"])
    assert root == str(tmp_path / "digits.seven+nine-zs")
    bench = read_benchmark(root)
    assert list(bench.classnames) == ["seven", "nine"]  # the dataset's label order, labels 0..k-1
    meta = {s["__key__"]: json.loads(s["json"])["class"] for s in
            tar_samples(({"url": u} for u in [ensure_builtin("digits", str(tmp_path))[1]]), SkipStats())}  # fmt: skip
    loader = make_loader(root, mode="eval", batch_size=64, preprocess=None, tokenizer=None, labels=True)
    got = {k: y for b in loader for k, y in zip(b["key"], b["label"].tolist())}
    assert got.keys() == {k for k, c in meta.items() if c in ("seven", "nine")}
    assert all(bench.classnames[y] == meta[k] for k, y in got.items())

def _script():
    spec = importlib.util.spec_from_file_location("modx_eval_script_zeroshot", ROOT / "eval" / "zeroshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_nan(token: str):
    raise AssertionError(f"{token} in JSON: modx writes undefined values as null")


def test_zeroshot_script_json(setup, capsys):
    script = _script()
    assert script.main(["--checkpoint", str(setup.root / "run"), "--data", str(setup.root / "cls"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=_no_nan)
    assert set(out["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert out["n_images"] == N and out["n_classes"] == len(CLASSES)
    assert out["metrics"]["acc5"] is None  # 4 classes: undefined, null in strict JSON
    assert script.main(["--checkpoint", str(setup.root / "run"), "--data", str(setup.root / "cls")]) == 0
    table = capsys.readouterr().out
    assert "top-1 accuracy" in table and "top-5 accuracy                 -  (fewer than 5 classes)" in table


@pytest.mark.parametrize(
    ("data", "message"),
    [("missing", "not found"), ("run", "not a CLIP_benchmark"), ("ret", "retrieval set")],
)
def test_zeroshot_script_bad_input_exits_2(setup, capsys, data, message):
    code = _script().main(["--checkpoint", str(setup.root / "run"), "--data", str(setup.root / data)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_trainer_evaluator_records_both_kinds_and_leaves_the_rng_alone(setup, tmp_path):
    from modx.config import load_config
    from modx.eval.continual import zeroshot_retention
    from modx.train.evaluate import Evaluator

    ret, cls = str(setup.root / "ret"), str(setup.root / "cls")
    cfg = load_config(None, [f"stream.phases=[{{name: r, train: {ret}, eval: {ret}, steps: 1}}]",
                             "eval.backend=torch", "eval.probe=4"])  # fmt: skip
    ev = Evaluator(cfg, [("r", ret)], setup.pre, setup.tok, tmp_path, torch.device("cpu"), zeroshot=[("z", cls)])
    state = torch.get_rng_state()
    row = ev.evaluate(setup.model, -1, "initial", 0)
    assert torch.equal(torch.get_rng_state(), state)  # the eval loaders drew from a forked RNG
    assert row["z"]["acc1"] == pytest.approx(evaluate_zeroshot(setup.model, cls, preprocess=setup.pre, tokenizer=setup.tok)["acc1"])
    records = [json.loads(line, parse_constant=_no_nan) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["retrieval", "zeroshot"] and "zero-shot z" in ev.headline(row)
    assert records[1]["metrics"]["acc5"] is None  # 4 classes
    assert zeroshot_retention(records, metric="acc5")["matrix"] == []  # null cells: no crash, no number
    assert zeroshot_retention(records, metric="acc5")["initial"] == [None]
