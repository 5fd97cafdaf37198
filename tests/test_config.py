"""The config tree: every shipped YAML validates; composition, overrides and errors behave."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from axpo_nemo.config import Config, ConfigError, find_config, load_config, load_config_tree, to_yaml
from axpo_nemo.config.loader import SOURCE_CONF_DIR, closest_key, parse_value
from axpo_nemo.core import AXPOConfig
from axpo_nemo.core.config import field_errors, setting

SHIPPED = sorted(SOURCE_CONF_DIR.rglob("*.yaml"))


def test_configs_are_shipped():
    names = {p.relative_to(SOURCE_CONF_DIR).as_posix() for p in SHIPPED}
    assert {"axpo.yaml", "grpo.yaml", "demo.yaml", "grpo_budget_matched.yaml"} <= names
    assert {f"ablations/{n}.yaml" for n in ("no_prefix_fixing", "no_prefix_credit", "joint_groups")} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(SOURCE_CONF_DIR).as_posix())
def test_every_shipped_config_loads_and_validates(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert isinstance(cfg.axpo, AXPOConfig)  # the core's own dataclass, built and re-validated


def test_defaults_compose_in_order_and_file_wins():
    cfg = load_config("grpo_budget_matched")
    assert cfg.algorithm == "grpo"  # from grpo.yaml
    assert cfg.rollout.group_size == 10  # its own value
    assert cfg.output_dir == "runs/grpo_budget_matched"
    assert cfg.axpo.r == 0.25  # from axpo.yaml through two levels


def test_ablation_configs_flip_exactly_one_switch():
    base = load_config("axpo").axpo
    for name, field, value in [
        ("no_prefix_fixing", "prefix_fixing", False),
        ("no_prefix_credit", "prefix_credit", False),
        ("joint_groups", "separate_groups", False),
        ("random_selection", "selection", "random"),
        ("confident_selection", "selection", "confident"),
    ]:
        ablated = load_config(f"ablations/{name}").axpo
        assert getattr(ablated, field) == value
        for other in ("r", "k", "selection", "prefix_fixing", "prefix_credit", "separate_groups"):
            if other != field:
                assert getattr(ablated, other) == getattr(base, other), (name, other)


def test_override_styles():
    cfg = load_config("axpo", ["axpo.r=0.5", "++axpo.k=2", "loss.dual_clip=3", "advantage.epsilon=1e-8"])
    assert (cfg.axpo.r, cfg.axpo.k, cfg.loss.dual_clip, cfg.advantage.epsilon) == (0.5, 2, 3.0, 1e-8)
    cfg = load_config("axpo", ["loss.dual_clip=null", "axpo.prefix_credit=false", "model.name=/ckpt/qwen"])
    assert cfg.loss.dual_clip is None and cfg.axpo.prefix_credit is False and cfg.model.name == "/ckpt/qwen"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["axpo.rr=1"], "unknown config key 'axpo.rr'.*did you mean 'axpo.r'"),
        (["axpo.selction=random"], "did you mean 'axpo.selection'"),
        (["rollout.groupsize=4"], "did you mean 'rollout.group_size'"),
        (["seletion=random"], "did you mean 'axpo.selection'"),
        (["axpo.k=four"], "invalid value for 'axpo.k'"),
        (["axpo.selection=entropy"], "axpo.selection: must be one of uncertainty, random, confident"),
        (["axpo.r=-0.1"], "axpo.r: must be >= 0.0"),
        (["loss.dual_clip=0.5"], "loss.dual_clip: must be > 1.0"),
        (["loss.kl_type=k4"], "loss.kl_type: must be one of k1, k2, k3"),
        (["algorithm=ppo"], "algorithm: must be one of axpo, grpo"),
        (["+axpo.r=0.3"], "'\\+' adds a new key but 'axpo.r' already exists"),
        (["++axpo.brand_new=1"], "unknown config key 'axpo.brand_new'"),
        (["axpo.r"], "not of the form key=value"),
        (["~axpo.r"], "not of the form|deleting keys"),
        (["~axpo.r=1"], "deleting keys is not supported"),
        # a NeMo-RL master-config key, typed as a NeMo-RL user would: point to where it goes
        (["logger.wandb.name=r05"], "go under nemo.overrides: \\+\\+nemo.overrides.logger.wandb.name=r05"),
        (["++policy.max_grad_norm=2"], "\\+\\+nemo.overrides.policy.max_grad_norm=2"),
    ],
)
def test_bad_overrides_fail_with_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        load_config("demo", overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["eval.ks=[0]"], r"eval\.ks\[0\]: must be >= 1 \(got 0\)"),
        (["eval.ks=[-1,4]"], r"eval\.ks\[0\]: must be >= 1 \(got -1\)"),
        (["eval.ks=[1,4,0]"], r"eval\.ks\[2\]: must be >= 1"),
        (["eval.ks=[]"], "give at least one k"),
        (["eval.samples_per_question=4", "eval.ks=[1,8]"], "exceeds samples_per_question"),
        (["tools.python.disable=[landlock,selinux]"], "tools.python.disable: must be one of"),
    ],
)
def test_the_tree_checks_list_elements_and_rules_across_fields(overrides, expected):
    """What config show, plan and the NeMo-RL entry point validate (the tree, not the objects)."""
    with pytest.raises(ConfigError, match=expected) as info:
        load_config_tree("demo", overrides)
    assert "\n" not in str(info.value)


def _list_settings(cls: type = Config, prefix: str = ""):
    """(key, element type, metadata) of every list-valued setting under ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _list_settings(kind, f"{prefix}{f.name}.")
            continue
        for option in (kind, *typing.get_args(kind)):
            if typing.get_origin(option) in (list, tuple):
                yield f"{prefix}{f.name}", typing.get_args(option)[0], f.metadata


