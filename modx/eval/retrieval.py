"""Image-text retrieval recall at K, without building the full similarity matrix.

Scores are inner products (pass L2-normalised embeddings for cosine similarity).
Several captions may belong to one image: ``text_image_ids[j]`` is the row of
caption j's image.

Rank and tie rule (both backends, by construction):
    rank(query) = number of *non-matching* gallery items whose score is strictly
    greater than the best matching item's score, the scores compared in float64.
    A query is a hit at K when rank < K.
An exact tie with a non-matching item therefore counts in the query's favour
(optimistic, competition ranking). Exact ties come from identical inputs: templated
captions shared by many images ("a photo of the digit 3") or duplicate images, where
the tied item is as right as the match. The flip side: a degenerate model whose
embeddings are all identical scores 100. For image -> text the best of the image's
captions is the match ("any caption in the top K"); for text -> image the caption's
one image is.

Backends only choose *candidates*; the rank is always decided by the shared
float64 comparison below, which is why ``faiss`` and ``torch`` agree exactly:
- ``faiss``: exact inner-product search (``IndexFlatIP``) of the top
  ``max(ks) + positives + margin`` items per query, then float64 rescoring of those.
  ``approximate=True`` uses an HNSW index instead (fast on huge galleries; then
  results may differ slightly from the exact ones).
- ``torch``: float32 score tiles (queries x gallery blocks); items clearly above
  the match (by more than the float32 error bound) are counted, items within the
  bound are rescored in float64. This gives full ranks (mean / median rank).
Memory is bounded by a score tile / query chunk (about 64 MiB), never N x M.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

Backend = Literal["faiss", "torch"]
ArrayLike = np.ndarray | torch.Tensor

_SCORE_CHUNK = 1 << 24  # float32 scores held at once by the torch backend (64 MiB)
_QUERY_TILE = 1024  # queries per torch score tile (the gallery is tiled to fit the chunk)
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
    """Recall@K (percent) in both directions and their mean.

    image_emb (N, d), text_emb (M, d), text_image_ids (M,) with values in [0, N).
    Returns ``i2t_R@K`` and ``t2i_R@K`` for each K in ``ks`` and ``mean_recall``
    (mean of all of them). i2t averages over the images that have a caption.
    ``ranks=True`` adds ``i2t_mean_rank``, ``i2t_median_rank``, ``t2i_mean_rank``,
    ``t2i_median_rank`` (1-based; median floored as in open_clip); they need full
    ranks and are computed by the exact torch counting path whatever the backend.
    """
    img, txt, ids, ks = _validate(image_emb, text_emb, text_image_ids, ks, backend)
    if approximate and backend != "faiss":
        raise ValueError("approximate=True needs backend='faiss'")
    n_img = img.shape[0]
    # float64 score of each caption with its own image; both directions use it.
    pos_t2i = _dot64(txt, img, np.arange(len(ids)), ids)  # (M,)
    has_caption = np.bincount(ids, minlength=n_img) > 0
    queries_i2t = np.flatnonzero(has_caption)
    pos_i2t = np.full(n_img, -np.inf)
    np.maximum.at(pos_i2t, ids, pos_t2i)
    pos_i2t = pos_i2t[queries_i2t]
    captions_per_image = int(np.bincount(ids).max())

    def is_pos_t2i(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return ids[rows] == cols

    def is_pos_i2t(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return ids[cols] == queries_i2t[rows]

    kmax = max(ks)
    out: dict[str, float] = {}
    full: dict[str, np.ndarray] = {}
    for name, q, g, pos, is_pos, n_pos in (
        (
            "i2t",
            img if has_caption.all() else img[queries_i2t],
            txt,
            pos_i2t,
            is_pos_i2t,
            captions_per_image,
        ),
        ("t2i", txt, img, pos_t2i, is_pos_t2i, 1),
    ):
        if backend == "torch" or ranks:
            rank = _ranks_by_counting(q, g, pos, is_pos)
            full[name] = rank
        if backend == "faiss":
            rank = _ranks_from_candidates(q, g, pos, is_pos, kmax + n_pos + _MARGIN, approximate)
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * int((rank < k).sum()) / len(rank)
    out["mean_recall"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]))
    if ranks:
        for name, rank in full.items():
            out[f"{name}_mean_rank"] = float(rank.mean() + 1)
            out[f"{name}_median_rank"] = float(np.floor(np.median(rank)) + 1)
    return out


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


def _count_above(
    q: np.ndarray,
    g: np.ndarray,
    pos: np.ndarray,
    is_pos: Callable[[np.ndarray, np.ndarray], np.ndarray],
    rows: np.ndarray,
    cols: np.ndarray,
    start: int,
    stop: int,
) -> np.ndarray:
    """For queries start..stop-1: the number of the given non-matching pairs
    (start + rows, cols) with float64 score > the query's best match score."""
    rows = rows + start
    keep = ~is_pos(rows, cols)
    rows, cols = rows[keep], cols[keep]
    hit = _dot64(q, g, rows, cols) > pos[rows]
    return np.bincount(rows[hit] - start, minlength=stop - start)


