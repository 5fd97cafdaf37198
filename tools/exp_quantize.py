"""Accuracy cost of quantized export on the synthetic task: full precision vs FP8 (Model Optimizer).

Evaluates one policy four ways on the held-out questions (Pass@k with fixed per-rollout seeds,
the same agent loop and tools as training), and prints a table:

* ``fp32``: the run's policy as trained;
* ``bf16``: cast to bfloat16, the dtype quantized exports keep unquantized layers and
  activations in (so the next rows show quantization's own cost apart from the cast);
* ``fp8 fake-quant``: Model Optimizer's FP8 quantize-dequantize of weights and activations,
  calibrated on the run's RL questions (what vLLM computes, up to kernel rounding);
* ``fp8 export``: the exported folder's weights dequantized (weights only, activations in fp32).

Usage (a finished run folder, e.g. from ``axpo sft output_dir=runs/sft``)::

    python tools/exp_quantize.py --run runs/sft [--config demo] [--max-questions 32] [KEY=VALUE ...]

Needs ``axpo-nemo[quant]``. Figures go to stdout and ``<run>/quantize_eval.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from axpo_nemo.agent.protocol import ChatProtocol
from axpo_nemo.agent.sample import read_samples
from axpo_nemo.config import load_config
from axpo_nemo.engines import local_generator
from axpo_nemo.eval.passk import evaluate
from axpo_nemo.export.quantize import (
    QuantizeConfig,
    calibration_inputs,
    export_quantized,
    load_dequantized,
    quantize_model,
)
from axpo_nemo.local.pipeline import Pipeline
from axpo_nemo.models import PolicyBundle
from axpo_nemo.run.run_folder import bundle_from_run


def _next_token_agreement(reference, model, batches) -> float:
    """Share of prompt positions where ``model``'s argmax next token equals ``reference``'s."""
    same = total = 0
    with torch.no_grad():
        for batch in batches:
            a = reference(**batch).logits.argmax(-1)
            b = model(**batch).logits.argmax(-1)
            same += int((a == b).sum())
            total += a.numel()
    return same / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run folder (sft/final.pt or rl/checkpoints, data/)")
    parser.add_argument("--config", default=None, help="the run's config (default: demo)")
    parser.add_argument("--max-questions", type=int, default=None, help="evaluate at most this many")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration questions")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run)
    cfg = load_config(args.config, [f"output_dir={run}", *args.overrides])
    if args.max_questions is not None:
        cfg.eval.max_questions = args.max_questions
    pipeline = Pipeline(cfg)
    eval_file = pipeline.data_dir / cfg.data.eval_file
    questions = list(read_samples(eval_file))
    rl_samples = list(read_samples(pipeline.data_dir / cfg.data.rl_file))

    base = bundle_from_run(run, cfg)
    qcfg = QuantizeConfig(format="fp8", calib_samples=args.calib_samples, device="cpu")
    batches = calibration_inputs(base.processor, rl_samples, pipeline.data_dir, limit=qcfg.calib_samples)

    def variant(model: torch.nn.Module) -> PolicyBundle:
        return PolicyBundle(
            model=model, processor=base.processor, tokenizer=base.tokenizer, config=model.config
        )

    bf16 = copy.deepcopy(base.model).to(torch.bfloat16)
    fake = quantize_model(copy.deepcopy(base.model).to(torch.bfloat16), qcfg, batches)
    with tempfile.TemporaryDirectory() as tmp:
        exported = export_quantized(copy.deepcopy(base), Path(tmp) / "fp8", qcfg, batches)
        dense = load_dequantized(exported.path)
        variants = {"fp32": base, "bf16": variant(bf16), "fp8 fake-quant": variant(fake), "fp8 export": dense}
        rows = {}
        with pipeline._tools() as tools:
            for name, bundle in variants.items():
                start = time.perf_counter()
                report = evaluate(
                    local_generator(bundle), ChatProtocol(bundle.processor), tools, questions, eval_file.parent, cfg.eval,
                    pipeline.loop_cfg, reward_cfg=cfg.reward,
                )  # fmt: skip
                overall = report.overall.as_dict()
                overall["next_token_agreement"] = _next_token_agreement(base.model, bundle.model, batches[:8])
                overall["seconds"] = time.perf_counter() - start
                rows[name] = overall
                print(f"{name}: done in {overall['seconds']:.0f} s", file=sys.stderr)
    keys = [k for k in ("pass@1", "pass@4", "accuracy", "tool_use_rate") if k in rows["fp32"]]
    keys.append("next_token_agreement")
    print(f"questions: {len(questions[: cfg.eval.max_questions or None])}, rollouts/question: "
          f"{cfg.eval.samples_per_question}, calibration questions: {len(batches)}")  # fmt: skip
    print("| variant | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):.3f}" for k in keys) + " |")
    for k in keys:
        print(f"delta {k} (fp8 fake-quant - fp32): {rows['fp8 fake-quant'][k] - rows['fp32'][k]:+.3f}")
    (run / "quantize_eval.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
