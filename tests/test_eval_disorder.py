"""modx.eval.disorder: spatial disorder against rotations and a naive float64 reference."""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.linalg import expm, orthogonal_procrustes
from scipy.stats import special_ortho_group

import modx.eval.disorder as disorder
from modx.eval.disorder import spatial_disorder

MAIN_KEYS = (
    "rotation_image_deg", "rotation_text_deg", "topology_drift_image_deg",
    "topology_drift_text_deg", "rigid_fraction_image", "rigid_fraction_text",
    "deviation_async_deg", "deviation_relative_rotation_deg", "alignment_change_deg",
    "alignment_flip_i2t", "alignment_flip_t2i",
)  # fmt: skip


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def probe(n=60, d=6, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    u = unit(rng.standard_normal((n, d)))
    return u, unit(u + noise * rng.standard_normal((n, d)))


def isoclinic(d, deg):
    """Rotation by the same angle in each of d/2 planes: every unit vector turns by deg."""
    a = math.radians(deg)
    q = np.zeros((d, d))
    for p in range(0, d, 2):
        q[p : p + 2, p : p + 2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return q


def test_same_isoclinic_rotation_of_both_modalities_is_pure_rotation():
    u, v = probe()
    q = isoclinic(6, 25.5)
    m = spatial_disorder(u, v, u @ q, v @ q)
    assert set(MAIN_KEYS) <= set(m)
    for key in ("rotation_image_deg", "rotation_text_deg", "rotation_image_deg_median",
                "rotation_text_deg_p90"):  # fmt: skip
        assert m[key] == pytest.approx(25.5, abs=1e-9)
    for key in ("topology_drift_image_deg", "topology_drift_text_deg", "deviation_async_deg",
                "deviation_relative_rotation_deg", "alignment_change_deg"):  # fmt: skip
        assert m[key] == pytest.approx(0.0, abs=1e-5)  # arccos near 1: ~1e-6 deg noise
    assert m["rigid_fraction_image"] == pytest.approx(1.0, abs=1e-12)
    assert m["rigid_fraction_text"] == pytest.approx(1.0, abs=1e-12)
    assert m["alignment_flip_i2t"] == m["alignment_flip_t2i"] == 0.0
    assert m["n_correct_old_i2t"] > 0
    assert sum(m["rotation_image_hist"]) == 60 and m["rotation_image_hist"][25] == 60
    assert len(m["rotation_hist_edges_deg"]) == 181


def test_general_rotation_of_both_gives_per_sample_angles_and_no_deviation():
    u, v = probe(d=5)
    q = special_ortho_group.rvs(5, random_state=1)
    m = spatial_disorder(u, v, u @ q, v @ q)
    expected = np.degrees(np.arccos(np.clip((u * (u @ q)).sum(1), -1, 1)))
    assert m["rotation_image_deg"] == pytest.approx(expected.mean())
    assert m["rotation_image_deg_p90"] == pytest.approx(np.percentile(expected, 90))
    assert m["topology_drift_text_deg"] == pytest.approx(0.0, abs=1e-6)
    assert m["rigid_fraction_text"] == pytest.approx(1.0)
    assert m["deviation_relative_rotation_deg"] == pytest.approx(0.0, abs=1e-5)
    assert m["alignment_change_deg"] == pytest.approx(0.0, abs=1e-9)
    assert m["alignment_flip_i2t"] == m["alignment_flip_t2i"] == 0.0


def test_rotating_one_modality_only_gives_deviation_and_flips():
    u, v = probe(noise=0.2)
    m = spatial_disorder(u, v, u @ isoclinic(6, 60.0), v)
    assert m["rotation_image_deg"] == pytest.approx(60.0)
    assert m["rotation_text_deg"] == pytest.approx(0.0, abs=1e-6)
    assert m["rigid_fraction_image"] == pytest.approx(1.0) and m["rigid_fraction_text"] == 1.0
    assert m["deviation_async_deg"] == pytest.approx(60.0, abs=1e-5)
    assert m["deviation_relative_rotation_deg"] == pytest.approx(60.0)  # tr(Q)/d = cos 60
    assert m["alignment_change_deg"] > 20.0
    assert m["alignment_flip_i2t"] > 0.3 and m["alignment_flip_t2i"] > 0.3


def naive_reference(u, v, u2, v2):
    """Loops over samples and pairs with math.acos; scipy's Procrustes."""
    u, v, u2, v2 = (unit(np.asarray(x, np.float64)) for x in (u, v, u2, v2))
    n, d = u.shape

    def ang(a, b):
        return math.degrees(math.acos(max(-1.0, min(1.0, float(sum(a * b))))))

    out = {}
    theta = {}
    rot = {}
    for name, z, z2 in (("image", u, u2), ("text", v, v2)):
        theta[name] = [ang(z[i], z2[i]) for i in range(n)]
        out[f"rotation_{name}_deg"] = sum(theta[name]) / n
        drift = [
            abs(ang(z2[i], z2[j]) - ang(z[i], z[j])) for i in range(n) for j in range(n) if i != j
        ]
        out[f"topology_drift_{name}_deg"] = sum(drift) / len(drift)
        r, _ = orthogonal_procrustes(z, z2)
        rot[name] = r
        out[f"rigid_fraction_{name}"] = 1 - np.sum((z @ r - z2) ** 2) / np.sum((z - z2) ** 2)
    out["deviation_async_deg"] = sum(abs(a - b) for a, b in zip(theta["image"], theta["text"])) / n
    out["deviation_relative_rotation_deg"] = math.degrees(
        math.acos(max(-1.0, min(1.0, float(np.trace(rot["image"] @ rot["text"].T)) / d)))
    )
    out["alignment_change_deg"] = sum(ang(u2[i], v2[i]) - ang(u[i], v[i]) for i in range(n)) / n

    def above_and_tied(q, g, i):
        s = [float(q[i] @ g[j]) for j in range(n)]
        tied = {j for j in range(n) if j != i and abs(s[j] - s[i]) <= 1e-12}
        return any(x > s[i] + 1e-12 for x in s), tied

    for name, q, g, q2, g2 in (("i2t", u, v, u2, v2), ("t2i", v, u, v2, u2)):
        right_old = right_both = 0.0  # expected counts, one random tie order for both
        for i in range(n):
            above_old, tied_old = above_and_tied(q, g, i)
            above_new, tied_new = above_and_tied(q2, g2, i)
            if not above_old:
                right_old += 1 / (len(tied_old) + 1)
                if not above_new:
                    right_both += 1 / (len(tied_old | tied_new) + 1)
        out[f"alignment_flip_{name}"] = (right_old - right_both) / right_old
    return out


def test_every_quantity_matches_a_naive_float64_reference(monkeypatch):
    monkeypatch.setattr(disorder, "_CHUNK_ELEMENTS", 100)  # several row blocks
    rng = np.random.default_rng(6)
    u, v = probe(n=40, d=5, noise=0.5, seed=5)
    u2 = u + 0.4 * rng.standard_normal(u.shape)  # not normalised: normalised inside
    skew = rng.standard_normal((5, 5))
    v2 = v @ expm(0.2 * (skew - skew.T)) + 0.1 * rng.standard_normal(v.shape)
    m = spatial_disorder(u, v, u2, v2)
    ref = naive_reference(u, v, u2, v2)
    for key in MAIN_KEYS:
        assert m[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-9), key
    assert 0 < m["rigid_fraction_image"] < 1 and 0 < m["alignment_flip_t2i"] < 1


def enumerated_flips(u, v, u2, v2):
    """Brute force: every order of the probe items as the shared tie-breaker (sort by
    score rounded to 1e-9, ties by the order); flips / right-old summed over orders."""
    u, v, u2, v2 = (unit(np.asarray(x, np.float64)) for x in (u, v, u2, v2))
    n = u.shape[0]
    perms = np.array(list(itertools.permutations(range(n))))  # (P, n)
    out = {}
    for name, q, g, q2, g2 in (("i2t", u, v, u2, v2), ("t2i", v, u, v2, u2)):
        right = []
        for a, b in ((q, g), (q2, g2)):
            scores = np.round(a @ b.T, 9)  # (n, n)
            top = [
                np.lexsort((perms, np.broadcast_to(-scores[i], perms.shape)), axis=-1)[:, 0] == i
                for i in range(n)
            ]
            right.append(np.array(top))  # (n, P)
        out[f"alignment_flip_{name}"] = (right[0] & ~right[1]).sum() / right[0].sum()
    return out


@pytest.mark.parametrize("seed", range(6))
def test_flips_with_ties_equal_enumeration_of_shared_tie_orders(seed):
    # integer directions with repeats: duplicate rows and exact score ties everywhere
    rng = np.random.default_rng(seed)
    rows = np.array([r for r in itertools.product((-1, 0, 1), repeat=3) if any(r)], float)
    u = rows[rng.integers(0, 4, size=6)]  # 6 pairs, at most 4 distinct rows
    v = u.copy()
    v[5] = rows[rng.integers(0, 26)]  # one caption moves
    u2, v2 = u.copy(), v.copy()
    u2[3:], v2[4:] = rows[rng.integers(0, 26, size=3)], rows[rng.integers(0, 26, size=2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank-deficient probe: Procrustes not unique
        m = spatial_disorder(u, v, u2, v2)
    ref = enumerated_flips(u, v, u2, v2)
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, rel=0, abs=1e-12), key
        assert 0.0 <= m[key] <= 1.0


def test_unchanged_model_with_duplicate_rows_flips_nothing():
    # duplicated pairs (templated captions of identical images): pairs 0-2 tie three
    # ways, each right with probability 1/3; one random tie order serves both models,
    # so an unchanged (here: rotated) model flips nothing
    u, v = probe(n=30, d=6, noise=0.05)
    u[1:3], v[1:3] = u[0], v[0]
    q = isoclinic(6, 40.0)
    m = spatial_disorder(u, v, u @ q, v @ q)
    assert m["n_correct_old_i2t"] == m["n_correct_old_t2i"] == pytest.approx(27 + 3 * (1 / 3))
    assert m["alignment_flip_i2t"] == m["alignment_flip_t2i"] == 0.0


def test_unchanged_model_and_torch_inputs():
    u, v = probe()
    m = spatial_disorder(torch.from_numpy(u), torch.from_numpy(v), u, v)
    assert m["rigid_fraction_image"] == m["rigid_fraction_text"] == 1.0
    for key in ("rotation_text_deg", "topology_drift_image_deg", "deviation_relative_rotation_deg"):
        assert m[key] == pytest.approx(0.0, abs=1e-5)


def test_probe_smaller_than_dimension_warns_and_bad_input_raises():
    u, v = probe(n=4, d=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spatial_disorder(u, v, u, v)
    assert any("not unique" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="one shape"):
        spatial_disorder(u, v, u[:3], v)
    with pytest.raises(ValueError, match="zero"):
        spatial_disorder(np.zeros_like(u), v, u, v)
