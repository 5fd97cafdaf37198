"""The few lines that run inside a vLLM process: requests in, sampled tokens and logprobs out.

Kept free of ``axpo_nemo`` imports and of our own types (requests and results are plain dicts,
lists, ints, floats and PIL images), so the function can be shipped to NeMo-RL's vLLM workers by
value and those workers need nothing of this project installed.
"""

from __future__ import annotations

from typing import Any


def run_on_llm(llm: Any, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Generate every request on a ``vllm.LLM``, each with its own sampling params.

    Each request is ``{"prompt": {"prompt_token_ids": [...], "multi_modal_data": {...}?},
    "sampling": {SamplingParams kwargs}}``. Returns, per request, ``{"token_ids": [...],
    "logprobs": [float | None, ...], "finish_reason": str, "prompt_len": int}``; a logprob is
    None when vLLM returned none for that token (it is never replaced by a number here);
    ``prompt_len`` is the prompt as vLLM processed it (image placeholders expanded).
    """
    from vllm import SamplingParams

    if not requests:
        return []
    prompts = [r["prompt"] for r in requests]
    params = [SamplingParams(**r["sampling"]) for r in requests]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [_extract(out) for out in outputs]


def run_on_vllm_worker(worker: Any, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`run_on_llm` on a NeMo-RL ``VllmGenerationWorker`` actor (its engine is ``worker.llm``)."""
    llm = getattr(worker, "llm", None)
    if llm is None:
        raise RuntimeError("this vLLM worker owns no engine (not a data-parallel leader?)")
    return run_on_llm(llm, requests)


def _extract(output: Any) -> dict[str, Any]:
    completion = output.outputs[0]
    token_ids = [int(t) for t in completion.token_ids]
    per_token = completion.logprobs
    logprobs: list[float | None] = []
    for i, token in enumerate(token_ids):
        entry = per_token[i] if per_token is not None and i < len(per_token) else None
        value = entry.get(token) if entry else None
        logprobs.append(None if value is None else float(value.logprob))
    prompt_ids = getattr(output, "prompt_token_ids", None)
    return {
        "token_ids": token_ids,
        "logprobs": logprobs,
        "finish_reason": str(completion.finish_reason),
        "prompt_len": None if prompt_ids is None else len(prompt_ids),
    }
