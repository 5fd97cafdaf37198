"""TRL's side of `bench_vs_trl`: its ``GRPOTrainer`` on the benchmark's workloads, with the tool as
an environment, turns pinned like ours, and a per-step timing record."""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from bench_vs_trl_common import Tails, _sync, _time_calls, control_ids, scripted_tails, token_reward

from axpo_nemo.agent.sample import Sample
from axpo_nemo.agent.tools.base import ToolContext
from axpo_nemo.agent.tools.zoom import ImageZoomTool
from axpo_nemo.models import PolicyBundle, resolve_device

# -- TRL ---------------------------------------------------------------------------------------------


class ZoomEnvironment:
    """A TRL environment (``environment_factory``): the question's image and the project's
    ``image_zoom_in`` over it, so TRL's tool does exactly the work of ours."""

    zoom = ImageZoomTool()

    def reset(self, **example: Any) -> None:
        """Keep the example's image (TRL passes the dataset row); the prompt is unchanged."""
        self.image = example["image"]

    def image_zoom_in(self, bbox_2d: list[float], label: str | None = None, image_index: int = 0) -> list:
        """Zoom in on a region of an image: crops the bounding box and returns it enlarged. Use it to read small text or inspect details.

        Args:
            bbox_2d: The region as [x1, y1, x2, y2], top-left then bottom-right corner, in relative coordinates from 0 to 1000 of the image's width and height.
            label: Optional name of the object in the region.
            image_index: Which image to zoom into: 0 (default) is the question's first image, then any later images in the conversation in order.
        """
        arguments: dict[str, Any] = {"bbox_2d": bbox_2d, "image_index": image_index}
        if label is not None:
            arguments["label"] = label
        result = self.zoom(arguments, ToolContext(images=[self.image]))
        return [{"type": "text", "text": result.text}] + [
            {"type": "image", "image": im} for im in result.images
        ]


class PinnedGenerate:
    """Replaces ``model.generate`` for TRL: exactly ``think_tokens`` sampled tokens per call
    (``min_new_tokens`` = ``max_new_tokens``), then the scripted tail (a first turn's tool call
    or a later turn's answer, told apart by a ``<tool_response>`` in the context), each ending
    with ``<|im_end|>`` as TRL's turns do; rows are right-padded with the pad token."""

    def __init__(self, model, tokenizer, think_tokens: int, tails: Tails) -> None:
        self.inner = model.generate
        self.think_tokens, self.tails = think_tokens, tails
        self.response_id = int(tokenizer.convert_tokens_to_ids("<tool_response>"))
        self.pad_id = int(tokenizer.pad_token_id)
        self.decoded_tokens = 0
        self.decode_s = 0.0

    def __call__(self, *args: Any, generation_config=None, **kwargs: Any) -> torch.Tensor:
        """``generate`` with the pinned length, then the tails."""
        config = copy.deepcopy(generation_config)
        config.max_new_tokens = config.min_new_tokens = self.think_tokens
        prompt = kwargs["input_ids"]
        t0 = time.perf_counter()
        out = self.inner(*args, generation_config=config, **kwargs)
        _sync(out.device)
        self.decode_s += time.perf_counter() - t0
        self.decoded_tokens += (out.shape[1] - prompt.shape[1]) * out.shape[0]
        if not self.tails.call:
            return out
        rows = []
        for r in range(out.shape[0]):
            later = bool((prompt[r] == self.response_id).any())
            tail = self.tails.answer if later else [*self.tails.call, self.tails.im_end]
            rows.append(out[r].tolist() + tail)
        width = max(map(len, rows))
        padded = [row + [self.pad_id] * (width - len(row)) for row in rows]
        return torch.tensor(padded, dtype=out.dtype, device=out.device)


def trl_config(args: argparse.Namespace, workload: str, steps: int, output_dir: str):
    """The ``GRPOConfig`` matching ours (see the module docstring); printed by `describe_trl`."""
    from trl import GRPOConfig

    cuda = resolve_device(args.device).type == "cuda"
    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=not cuda,
        bf16=False,  # weights are already in --dtype: no autocast, as ours
        fp16=False,
        gradient_checkpointing=False,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        num_iterations=1,
        num_generations=args.n,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.b * args.n // args.micro_batch_size,
        max_completion_length=4096,  # never binding: every turn is pinned
        max_tool_calling_iterations=2 if workload == "tools" else None,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        max_steps=steps,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        log_completions=False,
    )


