"""modx.eval.retrieval: recall at K with several captions per image, ties, backends."""

import numpy as np
import pytest
import torch
from open_clip_train.train import get_clip_metrics

import modx.eval.retrieval as retrieval
from modx.eval.retrieval import retrieval_metrics

BACKENDS = ("faiss", "torch")


def naive_ranks(img, txt, ids):
    """Reference: full float64 score matrix, loops; rank = non-matching items scoring
    strictly above the best match."""
    s = img.astype(np.float64) @ txt.astype(np.float64).T  # (N, M)
    i2t = []
    for i in range(len(img)):
        caps = [j for j in range(len(txt)) if ids[j] == i]
        if caps:
            best = max(s[i, j] for j in caps)
            i2t.append(sum(s[i, j] > best for j in range(len(txt)) if ids[j] != i))
    t2i = [
        sum(s[i, j] > s[ids[j], j] for i in range(len(img)) if i != ids[j]) for j in range(len(txt))
    ]
    return np.array(i2t), np.array(t2i)


def naive_metrics(img, txt, ids, ks):
    i2t, t2i = naive_ranks(img, txt, ids)
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * np.mean(r < k)
    out["mean_recall"] = np.mean(list(out.values()))
    return out


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_made_several_captions_per_image(backend):
    img = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    txt = np.array([[1, 0], [0, 1], [0, 1], [0.8, 0.6]], np.float32)
    ids = [0, 0, 1, 2]
    m = retrieval_metrics(img, txt, ids, ks=(1, 2, 3, 10), backend=backend)
    # i2t ranks: image0 0 (its caption 0 beats its caption 1 and the others), image1 0
    # (caption 1 of image0 only ties its caption 2), image2 0
    assert m["i2t_R@1"] == 100.0
    # t2i ranks: 0, 2 (caption 1 prefers image1 and image2 to its image0), 0, 0
    assert m["t2i_R@1"] == m["t2i_R@2"] == 75.0
    assert m["t2i_R@3"] == 100.0
    assert m["i2t_R@10"] == m["t2i_R@10"] == 100.0  # K beyond the gallery
    expected_mean = np.mean([100, 100, 100, 100, 75, 75, 100, 100])
    assert m["mean_recall"] == pytest.approx(expected_mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_tie_with_a_non_matching_item_counts_for_the_query(backend):
    # templated captions: images 0-2 are class A, 3-5 class B, and every image's
    # caption is its class's one text, so it ties with the class mates' captions
    a, b = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    img = np.array(
        [[1, 0, 0.1], [1, 0, 0.2], [1, 0, 0.3], [0, 1, 0.1], [0, 1, 0.2], [0, 1, 0.3]], np.float32
    )
    txt = np.array([a, a, a, b, b, b], np.float32)
    m = retrieval_metrics(img, txt, np.arange(6), ks=(1, 3, 4), backend=backend, ranks=True)
    assert m["i2t_R@1"] == 100.0 and m["i2t_mean_rank"] == 1.0
    # text -> image: caption "a" scores the three class-A images equally, ties again
    assert m["t2i_R@1"] == 100.0
    # the flip side, documented: all-equal embeddings tie everywhere and score 100
    z = np.ones((5, 3), np.float32)
    assert retrieval_metrics(z, z, np.arange(5), ks=(1,), backend=backend)["mean_recall"] == 100.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_larger_than_gallery_is_always_a_hit(backend):
    rng = np.random.default_rng(0)
    img, txt = unit(rng.standard_normal((4, 8))), unit(rng.standard_normal((9, 8)))
    m = retrieval_metrics(img, txt, [0, 0, 1, 1, 2, 2, 3, 3, 3], ks=(50,), backend=backend)
    assert m == {"i2t_R@50": 100.0, "t2i_R@50": 100.0, "mean_recall": 100.0}


def test_matches_open_clip_get_clip_metrics_on_one_caption_per_image():
    rng = np.random.default_rng(1)
    img = unit(rng.standard_normal((300, 16)))
    txt = unit(img + 0.9 * rng.standard_normal((300, 16)))
    ref = get_clip_metrics(torch.from_numpy(img), torch.from_numpy(txt), torch.tensor(100.0))
    for backend in BACKENDS:
        m = retrieval_metrics(img, txt, np.arange(300), backend=backend, ranks=True)
        for ours, theirs in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
            for k in (1, 5, 10):
                assert m[f"{ours}_R@{k}"] == pytest.approx(100 * ref[f"{theirs}_R@{k}"])
            assert m[f"{ours}_mean_rank"] == pytest.approx(ref[f"{theirs}_mean_rank"])
            assert m[f"{ours}_median_rank"] == ref[f"{theirs}_median_rank"]


def test_backends_identical_and_equal_to_naive_with_many_exact_ties(monkeypatch):
    # small-integer embeddings: dot products are exact, ties are everywhere
    monkeypatch.setattr(retrieval, "_SCORE_CHUNK", 50)  # several query and gallery tiles
    monkeypatch.setattr(retrieval, "_QUERY_TILE", 7)
    monkeypatch.setattr(retrieval, "_FAISS_CHUNK", 7)
    rng = np.random.default_rng(2)
    img = rng.integers(-1, 2, size=(40, 4)).astype(np.float32)
    ids = np.sort(rng.integers(0, 40, size=90))  # 0..k captions per image, some none
    txt = img[ids] + rng.integers(-1, 2, size=(90, 4)).astype(np.float32)
    img[0] = 0.0  # a zero vector ties with everything
    ks = (1, 3, 5, 10)
    ref = naive_metrics(img, txt, ids, ks)
    faiss_m = retrieval_metrics(img, txt, ids, ks, backend="faiss")
    torch_m = retrieval_metrics(img, txt, ids, ks, backend="torch")
    assert faiss_m == torch_m
    assert faiss_m == pytest.approx(ref)


def test_backends_identical_on_random_float_embeddings_and_duplicates():
    rng = np.random.default_rng(3)
    img = unit(rng.standard_normal((200, 32)))
    img[100:110] = img[90:100]  # duplicated images
    ids = np.repeat(np.arange(200), 3)
    txt = unit(img[ids] + 1.2 * rng.standard_normal((600, 32)))
    txt[300:303] = txt[0]  # duplicated captions
    a = retrieval_metrics(img, txt, ids, backend="faiss", ranks=True)
    b = retrieval_metrics(img, txt, ids, backend="torch", ranks=True)
    assert a == b
    assert {k: v for k, v in a.items() if "rank" not in k} == pytest.approx(
        naive_metrics(img, txt, ids, (1, 5, 10))
    )


def test_images_without_captions_are_not_i2t_queries():
    img = np.eye(3, dtype=np.float32)
    txt = np.eye(3, dtype=np.float32)[:2]
    m = retrieval_metrics(img, txt, [0, 1], ks=(1,), backend="torch")
    assert m["i2t_R@1"] == 100.0  # 2 queries, both right; image 2 is only a distractor


def test_torch_tensors_accepted_and_approximate_index_close():
    rng = np.random.default_rng(4)
    img = unit(rng.standard_normal((500, 16)))
    txt = unit(img + 0.5 * rng.standard_normal((500, 16)))
    exact = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), torch.arange(500))
    approx = retrieval_metrics(img, txt, np.arange(500), approximate=True)
    for key, value in exact.items():
        assert approx[key] == pytest.approx(value, abs=2.0)


@pytest.mark.parametrize(
    ("img", "txt", "ids", "kwargs", "match"),
    [
        (np.ones((2, 3)), np.ones((2, 4)), [0, 1], {}, "dim"),
        (np.ones((2, 3)), np.ones((2, 3)), [0, 2], {}, r"\[0, 2\)"),
        (np.ones((2, 3)), np.ones((2, 3)), [0], {}, "one per text"),
        (np.ones((2, 3)), np.ones((2, 3)), [0, 1], {"ks": (0,)}, "positive"),
        (np.ones((2, 3)), np.ones((2, 3)), [0, 1], {"backend": "annoy"}, "backend"),
        (
            np.ones((2, 3)),
            np.ones((2, 3)),
            [0, 1],
            {"backend": "torch", "approximate": True},
            "faiss",
        ),
        (np.full((2, 3), np.nan), np.ones((2, 3)), [0, 1], {}, "NaN"),
    ],
)
def test_bad_input_is_a_clear_value_error(img, txt, ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(img, txt, ids, **kwargs)
