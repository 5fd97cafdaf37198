"""The ``axpo`` command.

Every subcommand takes ``--config FILE`` (a path or a name under ``conf/``; default: the demo
config) followed by config overrides (``key=value``, ``+key=value``, ``++key=value``).

    axpo config show --config grpo axpo.r=0.5    # print the resolved config
    axpo config keys --config grpo tools         # the tools.* keys of a config, with their meaning
    axpo tools list                              # the enabled tools' schemas
    axpo tools run image_zoom_in --args '{"bbox_2d": [0, 0, 500, 500]}' --image photo.png
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from axpo_nemo import __version__

Handler = Callable[[argparse.Namespace], int]

#: Environment variable that, set to anything but "" or "0", shows tracebacks (as ``--debug``).
DEBUG_ENV = "AXPO_DEBUG"
#: Errors a user causes and can fix (a missing file or folder, a bad value, a corrupt shard, an
#: optional package not installed): their message names what is wrong, so the command prints that
#: one line. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, ModuleNotFoundError)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help="config file, or a name under conf/ such as 'grpo' or 'ablations/joint_groups' (default: demo)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides: key=value, +key=value, ++key=value"
    )


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
    from axpo_nemo.nemo.plan import PlanError, plan

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``axpo`` command with all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="axpo",
        description="AXPO: reinforcement learning that teaches vision-language models to use their tools.",
    )
    parser.add_argument("--version", action="version", version=f"axpo-nemo {__version__}")
    parser.add_argument(
        "--debug", action="store_true",
        help=f"show the traceback of an error (also: {DEBUG_ENV}=1; may follow the subcommand too)",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = commands.add_parser("config", help="inspect configurations", description="Inspect configurations.")
    config_commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = config_commands.add_parser(
        "show",
        help="print the resolved config (defaults composed, overrides applied, validated)",
        description="Print the resolved config: defaults composed, overrides applied, validated.",
    )
    _add_config_args(show)
    show.set_defaults(handler=_config_show)
    keys = config_commands.add_parser(
        "keys",
        help="list every config key with its value in the config a command would run, and its meaning",
        description="List config keys, one line each: 'key = value  # meaning', where value is the one the "
        "config (default: demo) and the overrides give, and '(default X)' marks a value that differs from "
        "the schema's. On a terminal each line is cut to its width (--full: never).",
    )
    keys.add_argument("--config", "-c", default=None, help="config file or name under conf/ (default: demo)")
    keys.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE|SECTION",
        help="config overrides, and sections to list (e.g. 'tools.search'; default: all keys)",
    )  # fmt: skip
    keys.add_argument("--width", type=int, default=None, help="cut lines to this many characters")
    keys.add_argument("--full", action="store_true", help="print the whole meaning of every key")
    keys.set_defaults(handler=_config_keys)

    train = commands.add_parser(
        "train",
        help="the whole local job: data, SFT, AXPO/GRPO, eval, export, plots (default config: the demo)",
        description="Run the local pipeline. With no arguments this is the embedded demo (conf/demo.yaml): "
        "a tiny Qwen3-VL, the synthetic tool task, SFT, AXPO, evaluation, export and plots. "
        "`axpo train algorithm=grpo` is its GRPO baseline. Rerunning the same command resumes.",
    )
    _add_config_args(train)
    train.set_defaults(handler=_train)
    sft = commands.add_parser("sft", help="data and SFT stages only", description="Run the data and SFT stages.")
    _add_config_args(sft)
    sft.set_defaults(handler=_sft)

    data = commands.add_parser("data", help="datasets", description="Dataset commands.")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    synth = data_commands.add_parser(
        "synth", help="generate the synthetic multimodal tool task", description="Generate the synthetic task (data.synth.*)."
    )
    synth.add_argument("--out", required=True, help="output folder")
    _add_config_args(synth)
    synth.set_defaults(handler=_data_synth)

    def output_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", choices=("shards", "jsonl"), default="shards", help="output kind (default: shards)")
        p.add_argument("--shard-samples", type=int, default=1000, help="samples per shard at most (default 1000)")
        p.add_argument("--shard-mb", type=float, default=256.0, help="shard size target in MiB (default 256)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")

    conv = data_commands.add_parser(
        "convert",
        help="convert a public dataset file (ViRL39K, FVQA, PyVision-RL, MMFineReason) into shards",
        description="Convert a public dataset file (.parquet/.json/.jsonl) into Sample shards or JSONL. "
        "Bad rows are reported with their row number and skipped.",
    )
    conv.add_argument(
        "--format", required=True, choices=("fvqa", "mmfinereason", "pyvision_rl", "virl39k"), help="dataset format"
    )
    conv.add_argument("input", help="dataset file (.parquet, .json or .jsonl)")
    conv.add_argument("out", help="output folder")
    conv.add_argument("--image-root", default=None, help="folder of relative image paths (default: the input's folder)")
    conv.add_argument("--allowed-tool", action="append", default=[], help="a tool the questions may use (repeatable)")
    conv.add_argument("--max-pass-rate", type=float, default=None, help="keep rows with pass rate <= this")
    conv.add_argument("--keep-responses", action="store_true", help="MMFineReason: keep the teacher response (SFT)")
    conv.add_argument("--limit", type=int, default=None, help="convert at most this many rows")
    output_args(conv)
    conv.set_defaults(handler=_data_convert)

    filt = data_commands.add_parser(
        "filter-sft",
        help="keep only SFT trajectories whose final answer verifies against the reference",
        description="Correctness filter for SFT trajectories (reward.* settings apply).",
    )
    filt.add_argument("input", help="trajectories: a JSONL file or a shard folder")
    filt.add_argument("out", help="output folder")
    output_args(filt)
    filt.add_argument(
        "--allow-incomplete", action="store_true",
        help="read an input shard folder whose writer did not finish (its finished shards)",
    )  # fmt: skip
    _add_config_args(filt)
    filt.set_defaults(handler=_data_filter_sft)

    prune = data_commands.add_parser(
        "prune",
        help="drop RL questions the SFT model solves k/k or the teacher fails k/k",
        description="Prune an RL question pool with rollout result files (the eval results.jsonl format).",
    )
    prune.add_argument("pool", help="questions: a JSONL file or a shard folder")
    prune.add_argument("out", help="output folder")
    prune.add_argument("--sft-results", action="append", required=True, help="SFT model results.jsonl (repeatable)")
    prune.add_argument("--teacher-results", action="append", required=True, help="teacher results.jsonl (repeatable)")
    prune.add_argument("-k", type=int, default=4, help="rollouts per question the rules need (default 4)")
    prune.add_argument("--keep-sft-solved", action="store_true", help="do not drop questions the SFT model solves")
    prune.add_argument("--keep-teacher-failed", action="store_true", help="do not drop questions the teacher fails")
    prune.add_argument("--missing", choices=("keep", "drop"), default="keep", help="questions without records")
    output_args(prune)
    prune.add_argument(
        "--allow-incomplete", action="store_true",
        help="read an input shard folder whose writer did not finish (its finished shards)",
    )  # fmt: skip
    prune.set_defaults(handler=_data_prune)

    ev = commands.add_parser(
        "eval", help="Pass@k with tool metrics on a question file", description="Evaluate a run's model or model.name."
    )
    ev.add_argument("--run", default=None, help="a run folder (its newest RL checkpoint, else its SFT model)")
    ev.add_argument("--questions", default=None, help="question JSONL (default: the data folder's eval file)")
    ev.add_argument("--out", default="eval_out", help="report folder; results.jsonl there makes the eval resumable")
    ev.add_argument(
        "--suite",
        default=None,
        help="run the benchmark suite instead: all, reasoning, perception, search, or a comma list of "
        "groups and benchmarks (mathvision, dynamath, mathverse, wemath, hrbench_4k, hrbench_8k, "
        "visualprobe, vstar, hr_mmsearch, fvqa, mmsearch)",
    )
    ev.add_argument("--data-dir", default=None, help="--suite: folder with one sub-folder per benchmark")
    ev.add_argument(
        "--engine", default="local", choices=("local", "vllm"),
        help="--suite: sample with the local generator, or vLLM through NeMo-RL (container)",
    )  # fmt: skip
    ev.add_argument("--label", default=None, help="--suite: the model's row name (default: run/model folder name)")
    _add_config_args(ev)
    ev.set_defaults(handler=_eval)

    export = commands.add_parser(
        "export",
        help="write a run's or cluster checkpoint's model as a Hugging Face folder",
        description="Export a local run, NeMo-RL checkpoint or Hugging Face folder, optionally quantized.",
    )
    export.add_argument(
        "--run", "--checkpoint", dest="run", required=True,
        help="local run folder, NeMo-RL checkpoint_dir or step_N folder, or Hugging Face folder",
    )  # fmt: skip
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.add_argument(
        "--format", default="auto", choices=("auto", "local", "megatron", "dtensor", "hf"),
        help="what --run is (default: detected)",
    )  # fmt: skip
    export.add_argument("--step", type=int, default=None, help="NeMo-RL step (default: newest complete)")
    export.add_argument("--hf-model-name", default=None, help="override the checkpoint's policy.model_name")
    export.add_argument("--processor-from", default=None, help="folder with the processor and tokenizer")
    export.add_argument(
        "--chat-template", default="axpo", help="'axpo' (the project's), 'source' (the processor's) or a file"
    )
    export.add_argument("--no-strict", action="store_true", help="Megatron: save even if weights are missing")
    export.add_argument(
        "--quantize", default=None, choices=("fp8", "fp8_pc_pt", "nvfp4", "mxfp8"),
        help="write a Model Optimizer quantized folder (needs axpo-nemo[quant])",
    )  # fmt: skip
    export.add_argument("--calib-data", default=None, help="questions to calibrate on (default: rl.jsonl)")
    export.add_argument("--calib-samples", type=int, default=32, help="calibration questions")
    export.add_argument(
        "--quant-exclude", action="append", default=None, metavar="GLOB",
        help="module-name glob kept in high precision (repeat; replaces the defaults)",
    )  # fmt: skip
    export.add_argument("--device", default="auto", help="calibration device: auto, cpu, cuda")
    _add_config_args(export)
    export.set_defaults(handler=_export)

    compare = commands.add_parser(
        "compare", help="overlay runs (e.g. GRPO vs AXPO) in one plot and table", description="Compare runs."
    )
    compare.add_argument("runs", nargs="+", help="run folders (each holds metrics.jsonl)")
    compare.add_argument("--out", default="compare_out", help="folder for the plots")
    compare.set_defaults(handler=_compare)

    plan = commands.add_parser(
        "plan",
        help="check a cluster config's parallel layout and estimate per-GPU memory",
        description="Check a NeMo-RL cluster config (e.g. cluster/axpo_8b): TP/PP/CP/DP against the model and "
        "the GPUs, batch divisibility, and a per-GPU memory estimate per phase. Exit code 1 when the layout "
        "is invalid or does not fit cluster.gpu_memory_gib.",
    )
    plan.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_config_args(plan)
    plan.set_defaults(handler=_plan)

    tools = commands.add_parser("tools", help="list and debug agent tools", description="List and debug agent tools.")
    tools_commands = tools.add_subparsers(dest="tools_command", metavar="SUBCOMMAND", required=True)
    listing = tools_commands.add_parser(
        "list", help="print the enabled tools' schemas as the model sees them", description="Print tool schemas."
    )
    _add_config_args(listing)
    listing.set_defaults(handler=_tools_list)
    run = tools_commands.add_parser(
        "run",
        help="run one tool call exactly as training would and print the observation",
        description="Run one tool call through the agent loop (parsing, timeout, observation rendering) "
        "and print what the model would see. Exit code 1 when the call ends in an error observation.",
    )
    run.add_argument("name", help="tool name, e.g. image_zoom_in, python, search")
    run.add_argument("--args", required=True, help='arguments as JSON, e.g. \'{"bbox_2d": [0, 0, 500, 500]}\'')
    run.add_argument("--image", action="append", default=[], help="an image of the question (repeatable)")
    run.add_argument("--out", default="tool_outputs", help="folder for images the tool returns (default: tool_outputs)")
    _add_config_args(run)
    run.set_defaults(handler=_tools_run)
    return parser


def _one_line(exc: BaseException) -> str:
    """An exception's message as one line (an OSError with a file name: ``path: reason``)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(lines) <= 1 else f"{text} …"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``axpo`` console script; returns the process exit code.

    A user error (see `USER_ERRORS`; config errors included) prints one line on stderr and exits
    with 2; ``--debug`` or ``AXPO_DEBUG=1`` shows its traceback instead.
    """
    from axpo_nemo.config import ConfigError

    parser = build_parser()
    # Overrides may follow options (`run NAME --args … key=value`), which argparse leaves unparsed;
    # so may --debug.
    args, extra = parser.parse_known_args(argv)
    debug = args.debug or "--debug" in extra or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    extra = [x for x in extra if x != "--debug"]
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.handler(args)
    except ConfigError as exc:
        if debug:
            raise
        print(f"axpo: config error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"axpo: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
