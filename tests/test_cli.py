"""The `axpo` command: help, config show on every shipped config, and clean failures."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from axpo_nemo.cli import main
from axpo_nemo.config.loader import SOURCE_CONF_DIR

SHIPPED = sorted(p.relative_to(SOURCE_CONF_DIR).as_posix() for p in SOURCE_CONF_DIR.rglob("*.yaml"))


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "config" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["config", "--help"])
    out = capsys.readouterr().out
    assert "show" in out and "keys" in out
    with pytest.raises(SystemExit):
        main(["config", "show", "--help"])
    assert "--config" in capsys.readouterr().out


@pytest.mark.parametrize("name", SHIPPED)
def test_config_show_works_on_every_shipped_config(name, capsys):
    assert main(["config", "show", "--config", name]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert {"algorithm", "model", "rollout", "axpo", "advantage", "loss"} <= set(shown)


def test_config_show_applies_overrides(capsys):
    assert main(["config", "show", "-c", "grpo", "axpo.r=0.5", "++rollout.group_size=16"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["algorithm"] == "grpo" and shown["axpo"]["r"] == 0.5 and shown["rollout"]["group_size"] == 16


def test_misspelt_key_exits_nonzero_naming_the_key(capsys):
    assert main(["config", "show", "axpo.selction=random"]) == 2
    err = capsys.readouterr().err
    assert "axpo.selction" in err and "axpo.selection" in err
    assert err.count("\n") == 1


def test_config_keys_documents_every_key(capsys):
    assert main(["config", "keys", "--width", "400"]) == 0
    out = capsys.readouterr().out
    for key in ("axpo.prefix_credit", "loss.clip_high", "rollout.group_size", "model.tiny.num_layers"):
        assert key in out


def test_console_script_runs_as_a_process():
    done = subprocess.run(
        [sys.executable, "-m", "axpo_nemo.cli", "config", "show", "axpo.rr=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "unknown config key 'axpo.rr'" in done.stderr and "did you mean 'axpo.r'" in done.stderr
    assert "Traceback" not in done.stderr


def test_tools_list_prints_enabled_schemas(capsys):
    assert main(["tools", "list", "tools.enabled=[image_zoom_in]"]) == 0
    out = capsys.readouterr().out
    assert '"name": "image_zoom_in"' in out and '"name": "python"' not in out


def test_tools_run_shows_the_observation_and_saves_images(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "question.png"
    Image.new("RGB", (600, 400), "red").save(image)
    args = ["tools", "run", "image_zoom_in", "--args", '{"bbox_2d": [0, 0, 500, 500]}']
    assert main([*args, "--image", str(image), "--out", str(tmp_path / "out"), "tools.enabled=[image_zoom_in]"]) == 0
    out = capsys.readouterr().out
    assert "status: ok" in out and "<tool_response>" in out and "<|image_pad|>" in out
    saved = Image.open(tmp_path / "out" / "observation_0.png")
    assert saved.size == (336, 224)  # 300x200 px crop upscaled to a 224 px short side


def test_tools_run_reports_error_observations(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "q.png"
    Image.new("RGB", (64, 64)).save(image)
    zoom = ["tools", "run", "image_zoom_in", "--image", str(image), "--out", str(tmp_path), "tools.enabled=[image_zoom_in]"]
    assert main([*zoom[:3], "--args", '{"bbox_2d": [1, 2,}', *zoom[3:]]) == 1
    out = capsys.readouterr().out
    assert "error (malformed_json)" in out and "Error:" in out
    assert main([*zoom[:3], "--args", '{"bbox_2d": [900, 900, 10, 10]}', *zoom[3:]]) == 1
    assert "error (bad_arguments)" in capsys.readouterr().out
    assert main(["tools", "run", "python", "--args", "{}", "tools.enabled=[image_zoom_in]"]) == 2
    assert "not enabled" in capsys.readouterr().err
    assert main([*zoom[:3], "--args", "{}", "--image", str(tmp_path / "missing.png"), "tools.enabled=[image_zoom_in]"]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_search_tool_needs_a_backend_named_by_config():
    from axpo_nemo.agent.tools.registry import build_tools
    from axpo_nemo.config import load_config

    cfg = load_config("demo", ["tools.enabled=[search]"])
    with pytest.raises(ValueError, match=r"tools\.search.*corpus_path"):
        build_tools(cfg.tools)


# -- the default (demo) config: commands build only the tools they run --------------------------


@pytest.fixture
def fresh_dir(tmp_path, monkeypatch):
    """A working directory without runs/ (the demo's output_dir is relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_tools_list_on_the_default_config_lists_search_with_a_note(fresh_dir, capsys):
    assert main(["tools", "list"]) == 0
    captured = capsys.readouterr()
    for name in ("image_zoom_in", "python", "search"):
        assert f'"name": "{name}"' in captured.out
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("note: search has no corpus") and "tools.search.corpus_path" in captured.err


def test_readme_tools_run_examples_work_on_the_default_config(fresh_dir, capsys):
    from PIL import Image

    Image.new("RGB", (640, 480), "blue").save(fresh_dir / "photo.png")
    assert main(["tools", "run", "image_zoom_in", "--args", '{"bbox_2d": [0, 0, 500, 500]}', "--image", "photo.png"]) == 0
    assert "status: ok" in capsys.readouterr().out
    assert main(["tools", "run", "python", "--args", '{"code": "print(image.size)"}', "--image", "photo.png"]) == 0
    out = capsys.readouterr().out
    assert "status: ok" in out and "(640, 480)" in out


def test_tools_run_search_reads_the_data_folder_corpus_or_names_the_key(fresh_dir, capsys):
    search = ["tools", "run", "search", "--args", '{"query": "capital of Norland"}']
    assert main(search) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tools.search.corpus_path" in err and "runs/demo/data/corpus.jsonl" in err
    corpus = fresh_dir / "runs" / "demo" / "data" / "corpus.jsonl"
    corpus.parent.mkdir(parents=True)
    corpus.write_text('{"id": "1", "contents": "\\"Norland\\"\\nThe capital of Norland is Brask."}\n')
    assert main(search) == 0
    assert "The capital of Norland is Brask." in capsys.readouterr().out
    assert main([*search, "tools.search.corpus_path=missing.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tools.search.corpus_path: missing.jsonl does not exist" in err


def test_eval_suite_perception_needs_no_search_corpus(fresh_dir, capsys):
    (fresh_dir / "bench").mkdir()
    # Search benchmarks need a corpus (never the synthetic task's): one line before any model loads.
    assert main(["eval", "--suite", "search", "--data-dir", "bench"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tools.search.corpus_path" in err
    # Perception benchmarks never search: the run gets as far as reading the benchmark files.
    assert main(["eval", "--suite", "perception", "--data-dir", "bench"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "benchmark 'hrbench_4k'" in err and "corpus" not in err


# -- overrides that add keys, and `config keys` on the config a command would run ----------------


def test_plus_plus_adds_keys_only_in_open_sections(capsys):
    assert main(["config", "show", "++nemo.overrides.policy.max_grad_norm=0.5", "++axpo.k=8"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["nemo"]["overrides"] == {"policy": {"max_grad_norm": 0.5}} and shown["axpo"]["k"] == 8
    for op in ("++", "+"):
        assert main(["config", "show", f"{op}axpo.newkey=1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "unknown config key 'axpo.newkey'" in err and f"'{op}' adds keys only under nemo.overrides" in err
        assert "`axpo config keys axpo` lists the valid keys" in err
    assert main(["config", "show", "++axpo.prefix_credt=1"]) == 2
    assert "did you mean 'axpo.prefix_credit'?" in capsys.readouterr().err


def test_config_keys_shows_the_config_a_command_would_run(capsys):
    assert main(["config", "keys", "--width", "80"]) == 0  # default: the demo config
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# ") and lines[0].endswith("demo.yaml")
    assert all(len(line) <= 80 for line in lines)
    assert 150 < len(lines) < 300  # one line per key
    assert any(line.startswith("model.tiny.num_layers = 3  # (default 2) ") for line in lines)
    assert main(["config", "keys", "--config", "grpo", "rollout.group_size=5", "algorithm", "rollout", "--full"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("grpo.yaml with rollout.group_size=5")
    assert all(line.split(" = ")[0] == "algorithm" or line.startswith("rollout.") for line in lines[1:])
    assert any(line.startswith("algorithm = grpo  # (default axpo) [axpo|grpo] ") for line in lines)
    assert "rollout.group_size = 5  # (default 8) Rollouts N per question." in "\n".join(lines)
    assert main(["config", "keys", "tool"]) == 2
    assert "did you mean 'tools'?" in capsys.readouterr().err
