"""The ``axpo`` subcommands: each handler takes the parsed arguments and returns the exit code."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence


def _config_show(args: argparse.Namespace) -> int:
    from axpo_nemo.config import load_config_tree, to_yaml

    print(to_yaml(load_config_tree(args.config, args.overrides)), end="")
    return 0


def _flow(value) -> str:
    """A config value as one line of YAML (flow style for lists and mappings)."""
    import yaml

    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return value if value.strip() == value and value else repr(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()


def _config_keys(args: argparse.Namespace) -> int:
    import shutil

    from omegaconf import OmegaConf

    from axpo_nemo.config import DEFAULT_CONFIG, Config, find_config, load_config_tree
    from axpo_nemo.config.loader import closest_key

    overrides = [x for x in args.overrides if "=" in x]
    sections = [x.rstrip(".") for x in args.overrides if "=" not in x]
    tree = load_config_tree(args.config, overrides)
    values = OmegaConf.to_container(tree, resolve=True)
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str, node: dict) -> None:
        for f in dataclasses.fields(cls):
            factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(factory):
                walk(factory, f"{prefix}{f.name}.", node[f.name])
                continue
            default = f.default if factory is None else factory()
            value = node[f.name]
            meaning = " ".join(f.metadata.get("help", "").split())
            if f.metadata.get("choices"):
                meaning = f"[{'|'.join(map(str, f.metadata['choices']))}] {meaning}"
            if value != default:
                meaning = f"(default {_flow(default)}) {meaning}"
            rows.append((prefix + f.name, _flow(value), meaning))

    walk(Config, "", values)
    if sections:
        known = {key for key, _, _ in rows} | {key.rsplit(".", i)[0] for key, _, _ in rows for i in range(1, key.count(".") + 1)}
        for section in sections:
            if section not in known:
                hint = closest_key(section)
                raise ValueError(f"no config key or section '{section}'" + (f"; did you mean '{hint}'?" if hint else ""))
        rows = [r for r in rows if any(r[0] == s or r[0].startswith(s + ".") for s in sections)]
    width = args.width
    if width is None and not args.full and sys.stdout.isatty():
        width = shutil.get_terminal_size().columns
    print(f"# {find_config(args.config or DEFAULT_CONFIG)}" + (f" with {' '.join(overrides)}" if overrides else ""))
    for key, value, meaning in rows:
        line = f"{key} = {value}" + (f"  # {meaning}" if meaning else "")
        if width and not args.full and len(line) > width:
            line = line[: max(width - 1, 0)] + "…"
        print(line)
    return 0


def _protocol_for(model_name: str):
    """The chat protocol of the configured model (tiny tokenizer/processor, or the checkpoint's)."""
    from axpo_nemo.agent.protocol import ChatProtocol
    from axpo_nemo.models import build_tiny_processor, build_tiny_tokenizer, load_processor

    if model_name == "tiny":
        return ChatProtocol(build_tiny_processor(build_tiny_tokenizer()))
    from pathlib import Path

    return ChatProtocol(load_processor(Path(model_name)))


def _tools_list(args: argparse.Namespace) -> int:
    import json

    from axpo_nemo.config import load_config
    from axpo_nemo.run.toolset import tool_schemas

    schemas, notes = tool_schemas(load_config(args.config, args.overrides))
    for schema in schemas:
        print(json.dumps(schema, indent=2, ensure_ascii=False))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _tools_run(args: argparse.Namespace) -> int:
    from PIL import Image

    from axpo_nemo.agent.loop import AgentLoopConfig
    from axpo_nemo.agent.tool_debug import run_tool_call, save_images
    from axpo_nemo.config import load_config
    from axpo_nemo.run.toolset import build_command_tools

    cfg = load_config(args.config, args.overrides)
    if args.name not in cfg.tools.enabled:
        print(f"axpo: tool '{args.name}' is not enabled (tools.enabled: {', '.join(cfg.tools.enabled)})", file=sys.stderr)
        return 2
    images = []
    for path in args.image:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (OSError, ValueError) as exc:
            print(f"axpo: cannot read image {path}: {exc}", file=sys.stderr)
            return 2
    protocol = _protocol_for(cfg.model.name)
    loop_cfg = AgentLoopConfig.from_rollout_config(cfg.rollout, tool_timeout_s=cfg.tools.timeout_s)
    with build_command_tools(cfg, [args.name]) as tools:
        report = run_tool_call(protocol, dict(tools), args.name, args.args, images, loop_cfg)
    status = "ok" if report.error is None else f"error ({report.error})"
    print(f"call: {report.call_text!r}")
    print(f"status: {status} in {report.duration_s * 1000:.1f} ms; observation: {report.observation_tokens} tokens")
    print("observation:")
    print(report.observation)
    if not report.fits_budget:
        print(f"note: prompt + call + observation exceed rollout.max_total_tokens={cfg.rollout.max_total_tokens}; "
              "in training this trajectory would end here")
    for path, img in zip(save_images(report.images, args.out), report.images, strict=True):
        print(f"image: {path} ({img.width}x{img.height})")
    return 0 if report.error is None else 1


def _load(args: argparse.Namespace, extra: Sequence[str] = ()):
    from omegaconf import OmegaConf

    from axpo_nemo.config import load_config_tree

    tree = load_config_tree(args.config, [*extra, *args.overrides])
    return OmegaConf.to_object(tree), tree


def _report_run(result) -> int:
    from axpo_nemo.run.stop import EXIT_STOPPED

    print(f"\nrun folder: {result.output_dir}  ({result.seconds:.0f} s)")
    for name, path in result.paths.items():
        print(f"  {name:<7} {path}")
    if result.eval_summary:
        keys = [k for k in result.eval_summary if "/" not in k and (k.startswith("pass@") or k in ("tool_use_rate", "accuracy"))]
        print("  eval    " + "  ".join(f"{k}={result.eval_summary[k]:.3f}" for k in keys))
    if result.stopped:
        print(f"stopped by a signal after checkpointing; run the same command again to continue (exit {EXIT_STOPPED})")
        return EXIT_STOPPED
    return 0


def _train(args: argparse.Namespace) -> int:
    from axpo_nemo.local.pipeline import run_train

    cfg, tree = _load(args)
    if cfg.backend == "nemo":
        return _run_nemo(args, None)
    if cfg.backend != "local":
        print(f"axpo: backend '{cfg.backend}' is not available in this build; use backend=local", file=sys.stderr)
        return 2
    return _report_run(run_train(cfg, tree))


def _run_nemo(args: argparse.Namespace, stage: str | None) -> int:
    """Hand a ``backend=nemo`` run to the NeMo-RL entry point (exit 2 when NeMo-RL is missing).

    ``stage`` None: the one of sft/rl that ``train.stages`` names."""
    from axpo_nemo.nemo.train import run

    return run(args.config, args.overrides, stage=stage)


def _sft(args: argparse.Namespace) -> int:
    from axpo_nemo.local.pipeline import run_train

    cfg, tree = _load(args, ["train.stages=[data,sft]"])
    if cfg.backend == "nemo":
        return _run_nemo(args, "sft")
    return _report_run(run_train(cfg, tree))


def _data_synth(args: argparse.Namespace) -> int:
    from axpo_nemo.data.synth import synthesize

    cfg, _ = _load(args)
    made = synthesize(cfg.data.synth, args.out)
    print(f"wrote {args.out}: {made.counts} in {made.elapsed_s:.1f} s")
    return 0


def _shard_cfg(args: argparse.Namespace):
    from axpo_nemo.data.shards import ShardConfig

    return ShardConfig(max_samples=args.shard_samples, max_bytes=int(args.shard_mb * 2**20))


@contextlib.contextmanager
def _overwrite_hint(out: str) -> Iterator[None]:
    """Name the command's own option when the output folder already holds a dataset."""
    try:
        yield
    except FileExistsError as exc:
        raise FileExistsError(f"{out} already holds a dataset; --overwrite replaces it") from exc


#: Without a terminal, progress is a plain line at most this often (and at the end).
PLAIN_PROGRESS_INTERVAL_S = 10.0


class _Progress:
    """Progress of a long command as ``axpo train`` shows it: rich bars on a terminal, else a plain
    line every `PLAIN_PROGRESS_INTERVAL_S`. Each phase (a benchmark, the rows of a file) starts
    on its first count; `counter` gives a ``progress(done)`` callback for one phase."""

    def __init__(self, unit: str) -> None:
        from axpo_nemo.run.metrics_log import ProgressDisplay

        self.unit = unit
        self.display = ProgressDisplay(min_interval_s=PLAIN_PROGRESS_INTERVAL_S)
        self.started: set[str] = set()

    def __enter__(self) -> _Progress:
        self.display.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for phase in self.started:
            self.display.finish(phase)
        self.display.close()

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        """Count ``done`` of ``total`` (None: unknown) units of ``phase``."""
        if phase not in self.started:
            self.started.add(phase)
            self.display.add_phase(phase, total, unit=self.unit)
        self.display.update(phase, done)

    def counter(self, phase: str, total: int | None) -> Callable[[int], None]:
        """A ``progress(done)`` callback for ``phase``."""
        return lambda done: self(phase, done, total)


def _count_items(path: str) -> int | None:
    """How many rows or samples ``path`` holds, where that is cheap to know (else None)."""
    from pathlib import Path

    p = Path(path)
    try:
        if p.is_dir():
            from axpo_nemo.data.shards import ShardReader

            with ShardReader(p) as reader:
                return len(reader)
        if p.suffix.lower() == ".jsonl":
            with p.open("rb") as f:
                return sum(1 for line in f if line.strip())
        if p.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.ParquetFile(p).metadata.num_rows
    except (OSError, ValueError, ImportError):
        pass  # the command itself reports what is wrong with the input
    return None


def _data_convert(args: argparse.Namespace) -> int:
    from axpo_nemo.data.converters import ConvertConfig, convert

    cfg = ConvertConfig(
        output=args.output, image_root=args.image_root, allowed_tools=args.allowed_tool,
        max_pass_rate=args.max_pass_rate, keep_responses=args.keep_responses, limit=args.limit,
        shard=_shard_cfg(args),
    )  # fmt: skip
    total = _count_items(args.input)
    if total is not None and args.limit is not None:
        total = min(total, args.limit)
    with _overwrite_hint(args.out), _Progress("row") as progress:
        report = convert(
            args.format, args.input, args.out, cfg, overwrite=args.overwrite,
            progress=progress.counter("convert", total),
        )  # fmt: skip
    for bad in report.bad_examples:
        print(f"  bad row {bad['row']}: {bad['error']}", file=sys.stderr)
    if report.bad > len(report.bad_examples):
        print(f"  ... and {report.bad - len(report.bad_examples)} more bad rows", file=sys.stderr)
    print(report.summary())
    print(f"written: {args.out} (bad rows: {args.out}/bad_rows.jsonl, report: {args.out}/convert_report.json)")
    return 0 if report.written or not report.rows else 1


def _data_filter_sft(args: argparse.Namespace) -> int:
    from axpo_nemo.data.sft_filter import filter_sft

    cfg, _ = _load(args)
    with _overwrite_hint(args.out), _Progress("trajectory") as progress:
        report = filter_sft(
            args.input, args.out, output=args.output, shard_cfg=_shard_cfg(args), reward_cfg=cfg.reward,
            overwrite=args.overwrite, allow_incomplete=args.allow_incomplete,
            progress=progress.counter("filter-sft", _count_items(args.input)),
        )  # fmt: skip
    print(report.summary())
    return 0


def _data_prune(args: argparse.Namespace) -> int:
    from axpo_nemo.data.prune import PruneConfig, prune_pool

    cfg = PruneConfig(
        k=args.k, drop_sft_solved=not args.keep_sft_solved, drop_teacher_failed=not args.keep_teacher_failed,
        missing=args.missing,
    )  # fmt: skip
    with _overwrite_hint(args.out), _Progress("question") as progress:
        report = prune_pool(
            args.pool, args.out, args.sft_results, args.teacher_results, cfg, output=args.output,
            shard_cfg=_shard_cfg(args), overwrite=args.overwrite, allow_incomplete=args.allow_incomplete,
            progress=progress.counter("prune", _count_items(args.pool)),
        )  # fmt: skip
    print(report.summary())
    print(f"written: {args.out} (dropped ids: {args.out}/pruned.jsonl, report: {args.out}/prune_report.json)")
    return 0


def _eval_suite(args: argparse.Namespace) -> int:
    from axpo_nemo.engines import EngineUnavailable, run_suite_command
    from axpo_nemo.eval.suite import paper_table

    if not args.data_dir:
        print("axpo: --suite needs --data-dir (a folder with one sub-folder per benchmark)", file=sys.stderr)
        return 2
    cfg, _ = _load(args)
    try:
        with _Progress("question") as progress:
            result, paths = run_suite_command(
                cfg, suite=args.suite, data_dir=args.data_dir, out=args.out, engine=args.engine,
                run=args.run, label=args.label, progress=progress,
            )  # fmt: skip
    except (EngineUnavailable, FileNotFoundError, ValueError) as exc:
        print(f"axpo: {exc}", file=sys.stderr)
        return 2
    print(paper_table([result]))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.suite:
        return _eval_suite(args)

    from axpo_nemo.agent.protocol import ChatProtocol
    from axpo_nemo.agent.sample import read_samples
    from axpo_nemo.engines import local_generator
    from axpo_nemo.eval.passk import evaluate
    from axpo_nemo.local.pipeline import Pipeline
    from axpo_nemo.models import build_policy
    from axpo_nemo.run.run_folder import bundle_from_run

    cfg, _ = _load(args)
    bundle = bundle_from_run(args.run, cfg) if args.run else build_policy(cfg.model, seed=cfg.seed)
    questions_path = Path(args.questions) if args.questions else Pipeline(cfg).data_dir / cfg.data.eval_file
    questions = list(read_samples(questions_path))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(cfg)
    with pipeline._tools() as tools, _Progress("question") as progress:
        report = evaluate(
            local_generator(bundle), ChatProtocol(bundle.processor), tools, questions, questions_path.parent, cfg.eval,
            pipeline.loop_cfg, results_path=out / "results.jsonl", model_id=str(args.run or cfg.model.name),
            reward_cfg=cfg.reward, progress=lambda done, total: progress("eval", done, total),
        )  # fmt: skip
    (out / "report.md").write_text(report.to_markdown())
    (out / "report.json").write_text(report.to_json())
    print(report.to_markdown())
    print(f"written: {out / 'report.md'}, {out / 'report.json'}, {out / 'results.jsonl'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from axpo_nemo.export.quantize import QuantizationUnavailable, QuantizeConfig
    from axpo_nemo.nemo.adapter import NemoRLUnavailable
    from axpo_nemo.nemo.export_megatron import export_any

    cfg, _ = _load(args)
    quant, schemas = None, None
    if args.quantize:
        from axpo_nemo.run.toolset import tool_schemas

        extra = {"exclude": args.quant_exclude} if args.quant_exclude else {}
        quant = QuantizeConfig(
            format=args.quantize, calib_samples=args.calib_samples, device=args.device, **extra
        )
        schemas, _ = tool_schemas(cfg)  # calibration prompts declare the tools, as rollouts do
    try:
        made = export_any(
            args.run, args.out, source_format=args.format, step=args.step, cfg=cfg,
            hf_model_name=args.hf_model_name, processor_from=args.processor_from,
            chat_template=args.chat_template, strict=not args.no_strict, overwrite=args.overwrite,
            quantize=quant, calib_data=args.calib_data, tool_schemas=schemas,
        )  # fmt: skip
    except (NemoRLUnavailable, QuantizationUnavailable, OSError, ValueError) as exc:
        print(f"axpo: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.run} ({made.source_format}) to {made.path}")
    if made.quantized is not None:
        q = made.quantized
        print(f"  {q.format.name}: {len(q.quantized)} modules quantized, {len(q.excluded)} kept unquantized")
        print(f"  serve: {q.vllm_command}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from axpo_nemo.local.plots import compare_runs

    pngs, table = compare_runs(args.runs, args.out)
    print(table)
    for png in pngs:
        print(f"plot: {png}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from axpo_nemo.config import load_config
    from axpo_nemo.nemo.cluster_layout import PlanError
    from axpo_nemo.nemo.cluster_plan import plan

    # `axpo plan CONFIG [KEY=VALUE ...]`: a leading argument without '=' names the config.
    overrides = list(args.overrides)
    if overrides and "=" not in overrides[0]:
        if args.config:
            print("axpo: plan: give the config either as --config or as the first argument", file=sys.stderr)
            return 2
        args.config = overrides.pop(0)
    cfg = load_config(args.config, overrides)
    try:
        report = plan(cfg, str(args.config or "demo"))
    except PlanError as exc:
        print(f"axpo: plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0 if report.ok else 1