# Lists of names the user chooses freely (module names, paths): nothing to bound.
FREE_FORM_LISTS = {"tools.python.blocked_modules", "tools.python.preload_modules", "tools.python.extra_readable_paths"}


def test_every_list_setting_constrains_its_elements():
    found = list(_list_settings())
    assert {"eval.ks", "tools.enabled", "train.stages"} <= {key for key, _, _ in found}
    for key, element, meta in found:
        if element in (int, float):
            assert any(meta.get(b) is not None for b in ("ge", "gt", "le", "lt")), f"{key}: no bounds"
        else:
            assert meta.get("choices") is not None or key in FREE_FORM_LISTS, f"{key}: no choices"


def test_bounds_apply_to_every_element():
    @dataclasses.dataclass
    class Probe:
        weights: list[float] = setting([1.0], "w", gt=0.0, le=2.0)
        sizes: tuple[int, ...] = setting((1,), "s", ge=1)
        scale: float = setting(1.0, "x", gt=0.0)

    assert field_errors(Probe()) == []
    assert field_errors(Probe(weights=[1.0, 0.0]), "p.") == ["p.weights[1]: must be > 0.0 (got 0.0)"]
    assert field_errors(Probe(weights=[3.0])) == ["weights[0]: must be <= 2.0 (got 3.0)"]
    assert field_errors(Probe(weights=[float("nan")])) == ["weights[0]: must be a number (got nan)"]
    assert field_errors(Probe(sizes=(2, 0, -1))) == ["sizes[1]: must be >= 1 (got 0)"]
    assert field_errors(Probe(scale=0.0)) == ["scale: must be > 0.0 (got 0.0)"]


def test_bad_key_in_a_file_names_the_file_and_key(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("axpo:\n  r: 0.5\n")
    (tmp_path / "child.yaml").write_text("defaults: base.yaml\naxpo:\n  kk: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'axpo.kk' \(in .*child.yaml\).*axpo.k'") as info:
        load_config(tmp_path / "child.yaml")
    assert "\n" not in str(info.value)


def test_wrong_type_in_a_file(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text("rollout:\n  group_size: many\n")
    with pytest.raises(ConfigError, match=r"invalid value for 'rollout\.group_size'"):
        load_config(tmp_path / "bad.yaml")


def test_defaults_cycle_missing_parent_and_bad_yaml(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("defaults: b.yaml\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("defaults: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"'nowhere\.yaml' not found"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "broken.yaml").write_text("axpo: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_interpolations_and_nemo_rl_resolvers(tmp_path: Path):
    (tmp_path / "i.yaml").write_text(
        "rollout:\n  group_size: 6\n  questions_per_step: ${mul:${rollout.group_size},2}\n"
        "  max_turns: ${max:1,4}\n"
    )
    cfg = load_config(tmp_path / "i.yaml")
    assert cfg.rollout.questions_per_step == 12 and cfg.rollout.max_turns == 4
    # Interpolations resolve after overrides, like Hydra.
    cfg = load_config(tmp_path / "i.yaml", ["rollout.group_size=5"])
    assert cfg.rollout.questions_per_step == 10
    (tmp_path / "dangling.yaml").write_text("rollout:\n  group_size: ${rollout.nope}\n")
    with pytest.raises(ConfigError, match="rollout"):
        load_config(tmp_path / "dangling.yaml")


def test_find_config_by_name_and_path(monkeypatch, tmp_path: Path):
    assert find_config("grpo") == SOURCE_CONF_DIR / "grpo.yaml"
    assert find_config("ablations/joint_groups.yaml") == SOURCE_CONF_DIR / "ablations" / "joint_groups.yaml"
    # A conf/ folder in the working directory takes precedence over the source tree's.
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "grpo.yaml").write_text("algorithm: grpo\n")
    monkeypatch.chdir(tmp_path)
    assert find_config("grpo").resolve() == (tmp_path / "conf" / "grpo.yaml").resolve()


def test_yaml_round_trip_of_resolved_config():
    tree = load_config_tree("demo", ["axpo.k=3"])
    text = to_yaml(tree)
    assert "k: 3" in text and "selection: uncertainty" in text
    assert to_yaml(load_config("demo", ["axpo.k=3"])) == text


def test_parse_value_and_closest_key():
    assert parse_value("1e-6") == 1e-6 and parse_value("3") == 3 and parse_value("null") is None
    assert parse_value("[1, 2]") == [1, 2] and parse_value("true") is True and parse_value("a b") == "a b"
    assert closest_key("loss.clip_hihg") == "loss.clip_high"
    assert closest_key("zzzzzz") is None
