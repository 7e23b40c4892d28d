"""modx.eval.continual: GEM / Chaudhry continual metrics on hand-made matrices."""

import json
import math

import pytest

from modx.eval.continual import continual_metrics, recall_matrix

R = [
    [50.0, 10.0, 5.0],
    [30.0, 60.0, 8.0],
    [20.0, 40.0, 70.0],
]
INITIAL = [10.0, 5.0, 4.0]


def test_hand_made_matrix():
    m = continual_metrics(R, INITIAL)
    assert m["average_recall"] == pytest.approx((20 + 40 + 70) / 3)
    assert m["last_recall"] == [20.0, 40.0, 70.0]
    assert m["learned_recall"] == [50.0, 60.0, 70.0]
    assert m["backward_transfer"] == pytest.approx(((20 - 50) + (40 - 60)) / 2)
    assert m["forgetting_per_set"] == [30.0, 20.0]  # max(50, 30) - 20, 60 - 40
    assert m["forgetting"] == pytest.approx(25.0)
    assert m["forward_transfer"] == pytest.approx(((10 - 5) + (8 - 4)) / 2)
    json.dumps(m, allow_nan=False)


def test_forgetting_uses_the_best_earlier_phase_not_the_learning_phase():
    m = continual_metrics([[10.0, 0.0], [30.0, 50.0]] + [], None)
    assert m["forgetting_per_set"] == [-20.0]  # improved: negative forgetting
    m = continual_metrics([[40, 0, 0], [60, 50, 0], [45, 20, 30]])
    assert m["forgetting_per_set"] == [15.0, 30.0]


def test_undefined_values_are_none():
    one = continual_metrics([[42.0, 1.0]])
    assert one["average_recall"] == 42.0 and one["last_recall"] == [42.0, 1.0]
    assert one["backward_transfer"] is None and one["forgetting"] is None
    assert one["forward_transfer"] is None
    nan = continual_metrics([[math.nan, 1.0], [2.0, 3.0]], [0.0, 1.0])
    assert nan["backward_transfer"] is None and nan["forward_transfer"] == 0.0
    json.dumps(nan, allow_nan=False)


def test_partial_run_uses_the_sets_seen_so_far():
    m = continual_metrics(R[:2], INITIAL)
    assert m["average_recall"] == pytest.approx((30 + 60) / 2)
    assert m["last_recall"] == [30.0, 60.0, 8.0]
    assert m["forward_transfer"] == pytest.approx(10 - 5)


@pytest.mark.parametrize("bad", [[[1.0], [2.0]], [], [1.0, 2.0]])
def test_bad_shape_is_a_value_error(bad):
    with pytest.raises(ValueError, match="phases"):
        continual_metrics(bad)


def test_recall_matrix_from_results_records():
    def rec(phase, j, value, name=None):
        return {
            "phase": phase,
            "phase_name": name or ("initial" if phase < 0 else f"p{phase}"),
            "eval_set": f"set{j}",
            "eval_index": j,
            "step": 0,
            "metrics": {"mean_recall": value, "i2t_R@1": value / 2},
        }

    records = [rec(-1, 0, 1.0), rec(-1, 1, 2.0), rec(1, 1, 7.0), rec(0, 0, 3.0), rec(0, 1, 4.0)]
    records += [rec(1, 0, 5.0), rec(1, 1, 6.0)]  # a resumed run re-evaluated (1, 1)
    rm = recall_matrix(records)
    assert rm.values == [[3.0, 4.0], [5.0, 6.0]]
    assert rm.initial == [1.0, 2.0]
    assert rm.phases == ["p0", "p1"] and rm.eval_sets == ["set0", "set1"]
    assert recall_matrix(records, "i2t_R@1").values[0] == [1.5, 2.0]
    no_initial = recall_matrix(records[2:])
    assert no_initial.initial is None and math.isnan(
        recall_matrix(records[3:4] + records[2:3]).values[0][1]
    )


def _rec(phase, name, value, kind="retrieval", j=0, **extra):
    key = "acc1" if kind == "zeroshot" else "mean_recall"
    return {"kind": kind, "phase": phase, "phase_name": "initial" if phase < 0 else f"p{phase}",
            "eval_set": name, "eval_index": j, "step": 10 * (phase + 1), "metrics": {key: value}, **extra}  # fmt: skip


