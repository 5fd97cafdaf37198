"""Export NeMo-RL (v0.7.0) cluster checkpoints as complete Hugging Face Qwen3-VL folders.

**Checkpoint layout.** NeMo-RL writes ``checkpoint_dir/step_N/`` with ``config.yaml`` (the run's
master config), ``training_info.json`` and ``policy/{weights,optimizer,tokenizer}``. A save is
written to ``tmp_step_N`` and renamed on finalize, so a ``step_N`` folder is a finished save. Its
``policy/weights`` holds one of:

* ``iter_NNNNNNN/`` (Megatron backend; ``latest_checkpointed_iteration.txt`` beside it names
  the newest): converted with NeMo-RL's ``export_model_from_megatron`` (Megatron-Bridge), the
  function ``examples/converters/convert_megatron_to_hf.py`` calls;
* ``model/consolidated/`` with ``config.json`` and safetensors (DTensor v2 policy with
  ``checkpointing.save_consolidated: true``): already a Hugging Face folder, copied as is;
* a torch-DCP checkpoint (``.metadata`` in ``weights/`` for DTensor v1, in ``weights/model/``
  for v2): converted with NeMo-RL's ``convert_dcp_to_hf`` (``convert_dcp_to_hf.py``'s function).

**Why in-process.** The converters are called as functions through `axpo_nemo.nemo.adapter`
rather than as subprocesses of the example scripts: ``examples/`` is not part of the installed
``nemo_rl`` package (its path differs between the container and a source checkout), the scripts
take only a subset of the functions' arguments, and an in-process call reports failures as
Python exceptions with their cause instead of an exit code. Megatron export runs on CPU
(NeMo-RL sets up a gloo process group itself), so this needs no GPU, but it needs NeMo-RL with
its ``mcore`` extra: inside the ``nvcr.io/nvidia/nemo-rl:v0.7.0`` container. Without NeMo-RL
the error names what is missing and gives both ways to run it.

**Completion.** The converted folder holds weights and ``config.json``; the processor (image
processor and tokenizer) is then taken from, in order: ``processor_from``, the step's
``policy/tokenizer`` (DTensor saves write the processor there; Megatron saves do not), the
consolidated folder itself, and the base model named by ``policy.model_name`` (a local folder or
a model in the Hugging Face cache). The chat template defaults to the project's, which the
policy was trained with. `axpo_nemo.export.hf.complete_hf_folder` writes both and checks that
the folder loads. Output is written to a temporary folder and renamed into place.

`export_any` is what ``axpo export`` runs: it detects the source (local run, NeMo-RL checkpoint,
Hugging Face folder), exports it, and for ``--quantize`` converts at full precision first and
hands the model to `axpo_nemo.export.quantize`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from axpo_nemo.export.hf import complete_hf_folder, resolve_chat_template
from axpo_nemo.nemo import adapter
from axpo_nemo.run.atomic import atomic_output_dir

__all__ = [
    "SOURCE_FORMATS",
    "CheckpointLayoutError",
    "ExportResult",
    "NemoRLCheckpoint",
    "ProcessorNotFoundError",
    "detect_format",
    "export_any",
    "export_hf_folder",
    "export_nemo_rl_checkpoint",
    "find_nemo_rl_checkpoint",
    "resolve_processor",
]

logger = logging.getLogger(__name__)

#: What ``axpo export --format`` accepts: ``auto`` detects one of the others from the folder.
SOURCE_FORMATS = ("auto", "local", "megatron", "dtensor", "hf")

_STEP_RE = re.compile(r"^step_(\d+)$")
_ITER_RE = re.compile(r"^iter_(\d+)$")
#: A folder's files that show it is a NeMo-RL step folder.
_STEP_MARKERS = ("config.yaml", "policy")


class CheckpointLayoutError(ValueError):
    """A folder is not (or not a complete) checkpoint of the expected layout."""


class ProcessorNotFoundError(FileNotFoundError):
    """No processor (image processor + tokenizer) could be found for an export."""


@dataclass(frozen=True)
class NemoRLCheckpoint:
    """One finished NeMo-RL save.

    Attributes:
        step_dir: the ``step_N`` folder.
        step: N.
        kind: ``megatron`` (``policy/weights/iter_*``), ``dtensor_consolidated``
            (``policy/weights/model/consolidated``) or ``dtensor_dcp`` (torch DCP).
        weights: what the converter reads: the ``iter_*`` folder, the consolidated folder, or
            ``policy/weights`` for DCP.
    """

    step_dir: Path
    step: int
    kind: str
    weights: Path

    @property
    def config_path(self) -> Path:
        """The run's master config saved with the step."""
        return self.step_dir / "config.yaml"

    def policy_config(self) -> dict[str, Any]:
        """The ``policy`` section of the saved config (model name, tokenizer, hf_overrides)."""
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise CheckpointLayoutError(f"{self.config_path}: not valid YAML ({exc})") from exc
        policy = data.get("policy") if isinstance(data, dict) else None
        if not isinstance(policy, dict) or not policy.get("model_name"):
            raise CheckpointLayoutError(f"{self.config_path}: no policy.model_name (is it a NeMo-RL config?)")
        return policy

    @property
    def format(self) -> str:
        """The `SOURCE_FORMATS` name of this checkpoint (``megatron`` or ``dtensor``)."""
        return "megatron" if self.kind == "megatron" else "dtensor"


