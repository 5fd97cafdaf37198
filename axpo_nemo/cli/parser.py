"""The ``axpo`` argument parser: every subcommand, its options and its handler."""

from __future__ import annotations

import argparse

from axpo_nemo import __version__
from axpo_nemo.cli import commands as handlers
from axpo_nemo.cli.errors import DEBUG_ENV


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
    show.set_defaults(handler=handlers._config_show)
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
    keys.set_defaults(handler=handlers._config_keys)

    train = commands.add_parser(
        "train",
        help="the whole local job: data, SFT, AXPO/GRPO, eval, export, plots (default config: the demo)",
        description="Run the local pipeline. With no arguments this is the embedded demo (conf/demo.yaml): "
        "a tiny Qwen3-VL, the synthetic tool task, SFT, AXPO, evaluation, export and plots. "
        "`axpo train algorithm=grpo` is its GRPO baseline. Rerunning the same command resumes.",
    )
    _add_config_args(train)
    train.set_defaults(handler=handlers._train)
    sft = commands.add_parser("sft", help="data and SFT stages only", description="Run the data and SFT stages.")
    _add_config_args(sft)
    sft.set_defaults(handler=handlers._sft)

    data = commands.add_parser("data", help="datasets", description="Dataset commands.")
    data_commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    synth = data_commands.add_parser(
        "synth", help="generate the synthetic multimodal tool task", description="Generate the synthetic task (data.synth.*)."
    )
    synth.add_argument("--out", required=True, help="output folder")
    _add_config_args(synth)
    synth.set_defaults(handler=handlers._data_synth)

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
    conv.set_defaults(handler=handlers._data_convert)

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
    filt.set_defaults(handler=handlers._data_filter_sft)

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
    prune.set_defaults(handler=handlers._data_prune)

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
    ev.set_defaults(handler=handlers._eval)

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
    export.set_defaults(handler=handlers._export)

    compare = commands.add_parser(
        "compare", help="overlay runs (e.g. GRPO vs AXPO) in one plot and table", description="Compare runs."
    )
    compare.add_argument("runs", nargs="+", help="run folders (each holds metrics.jsonl)")
    compare.add_argument("--out", default="compare_out", help="folder for the plots")
    compare.set_defaults(handler=handlers._compare)

    plan = commands.add_parser(
        "plan",
        help="check a cluster config's parallel layout and estimate per-GPU memory",
        description="Check a NeMo-RL cluster config (e.g. cluster/axpo_8b): TP/PP/CP/DP against the model and "
        "the GPUs, batch divisibility, and a per-GPU memory estimate per phase. Exit code 1 when the layout "
        "is invalid or does not fit cluster.gpu_memory_gib.",
    )
    plan.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_config_args(plan)
    plan.set_defaults(handler=handlers._plan)

    tools = commands.add_parser("tools", help="list and debug agent tools", description="List and debug agent tools.")
    tools_commands = tools.add_subparsers(dest="tools_command", metavar="SUBCOMMAND", required=True)
    listing = tools_commands.add_parser(
        "list", help="print the enabled tools' schemas as the model sees them", description="Print tool schemas."
    )
    _add_config_args(listing)
    listing.set_defaults(handler=handlers._tools_list)
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
    run.set_defaults(handler=handlers._tools_run)
    return parser