def test_recall_matrix_skips_zero_shot_and_in_phase_records_and_flags_held_out_sets():
    records = [
        _rec(-1, "a", 1.0), _rec(-1, "coco", 9.0, j=1, held_out=True), _rec(-1, "zs", 50.0, "zeroshot"),
        _rec(0, "a", 99.0, in_phase=True), _rec(0, "a", 3.0), _rec(0, "coco", 8.0, j=1, held_out=True),
        _rec(0, "zs", 40.0, "zeroshot"), _rec(0, "a", 77.0, in_phase=True),  # a late in-phase record
    ]  # fmt: skip
    rm = recall_matrix(records)
    assert rm.values == [[3.0, 8.0]] and rm.initial == [1.0, 9.0] and rm.held_out == (False, True)
    stream, held = rm.columns(held_out=False), rm.columns(held_out=True)
    assert stream.eval_sets == ["a"] and stream.values == [[3.0]] and stream.initial == [1.0]
    assert held.eval_sets == ["coco"] and held.values == [[8.0]] and held.initial == [9.0]
    assert continual_metrics(stream.values, stream.initial)["average_recall"] == 3.0


def test_zeroshot_retention_is_accuracy_relative_to_the_initial_model():
    from modx.eval.continual import zeroshot_retention

    records = [_rec(-1, "x", 50.0, "zeroshot"), _rec(-1, "y", 20.0, "zeroshot", j=1),
               _rec(0, "x", 40.0, "zeroshot"), _rec(0, "y", 30.0, "zeroshot", j=1),
               _rec(1, "x", 25.0, "zeroshot", in_phase=True),
               _rec(1, "x", 45.0, "zeroshot"), _rec(1, "y", 10.0, "zeroshot", j=1), _rec(1, "a", 3.0)]  # fmt: skip
    z = zeroshot_retention(records)
    assert z["eval_sets"] == ["x", "y"] and z["phases"] == ["p0", "p1"] and z["initial"] == [50.0, 20.0]
    assert z["matrix"] == [[40.0, 30.0], [45.0, 10.0]]
    assert z["retention"] == [[pytest.approx(80.0), pytest.approx(150.0)], [pytest.approx(90.0), pytest.approx(50.0)]]
    assert z["mean_retention"] == pytest.approx(70.0)
    assert zeroshot_retention(records[2:4])["retention"] == [[None, None]]  # no initial model
    assert "not evaluated" in zeroshot_retention(records[2:4])["omitted"]
    assert zeroshot_retention([_rec(0, "a", 3.0)]) is None


ZS = [_rec(-1, "x", 10.0, "zeroshot", random_init=True), _rec(-1, "y", 20.0, "zeroshot", j=1, random_init=True),
      _rec(0, "x", 60.0, "zeroshot"), _rec(0, "y", 40.0, "zeroshot", j=1),
      _rec(1, "x", 30.0, "zeroshot"), _rec(1, "y", 50.0, "zeroshot", j=1),
      _rec(2, "x", 15.0, "zeroshot"), _rec(2, "y", 10.0, "zeroshot", j=1)]  # fmt: skip


def test_retention_from_a_random_start_is_omitted_with_the_reason():
    from modx.eval.continual import RANDOM_START, zeroshot_retention

    z = zeroshot_retention(ZS)
    assert z["omitted"] == RANDOM_START and "random weights" in z["omitted"]
    assert z["mean_retention"] is None and all(r is None for row in z["retention"] for r in row)
    assert z["matrix"] == [[60.0, 40.0], [30.0, 50.0], [15.0, 10.0]]  # the accuracies stay


def test_retention_is_relative_to_the_model_after_the_named_phase():
    from modx.eval.continual import zeroshot_retention

    z = zeroshot_retention(ZS, reference="p0")
    assert z["omitted"] is None and z["reference"] == "p0" and z["reference_accuracy"] == [60.0, 40.0]
    # by hand: after p1 x kept 30/60 = 50 %, y 50/40 = 125 %; after p2 15/60 = 25 %, 10/40 = 25 %
    assert z["retention"] == [[100.0, 100.0], [50.0, 125.0], [25.0, 25.0]]
    assert z["mean_retention"] == 25.0
    later = zeroshot_retention(ZS, reference="p1")
    assert later["retention"][0] == [None, None] and later["retention"][2] == [50.0, 20.0]  # nothing before p1
    assert later["mean_retention"] == 35.0
    missing = zeroshot_retention(ZS[:4], reference="p1")  # the run has not reached p1 yet
    assert "reference phase 'p1'" in missing["omitted"] and missing["mean_retention"] is None
