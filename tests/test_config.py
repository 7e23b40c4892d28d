"""modx.config: YAML + dotted overrides -> typed, validated Config; errors name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modx.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "model": {"arch": "modx-tiny-s4d"},
    "strategy": {"name": "modx", "alpha": 20.0},
    "stream": {"phases": [
        {"name": "a", "train": "data/a/train-{000000..000001}.tar", "eval": "data/a/test-000000.tar", "steps": 10},
        {"name": "b", "builtin": "digits", "samples": 640, "lr": 1.0e-4},
    ]},
    "train": {"batch_size": 8, "output_dir": "runs/x"},
    "eval": {"ks": [1, 5]},
}


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_yaml_and_overrides_build_typed_config(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.lr=1e-3", "stream.phases.0.steps=20", "strategy.cognition_align=false"])
    assert isinstance(cfg, Config)
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)  # '1e-3' is a YAML string
    assert cfg.stream.phases[0].steps == 20
    assert cfg.stream.phases[1].samples == 640 and cfg.stream.phases[1].lr == pytest.approx(1e-4)
    assert cfg.strategy.cognition_align is False
    assert cfg.strategy.reduction == "sum" and cfg.strategy.temperature == 1.0  # reference defaults
    assert cfg.eval.ks == [1, 5]


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["strategy.replay.ratio=0.25"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.bach_size=8"], "train.bach_size"),  # unknown key
        (["train.batch_size=eight"], "train.batch_size"),  # wrong type
        (["train.batch_size=8.5"], "train.batch_size"),
        (["strategy.cognition_align=maybe"], "strategy.cognition_align"),
        (["train.precision=fp8"], "train.precision"),
        (["stream.phases.0.samples=100"], "stream.phases.0"),  # two budgets
        (["stream.phases.5.steps=1"], "stream.phases.5"),
        (["eval.ks=3"], "eval.ks"),
        (["notakey=1"], "notakey"),
        (["train.warmup=1.5"], "train.warmup"),
        (["strategy.align_initial=sometimes"], "strategy.align_initial"),
        (["eval.reference=nowhere/summary.json"], "eval.reference"),
        (["eval.every=-1"], "eval.every"),
        (["eval.zeroshot=[{name: z}]"], "eval.zeroshot.0"),  # neither data nor builtin
        (["eval.zeroshot=[{data: d, builtin: digits}]"], "eval.zeroshot.0"),
        (["eval.retrieval=[{name: a, data: x.tar}]"], "eval.retrieval.0.name"),  # a phase's name
        (["eval.zeroshot=[{builtin: digits}, {builtin: digits}]"], "eval.zeroshot.1.name"),
        (["eval.zeroshot=[{builtin: digits, tempaltes: x}]"], "eval.zeroshot.0.tempaltes"),
        (["strategy.cclip_lora_rank=0"], "strategy.cclip_lora_rank"),
        (["strategy.cclip_lora_alpha=0"], "strategy.cclip_lora_alpha"),
        (["strategy.cclip_lora_dropout=1"], "strategy.cclip_lora_dropout"),
        (["strategy.cclip_hidden=0"], "strategy.cclip_hidden"),
        (["strategy.cclip_weight=-1"], "strategy.cclip_weight"),
        (["strategy.cmcl_train=trunk"], "strategy.cmcl_train"),
        (["strategy.cmcl_lambda_min=-0.1"], "strategy.cmcl_lambda_min"),
        (["strategy.cmcl_lambda_min_out=-1"], "strategy.cmcl_lambda_min_out"),
        (["strategy.cmcl_batches=0"], "strategy.cmcl_batches"),
        (["stream.phases.0.val=[1, 2]"], "stream.phases.0.val"),  # URLs are one string
        (["stream.phases.1.builtin=[]"], "stream.phases.1.builtin"),
        (["stream.phases.1.builtin=[digits, shapes]", "stream.phases.1.classes=[zero]"], "stream.phases.1.classes"),
        (["stream.phases.0.classes=[zero]"], "stream.phases.0.classes"),  # no builtin to take them from
        (["stream.phases.1.classes=zero"], "stream.phases.1.classes"),  # a list
        (["eval.zeroshot=[{data: d, classes: [zero]}]"], "eval.zeroshot.0.classes"),
        (["eval.retention_from=digits"], "eval.retention_from"),  # no phase of that name
    ],
)
def test_bad_values_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE), overrides)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)


def test_config_does_not_import_the_strategies_it_sits_below():
    """The dependency runs one way: modx.strategies imports modx.config, never the reverse;
    loading and validating a config leaves the strategies unimported."""
    code = (f"import sys; from modx.config import load_config; load_config({str(ROOT / 'configs' / 'demo.yaml')!r}); "
            "print(sorted(m for m in sys.modules if m.startswith('modx.strategies')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_the_registry_rejects_an_unknown_strategy_naming_the_key(tmp_path):
    from modx.strategies import STRATEGIES, validate_strategy

    cfg = load_config(write(tmp_path, BASE), ["strategy.name=magic"])  # a name config cannot know
    with pytest.raises(ConfigError) as info:
        validate_strategy(cfg.strategy)
    assert info.value.key == "strategy.name"
    assert str(info.value) == f"config error at 'strategy.name': unknown strategy 'magic'; choose one of {sorted(STRATEGIES)}"
    for name in STRATEGIES:
        cfg.strategy.name = name
        validate_strategy(cfg.strategy)


def test_val_builtin_lists_classes_and_retention_from_are_read(tmp_path):
    cfg = load_config(write(tmp_path, BASE), [
        "stream.phases.0.val=data/a/val-000000.tar", "stream.phases.1.builtin=[digits, shapes]",
        "stream.phases.1.name=''", "eval.retention_from=digits+shapes",
        "eval.zeroshot=[{builtin: digits, classes: [nine, eight]}]",
    ])
    assert cfg.stream.phases[0].val == "data/a/val-000000.tar" and cfg.stream.phases[1].val == ""
    assert cfg.stream.phases[1].builtin == ["digits", "shapes"] and cfg.stream.phases[1].name == "digits+shapes"
    assert cfg.eval.retention_from == "digits+shapes" and cfg.eval.zeroshot[0].name == "digits.nine+eight-zs"
    cfg = load_config(write(tmp_path, BASE), ["stream.phases.1.classes=[zero, one]", "stream.phases.1.name=''"])
    assert cfg.stream.phases[1].name == "digits.zero+one"
    with pytest.raises(ConfigError, match="choose initial or a phase name \\(a, b\\)"):
        load_config(write(tmp_path, BASE), ["eval.retention_from=c"])


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        load_config(write(tmp_path, BASE), ["train.bach_size=8"])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_configs_are_valid():
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert any(p.name == "demo.yaml" for p in paths)
    for path in paths:
        load_config(path)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train_modx.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    proc = run_cli("--config", str(write(tmp_path, BASE)), "train.bach_size=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.bach_size" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_unknown_strategy_exits_2_with_one_line(tmp_path):
    proc = run_cli("--config", str(write(tmp_path, BASE)), "--print-config", "strategy.name=magic", cwd=tmp_path)
    assert proc.returncode == 2 and not proc.stdout
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("train_modx.py: config error at 'strategy.name': unknown strategy 'magic'; choose one of")


def test_cli_missing_config_file_exits_2(tmp_path):
    proc = run_cli("--config", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "--config" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_no_shards_matched_exits_2_naming_the_phase(tmp_path):
    tree = {**BASE, "stream": {"phases": [{"name": "a", "train": str(tmp_path / "none-{0..3}.tar"),
                                           "eval": str(tmp_path / "none-0.tar"), "steps": 2}]},
            "train": {"output_dir": str(tmp_path / "run"), "tracker": "none"}}
    proc = run_cli("--config", str(write(tmp_path, tree)), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "stream.phases.0.train" in proc.stderr and "no shards matched" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_print_config_resolves_the_demo(tmp_path):
    proc = run_cli("--print-config", "train.lr=0.002", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tree = yaml.safe_load(proc.stdout)
    assert tree["strategy"]["name"] == "modx" and tree["train"]["lr"] == 0.002
    assert set(tree) == {"model", "strategy", "stream", "train", "eval"}


@pytest.mark.parametrize(("value", "want"), [("auto", "auto"), ("true", True), ("false", False)])
def test_align_initial_takes_auto_or_a_boolean(tmp_path, value, want):
    assert load_config(write(tmp_path, BASE), [f"strategy.align_initial={value}"]).strategy.align_initial == want


def test_reference_summary_is_found_beside_the_config(tmp_path):
    (tmp_path / "ref.json").write_text("{}")
    cfg = load_config(write(tmp_path, BASE), ["eval.reference=ref.json"])
    assert cfg.eval.reference == str(tmp_path / "ref.json")


def test_cli_bad_zero_shot_directory_exits_2_naming_the_key(tmp_path):
    tree = {**BASE, "stream": {"phases": [{"name": "a", "train": str(tmp_path / "s.tar"),
                                           "eval": str(tmp_path / "s.tar"), "steps": 2}]},
            "train": {"output_dir": str(tmp_path / "run"), "tracker": "none"},
            "eval": {"zeroshot": [{"name": "z", "data": str(tmp_path)}]}}  # fmt: skip
    (tmp_path / "s.tar").touch()
    proc = run_cli("--config", str(write(tmp_path, tree)), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "eval.zeroshot.0.data" in proc.stderr and "not a CLIP_benchmark" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_retention_stream_holds_its_zero_shot_classes_out_of_the_narrow_phases():
    cfg = load_config(ROOT / "configs" / "bench_retention.yaml")
    names = [p.name for p in cfg.stream.phases]
    broad = cfg.stream.phases[names.index(cfg.eval.retention_from)]
    assert cfg.eval.retention_from == names[0] and isinstance(broad.builtin, list) and len(broad.builtin) >= 2
    narrow = cfg.stream.phases[1:]
    assert narrow and all(isinstance(p.builtin, str) and p.classes for p in narrow)
    trained = {(p.builtin, c) for p in narrow for c in p.classes}
    for z in cfg.eval.zeroshot:
        assert z.builtin in broad.builtin  # the "pretrained" model saw the zero-shot domain
        if z.classes:
            assert not {(z.builtin, c) for c in z.classes} & trained, z.name
        else:
            assert z.builtin not in {p.builtin for p in narrow}, z.name  # a whole held-out domain
