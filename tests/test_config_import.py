"""Loading a config stays light: no torch, no transformers; the lazy package exports still resolve."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: what `axpo config show`, `axpo config keys` and `axpo plan` import.
_PROBE = """
import contextlib, io, json, sys

from axpo_nemo.config import load_config, load_config_tree, to_yaml
from axpo_nemo.cli import main

cfg = load_config("demo", ["rl.steps=3"])
assert cfg.rl.steps == 3 and cfg.rl.speculative_extra_prefixes >= 0
assert "speculative_resampling" in to_yaml(load_config_tree("demo", []))
codes = []
with contextlib.redirect_stdout(io.StringIO()):
    for argv in (["config", "show"], ["config", "keys"], ["plan", "cluster/axpo_8b"]):
        codes.append(main(argv))
print(json.dumps({"codes": codes, "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""


def test_loading_a_config_imports_neither_torch_nor_transformers():
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 0]
    assert report["heavy"] == [], f"config loading imported {report['heavy']}"


@pytest.mark.parametrize("package", ["axpo_nemo.core", "axpo_nemo.eval", "axpo_nemo.export", "axpo_nemo.local"])
def test_every_lazy_export_resolves(package):
    module = importlib.import_module(package)
    assert set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match=f"{package}.*no_such_name"):
        module.no_such_name  # noqa: B018


def test_lazy_exports_are_the_defining_modules_objects():
    from axpo_nemo import core
    from axpo_nemo.core import plan_resampling
    from axpo_nemo.core.rollout import RolloutBatch
    from axpo_nemo.core.selection import plan_resampling as defined
    from axpo_nemo.eval import EvalConfig, evaluate
    from axpo_nemo.eval.passk import evaluate as passk_evaluate
    from axpo_nemo.local import LocalGenerator
    from axpo_nemo.local.generator import LocalGenerator as defined_generator

    assert plan_resampling is defined and core.RolloutBatch is RolloutBatch
    assert evaluate is passk_evaluate and LocalGenerator is defined_generator
    assert EvalConfig(samples_per_question=2, ks=[2, 1]).ks == [1, 2]


def test_config_sections_are_reexported_by_the_modules_that_use_them():
    from axpo_nemo.agent.tools import config as tools_config
    from axpo_nemo.agent.tools import registry, search, search_config
    from axpo_nemo.config import checkpoint as checkpoint_config
    from axpo_nemo.config import evaluation as passk_config
    from axpo_nemo.config import rl as rl_config
    from axpo_nemo.config import sft as sft_config
    from axpo_nemo.config import synth as synth_config
    from axpo_nemo.data import synth
    from axpo_nemo.eval import passk
    from axpo_nemo.local import rl, sft
    from axpo_nemo.run import checkpoint

    assert rl.RLConfig is rl_config.RLConfig and sft.SFTConfig is sft_config.SFTConfig
    assert checkpoint.CheckpointConfig is checkpoint_config.CheckpointConfig
    assert passk.EvalConfig is passk_config.EvalConfig
    assert synth.SynthConfig is synth_config.SynthConfig and synth.FAMILIES is synth_config.FAMILIES
    assert synth.FamilyWeights is synth_config.FamilyWeights
    assert registry.ToolsConfig is tools_config.ToolsConfig and registry.TOOL_NAMES == tools_config.TOOL_NAMES
    assert search.SearchConfig is search_config.SearchConfig
    with pytest.raises(ValueError, match="multiply_min"):
        synth.SynthConfig(multiply_min=50, multiply_max=20)