def _is_step_dir(path: Path) -> bool:
    return all((path / name).exists() for name in _STEP_MARKERS)


def _step_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    steps = []
    for child in checkpoint_dir.iterdir():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir():
            steps.append((int(match.group(1)), child))
    return sorted(steps)


def _latest_iteration(weights: Path) -> Path | None:
    iters = sorted(
        (int(m.group(1)), p) for p in weights.iterdir() if p.is_dir() and (m := _ITER_RE.match(p.name))
    )
    if not iters:
        return None
    tracker = weights / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        try:
            named = int(tracker.read_text().strip())
        except ValueError:
            named = None
        for number, path in iters:
            if number == named:
                return path
    return iters[-1][1]


def _read_step(step_dir: Path) -> NemoRLCheckpoint:
    """The checkpoint in ``step_dir``; CheckpointLayoutError naming what is missing otherwise."""
    match = _STEP_RE.match(step_dir.name)
    if match is None:
        raise CheckpointLayoutError(f"{step_dir}: a NeMo-RL step folder is named step_N")
    if not (step_dir / "config.yaml").is_file():
        raise CheckpointLayoutError(f"{step_dir}: no config.yaml (an unfinished or foreign save)")
    weights = step_dir / "policy" / "weights"
    if not weights.is_dir():
        raise CheckpointLayoutError(f"{step_dir}: no policy/weights folder")
    step = int(match.group(1))
    iteration = _latest_iteration(weights)
    if iteration is not None:
        if not any(iteration.iterdir()):
            raise CheckpointLayoutError(f"{iteration}: the Megatron checkpoint folder is empty")
        return NemoRLCheckpoint(step_dir, step, "megatron", iteration)
    consolidated = weights / "model" / "consolidated"
    if (consolidated / "config.json").is_file():
        return NemoRLCheckpoint(step_dir, step, "dtensor_consolidated", consolidated)
    if (weights / ".metadata").is_file() or (weights / "model" / ".metadata").is_file():
        return NemoRLCheckpoint(step_dir, step, "dtensor_dcp", weights)
    raise CheckpointLayoutError(
        f"{weights}: no Megatron iter_* folder, no model/consolidated/config.json and no torch-DCP "
        ".metadata (sharded safetensors without consolidation cannot be exported: save with "
        "checkpointing.save_consolidated=true)"
    )


