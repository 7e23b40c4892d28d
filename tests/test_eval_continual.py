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