def describe_trl(config) -> str:
    """The settings of a ``GRPOConfig`` that the comparison depends on, as one line."""
    names = (
        "beta", "loss_type", "epsilon", "epsilon_high", "num_iterations", "num_generations",
        "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
        "gradient_checkpointing", "bf16", "fp16", "temperature", "top_p", "top_k", "learning_rate",
        "lr_scheduler_type", "optim", "weight_decay", "max_grad_norm", "scale_rewards",
        "mask_truncated_completions", "max_tool_calling_iterations", "use_vllm",
    )  # fmt: skip
    values = {name: getattr(config, name) for name in names}
    return " ".join(f"{name}={getattr(value, 'value', value)}" for name, value in values.items())


@dataclass
class TrlRun:
    """A TRL trainer with its timers."""

    trainer: Any
    generate: PinnedGenerate
    sink: dict[str, float] = field(default_factory=dict)
    started: float = 0.0


def build_trl(
    bundle: PolicyBundle,
    questions: list[Sample],
    workload: str,
    args: argparse.Namespace,
    steps: int,
    callbacks: list,
) -> TrlRun:
    """TRL's ``GRPOTrainer`` on ``bundle`` (its own copy of the weights is trained)."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    model, processor = bundle.model, bundle.processor
    tokenizer = processor.tokenizer
    if workload == "tools":
        # The project's chat template is Qwen3's format but not byte-identical to a template TRL
        # recognises, so TRL cannot pick the response parser itself.
        tokenizer.response_template = qwen3_template
    generate = PinnedGenerate(model, tokenizer, args.think_tokens, scripted_tails(tokenizer, workload))
    model.generate = generate
    dataset = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": q.question}] for q in questions],
            "image": [q.load_images()[0] for q in questions],
        }
    )
    config = trl_config(args, workload, steps, tempfile.mkdtemp(prefix="bench-vs-trl-"))
    # TRL suppresses only the image pad in generation; the pinned turn suppresses every control
    # token (the video pad too), as ours replaces them.
    config.generation_kwargs = {"suppress_tokens": control_ids(tokenizer)}

    def reward(completion_ids, **_: Any) -> list[float]:
        """`token_reward` of each completion (TRL's reward-function signature)."""
        return [token_reward(ids) for ids in completion_ids]

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=processor,  # a processor object: loading a saved one needs torchvision
        callbacks=callbacks,
        environment_factory=ZoomEnvironment if workload == "tools" else None,
    )
    trainer.remove_callback(PrinterCallback)  # its end-of-training log line
    run = TrlRun(trainer, generate)
    for name, key in (
        ("_generate", "gen"),
        ("_generate_and_score_completions", "gen_score"),
        ("get_batch_samples", "fetch"),
    ):
        _time_calls(trainer, name, run.sink, key)
    fetch = trainer.get_batch_samples

    def start_step(*a, **kw):
        """TRL's step starts by fetching its batch: reset the timers there."""
        run.sink.clear()
        generate.decode_s, generate.decoded_tokens = 0.0, 0
        _sync(trainer.args.device)
        run.started = time.perf_counter()
        return fetch(*a, **kw)

    trainer.get_batch_samples = start_step
    return run


def trl_step_record(run: TrlRun) -> dict[str, float]:
    """The phases of TRL's step that just ended (called from ``on_step_end``)."""
    _sync(run.trainer.args.device)
    step = time.perf_counter() - run.started
    s = run.sink
    gen, gen_score, fetch = s.get("gen", 0.0), s.get("gen_score", 0.0), s.get("fetch", 0.0)
    logged = run.trainer._metrics["train"]
    last = {k: (v[-1] if v else 0.0) for k, v in logged.items()}
    return {
        "loss_tokens": last.get("completions/mean_length", float("nan")),  # tool tokens excluded
        "tool_calls": last.get("tools/call_frequency", 0.0),
        "tool_errors": last.get("tools/failure_frequency", 0.0),
        "step": step,
        "gen": gen,
        "score": gen_score - gen,
        "update": step - gen_score - fetch,
        "other": fetch,
        "decode": run.generate.decode_s,
        "decoded_tokens": float(run.generate.decoded_tokens),
    }