def _ranks_by_counting(
    q: np.ndarray,
    g: np.ndarray,
    pos: np.ndarray,
    is_pos: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """Exact ranks from float32 score tiles (query block x gallery block): a score more
    than the float32 error bound above the match is counted directly, one within the
    bound is rescored in float64.
    Bound: |fl32(<a,b>) - <a,b>| <= d u ||a|| ||b|| / (1 - d u), u = 2^-24."""
    d = q.shape[1]
    u = d * 2.0**-24
    qt, gt = torch.from_numpy(q), torch.from_numpy(g)
    g_norm_max = float(np.sqrt(np.einsum("ij,ij->i", g, g).max()))  # no (n, d) temporary
    q_norm = np.sqrt(np.einsum("ij,ij->i", q, q).astype(np.float64))  # (nq,)
    tol = 1.01 * u / (1 - u) * q_norm * g_norm_max + 1e-30  # (nq,)
    ranks = np.zeros(q.shape[0], dtype=np.int64)
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
            above = (scores > hi).sum(1)  # (c,)
            in_band = (scores >= lo).sum(1) - above  # (c,) usually all zero
            ranks[s:e] += above.numpy()
            rows = torch.nonzero(in_band, as_tuple=True)[0]
            if len(rows):
                sub = scores[rows]
                r, c = torch.nonzero((sub >= lo[rows]) & (sub <= hi[rows]), as_tuple=True)
                r, c = rows[r].numpy(), c.numpy() + gs
                ranks[s:e] += _count_above(q, g, pos, is_pos, r, c, s, e)
    return ranks


def _ranks_from_candidates(
    q: np.ndarray,
    g: np.ndarray,
    pos: np.ndarray,
    is_pos: Callable[[np.ndarray, np.ndarray], np.ndarray],
    k: int,
    approximate: bool,
) -> np.ndarray:
    """Ranks from a faiss top-k candidate list, rescored in float64. Exact for ranks
    below k - positives - margin, which covers every K asked for; larger ranks are
    lower bounds (they only ever mean 'miss')."""
    import faiss

    k = min(k, g.shape[0])
    if approximate:
        index = faiss.IndexHNSWFlat(g.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, 2 * k)
    else:
        index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    ranks = np.zeros(q.shape[0], dtype=np.int64)
    for s in range(0, q.shape[0], _FAISS_CHUNK):
        e = min(s + _FAISS_CHUNK, q.shape[0])
        _, cand = index.search(q[s:e], k)  # (c, k), -1 where fewer results
        r, c = np.nonzero(cand >= 0)
        ranks[s:e] = _count_above(q, g, pos, is_pos, r, cand[r, c], s, e)
    return ranks
