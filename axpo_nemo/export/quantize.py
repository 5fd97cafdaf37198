"""Quantized Hugging Face export with NVIDIA Model Optimizer, for cheap evaluation and vLLM serving.

`export_quantized` casts a policy to ``bfloat16`` (or ``float16``), inserts Model Optimizer
quantizers with one of `QUANT_FORMATS`, calibrates them on RL questions (each question rendered
through the chat template with its images, exactly as the processor feeds the model in
rollouts), and writes the checkpoint with ``modelopt.torch.export.export_hf_checkpoint``:
quantized weights with their scales, ``hf_quant_config.json`` and a ``quantization_config``
(``quant_method: modelopt``) in ``config.json``, which is what vLLM's ModelOpt loader reads.
The processor, tokenizer and chat template are then added (`complete_hf_folder`), so the folder
is as complete as a plain export. Output is written to a temporary folder and renamed into place.

**What stays in high precision.** `QuantizeConfig.exclude` lists module-name patterns
(``fnmatch`` globs over names such as ``model.visual.blocks.0.attn.qkv``): a module whose name
matches, and every module inside it, keeps its weights and activations unquantized. The defaults
keep the vision tower and its mergers (``*visual*``), the LM head, the token embeddings and MoE
routers/gates (``*router*``, ``*mlp.gate``, ``*shared_expert_gate``) in the export dtype; the
exporter records them under ``exclude_modules`` / ``ignore``, which vLLM honours. With tied
embeddings (Qwen3-VL 2B/4B) the LM head must stay excluded: it *is* the embedding matrix.

**Formats** (all ones vLLM's ModelOpt loader serves; Model Optimizer's INT4-AWQ and W4A8-AWQ
exports are TensorRT-LLM formats that vLLM rejects, so they are not offered):

=============  ==============================  =====================  ======================
format         Model Optimizer config          vLLM ``--quantization`` calibrates on
=============  ==============================  =====================  ======================
``fp8``        ``FP8_DEFAULT_CFG``             ``modelopt``           CPU or GPU
``fp8_pc_pt``  ``FP8_PER_CHANNEL_PER_TOKEN``   ``modelopt``           CPU or GPU
``nvfp4``      ``NVFP4_DEFAULT_CFG``           ``modelopt_fp4``       GPU only
``mxfp8``      ``MXFP8_DEFAULT_CFG``           ``modelopt_mxfp8``     GPU only
=============  ==============================  =====================  ======================

`QuantFormat.cuda_only` says why a format needs a GPU (found by running it on CPU with
nvidia-modelopt 0.47); `export_quantized` refuses it up front on a machine without CUDA.

**Checking an export on CPU.** transformers does not read ModelOpt checkpoints (it would load
the FP8 weights without their scales), so `load_dequantized` rebuilds a dense model from an
``fp8`` / ``fp8_pc_pt`` folder (weight × scale) for evaluation and tests.

Model Optimizer is an optional dependency: ``pip install "axpo-nemo[quant]"`` (nvidia-modelopt,
CPU-only torch is fine). Without it the functions raise `QuantizationUnavailable` saying so.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText

from axpo_nemo.agent.sample import Sample, read_samples
from axpo_nemo.core.config import ValidatedConfig, setting
from axpo_nemo.export.hf import complete_hf_folder, resolve_chat_template
from axpo_nemo.models import PolicyBundle, load_processor
from axpo_nemo.run.atomic import atomic_output_dir

__all__ = [
    "DEFAULT_EXCLUDE",
    "QUANT_FORMATS",
    "QuantFormat",
    "QuantizationUnavailable",
    "QuantizeConfig",
    "QuantizedExport",
    "calibration_inputs",
    "check_quantization_available",
    "excluded_modules",
    "export_quantized",
    "load_dequantized",
    "modelopt_config",
    "quantize_model",
    "quantized_modules",
    "read_calibration_samples",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantFormat:
    """One quantized export format.

    Attributes:
        name: the ``--quantize`` value.
        modelopt_config: the ``modelopt.torch.quantization`` config it starts from.
        quant_algo: the ``quant_algo`` the export records (and vLLM dispatches on).
        vllm_quantization: the value of vLLM's ``--quantization`` for the folder.
        description: one line for help texts.
        cuda_only: why Model Optimizer cannot calibrate this format without CUDA (None: it can).
    """

    name: str
    modelopt_config: str
    quant_algo: str
    vllm_quantization: str
    description: str
    cuda_only: str | None = None


QUANT_FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat(
            "fp8", "FP8_DEFAULT_CFG", "FP8", "modelopt",
            "FP8 E4M3 weights and activations, per-tensor scales calibrated on RL questions",
        ),
        QuantFormat(
            "fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_PER_CHANNEL_PER_TOKEN", "modelopt",
            "FP8 E4M3 weights with per-channel scales, activations quantized per token at run time",
        ),
        QuantFormat(
            "nvfp4", "NVFP4_DEFAULT_CFG", "NVFP4", "modelopt_fp4",
            "NVFP4 (FP4 E2M1 in blocks of 16 with FP8 scales) weights and activations; Blackwell "
            "GPUs run it natively, older ones as weight-only W4A16",
            cuda_only="Model Optimizer's NVFP4 block quantizer asserts 'amax must be a CUDA tensor for "
            "dynamic block quantization', and its Conv3d path calls a CUDA-only implicit-GEMM kernel",
        ),
        QuantFormat(
            "mxfp8", "MXFP8_DEFAULT_CFG", "MXFP8", "modelopt_mxfp8",
            "MXFP8 (FP8 E4M3 in blocks of 32 with power-of-two scales) weights and activations",
            cuda_only="Model Optimizer's MXFP8 quantizer runs its CUDA extension modelopt_cuda_ext_mx "
            "('Skipping extension modelopt_cuda_ext_mx because CUDA is not available')",
        ),
    )
}  # fmt: skip

#: Modules kept in high precision by default (module-name globs; see the module docstring).
DEFAULT_EXCLUDE = [
    "*visual*",
    "lm_head",
    "*embed_tokens",
    "*router*",
    "*mlp.gate",
    "*shared_expert_gate",
]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantizationUnavailable(RuntimeError):
    """Model Optimizer is missing, or the format cannot run on this machine."""


@dataclass
class QuantizeConfig(ValidatedConfig):
    """How a quantized export is made."""

    format: str = setting("fp8", "Quantization format (see QUANT_FORMATS).", choices=tuple(QUANT_FORMATS))
    exclude: list[str] = setting(
        list(DEFAULT_EXCLUDE),
        "Module-name globs kept in high precision (with everything inside them): the vision "
        "tower, LM head, embeddings and MoE routers/gates by default.",
    )
    calib_samples: int = setting(32, "RL questions run through the model to calibrate scales.", ge=1)
    seed: int = setting(0, "Seed of the choice of calibration questions (when the file has more).")
    dtype: str = setting(
        "bfloat16",
        "Dtype of the unquantized weights and of activations (vLLM's ModelOpt kernels take "
        "bfloat16 or float16).",
        choices=tuple(_DTYPES),
    )
    device: str = setting(
        "auto", "Where calibration runs: 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N'."
    )

    def __post_init__(self) -> None:
        """Check choices and bounds, then the exclude patterns."""
        super().__post_init__()
        bad = [p for p in self.exclude if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"QuantizeConfig: exclude: patterns must be non-empty strings (got {bad[0]!r})")

    @property
    def quant_format(self) -> QuantFormat:
        """The `QuantFormat` named by ``format``."""
        return QUANT_FORMATS[self.format]


@dataclass
class QuantizedExport:
    """What `export_quantized` wrote.

    Attributes:
        path: the folder.
        format: the `QuantFormat`.
        quantized: names of the modules whose weights were quantized.
        excluded: names of the linear/conv modules the exclude patterns kept in high precision.
        calib_samples: how many questions calibrated the scales.
        hf_quant_config: the ``hf_quant_config.json`` written.
    """

    path: Path
    format: QuantFormat
    quantized: list[str]
    excluded: list[str]
    calib_samples: int
    hf_quant_config: dict[str, Any] = field(default_factory=dict)

    @property
    def vllm_command(self) -> str:
        """The command that serves the folder with vLLM."""
        return f"vllm serve {self.path} --quantization {self.format.vllm_quantization}"


def _modelopt():
    """(modelopt.torch.quantization, modelopt.torch.export), or QuantizationUnavailable."""
    try:
        with warnings.catch_warnings():
            # modelopt warns when transformers is newer than the version it was tested with.
            warnings.simplefilter("ignore")
            import modelopt.torch.export as mte
            import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise QuantizationUnavailable(
            f"quantized export needs NVIDIA Model Optimizer ({exc}); install it with "
            '`pip install "axpo-nemo[quant]"` (or `pip install nvidia-modelopt`)'
        ) from exc
    return mtq, mte


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether module ``name`` or one of the modules containing it matches a pattern."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def modelopt_config(fmt: QuantFormat | str, exclude: Sequence[str]) -> dict[str, Any]:
    """The ``mtq.quantize`` config of ``fmt`` with every module matching ``exclude`` disabled.

    Model Optimizer matches quantizer names (``<module>.weight_quantizer``, ...), so each module
    pattern ``P`` becomes ``P.*``. The disabled entries also reset the quantizer to plain 8-bit:
    a disabled quantizer otherwise keeps the format's attributes, and Model Optimizer's
    ``QuantConv3d`` (Qwen3-VL's patch embedding) picks its NVFP4 kernel from those attributes
    even when its quantizers are off.
    """
    mtq, _ = _modelopt()
    fmt = QUANT_FORMATS[fmt] if isinstance(fmt, str) else fmt
    cfg = copy.deepcopy(getattr(mtq, fmt.modelopt_config))
    quant_cfg = cfg["quant_cfg"]
    for pattern in exclude:
        name = f"{pattern}.*"
        if isinstance(quant_cfg, list):  # Model Optimizer >= 0.4x: ordered entries, later wins
            quant_cfg.append({"quantizer_name": name, "cfg": {"num_bits": 8, "axis": None}, "enable": False})
        else:  # older releases: a dict of pattern -> attributes
            quant_cfg[name] = {"enable": False}
    return cfg


def _enabled_quantizer_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """Module name -> names of its enabled quantizers (``weight_quantizer``, ...)."""
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        for attr in ("weight_quantizer", "input_quantizer", "output_quantizer"):
            q = getattr(module, attr, None)
            if q is not None and getattr(q, "is_enabled", False):
                out.setdefault(name, []).append(attr)
    return out


def quantized_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules of a quantized ``model`` whose weights are quantized."""
    return sorted(n for n, qs in _enabled_quantizer_modules(model).items() if "weight_quantizer" in qs)


def excluded_modules(model: torch.nn.Module, exclude: Sequence[str]) -> list[str]:
    """Names of ``model``'s linear and convolution modules that ``exclude`` keeps in high precision."""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    return sorted(n for n, m in model.named_modules() if isinstance(m, kinds) and _matches(n, exclude))


def _tied_embeddings(config: Any) -> bool:
    text = getattr(config, "text_config", None)
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def calibration_inputs(
    processor: Any,
    samples: Iterable[Sample],
    root: str | os.PathLike,
    *,
    limit: int | None = None,
    seed: int = 0,
    tools: Sequence[Mapping[str, Any]] = (),
    system_prompt: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Model inputs for calibration: each question rendered as a rollout's first prompt.

    Args:
        processor: the policy's processor (chat template, tokenizer, image processor).
        samples: questions (e.g. ``rl.jsonl``); their images are read relative to ``root``.
        root: the folder image paths are relative to.
        limit: use at most this many questions, a seeded random choice when there are more.
        seed: seed of that choice.
        tools: tool schemas to declare in the prompt (as rollouts do); empty declares none.
        system_prompt: an optional system message.

    Returns:
        One batch (size 1) per question: ``input_ids``, ``attention_mask``, and
        ``pixel_values`` / ``image_grid_thw`` when it has images.

    Raises:
        ValueError: no samples.
    """
    chosen = list(samples)
    if not chosen:
        raise ValueError("calibration: no questions to calibrate on")
    if limit is not None and len(chosen) > limit:
        chosen = sorted(random.Random(seed).sample(chosen, limit), key=lambda s: s.id)
    batches = []
    for sample in chosen:
        images = sample.load_images(root)
        messages: list[dict[str, Any]] = (
            [{"role": "system", "content": system_prompt}] if system_prompt else []
        )
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": sample.question}]
        messages.append({"role": "user", "content": content})
        text = processor.apply_chat_template(
            messages, tools=list(tools) or None, add_generation_prompt=True, tokenize=False
        )
        kwargs = {"images": images} if images else {}
        encoded = processor(text=[text], return_tensors="pt", **kwargs)
        batches.append({k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)})
    return batches


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantizationUnavailable(f"quantize: device '{name}' requested but CUDA is not available")
    return device


def _check_runnable(fmt: QuantFormat, device: torch.device) -> None:
    if fmt.cuda_only and device.type != "cuda":
        raise QuantizationUnavailable(
            f"quantize: format '{fmt.name}' needs a CUDA GPU ({fmt.cuda_only}); run it on a GPU "
            "machine, or use 'fp8' / 'fp8_pc_pt', which calibrate on CPU"
        )


def check_quantization_available(cfg: QuantizeConfig) -> None:
    """Raise `QuantizationUnavailable` now if ``cfg`` cannot run here (Model Optimizer missing,
    or a GPU-only format without CUDA), before any slow work."""
    _check_runnable(cfg.quant_format, _resolve_device(cfg.device))
    _modelopt()


def quantize_model(
    model: torch.nn.Module,
    cfg: QuantizeConfig,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> torch.nn.Module:
    """Insert Model Optimizer quantizers into ``model`` (in place) and calibrate them on ``batches``.

    The model must already be in its export dtype and on the calibration device; batches are
    moved there. Afterwards the model computes with fake quantization (quantize-dequantize), so
    evaluating it measures the format's accuracy cost.

    Raises:
        QuantizationUnavailable: Model Optimizer missing, or a GPU-only format on CPU.
        ValueError: tied embeddings with the LM head not excluded, no module left to quantize,
            or an excluded module that Model Optimizer quantized anyway.
    """
    fmt = cfg.quant_format
    device = next(model.parameters()).device
    _check_runnable(fmt, device)
    if _tied_embeddings(model.config) and not _matches("lm_head", cfg.exclude):
        raise ValueError(
            "quantize: the model ties its LM head to the token embeddings, so 'lm_head' must stay in "
            "QuantizeConfig.exclude (quantizing one would change the other)"
        )
    if not any(
        isinstance(m, torch.nn.Linear) and not _matches(n, cfg.exclude) for n, m in model.named_modules()
    ):
        raise ValueError(
            f"quantize: no module was quantized (QuantizeConfig.exclude {cfg.exclude} covers every layer)"
        )
    mtq, _ = _modelopt()

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                m(**{k: v.to(device) for k, v in batch.items()})
                if progress is not None:
                    progress(i + 1, len(batches))

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mtq.quantize(model, modelopt_config(fmt, cfg.exclude), forward_loop)
    enabled = _enabled_quantizer_modules(model)
    leaked = sorted(n for n in enabled if _matches(n, cfg.exclude))
    if leaked:
        raise ValueError(f"quantize: excluded modules were quantized anyway: {leaked[:5]}")
    if not quantized_modules(model):
        raise ValueError(
            f"quantize: no module was quantized (QuantizeConfig.exclude {cfg.exclude} covers every layer)"
        )
    return model


def export_quantized(
    bundle: PolicyBundle,
    out_dir: str | os.PathLike,
    cfg: QuantizeConfig,
    batches: Sequence[Mapping[str, torch.Tensor]],
    *,
    chat_template: str | None = "axpo",
    overwrite: bool = False,
) -> QuantizedExport:
    """Quantize ``bundle``'s model and write it as a vLLM-servable Hugging Face folder.

    The model is quantized **in place** (cast to ``cfg.dtype``, moved to ``cfg.device``) and the
    exporter packs its weights into the quantized storage, so the model cannot run afterwards:
    pass a bundle you no longer need (evaluate fake quantization with `quantize_model` on a copy).

    Args:
        bundle: the policy.
        out_dir: the folder to create.
        cfg: format, exclusions, dtype and device.
        batches: calibration inputs (see `calibration_inputs`).
        chat_template: ``"axpo"``, ``"source"`` (the bundle's) or a template file.
        overwrite: replace an existing ``out_dir``.

    Returns:
        A `QuantizedExport` describing the folder.
    """
    fmt = cfg.quant_format
    device = _resolve_device(cfg.device)
    _check_runnable(fmt, device)
    _, mte = _modelopt()
    model = bundle.model
    # Model Optimizer's exporter reads config.architectures; a model built from a config has none.
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.to(device=device, dtype=_DTYPES[cfg.dtype])
    excluded = excluded_modules(model, cfg.exclude)
    quantize_model(model, cfg, batches)
    quantized = quantized_modules(model)
    template = resolve_chat_template(chat_template, bundle.processor)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mte.export_hf_checkpoint(model, dtype=_DTYPES[cfg.dtype], export_dir=tmp)
        hf_quant = json.loads((tmp / "hf_quant_config.json").read_text(encoding="utf-8"))
        algo = str(hf_quant.get("quantization", {}).get("quant_algo", "")).upper()
        if algo != fmt.quant_algo:
            raise ValueError(
                f"quantize: the export recorded quant_algo {algo!r}, expected {fmt.quant_algo!r}"
            )
        complete_hf_folder(
            tmp, bundle.processor, chat_template=template, generation_config=model.generation_config
        )
    path = Path(out_dir).expanduser().absolute()
    logger.info("quantize: wrote %s (%s, %d modules quantized)", path, fmt.name, len(quantized))
    return QuantizedExport(path, fmt, quantized, excluded, len(batches), hf_quant)


def _dense_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors files")
    raw: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open handles have no __iter__)
                raw[key] = f.get_tensor(key)
    out = {}
    for key, value in raw.items():
        if key.endswith((".weight_scale", ".input_scale", ".weight_scale_2", "_scale")):
            continue
        scale = raw.get(f"{key}_scale") if key.endswith(".weight") else None
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if scale is None:
                raise ValueError(f"{folder}: FP8 tensor {key} has no {key}_scale")
            scale = scale.to(torch.float32)
            if scale.dim() == 1 and value.dim() == 2:  # per-output-channel scales
                scale = scale[:, None]
            value = value.to(torch.float32) * scale
        out[key] = value
    return out


def load_dequantized(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> PolicyBundle:
    """Load an ``fp8`` / ``fp8_pc_pt`` export as a dense model (weights × scales), for CPU checks.

    Activations are not quantized: the result is the exported weights' precision alone.

    Raises:
        ValueError: the folder's format is not an FP8 one, or its tensors do not fit the config.
    """
    folder = Path(folder).expanduser()
    quant = json.loads((folder / "hf_quant_config.json").read_text(encoding="utf-8"))
    algo = str(quant.get("quantization", {}).get("quant_algo", "")).upper()
    if algo not in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
        raise ValueError(f"load_dequantized: {folder} is {algo!r}; only FP8 exports dequantize here")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    state = _dense_state_dict(folder)
    result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and _tied_embeddings(config))]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"load_dequantized: {folder} does not fit its config: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    model.tie_weights()
    model.eval()
    processor = load_processor(folder)
    return PolicyBundle(model=model, processor=processor, tokenizer=processor.tokenizer, config=model.config)


def read_calibration_samples(path: str | os.PathLike) -> tuple[list[Sample], Path]:
    """The questions of a sample file (JSONL) and the folder their image paths are relative to."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"calibration: question file {path} does not exist")
    return list(read_samples(path)), path.parent
