"""Which generator serves an evaluation: the local backend's or vLLM through the cluster backend.

This module is wiring above both backends (like the CLI that calls it): the evaluation code in
`axpo_nemo.eval` takes any `Generator` and imports neither backend. ``local`` samples with
`LocalGenerator` (the training agent loop; CPU or one GPU); ``vllm`` asks
`axpo_nemo.nemo.generator.standalone_vllm_generator` for a vLLM-backed `Generator` (NeMo-RL
container).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from axpo_nemo.agent.loop import AgentLoopConfig
from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.eval.suite.benchmark_scores import SuiteResult
from axpo_nemo.eval.suite.registry import resolve_suite
from axpo_nemo.eval.suite.runner import default_label, run_suite

__all__ = ["ENGINES", "EngineUnavailable", "local_engine", "local_generator", "run_suite_command", "vllm_engine"]

ENGINES = ("local", "vllm")


class EngineUnavailable(RuntimeError):
    """The requested generation engine cannot run in this environment."""


def local_generator(bundle: Any) -> Any:
    """The local backend's `Generator` for a loaded policy bundle."""
    from axpo_nemo.local.generator import LocalGenerator

    return LocalGenerator.from_bundle(bundle)


def local_engine(cfg: Any, run: str | None = None) -> tuple[Any, ChatProtocol, str]:
    """``(generator, protocol, model_id)`` for the local generator: a run folder's model, else
    ``model.name`` (``tiny`` or a Hugging Face folder)."""
    from axpo_nemo.local.generator import LocalGenerator
    from axpo_nemo.models import build_policy
    from axpo_nemo.run.run_folder import bundle_from_run

    bundle = bundle_from_run(run, cfg) if run else build_policy(cfg.model, seed=cfg.seed)
    return LocalGenerator.from_bundle(bundle), ChatProtocol(bundle.processor), str(run or cfg.model.name)


def vllm_engine(cfg: Any, model_path: str) -> tuple[Any, ChatProtocol, str]:
    """``(generator, protocol, model_id)`` for vLLM through NeMo-RL (imported only now).

    Raises:
        EngineUnavailable: vLLM / NeMo-RL is not importable here, or ``model_path`` is not a
            Hugging Face model folder.
    """
    if not Path(model_path).is_dir():
        raise EngineUnavailable(
            f"--engine vllm needs a Hugging Face model folder (--run or model.name), got {model_path!r}"
        )
    try:
        from axpo_nemo.nemo.generator import standalone_vllm_generator

        generator = standalone_vllm_generator(model_path, cfg)
    except ImportError as exc:
        raise EngineUnavailable(
            f"--engine vllm needs vLLM and NeMo-RL, which are not importable here ({exc}); run inside "
            "the NeMo-RL container, or use --engine local"
        ) from exc
    from axpo_nemo.models import load_processor

    return generator, ChatProtocol(load_processor(Path(model_path))), str(model_path)


def run_suite_command(
    cfg: Any,
    *,
    suite: str,
    data_dir: str,
    out: str,
    engine: str = "local",
    run: str | None = None,
    label: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[SuiteResult, dict[str, Path]]:
    """What ``axpo eval --suite`` does with a loaded `Config`: build the engine and tools, run the
    suite, write the reports. Returns the result and the report paths.

    Only the tools the chosen benchmarks allow are built (a perception run needs no search
    corpus); search reads ``tools.search.corpus_path`` or ``tools.search.url``, never the
    synthetic task's corpus."""
    from axpo_nemo.agent.tools.registry import build_tools
    from axpo_nemo.eval.suite.report import REPORT_FILES
    from axpo_nemo.run.toolset import resolve_tools_config

    benchmarks = resolve_suite(suite)
    tools_cfg = resolve_tools_config(cfg, {name for bench in benchmarks for name in bench.tools}, data_corpus=False)
    if engine not in ENGINES:
        raise EngineUnavailable(f"--engine: choose one of {', '.join(ENGINES)} (got {engine!r})")
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} is not a folder")
    if engine == "vllm":
        generator, protocol, model_id = vllm_engine(cfg, run or cfg.model.name)
    else:
        generator, protocol, model_id = local_engine(cfg, run)
    loop_cfg = AgentLoopConfig.from_rollout_config(
        cfg.rollout, tool_timeout_s=cfg.tools.timeout_s, tool_workers=cfg.tools.workers, seed=cfg.seed
    )
    with build_tools(tools_cfg) as tools:
        result = run_suite(
            generator, protocol, tools, benchmarks, data_dir, out, cfg.eval, loop_cfg,
            label=label or default_label(run, cfg.model.name), model_id=model_id, engine=engine,
            reward_cfg=cfg.reward, progress=progress,
        )  # fmt: skip
    return result, {name: Path(out) / filename for name, filename in REPORT_FILES.items()}
