"""modx.eval.retrieval: recall at K with several captions per image, random-tie
expectation, backends."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from open_clip_train.train import get_clip_metrics

import modx.eval.retrieval as retrieval
from modx.eval.retrieval import retrieval_metrics

BACKENDS = ("faiss", "torch")


def naive_counts(img, txt, ids):
    """Reference: full float64 score matrix, loops; per query (a, t, q) = non-matching
    items strictly above / tied with the best match score, matching items tied with it."""
    s = img.astype(np.float64) @ txt.astype(np.float64).T  # (N, M)
    i2t, t2i = [], []
    for i in range(len(img)):
        caps = [j for j in range(len(txt)) if ids[j] == i]
        if caps:
            best = max(s[i, j] for j in caps)
            wrong = [s[i, j] for j in range(len(txt)) if ids[j] != i]
            q = sum(s[i, j] == best for j in caps)
            i2t.append((sum(x > best for x in wrong), sum(x == best for x in wrong), q))
    for j in range(len(txt)):
        best = s[ids[j], j]
        wrong = [s[i, j] for i in range(len(img)) if i != ids[j]]
        t2i.append((sum(x > best for x in wrong), sum(x == best for x in wrong), 1))
    return i2t, t2i


def exact_hit(a, t, q, k):
    """P(hit at k) as an exact fraction: 1 - C(t, r) / C(t + q, r), r = k - a."""
    r = k - a
    if r <= 0:
        return Fraction(0)
    if r > t:
        return Fraction(1)
    return 1 - Fraction(math.comb(t, r), math.comb(t + q, r))


def naive_metrics(img, txt, ids, ks, ranks=False):
    out = {}
    for name, counts in zip(("i2t", "t2i"), naive_counts(img, txt, ids)):
        for k in ks:
            out[f"{name}_R@{k}"] = float(100 * sum(exact_hit(*c, k) for c in counts) / len(counts))
        if ranks:
            expected = [a + Fraction(t, q + 1) for a, t, q in counts]
            out[f"{name}_mean_rank"] = float(sum(expected) / len(expected) + 1)
            out[f"{name}_median_rank"] = float(math.floor(np.median(np.array(expected, float))) + 1)
    out["mean_recall"] = np.mean([v for key, v in out.items() if "R@" in key])
    return out


def enumerated_metrics(img, txt, ids, ks):
    """Brute force: average over every order of the gallery used as tie-breaker (sort by
    score, ties by the order): hit at K and 1-based rank of the first matching item."""
    s = img.astype(np.float64) @ txt.astype(np.float64).T  # (N, M)
    out = {}
    for name, scores, match in (
        ("i2t", s, ids[None, :] == np.arange(len(img))[:, None]),
        ("t2i", s.T, ids[:, None] == np.arange(len(img))[None, :]),
    ):
        keep = match.any(1)
        scores, match = scores[keep], match[keep]
        perms = np.array(list(itertools.permutations(range(scores.shape[1]))))  # (P, G)
        first = []  # (queries, P) 0-based position of the first matching item
        for row, m in zip(scores, match):
            order = np.lexsort((perms, np.broadcast_to(-row, perms.shape)), axis=-1)
            first.append(m[order].argmax(1))
        first = np.array(first)
        for k in ks:
            out[f"{name}_R@{k}"] = 100 * (first < k).mean(1).mean()
        out[f"{name}_mean_rank"] = first.mean() + 1
    return out


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_made_several_captions_per_image(backend):
    img = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    txt = np.array([[1, 0], [0, 1], [0, 1], [0.8, 0.6]], np.float32)
    ids = [0, 0, 1, 2]
    m = retrieval_metrics(img, txt, ids, ks=(1, 2, 3, 10), backend=backend)
    # i2t: image0 rank 0 (its caption 0 beats its caption 1 and the others), image2 0;
    # image1's caption 2 ties with caption 1 of image0: a coin flip at K = 1
    assert m["i2t_R@1"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert m["i2t_R@2"] == 100.0
    # t2i ranks: 0, 2 (caption 1 prefers image1 and image2 to its image0), 0, 0
    assert m["t2i_R@1"] == m["t2i_R@2"] == 75.0
    assert m["t2i_R@3"] == 100.0
    assert m["i2t_R@10"] == m["t2i_R@10"] == 100.0  # K beyond the gallery
    expected_mean = np.mean([250 / 3, 100, 100, 100, 75, 75, 100, 100])
    assert m["mean_recall"] == pytest.approx(expected_mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_share_the_credit(backend):
    # templated captions: images 0-2 are class A, 3-5 class B, and every image's
    # caption is its class's one text, so it ties with the class mates' captions
    a, b = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    img = np.array(
        [[1, 0, 0.1], [1, 0, 0.2], [1, 0, 0.3], [0, 1, 0.1], [0, 1, 0.2], [0, 1, 0.3]], np.float32
    )
    txt = np.array([a, a, a, b, b, b], np.float32)
    m = retrieval_metrics(img, txt, np.arange(6), ks=(1, 2, 3), backend=backend, ranks=True)
    # image -> text: 2 wrong captions tie with the right one: P(top 1) = 1/3, top 2 = 2/3
    assert m["i2t_R@1"] == pytest.approx(100 / 3) and m["i2t_R@2"] == pytest.approx(200 / 3)
    assert m["i2t_R@3"] == 100.0 and m["i2t_mean_rank"] == 2.0
    # text -> image: caption "a" scores the three class-A images equally, ties again
    assert m["t2i_R@1"] == pytest.approx(100 / 3) and m["t2i_median_rank"] == 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_collapsed_model_scores_chance(backend):
    # all embeddings equal: every query ties with the whole gallery (300 items, far more
    # than the faiss candidate list), so recall is K / gallery and the rank the middle
    z = np.ones((300, 4), np.float32)
    m = retrieval_metrics(z, z, np.arange(300), ks=(1, 5, 10), backend=backend, ranks=True)
    for name in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert m[f"{name}_R@{k}"] == pytest.approx(100 * k / 300, rel=1e-12)
        assert m[f"{name}_mean_rank"] == 150.5
    assert retrieval_metrics(z, z, np.arange(300), ks=(400,), backend=backend)["mean_recall"] == 100


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(8))
def test_closed_form_equals_enumeration_of_every_tie_order(backend, seed):
    # tiny integer embeddings (exact scores, ties everywhere); image 0's first two
    # captions are identical, so image -> text has several matching items tied (q > 1)
    rng = np.random.default_rng(seed)
    img = rng.integers(-1, 2, size=(4, 2)).astype(np.float32)
    ids = np.array([0, 0, 0, 1, 1, 2, 3])
    txt = rng.integers(-1, 2, size=(7, 2)).astype(np.float32)
    txt[1] = txt[0]
    ks = (1, 2, 3, 4, 5, 6, 7)
    m = retrieval_metrics(img, txt, ids, ks=ks, backend=backend, ranks=True)
    ref = enumerated_metrics(img, txt, ids, ks)
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, rel=0, abs=1e-12), key


def test_the_enumerated_cases_have_ties_with_several_tied_matches():
    i2t = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        img = rng.integers(-1, 2, size=(4, 2)).astype(np.float32)
        txt = rng.integers(-1, 2, size=(7, 2)).astype(np.float32)
        txt[1] = txt[0]
        i2t += naive_counts(img, txt, np.array([0, 0, 0, 1, 1, 2, 3]))[0]
    assert any(t > 0 and q > 1 for _, t, q in i2t) and any(a > 0 and t > 0 for a, t, _ in i2t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_tie_groups_are_exact(backend):
    # image 0 has 3 captions, tied with 2000 captions of images 1..2000 (t = 2000,
    # q = 3); images 1..2000 score every caption 0 (t = 2002, q = 1)
    img = np.zeros((2001, 2), np.float32)
    img[0, 0], img[1:, 1] = 1, 1
    txt = np.tile(np.array([[1, 0]], np.float32), (2003, 1))
    ids = np.concatenate([[0, 0, 0], np.arange(1, 2001)])
    ks = (1, 5, 10)
    m = retrieval_metrics(img, txt, ids, ks=ks, backend=backend)
    for k in ks:
        i2t = (exact_hit(0, 2000, 3, k) + 2000 * exact_hit(0, 2002, 1, k)) / 2001
        # text -> image: image 0's captions hit; the others have image 0 above
        t2i = (3 + 2000 * exact_hit(1, 1999, 1, k)) / 2003
        assert m[f"i2t_R@{k}"] == pytest.approx(float(100 * i2t), rel=1e-12)
        assert m[f"t2i_R@{k}"] == pytest.approx(float(100 * t2i), rel=1e-12)


def test_hit_probability_is_stable_for_thousands_of_ties():
    t = np.array([5000, 5000, 3000, 7])
    q = np.array([4, 1, 50, 2])
    for k in (1, 10, 100):
        p = retrieval.hit_probability(np.zeros(4, np.int64), t, q, k)
        for i in range(4):
            assert p[i] == pytest.approx(float(exact_hit(0, t[i], q[i], k)), rel=1e-12)


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
    monkeypatch.setattr(retrieval, "_IMAGE_TILE", 7)
    monkeypatch.setattr(retrieval, "_FAISS_CHUNK", 7)
    rng = np.random.default_rng(2)
    img = rng.integers(-1, 2, size=(40, 4)).astype(np.float32)
    ids = np.sort(rng.integers(0, 40, size=90))  # 0..k captions per image, some none
    txt = img[ids] + rng.integers(-1, 2, size=(90, 4)).astype(np.float32)
    img[0] = 0.0  # a zero vector ties with everything
    ks = (1, 3, 5, 10)
    ref = naive_metrics(img, txt, ids, ks, ranks=True)
    faiss_m = retrieval_metrics(img, txt, ids, ks, backend="faiss", ranks=True)
    torch_m = retrieval_metrics(img, txt, ids, ks, backend="torch", ranks=True)
    assert faiss_m == torch_m
    assert faiss_m == pytest.approx(ref, rel=1e-12)


def test_faiss_recounts_tie_groups_beyond_its_candidate_list(monkeypatch):
    monkeypatch.setattr(retrieval, "_FAISS_CHUNK", 64)
    rng = np.random.default_rng(7)
    img = rng.integers(-1, 2, size=(300, 2)).astype(np.float32)  # 9 distinct rows
    ids = np.concatenate([np.arange(300), rng.integers(0, 300, size=60)])
    txt = rng.integers(-1, 2, size=(360, 2)).astype(np.float32)
    ks = (1, 5, 10)
    i2t, t2i = naive_counts(img, txt, ids)
    n_cand = max(ks) + 1 + retrieval._MARGIN  # the t2i candidate list
    assert max(a + t for a, t, _ in t2i if a < max(ks)) > n_cand
    faiss_m = retrieval_metrics(img, txt, ids, ks, backend="faiss")
    torch_m = retrieval_metrics(img, txt, ids, ks, backend="torch")
    assert faiss_m == torch_m
    assert faiss_m == pytest.approx(naive_metrics(img, txt, ids, ks), rel=1e-12)


def test_one_pass_counts_both_directions_like_the_naive_loops(monkeypatch):
    """One matmul per tile, counted along rows (i2t) and columns (t2i): the per-query
    (above, tied) of both directions equal the float64 loops, across several tiles."""
    monkeypatch.setattr(retrieval, "_SCORE_CHUNK", 60)
    monkeypatch.setattr(retrieval, "_IMAGE_TILE", 6)
    rng = np.random.default_rng(11)
    img = rng.integers(-1, 2, size=(31, 3)).astype(np.float32)  # many exact ties
    ids = np.sort(rng.integers(0, 31, size=70))
    txt = img[ids] + rng.integers(-1, 2, size=(70, 3)).astype(np.float32)
    pos_t2i = retrieval._dot64(txt, img, np.arange(70), ids)
    pos_img = np.full(31, -np.inf)
    np.maximum.at(pos_img, ids, pos_t2i)
    (a_i, t_i), (a_t, t_t) = retrieval._counts_both_directions(img, txt, pos_img, pos_t2i, ids)
    want_i2t, want_t2i = naive_counts(img, txt, ids)
    has = np.flatnonzero(np.bincount(ids, minlength=31) > 0)
    assert len(has) < 31  # an image without captions counts nothing
    assert [(a, t) for a, t, _ in want_i2t] == list(zip(a_i[has].tolist(), t_i[has].tolist()))
    assert (a_i[np.setdiff1d(np.arange(31), has)] == 0).all()
    assert [(a, t) for a, t, _ in want_t2i] == list(zip(a_t.tolist(), t_t.tolist()))


def test_candidate_lists_recount_what_they_may_miss():
    """The candidate path (used by approximate=True) over an exact index equals the
    naive counts whenever the recall depends on them."""
    rng = np.random.default_rng(7)
    img = rng.integers(-1, 2, size=(300, 2)).astype(np.float32)
    ids = np.concatenate([np.arange(300), rng.integers(0, 300, size=60)])
    txt = rng.integers(-1, 2, size=(360, 2)).astype(np.float32)
    pos = retrieval._dot64(txt, img, np.arange(360), ids)
    above, tied = retrieval._counts_from_candidates(
        txt, img, pos, lambda r, c: ids[r] == c, 10 + 1 + retrieval._MARGIN, 10, False
    )
    _, want = naive_counts(img, txt, ids)
    for (a, t, _), got_a, got_t in zip(want, above, tied):
        if a < 10:
            assert (got_a, got_t) == (a, t)


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
    assert a == pytest.approx(naive_metrics(img, txt, ids, (1, 5, 10), ranks=True), rel=1e-12)


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


def brute_counts(img, txt, ids):
    """Reference for adversarial data: the full float64 score matrix, every product
    summed along d exactly as the module's float64 rescoring does (so bit-equal scores
    for equal vectors), then per query (a, t, q) by whole-row comparisons."""
    a64, t64 = img.astype(np.float64), txt.astype(np.float64)
    s = (a64[:, None, :] * t64[None, :, :]).sum(-1)  # (N, M)
    i2t, t2i = [], []
    for i in range(len(img)):
        mine = ids == i
        if mine.any():
            best = s[i, mine].max()
            wrong = s[i, ~mine]
            i2t.append(
                (
                    int((wrong > best).sum()),
                    int((wrong == best).sum()),
                    int((s[i, mine] == best).sum()),
                )
            )
    for j in range(len(txt)):
        best, wrong = s[ids[j], j], np.delete(s[:, j], ids[j])
        t2i.append((int((wrong > best).sum()), int((wrong == best).sum()), 1))
    return i2t, t2i


def metrics_from_counts(i2t, t2i, ks):
    out = {}
    for name, counts in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = float(100 * sum(exact_hit(*c, k) for c in counts) / len(counts))
        expected = [a + Fraction(t, q + 1) for a, t, q in counts]
        out[f"{name}_mean_rank"] = float(sum(expected) / len(expected) + 1)
        out[f"{name}_median_rank"] = float(math.floor(np.median(np.array(expected, float))) + 1)
    out["mean_recall"] = np.mean([v for key, v in out.items() if "R@" in key])
    return out


def adversarial(seed, dim=37):
    """Near-ties far below the float32 error, exact duplicates, an image with many
    captions, scores of large and small magnitude, d not a multiple of 16."""
    rng = np.random.default_rng(seed)
    n_img = 60
    img = rng.standard_normal((n_img, dim)).astype(np.float32)
    img[:20] *= np.float32(1e3)  # large scores next to unit-scale ones
    img[20:25] *= np.float32(1e-3)
    img[30:33] = img[33]  # duplicate images
    ids = np.concatenate([np.arange(n_img), np.full(40, 5), rng.integers(0, n_img, 100)])
    txt = img[ids] + rng.standard_normal((len(ids), dim)).astype(np.float32) * img[ids].std(
        1, keepdims=True
    )
    txt = txt.astype(np.float32)
    # near-ties: copies of image 7's first caption nudged by one float32 ulp in one
    # coordinate, attached to other images (the score moves by ~1e-7 relative, where
    # the float32 product errs by up to ~dim * 6e-8), plus exact duplicates of it
    base = txt[7].copy()
    nudged = []
    for k in range(24):
        v = base.copy()
        c = k % dim
        v[c] = (
            np.nextafter(v[c], np.float32(np.inf) if k % 3 == 0 else np.float32(-np.inf))
            if k % 3 < 2
            else v[c]
        )
        nudged.append(v)
    txt = np.concatenate([txt, np.array(nudged, dtype=np.float32)])
    ids = np.concatenate([ids, rng.integers(0, n_img, 24)])
    # and a text side near-tie: image 9's caption scored against images nudged from image 9
    img = np.concatenate([img, np.repeat(img[9:10], 6, axis=0)])
    for r in range(n_img, n_img + 6):
        c = r % dim
        img[r, c] = np.nextafter(img[r, c], np.float32(np.inf) if r % 2 else np.float32(-np.inf))
    return img.astype(np.float32), txt, ids


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_pass_on_adversarial_data_equals_float64_brute_force(monkeypatch, threads, seed):
    monkeypatch.setattr(retrieval, "_IMAGE_TILE", 16)  # several image blocks per worker
    monkeypatch.setattr(retrieval, "_TEXT_TILE", 40)  # text tiles not a multiple of 8 at the edge
    img, txt, ids = adversarial(seed)
    a64 = img.astype(np.float64) @ txt.astype(np.float64).T
    a32 = img @ txt.T
    # the data is adversarial: float32 scores order some pairs differently from float64
    order64 = np.sign(a64[:, :, None] - a64[:, None, :])
    order32 = np.sign(a32[:, :, None] - a32[:, None, :]).astype(np.float64)
    assert (order64 != order32).sum() > 0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ks = (1, 5, 10, 50)
        got = {b: retrieval_metrics(img, txt, ids, ks, backend=b, ranks=True) for b in BACKENDS}
        pos_t2i = retrieval._dot64(txt, img, np.arange(len(ids)), ids)
        pos_img = np.full(len(img), -np.inf)
        np.maximum.at(pos_img, ids, pos_t2i)
        (a_i, t_i), (a_t, t_t) = retrieval._counts_both_directions(img, txt, pos_img, pos_t2i, ids)
        assert torch.get_num_threads() == threads  # the workers' one-thread setting does not leak
    finally:
        torch.set_num_threads(before)
    want_i2t, want_t2i = brute_counts(img, txt, ids)
    has = np.flatnonzero(np.bincount(ids, minlength=len(img)) > 0)
    assert [(a, t) for a, t, _ in want_i2t] == list(zip(a_i[has].tolist(), t_i[has].tolist()))
    assert [(a, t) for a, t, _ in want_t2i] == list(zip(a_t.tolist(), t_t.tolist()))
    assert (
        sum(t for _, t, _ in want_t2i) > 0 and sum(t for _, t, _ in want_i2t) > 0
    )  # exact ties too
    assert got["faiss"] == got["torch"]
    assert got["torch"] == pytest.approx(metrics_from_counts(want_i2t, want_t2i, ks), rel=1e-12)


@pytest.mark.parametrize(
    "shape", [(512, 2048), (510, 2040), (300, 16), (7, 13), (256, 4096), (1, 8), (509, 24)]
)
def test_tile_counts_equal_plain_sums(shape):
    """The uint64-lane counts of a bool tile equal numpy's sums, all-true included
    (the case where a byte lane would overflow past 255)."""
    rng = np.random.default_rng(0)
    for mask in (rng.random(shape) < 0.3, np.ones(shape, dtype=bool), np.zeros(shape, dtype=bool)):
        assert (retrieval._count_rows(mask) == mask.sum(1)).all()
        assert (retrieval._count_cols(mask) == mask.sum(0)).all()
