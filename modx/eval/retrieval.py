"""Image-text retrieval recall at K, without building the full similarity matrix.

Scores are inner products (pass L2-normalised embeddings for cosine similarity).
Several captions may belong to one image: ``text_image_ids[j]`` is the row of
caption j's image.

Tie rule (both backends, by construction): exact score ties are broken uniformly at
random, and the metrics are the *expected* values over that random order (computed in
closed form, so they are deterministic). For one query, with s* the best matching
item's score (scores compared in float64):
    a = non-matching items scoring strictly above s*,
    t = non-matching items scoring exactly s*,
    q = matching items scoring exactly s* (q >= 1; image -> text: the image's
        captions, a hit when any is in the top K; text -> image: q = 1).
The t + q tied items fill positions a+1 .. a+t+q in random order, so with r = K - a
    P(hit at K) = 0 if r <= 0, 1 if r > t, else 1 - C(t, r) / C(t + q, r)
               (= r / (t + 1) when q = 1),
and R@K = 100 * mean P(hit at K). The expected 1-based rank is a + 1 + t / (q + 1).
Without ties this is the usual recall; a collapsed model (all embeddings equal) scores
chance, K / gallery size; identical templated captions share the credit. Exact ties
come from identical inputs (captions such as "a handwritten digit 7" shared by many
images, duplicate images), so neither a rule that counts a tie for the query (a
collapsed model scores 100) nor one that counts it against (image -> text recall 0 for
every model on templated data) is fair.

Exact retrieval (both backends; ``faiss`` and ``torch`` are the same computation and
agree exactly) scores the image-text product ONCE: float32 tiles S = I T^T (image
block x text block, one matmul each) are counted along their rows (image -> text)
and along their columns (text -> image). Items clearly above the query's match (by
more than the float32 error bound) are counted, items within the bound are rescored
in float64, so a, t and q are always decided by the shared float64 comparison below;
this gives full ranks (mean / median rank) too. ``approximate=True`` (faiss only)
instead takes the top ``max(ks) + positives + margin`` candidates per query from an
HNSW index, rescored in float64 (fast on huge galleries; results may differ
slightly from the exact ones); a query whose last candidate may still score s* or
more is recounted exactly.

Why the band is exact. With u = 2^-24 (float32) and any summation order, blocking or
FMA, the computed fl(q . g) satisfies |fl(q . g) - q . g| <= gamma_d sum_k |q_k g_k|
<= gamma_d |q| |g| (Cauchy-Schwarz), gamma_d = d u / (1 - d u); the float64 reference
differs from q . g by ~d 2^-53 |q||g|, which the 1% margin of ``_f32_error_bound``
covers, and the band ends lo/hi, rounded to float32, are widened by one ulp. So a
float32 score above hi is a float64 score above s*, one below lo is below, and only
the band [lo, hi] is rescored: on the benchmark's data 5e-5 of the pairs (text ->
image; 5e-6 image -> text), matching pairs excluded (``bench_retrieval.py --bands``).

Why not a bfloat16 first pass (2.5x the float32 matmul rate on this CPU). Rounding the
inputs to bfloat16 (u = 2^-8) moves a score by up to |r_a||b~| + |a~||r_b| + |r_a||r_b|
(r = the rounding residual, |r| <= u|x|; the rigorous bound is the Cauchy-Schwarz one,
as for float32, and the typical error is ~sqrt(d) times smaller), and torch's CPU
matmul also rounds its output to bfloat16 (no float32 output). On the benchmark's
data that band holds 1.1% of the pairs (text -> image), 200x the float32 band:
5.5e8 float64 rescorings at 100k x 500k, minutes, against the ~90 s the cheaper
matmul saves. The band is that wide because a caption's match score sits in the bulk
of its scores (a weak model, recall ~5%); int8 with per-vector scales rounds worse
than bfloat16. So the first pass stays float32; a reduced-precision pass pays only
where matches sit in the tail (strong models), which exactness cannot assume.

Speed of the one pass: tiles of ``_IMAGE_TILE`` x ``_TEXT_TILE`` (512 x 2048, 4 MiB of
scores) so that the four comparisons per tile (above / within the band, along rows and
columns) read it from cache, counted 8 bools at a time (uint64 byte lanes); image
blocks are shared out to ``torch.get_num_threads()`` worker threads, each running its
matmuls on one thread (numpy's comparisons are single-threaded; both release the GIL).
Set ``torch.set_num_threads`` to limit it. Memory: per worker one tile, its mask and
two counters per caption (16 bytes each), plus the band pairs of one image block;
never N x M.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from modx.threads import MAX_THREADS, map_one_thread_each

Backend = Literal["faiss", "torch"]
ArrayLike = np.ndarray | torch.Tensor

_SCORE_CHUNK = 1 << 24  # float32 scores held at once by the torch backend (64 MiB)
_QUERY_TILE = 1024  # queries per torch score tile (the gallery is tiled to fit the chunk)
_IMAGE_TILE = 512  # images per tile of the one-pass count (texts tiled to fit the chunk)
_TEXT_TILE = 2048  # texts per tile of the one-pass count (512 x 2048 x 4 B = 4 MiB: cache-sized)
_FAISS_CHUNK = 16384  # queries per faiss search call
_PAIR_CHUNK = 1 << 12  # (query, item) pairs rescored in float64 at once
_MARGIN = 8  # extra faiss candidates, so near-ties at the cut cannot change a rank


def retrieval_metrics(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_image_ids: ArrayLike | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    backend: Backend = "faiss",
    *,
    ranks: bool = False,
    approximate: bool = False,
) -> dict[str, float]:
    """Recall@K (percent) in both directions and their mean, ties broken at random
    in expectation (module docstring).

    image_emb (N, d), text_emb (M, d), text_image_ids (M,) with values in [0, N).
    Returns ``i2t_R@K`` and ``t2i_R@K`` for each K in ``ks`` and ``mean_recall``
    (mean of all of them). i2t averages over the images that have a caption.
    ``ranks=True`` adds ``i2t_mean_rank``, ``i2t_median_rank``, ``t2i_mean_rank``,
    ``t2i_median_rank``: mean and median over queries of the expected 1-based rank
    a + 1 + t / (q + 1) (median floored as in open_clip); they need full ranks and
    are computed by the exact one-pass count whatever the backend.
    """
    img, txt, ids, ks = _validate(image_emb, text_emb, text_image_ids, ks, backend)
    if approximate and backend != "faiss":
        raise ValueError("approximate=True needs backend='faiss'")
    n_img = img.shape[0]
    # float64 score of each caption with its own image; both directions use it.
    pos_t2i = _dot64(txt, img, np.arange(len(ids)), ids)  # (M,)
    has_caption = np.bincount(ids, minlength=n_img) > 0
    queries_i2t = np.flatnonzero(has_caption)
    pos_img = np.full(n_img, -np.inf)
    np.maximum.at(pos_img, ids, pos_t2i)
    pos_i2t = pos_img[queries_i2t]
    # q: matching items tied at the best match score (an image's best captions)
    q_i2t = np.bincount(ids[pos_t2i == pos_img[ids]], minlength=n_img)[queries_i2t]
    captions_per_image = int(np.bincount(ids).max())

    def is_pos_t2i(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return ids[rows] == cols

    def is_pos_i2t(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return ids[cols] == queries_i2t[rows]

    def exact_counts() -> dict[str, tuple[np.ndarray, np.ndarray]]:
        (above_i, tied_i), t2i = _counts_both_directions(img, txt, pos_img, pos_t2i, ids)
        return {"i2t": (above_i[queries_i2t], tied_i[queries_i2t]), "t2i": t2i}

    kmax = max(ks)
    out: dict[str, float] = {}
    counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if approximate:  # HNSW candidates per direction, rescored in float64
        for name, q, g, pos, is_pos, n_pos in (
            ("i2t", img[queries_i2t], txt, pos_i2t, is_pos_i2t, captions_per_image),
            ("t2i", txt, img, pos_t2i, is_pos_t2i, 1),
        ):
            counts[name] = _counts_from_candidates(q, g, pos, is_pos, kmax + n_pos + _MARGIN, kmax, True)
    else:  # exact: both directions from one pass over the score tiles
        counts = exact_counts()
    n_matches = {"i2t": q_i2t, "t2i": np.ones(len(ids), dtype=np.int64)}
    for name in ("i2t", "t2i"):
        above, tied = counts[name]
        for k in ks:
            hit = hit_probability(above, tied, n_matches[name], k)
            out[f"{name}_R@{k}"] = 100.0 * float(hit.sum()) / len(hit)
    out["mean_recall"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]))
    if ranks:
        if approximate:
            counts = exact_counts()
        for name, (above, tied) in counts.items():
            rank = above + tied / (n_matches[name] + 1)  # expected 0-based rank
            out[f"{name}_mean_rank"] = float(rank.mean() + 1)
            out[f"{name}_median_rank"] = float(np.floor(np.median(rank)) + 1)
    return out


def hit_probability(above: np.ndarray, tied: np.ndarray, n_match: np.ndarray, k: int) -> np.ndarray:
    """P(some matching item is in the top k) per query when ties are broken uniformly at
    random: a = above, t = tied wrong items, q = n_match tied matching items, r = k - a;
    0 if r <= 0, 1 if r > t, else 1 - C(t, r) / C(t + q, r), the ratio taken as the
    product prod_{i<r} (t - i) / (t + q - i) (stable for large t); r / (t + 1) if q = 1."""
    r = k - above
    p = (r > tied).astype(np.float64)
    m = np.flatnonzero((r > 0) & (r <= tied))
    if len(m):
        t, q, r = tied[m].astype(np.float64), n_match[m].astype(np.float64), r[m]
        miss = np.ones(len(m))
        for i in range(int(r.max())):
            live = i < r
            miss[live] *= (t[live] - i) / (t[live] + q[live] - i)
        p[m] = np.where(q == 1, r / (t + 1), 1.0 - miss)  # q = 1: the exact r / (t + 1)
    return p


def _validate(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_image_ids: ArrayLike | Sequence[int],
    ks: Sequence[int],
    backend: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    img, txt = _as_f32(image_emb, "image_emb"), _as_f32(text_emb, "text_emb")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_emb has dim {img.shape[1]} but text_emb has dim {txt.shape[1]}")
    if img.shape[0] == 0 or txt.shape[0] == 0:
        raise ValueError(f"empty gallery: {img.shape[0]} images, {txt.shape[0]} texts")
    if isinstance(text_image_ids, torch.Tensor):
        text_image_ids = text_image_ids.detach().cpu().numpy()
    ids = np.asarray(text_image_ids)
    if ids.shape != (txt.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"text_image_ids must be {txt.shape[0]} integers (one per text), got shape "
            f"{ids.shape} dtype {ids.dtype}"
        )
    if ids.min() < 0 or ids.max() >= img.shape[0]:
        raise ValueError(
            f"text_image_ids must lie in [0, {img.shape[0]}): found {ids.min()}..{ids.max()}"
        )
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if backend not in ("faiss", "torch"):
        raise ValueError(f"backend must be 'faiss' or 'torch', got {backend!r}")
    return img, txt, ids.astype(np.int64), ks


def _as_f32(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {x.shape}")
    if not np.isfinite(x.sum(axis=1)).all():  # NaN / inf propagate; no (n, d) temporary
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _dot64(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 <a[rows[p]], b[cols[p]]> per pair p, computed the same way for every pair
    (elementwise product, then a sum along the contiguous last axis), so equal vectors
    always get bit-equal scores."""
    out = np.empty(len(rows))
    for s in range(0, len(rows), _PAIR_CHUNK):
        r, c = rows[s : s + _PAIR_CHUNK], cols[s : s + _PAIR_CHUNK]
        out[s : s + _PAIR_CHUNK] = (a[r].astype(np.float64) * b[c].astype(np.float64)).sum(-1)
    return out