def find_nemo_rl_checkpoint(
    path: str | os.PathLike, step: int | None = None, *, kind: str | None = None
) -> NemoRLCheckpoint:
    """The NeMo-RL checkpoint at ``path``: a ``step_N`` folder, or a ``checkpoint_dir`` holding them.

    Args:
        path: a step folder or a checkpoint_dir.
        step: the step to export; None takes the newest complete step (a newer incomplete one
            is skipped with a warning). With a step folder, it must match the folder's N.
        kind: ``megatron`` or ``dtensor`` to require that format.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointLayoutError: no (complete) step, the requested step is missing or incomplete,
            or the step is not of ``kind``; the message lists what was found.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"export: checkpoint folder {path} does not exist")
    if _STEP_RE.match(path.name) and _is_step_dir(path):
        ckpt = _read_step(path)
        if step is not None and step != ckpt.step:
            raise CheckpointLayoutError(f"--step {step} given, but {path} is step {ckpt.step}")
    else:
        steps = _step_dirs(path)
        if not steps:
            pending = sorted(p.name for p in path.glob("tmp_step_*"))
            extra = f"; only unfinished saves: {pending}" if pending else ""
            raise CheckpointLayoutError(f"{path}: no step_N folders (not a NeMo-RL checkpoint_dir){extra}")
        if step is not None:
            by_step = dict(steps)
            if step not in by_step:
                raise CheckpointLayoutError(f"{path}: no step_{step}; steps present: {[n for n, _ in steps]}")
            ckpt = _read_step(by_step[step])
        else:
            ckpt = None
            problems = []
            for _, step_dir in reversed(steps):
                try:
                    ckpt = _read_step(step_dir)
                    break
                except CheckpointLayoutError as exc:
                    logger.warning("export: skipping %s (%s)", step_dir.name, exc)
                    problems.append(str(exc))
            if ckpt is None:
                raise CheckpointLayoutError(f"{path}: no complete step folder: " + "; ".join(problems))
    if kind is not None and ckpt.format != kind:
        raise CheckpointLayoutError(
            f"--format {kind} given, but {ckpt.step_dir} is a {ckpt.format} checkpoint ({ckpt.kind})"
        )
    return ckpt


def _is_local_run(path: Path) -> bool:
    return (path / "sft" / "final.pt").is_file() or (path / "rl" / "checkpoints").is_dir()


def detect_format(path: str | os.PathLike, step: int | None = None) -> str:
    """Which of `SOURCE_FORMATS` (other than ``auto``) the folder ``path`` is.

    ``hf``: a Hugging Face folder (``config.json``); ``megatron`` / ``dtensor``: a NeMo-RL step
    folder or checkpoint_dir (by the chosen step's weights); ``local``: a run folder of the local
    trainer (``sft/final.pt`` or ``rl/checkpoints/``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointLayoutError: none of these layouts (the message says what each one needs), or
            a NeMo-RL checkpoint without a complete step.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"export: {path} does not exist")
    if (path / "config.json").is_file() and not (path / "policy").exists():
        return "hf"
    if (_STEP_RE.match(path.name) and _is_step_dir(path)) or any(
        _is_step_dir(p) for _, p in _step_dirs(path)
    ):
        return find_nemo_rl_checkpoint(path, step).format
    if _is_local_run(path):
        return "local"
    raise CheckpointLayoutError(
        f"export: cannot tell what {path} is. Expected a local run folder (sft/final.pt or "
        "rl/checkpoints/), a NeMo-RL checkpoint_dir or one of its step_N folders (config.yaml and "
        "policy/weights/), or a Hugging Face folder (config.json); pass --format to say which"
    )


def _processor_candidates(*paths: str | os.PathLike | None) -> list[str]:
    seen: list[str] = []
    for p in paths:
        if p is not None and str(p) and str(p) not in seen:
            seen.append(str(p))
    return seen


def resolve_processor(*candidates: str | os.PathLike | None) -> tuple[Any, str]:
    """Load the first Qwen3-VL processor (image processor and tokenizer) among ``candidates``.

    Each candidate is a folder or a model name in the local Hugging Face cache (never
    downloaded); None entries are skipped.

    Returns:
        (processor, the candidate it came from).

    Raises:
        ProcessorNotFoundError: none loads; the message lists every candidate and why.
    """
    from axpo_nemo.models import load_processor

    tried = []
    for candidate in _processor_candidates(*candidates):
        path = Path(candidate).expanduser()
        try:
            processor = load_processor(path if path.exists() else candidate)
        except Exception as exc:  # missing files, not a processor folder, not in the cache
            tried.append(
                f"{candidate} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            )
            continue
        if getattr(processor, "image_processor", None) is None:
            tried.append(f"{candidate} (no image processor)")
            continue
        return processor, candidate
    raise ProcessorNotFoundError(
        "export: no Qwen3-VL processor found; tried: "
        + ("; ".join(tried) if tried else "nothing")
        + ". Pass --processor-from with the base model's folder (preprocessor_config.json and "
        "tokenizer files)"
    )


def _base_generation_config(model_name: str | None):
    from transformers import GenerationConfig

    if not model_name:
        return None
    try:
        return GenerationConfig.from_pretrained(model_name, local_files_only=True)
    except Exception:  # not a local folder or cached model: derived from config.json instead
        return None


def _move_contents(src: Path, dst: Path) -> None:
    for entry in src.iterdir():
        os.replace(entry, dst / entry.name)
    src.rmdir()


def _converter(name: str, ckpt: NemoRLCheckpoint, out_hint: str):
    """The adapter's converter ``name``; without NeMo-RL, an error saying how to run the export."""
    try:
        return getattr(adapter, name)()
    except adapter.NemoRLUnavailable as exc:
        weights, config = ckpt.weights, ckpt.config_path
        if ckpt.kind == "megatron":
            need = "NeMo-RL with Megatron-Bridge (its mcore extra)"
            script = (
                "uv run --extra mcore python examples/converters/convert_megatron_to_hf.py "
                f"--config {config} --megatron-ckpt-path {weights} --hf-ckpt-path HF_DIR"
            )
        else:
            need = "NeMo-RL"
            script = (
                "uv run python examples/converters/convert_dcp_to_hf.py "
                f"--config {config} --dcp-ckpt-path {weights} --hf-ckpt-path HF_DIR"
            )
        raise adapter.NemoRLUnavailable(
            f"export: converting the {ckpt.format} checkpoint {ckpt.step_dir} needs {need} "
            f"v{adapter.NEMO_RL_VERSION}, which is not importable here ({exc.__cause__ or exc}). Either run "
            f"the same `axpo export` inside the nvcr.io/nvidia/nemo-rl:v{adapter.NEMO_RL_VERSION} "
            "container with axpo-nemo installed in NeMo-RL's environment (`uv run --extra mcore axpo "
            f"export ...` from the NeMo-RL folder), or convert there with NeMo-RL's script: `{script}`, "
            f"and complete the folder anywhere with `axpo export --checkpoint HF_DIR --out {out_hint}`"
        ) from exc


def export_nemo_rl_checkpoint(
    checkpoint: NemoRLCheckpoint | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    hf_model_name: str | None = None,
    processor_from: str | os.PathLike | None = None,
    chat_template: str | None = "axpo",
    strict: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a NeMo-RL checkpoint as a complete Hugging Face folder (see the module docstring).

    Args:
        checkpoint: a `NemoRLCheckpoint`, or a step folder / checkpoint_dir (see
            `find_nemo_rl_checkpoint`; ``step`` selects the step of a checkpoint_dir).
        out_dir: the folder to create.
        step: the step to export (None: the newest complete one).
        hf_model_name: overrides ``policy.model_name`` as the architecture the converter maps
            onto (and as the last processor candidate).
        processor_from: a folder (or cached model name) to take the processor from first.
        chat_template: ``"axpo"`` (the project's template), ``"source"`` (the processor's) or a
            template file (see `resolve_chat_template`).
        strict: Megatron export fails on weights missing from the checkpoint (NeMo-RL's
            ``--no-strict`` is ``strict=False``).
        overwrite: replace an existing ``out_dir``.

    Returns:
        The folder's path.

    Raises:
        CheckpointLayoutError, ProcessorNotFoundError, FileExistsError, and
        `adapter.NemoRLUnavailable` when a conversion needs NeMo-RL and it is missing.
    """
    ckpt = (
        checkpoint if isinstance(checkpoint, NemoRLCheckpoint) else find_nemo_rl_checkpoint(checkpoint, step)
    )
    policy = ckpt.policy_config()
    model_name = hf_model_name or str(policy["model_name"])
    tokenizer_name = str((policy.get("tokenizer") or {}).get("name") or model_name)
    hf_overrides = policy.get("hf_overrides") or {}
    convert = None
    if ckpt.kind != "dtensor_consolidated":  # fail before any work when NeMo-RL is missing
        name = "export_model_from_megatron" if ckpt.kind == "megatron" else "convert_dcp_to_hf"
        convert = _converter(name, ckpt, str(out_dir))
    with atomic_output_dir(out_dir, overwrite) as tmp:
        converted = tmp / "_converted"
        logger.info("export: converting %s (%s, step %d)", ckpt.weights, ckpt.kind, ckpt.step)
        if ckpt.kind == "megatron":
            convert(
                hf_model_name=model_name,
                input_path=str(ckpt.weights),
                output_path=str(converted),
                hf_tokenizer_path=tokenizer_name,
                hf_overrides=hf_overrides,
                strict=strict,
            )
        elif ckpt.kind == "dtensor_dcp":
            convert(
                dcp_ckpt_path=str(ckpt.weights),
                hf_ckpt_path=str(converted),
                model_name_or_path=model_name,
                tokenizer_name_or_path=tokenizer_name,
                hf_overrides=hf_overrides,
            )
        else:
            shutil.copytree(ckpt.weights, converted)
        _move_contents(converted, tmp)
        processor, source = resolve_processor(
            processor_from, ckpt.step_dir / "policy" / "tokenizer", tmp, model_name
        )
        logger.info("export: processor from %s", source)
        complete_hf_folder(
            tmp,
            processor,
            chat_template=resolve_chat_template(chat_template, processor),
            generation_config=_base_generation_config(model_name),
        )
    return Path(out_dir).expanduser().absolute()


def export_hf_folder(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    processor_from: str | os.PathLike | None = None,
    chat_template: str | None = "axpo",
    overwrite: bool = False,
) -> Path:
    """Copy a Hugging Face folder (e.g. a converter's output) to ``out_dir`` and complete it.

    The processor comes from ``processor_from`` if given, else from ``source`` itself (see
    `resolve_processor`); ``chat_template`` as in `export_nemo_rl_checkpoint`.
    """
    source = Path(source).expanduser()
    if not (source / "config.json").is_file():
        raise CheckpointLayoutError(f"export: {source} has no config.json (not a Hugging Face folder)")
    processor, origin = resolve_processor(processor_from, source)
    logger.info("export: processor from %s", origin)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        complete_hf_folder(tmp, processor, chat_template=resolve_chat_template(chat_template, processor))
    return Path(out_dir).expanduser().absolute()


@dataclass
class ExportResult:
    """What `export_any` wrote.

    Attributes:
        path: the output folder.
        source_format: the `SOURCE_FORMATS` name the source was read as.
        quantized: the quantized export's description, when one was made.
    """

    path: Path
    source_format: str
    quantized: Any = None


def _default_calibration_file(source: Path, source_format: str, cfg: Any) -> Path | None:
    if source_format == "local" and cfg is not None:
        for folder in (source / "data", Path(cfg.data.dir) if cfg.data.dir else None):
            if folder is not None and (folder / cfg.data.rl_file).is_file():
                return folder / cfg.data.rl_file
    return None


def export_any(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    source_format: str = "auto",
    step: int | None = None,
    cfg: Any = None,
    hf_model_name: str | None = None,
    processor_from: str | os.PathLike | None = None,
    chat_template: str | None = "axpo",
    strict: bool = True,
    overwrite: bool = False,
    quantize: Any = None,
    calib_data: str | os.PathLike | None = None,
    tool_schemas: list[dict[str, Any]] | None = None,
) -> ExportResult:
    """Export any supported source as a complete Hugging Face folder, optionally quantized.

    Args:
        source: a local run folder, a NeMo-RL checkpoint_dir or step folder, or a Hugging Face
            folder (see `detect_format`).
        out_dir: the folder to create.
        source_format: one of `SOURCE_FORMATS`; ``auto`` detects it.
        step: the NeMo-RL step (None: the newest complete one).
        cfg: the project `Config` (needed for local runs: model architecture, checkpoint folder,
            and the default calibration file ``<run>/data/<data.rl_file>``).
        hf_model_name, processor_from, chat_template, strict: see `export_nemo_rl_checkpoint`.
        overwrite: replace an existing ``out_dir``.
        quantize: a `axpo_nemo.export.quantize.QuantizeConfig` for a quantized export, else None.
        calib_data: the question file (JSONL samples) to calibrate on; required for quantized
            exports of cluster checkpoints.
        tool_schemas: tool schemas declared in calibration prompts, as in rollouts.

    Returns:
        An `ExportResult`.
    """
    from axpo_nemo.export.hf import export_hf

    source = Path(source).expanduser()
    if source_format not in SOURCE_FORMATS:
        raise ValueError(
            f"export: --format must be one of {', '.join(SOURCE_FORMATS)} (got {source_format!r})"
        )
    kind = detect_format(source, step) if source_format == "auto" else source_format
    out_dir = Path(out_dir).expanduser().absolute()
    cluster = dict(
        hf_model_name=hf_model_name, processor_from=processor_from, chat_template=chat_template, strict=strict
    )

    def local_bundle():
        from axpo_nemo.run.run_folder import bundle_from_run

        if cfg is None:
            raise ValueError("export: a local run needs the project config (cfg)")
        return bundle_from_run(source, cfg)

    def to_folder(dst: Path, overwrite_dst: bool) -> Path:
        if kind == "local":
            return export_hf(local_bundle(), dst, overwrite=overwrite_dst)
        if kind == "hf":
            return export_hf_folder(
                source,
                dst,
                processor_from=processor_from,
                chat_template=chat_template,
                overwrite=overwrite_dst,
            )
        ckpt = find_nemo_rl_checkpoint(source, step, kind=kind)
        return export_nemo_rl_checkpoint(ckpt, dst, overwrite=overwrite_dst, **cluster)

    if quantize is None:
        return ExportResult(to_folder(out_dir, overwrite), kind)

    from axpo_nemo.export.quantize import (
        calibration_inputs,
        check_quantization_available,
        export_quantized,
        read_calibration_samples,
    )
    from axpo_nemo.models import load_qwen3vl

    check_quantization_available(quantize)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"export: {out_dir} already exists (pass --overwrite to replace it)")
    calib = Path(calib_data) if calib_data else _default_calibration_file(source, kind, cfg)
    if calib is None:
        raise ValueError(
            "export: a quantized export calibrates on RL questions: pass --calib-data with a question "
            "file (e.g. the run's data/rl.jsonl)"
        )
    samples, root = read_calibration_samples(calib)
    full = out_dir.parent / f".{out_dir.name}.full"
    try:
        if kind == "local":
            bundle = local_bundle()
        else:  # convert at full precision first, then quantize the Hugging Face model
            to_folder(full, True)
            bundle = load_qwen3vl(full)
        batches = calibration_inputs(
            bundle.processor, samples, root, limit=quantize.calib_samples, seed=quantize.seed,
            tools=tool_schemas or (),
        )  # fmt: skip
        made = export_quantized(
            bundle, out_dir, quantize, batches, chat_template=chat_template, overwrite=overwrite
        )
    finally:
        shutil.rmtree(full, ignore_errors=True)
    return ExportResult(made.path, kind, made)
