"""modx.train building blocks: the LR schedule, probe pairs, checkpoint files, summaries."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modx.train.checkpoint import find_latest, forget_states
from modx.train.data import Phase, data_seed, joint_phase
from modx.train.evaluate import format_summary, probe_pairs
from modx.train.loop import PhaseSchedule


def phases() -> list[Phase]:
    return [Phase(0, "a", "a.tar", "ae.tar", 10, 1e-3), Phase(1, "b", "b.tar", "be.tar", 20, 5e-4)]


def test_schedule_warms_up_then_decays_to_zero_in_every_phase():
    f = PhaseSchedule(phases(), base_lr=1e-3, warmup=0.2)
    assert [f(s) for s in range(2)] == pytest.approx([0.5, 1.0])  # 2 warm-up steps in phase a
    assert f(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert f(10) == pytest.approx(0.5 * 0.25)  # phase b restarts warm-up at its own lr (0.5x)
    assert f(13) == pytest.approx(0.5)
    assert f(29) < 0.01 and all(0 <= f(s) <= 1 for s in range(30))


def test_joint_phase_joins_every_training_set_and_budget():
    (joint,) = joint_phase(phases())
    assert joint.train == "a.tar::b.tar" and joint.steps == 30 and joint.name == "joint"


def test_data_seed_differs_per_rank_and_segment():
    seeds = {data_seed(0, step, rank) for step in (0, 50, 100) for rank in range(4)}
    assert len(seeds) == 12 and data_seed(1, 0, 0) != data_seed(0, 0, 0)


def test_probe_takes_each_image_with_its_first_caption():
    image = torch.eye(4)
    text = torch.arange(24, dtype=torch.float).view(6, 4)
    ids = torch.tensor([2, 0, 0, 1, 2, 3])  # image 0's first caption is row 1, image 2's row 0
    img, txt = probe_pairs(image, text, ids, n=3)
    assert torch.equal(img, image[:3])
    assert torch.equal(txt, text[[1, 3, 0]])


def test_latest_state_needs_a_complete_directory(tmp_path):
    (tmp_path / "state-00000002").mkdir()
    (tmp_path / "state-00000002" / "trainer_state.json").write_text("{}")
    (tmp_path / "state-00000004").mkdir()  # incomplete (no trainer_state.json)
    assert find_latest(tmp_path).name == "state-00000002"
    (tmp_path / "latest").write_text("state-00000002")
    forget_states(tmp_path)
    assert find_latest(tmp_path) is None and not (tmp_path / "latest").exists()


def test_summary_prints_matrix_forgetting_and_disorder():
    summary = {
        "metric": "mean_recall", "eval_sets": ["digits", "shapes"], "phases": ["digits", "shapes"],
        "initial": [1.0, 2.0], "matrix": [[30.0, 2.5], [12.5, 40.0]], "average_recall": 26.25,
        "forgetting": 17.5, "backward_transfer": -17.5, "forward_transfer": 0.5,
        "disorder": {"initial": {"shapes": {"digits": {"rotation_image_deg": 40.0, "rotation_text_deg": 35.0,
                                                        "deviation_async_deg": 5.0, "alignment_change_deg": 3.0,
                                                        "alignment_flip_i2t": 0.25}}}},
    }
    text = format_summary(json.loads(json.dumps(summary)))
    assert "12.50" in text and "forgetting 17.50" in text and "rotation img 40.00" in text


def test_comparison_prints_this_run_beside_the_reference():
    from modx.train.evaluate import format_comparison, headline

    run = {"strategy": "modx", "eval_sets": ["digits", "shapes"], "learned_recall": [60.0, 40.0],
           "last_recall": [50.0, 40.0], "average_recall": 45.0, "forgetting": 10.0}
    ref = {"strategy": "finetune", "eval_sets": ["digits", "shapes"], "learned_recall": [60.0, 44.0],
           "last_recall": [30.0, 44.0], "average_recall": 37.0, "forgetting": 30.0, "source": "shipped"}
    assert headline(run)["plasticity"] == 50.0 and headline(ref)["first_last"] == 30.0
    text = format_comparison(run, ref, "ref.json")
    lines = text.splitlines()
    assert "ref.json (shipped)" in lines[0]
    assert "this run (modx)" in lines[2] and "50.00 / 40.00" in lines[2] and "45.00" in lines[2]
    assert "reference (finetune)" in lines[3] and "30.00 / 44.00" in lines[3] and "52.00" in lines[3]


def test_joint_headline_averages_every_domain_it_trained_on():
    from modx.train.evaluate import headline

    joint = {"strategy": "joint", "eval_sets": ["a", "b", "c"], "learned_recall": [60.0],
             "last_recall": [60.0, 30.0, 30.0], "average_recall": 60.0}
    assert headline(joint)["average_recall"] == headline(joint)["plasticity"] == 40.0


def test_builtin_phases_get_val_sets_mixed_lists_and_class_subsets(tmp_path):
    from modx.config import ConfigError, load_config
    from modx.data.builtin import ensure_builtin_splits
    from modx.train.data import resolve_phases

    root = tmp_path / "data"
    phases = "[{builtin: [digits, shapes], steps: 1}, {builtin: digits, classes: [zero, one], steps: 1}]"
    cfg = load_config(None, [f"stream.data_root={root}", f"stream.phases={phases}"])
    broad, narrow = resolve_phases(cfg)
    digits, shapes = (ensure_builtin_splits(n, root=str(root)) for n in ("digits", "shapes"))
    assert broad.name == "digits+shapes" and broad.train == f"{digits.train}@1::{shapes.train}@1"
    assert broad.val == f"{digits.val}::{shapes.val}" and broad.eval == f"{digits.test}::{shapes.test}"
    subset = ensure_builtin_splits("digits", root=str(root), classes=["zero", "one"])
    assert (narrow.name, narrow.train, narrow.val, narrow.eval) == ("digits.zero+one", *subset)
    cfg = load_config(None, [f"stream.data_root={root}", "stream.phases=[{builtin: digits, steps: 1}]",
                             f"stream.phases.0.val={digits.test}"])
    with pytest.raises(ConfigError, match="disjoint from the eval set") as info:
        resolve_phases(cfg)
    assert info.value.key == "stream.phases.0.val"
    cfg = load_config(None, [f"stream.data_root={root}", "stream.phases=[{builtin: digits, classes: [ten], steps: 1}]"])
    with pytest.raises(ConfigError, match="no class 'ten'") as info:
        resolve_phases(cfg)
    assert info.value.key == "stream.phases.0.classes"


def test_summary_prints_the_reason_instead_of_retention_from_a_random_start():
    from modx.eval.continual import RANDOM_START, zeroshot_retention
    from modx.train.evaluate import format_zeroshot

    records = [{"kind": "zeroshot", "phase": p, "phase_name": name, "eval_set": "z", "eval_index": 0,
                "metrics": {"acc1": acc}, **({"random_init": True} if p < 0 else {})}
               for p, name, acc in ((-1, "initial", 10.0), (0, "broad", 80.0), (1, "narrow", 40.0))]  # fmt: skip
    text = "\n".join(format_zeroshot(zeroshot_retention(records)))
    assert f"zero-shot retention omitted: {RANDOM_START}" in text and "(50%)" not in text
    text = "\n".join(format_zeroshot(zeroshot_retention(records, reference="broad")))
    assert "40.00 (50%)" in text and "mean zero-shot retention after the last phase 50.00%" in text
    assert "after phase 'broad'" in text
