"""``backend=nemo`` entry points fail with one clear line and exit code 2 where NeMo-RL is missing."""

from __future__ import annotations

import pytest

from axpo_nemo.cli import main
from axpo_nemo.nemo import adapter
from axpo_nemo.nemo.train import main as nemo_train_main

pytestmark = pytest.mark.skipif(adapter.nemo_rl_available(), reason="NeMo-RL is importable here")


@pytest.mark.parametrize(
    ("run", "argv", "module"),
    [
        (main, ["train", "backend=nemo"], "nemo_rl.algorithms.grpo"),
        (
            main,
            ["train", "--config", "grpo", "backend=nemo", "rollout.group_size=4"],
            "nemo_rl.algorithms.grpo",
        ),
        (main, ["sft", "backend=nemo"], "nemo_rl.algorithms.sft"),
        (nemo_train_main, ["--config", "demo"], "nemo_rl.algorithms.grpo"),
    ],
)
def test_backend_nemo_without_nemo_rl_exits_2_with_one_line(run, argv, module, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written before the check
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("axpo: the NeMo-RL backend needs") and module in err and "backend=local" in err
    assert not any(tmp_path.iterdir())


def test_bad_config_is_reported_before_anything_else(capsys):
    assert nemo_train_main(["--config", "demo", "rollout.group_sise=4"]) == 2
    assert "unknown config key 'rollout.group_sise'" in capsys.readouterr().err


def test_a_vision_freeze_v070_cannot_apply_is_refused_by_name(capsys):
    assert nemo_train_main(["--config", "cluster/axpo_2b", "nemo.megatron.freeze_vision_model=true"]) == 2
    err = capsys.readouterr().err
    assert "nemo.megatron.freeze_vision_model" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "module"),
    [(["--config", "cluster/sft_2b"], "nemo_rl.algorithms.sft"), (["--config", "cluster/axpo_2b"], "nemo_rl.algorithms.grpo")],
)
def test_the_stage_comes_from_train_stages(argv, module, capsys):
    # cluster/sft_* sets train.stages=[sft]: the entry runs NeMo-RL's SFT, not the RL loop.
    assert nemo_train_main(argv) == 2
    assert module in capsys.readouterr().err