def _count_above_and_tied(
    q: np.ndarray,
    g: np.ndarray,
    pos: np.ndarray,
    is_pos: Callable[[np.ndarray, np.ndarray], np.ndarray],
    rows: np.ndarray,
    cols: np.ndarray,
    start: int,
    stop: int,
) -> tuple[np.ndarray, np.ndarray]:
    """For queries start..stop-1: how many of the given non-matching pairs
    (start + rows, cols) have float64 score > and == the query's best match score."""
    rows = rows + start
    keep = ~is_pos(rows, cols)
    rows, cols = rows[keep] - start, cols[keep]
    scores = _dot64(q, g, rows + start, cols)
    best = pos[rows + start]
    n = stop - start
    return (
        np.bincount(rows[scores > best], minlength=n),
        np.bincount(rows[scores == best], minlength=n),
    )


def _f32_error_bound(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(nq,) bound on |fl32(<q_i, g_j>) - <q_i, g_j>| over all j, with a 1% margin that
    also covers the float64 rounding: d u ||q_i|| max_j ||g_j|| / (1 - d u), u = 2^-24."""
    u = q.shape[1] * 2.0**-24
    g_norm_max = float(np.sqrt(np.einsum("ij,ij->i", g, g).max()))  # no (n, d) temporary
    q_norm = np.sqrt(np.einsum("ij,ij->i", q, q).astype(np.float64))  # (nq,)
    return 1.01 * u / (1 - u) * q_norm * g_norm_max + 1e-30


def _counts_by_counting(
    q: np.ndarray,
    g: np.ndarray,
    pos: np.ndarray,
    is_pos: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (above, tied) counts of non-matching items per query from float32 score
    tiles (query block x gallery block): a score more than the float32 error bound
    above the match is counted as above directly, one within the bound is rescored in
    float64 (ties always fall within the bound)."""
    tol = _f32_error_bound(q, g)
    qt, gt = torch.from_numpy(q), torch.from_numpy(g)
    above = np.zeros(q.shape[0], dtype=np.int64)
    tied = np.zeros(q.shape[0], dtype=np.int64)
    q_tile = min(_QUERY_TILE, q.shape[0])
    g_tile = max(1, _SCORE_CHUNK // q_tile)
    for s in range(0, q.shape[0], q_tile):
        e = min(s + q_tile, q.shape[0])
        lo = torch.from_numpy(pos[s:e] - tol[s:e]).float()[:, None]  # (c, 1)
        hi = torch.from_numpy(pos[s:e] + tol[s:e]).float()[:, None]
        # float32 rounding of lo/hi: widen by one ulp so the band keeps its guarantee
        lo, hi = torch.nextafter(lo, lo - 1), torch.nextafter(hi, hi + 1)
        for gs in range(0, g.shape[0], g_tile):
            scores = qt[s:e] @ gt[gs : gs + g_tile].T  # (c, tile) float32
            clear = (scores > hi).sum(1)  # (c,)
            in_band = (scores >= lo).sum(1) - clear  # (c,) usually all zero
            above[s:e] += clear.numpy()
            rows = torch.nonzero(in_band, as_tuple=True)[0]
            if len(rows):
                sub = scores[rows]
                r, c = torch.nonzero((sub >= lo[rows]) & (sub <= hi[rows]), as_tuple=True)
                r, c = rows[r].numpy(), c.numpy() + gs
                a, t = _count_above_and_tied(q, g, pos, is_pos, r, c, s, e)
                above[s:e] += a
                tied[s:e] += t
    return above, tied


def _counts_both_directions(
    img: np.ndarray,
    txt: np.ndarray,
    pos_img: np.ndarray,
    pos_txt: np.ndarray,
    ids: np.ndarray,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``_counts_by_counting`` for both directions from ONE pass over the score tiles:
    each (image block x text block) float32 tile S = I T^T is counted along its rows
    (image -> text, against ``pos_img``) and along its columns (text -> image, against
    ``pos_txt``), with the same float32 error band and float64 rescoring. An image with
    ``pos_img = -inf`` (no caption) counts nothing. Returns ((above, tied) per image,
    (above, tied) per text). Tiles, threads and memory: module docstring."""
    n_img, n_txt = len(img), len(txt)
    above_i, tied_i = np.zeros(n_img, dtype=np.int64), np.zeros(n_img, dtype=np.int64)
    bands = []
    for q, g, pos in ((img, txt, pos_img), (txt, img, pos_txt)):
        tol = _f32_error_bound(q, g)
        lo = np.where(np.isfinite(pos), pos - tol, np.inf).astype(np.float32)
        hi = np.where(np.isfinite(pos), pos + tol, np.inf).astype(np.float32)
        # float32 rounding of lo/hi: widen by one ulp so the band keeps its guarantee
        bands.append((np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf))))
    (lo_i, hi_i), (lo_t, hi_t) = bands
    it, tt = torch.from_numpy(img), torch.from_numpy(txt)
    i_tile = min(_IMAGE_TILE, n_img)
    t_tile = max(1, min(n_txt, _SCORE_CHUNK // i_tile, _TEXT_TILE))
    blocks = list(range(0, n_img, i_tile))
    n_workers = max(1, min(torch.get_num_threads(), len(blocks), MAX_THREADS))

    def worker(share: list[int]) -> tuple[np.ndarray, np.ndarray]:
        above_t, tied_t = np.zeros(n_txt, dtype=np.int64), np.zeros(n_txt, dtype=np.int64)
        score_buf = torch.empty(i_tile * t_tile)
        mask_buf = np.empty(i_tile * t_tile, dtype=bool)
        for s in share:
            e = min(s + i_tile, n_img)
            lo_r, hi_r = lo_i[s:e, None], hi_i[s:e, None]  # (c, 1)
            pairs_i: list[tuple[np.ndarray, np.ndarray]] = []  # (image, text) in the i2t band
            pairs_t: list[tuple[np.ndarray, np.ndarray]] = []  # (image, text) in the t2i band
            for gs in range(0, n_txt, t_tile):
                ge = min(gs + t_tile, n_txt)
                out = score_buf[: (e - s) * (ge - gs)].view(e - s, ge - gs)
                scores = torch.mm(it[s:e], tt[gs:ge].T, out=out).numpy()  # (c, tile), contiguous
                m = mask_buf[: scores.size].reshape(scores.shape)
                lo_c, hi_c = lo_t[None, gs:ge], hi_t[None, gs:ge]  # (1, tile)
                clear_r = _count_rows(np.greater(scores, hi_r, out=m))  # clearly above the image's match
                band_r = _count_rows(np.greater_equal(scores, lo_r, out=m)) - clear_r
                clear_c = _count_cols(np.greater(scores, hi_c, out=m))  # clearly above the caption's
                band_c = _count_cols(np.greater_equal(scores, lo_c, out=m)) - clear_c
                above_i[s:e] += clear_r
                above_t[gs:ge] += clear_c
                # the matching pairs in this tile sit in the band by construction: discount them
                pc = np.flatnonzero((ids[gs:ge] >= s) & (ids[gs:ge] < e))  # their columns
                if len(pc):
                    pr = ids[gs + pc] - s  # their rows
                    ps = scores[pr, pc]
                    band_r -= np.bincount(pr[(ps >= lo_r[pr, 0]) & (ps <= hi_r[pr, 0])], minlength=e - s)
                    band_c -= np.bincount(pc[(ps >= lo_c[0, pc]) & (ps <= hi_c[0, pc])], minlength=ge - gs)
                if band_r.any():
                    rows = np.flatnonzero(band_r)
                    sub = scores[rows]
                    r, c = np.nonzero((sub >= lo_r[rows]) & (sub <= hi_r[rows]))
                    pairs_i.append((rows[r] + s, c + gs))
                if band_c.any():
                    cols = np.flatnonzero(band_c)
                    sub = scores[:, cols]
                    r, c = np.nonzero((sub >= lo_c[:, cols]) & (sub <= hi_c[:, cols]))
                    pairs_t.append((r + s, cols[c] + gs))
            if pairs_i:
                _rescore_pairs(img, txt, ids, pairs_i, pos_img, True, above_i, tied_i)
            if pairs_t:
                _rescore_pairs(img, txt, ids, pairs_t, pos_txt, False, above_t, tied_t)
        return above_t, tied_t

    # image blocks on threads with one torch thread each: their matmuls, numpy's comparisons
    parts = map_one_thread_each(worker, [blocks[k::n_workers] for k in range(n_workers)])
    above_t, tied_t = (np.sum([p[k] for p in parts], axis=0) for k in range(2))
    return (above_i, tied_i), (above_t, tied_t)


def _rescore_pairs(
    img: np.ndarray,
    txt: np.ndarray,
    ids: np.ndarray,
    pairs: list[tuple[np.ndarray, np.ndarray]],
    pos: np.ndarray,
    by_image: bool,
    above: np.ndarray,
    tied: np.ndarray,
) -> None:
    """Add the float64 verdicts of (image, text) pairs that fell in one direction's
    float32 band: for each non-matching pair, +1 to ``above`` / ``tied`` of its query
    (the image when ``by_image``, else the text) when its score is > / == the query's
    best match score ``pos``."""
    i = np.concatenate([p[0] for p in pairs])
    j = np.concatenate([p[1] for p in pairs])
    keep = ids[j] != i  # matching pairs are never counted
    i, j = i[keep], j[keep]
    score = _dot64(img, txt, i, j)
    query = i if by_image else j
    best = pos[query]
    np.add.at(above, query[score > best], 1)
    np.add.at(tied, query[score == best], 1)


def _count_rows(mask: np.ndarray) -> np.ndarray:
    """True entries per row of a C-contiguous bool (c, t) tile. Fast path: 8 bools
    summed at once as the bytes of a uint64 (at most 255 words per partial sum, so no
    byte overflows into the next), then the 8 byte lanes added."""
    c, t = mask.shape
    k = _chunks(t // 8) if t % 8 == 0 else 0
    if not k:
        return mask.view(np.uint8).sum(axis=1, dtype=np.int64)
    words = mask.view(np.uint64).reshape(c, k, t // 8 // k).sum(axis=2, dtype=np.uint64)
    return words.view(np.uint8).reshape(c, 8 * k).sum(axis=1, dtype=np.int64)


def _count_cols(mask: np.ndarray) -> np.ndarray:
    """True entries per column of a C-contiguous bool (c, t) tile (uint64 lanes as in
    ``_count_rows``, summed over at most 255 rows at a time)."""
    c, t = mask.shape
    k = _chunks(c) if t % 8 == 0 else 0
    if not k:
        return mask.view(np.uint8).sum(axis=0, dtype=np.int64)
    words = mask.view(np.uint64).reshape(k, c // k, t // 8).sum(axis=1, dtype=np.uint64)
    return words.view(np.uint8).reshape(k, t).sum(axis=0, dtype=np.int64)


def _chunks(n: int) -> int:
    """Smallest k dividing n with n / k <= 255 (0 if none below 64)."""
    for k in range(max(1, -(-n // 255)), 64):
        if n % k == 0:
            return k
    return 0


def _counts_from_candidates(
    q: np.ndarray,
    g: np.ndarray,
    pos: np.ndarray,
    is_pos: Callable[[np.ndarray, np.ndarray], np.ndarray],
    k: int,
    kmax: int,
    approximate: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(above, tied) from a faiss top-k candidate list, rescored in float64. Exact when
    every item scoring s* or more is a candidate: that holds when the last candidate
    scores below s* by more than twice the float32 error bound (faiss's score of an
    item left out is at most the last one's). Queries where it may not hold and whose
    count above is below kmax (so the recall depends on it) are recounted exactly by
    the torch path; otherwise (above >= kmax) every K is a miss anyway."""
    import faiss

    k = min(k, g.shape[0])
    if approximate:
        index = faiss.IndexHNSWFlat(g.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, 2 * k)
    else:
        index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    above = np.zeros(q.shape[0], dtype=np.int64)
    tied = np.zeros(q.shape[0], dtype=np.int64)
    last = np.full(q.shape[0], np.inf)  # float64 score of the last candidate
    for s in range(0, q.shape[0], _FAISS_CHUNK):
        e = min(s + _FAISS_CHUNK, q.shape[0])
        _, cand = index.search(q[s:e], k)  # (c, k), -1 where fewer results
        r, c = np.nonzero(cand >= 0)
        above[s:e], tied[s:e] = _count_above_and_tied(q, g, pos, is_pos, r, cand[r, c], s, e)
        complete = cand[:, -1] >= 0
        rows = np.arange(s, e)[complete]
        last[rows] = _dot64(q, g, rows, cand[complete, -1])
    if k < g.shape[0]:
        unsure = np.flatnonzero((above < kmax) & (last >= pos - 2 * _f32_error_bound(q, g)))
        if len(unsure):
            above[unsure], tied[unsure] = _counts_by_counting(
                q[unsure], g, pos[unsure], lambda r, c: is_pos(unsure[r], c)
            )
    return above, tied
