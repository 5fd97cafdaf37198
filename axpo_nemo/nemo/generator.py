"""The agent loop's `Generator` on vLLM: NeMo-RL's colocated engines in training, a plain one for eval.

**Why not ``VllmGeneration.generate``.** NeMo-RL v0.7.0's generate path cannot express what the
agent loop needs:

* *Token ids plus images.* ``format_prompt_for_vllm_generation`` sends either
  ``{"prompt": vllm_content, "multi_modal_data": ...}`` (a chat-template *string*, re-tokenized by
  vLLM) or, when ``vllm_content`` is None, ``{"prompt_token_ids": ...}`` *without* the images.
  A trajectory that holds images (every Qwen3-VL question) would lose its pixels on the second
  path and be re-tokenized on the first, which is not an exact continuation of a frozen prefix
  (sampled tokens are often not the canonical tokenization of their text).
* *Per-sample stops and budgets.* The sync worker merges every row's stop strings into one set
  for the whole batch and uses the config's ``max_new_tokens`` for every row; the async worker is
  per sample but also goes through the same prompt formatting.

So each request here is a vLLM ``TokensPrompt`` — ``prompt_token_ids`` plus ``multi_modal_data``
with the trajectory's images in token order — and carries its own
``SamplingParams``: ``stop_token_ids`` (the turn's stop tokens and EOS), ``max_tokens`` (the
state's remaining budget), temperature, top_p, a per-trajectory seed and ``logprobs=0``. The
requests run on NeMo-RL's own engines: `NemoVllmEngine` sends them to every data-parallel leader
of the ``VllmGeneration`` through Ray's ``__ray_call__`` with `_vllm_remote.run_on_llm` (shipped by
value), which calls ``worker.llm.generate(prompts, [params per prompt])``. Refit, sleep/wake and
prefix caching stay NeMo-RL's (``enable_prefix_caching`` is on in our configs, so the K forks of a
prefix and the N rollouts of a question share their prompt's KV blocks).

**Image placeholders.** vLLM expects one ``<|image_pad|>`` per image in a token prompt
(Qwen-VL's ``get_placeholder_str`` in ``vllm/model_executor/models/qwen2_vl.py`` / ``qwen3_vl.py``)
and expands it itself: a token prompt is always marked "updates not applied"
(``vllm/multimodal/processing/processor.py``), so a run already expanded by our protocol would be
expanded again (measured on vLLM 0.20's ``apply_token_matches``: 4 pads became 7, and a second
image's placeholder landed inside the first's run, silently). So the wire prompt collapses each
image's pad run to one pad (`collapse_image_pads`; the training ids stay expanded), and every
output must report the prompt length vLLM expanded it back to: anything but the state's length
(e.g. other min/max pixels on the engine's processor) raises instead of sampling from another
context than the policy is trained on.

**Stops.** Stops are exact per sample: vLLM stops each request at its own stop tokens, and
`cut_continuation` re-applies each state's own stops and budget to what came back (first stop
token kept, nothing after it, at most ``max_tokens``), so a sample can never run past its own
stop even if an engine were to ignore one. Stop *tokens*, not strings: a ``</tool_call>`` spelled
with ordinary tokens is not a call (as in the local generator and the protocol's parser).

**Logprobs.** vLLM returns the sampled token's logprob. A missing entry (None) or a non-finite
value (vLLM >= 0.14 can return NaN with prefix caching, NeMo-RL ``docs/adding-new-models.md``) is
*not* replaced by a number: the continuation carries NaN there, `VllmGeneratorStats` counts the
sample, and the trainer excludes every row holding a non-finite behaviour logprob from the loss
(`invalid_logprob_rows`) and logs the count. Nothing is silently trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from axpo_nemo.agent.loop import Continuation, SamplingParams, WorkCounters, per_state_params
from axpo_nemo.agent.trajectory import TrajectoryState, derive_seed

__all__ = [
    "LlmEngine",
    "NemoVllmEngine",
    "RawOutput",
    "VllmGenerator",
    "VllmGeneratorStats",
    "VllmRequest",
    "build_request",
    "check_logprobs",
    "cut_continuation",
    "invalid_logprob_rows",
    "standalone_vllm_generator",
    "stop_token_map",
]

#: vLLM's seeds are 64-bit signed; ours are 63-bit already, this keeps a margin for vLLM's offsets.
_SEED_MASK = (1 << 62) - 1


@dataclass
class VllmRequest:
    """One trajectory's next turn as a vLLM request.

    Attributes:
        prompt_token_ids: the state's tokens, each image's pad run collapsed to one pad.
        expected_prompt_len: the state's length, what vLLM must expand the prompt back to.
        images: the state's images in token order (PIL).
        max_tokens: tokens to sample at most (>= 1).
        stop_token_ids: tokens that end the turn (kept in the output).
        temperature, top_p: sampling settings (temperature 0: greedy).
        seed: the request's sampling seed.
        ignore_eos: EOS tokens are not among the stops.
    """

    prompt_token_ids: list[int]
    images: list[Any]
    max_tokens: int
    stop_token_ids: tuple[int, ...]
    temperature: float
    top_p: float
    seed: int
    ignore_eos: bool = False
    expected_prompt_len: int | None = None

    def to_wire(self) -> dict[str, Any]:
        """The request as plain data for `_vllm_remote.run_on_llm` (a TokensPrompt + SamplingParams kwargs)."""
        prompt: dict[str, Any] = {"prompt_token_ids": list(self.prompt_token_ids)}
        if self.images:
            prompt["multi_modal_data"] = {"image": list(self.images)}
        sampling = {
            "n": 1,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "max_tokens": int(self.max_tokens),
            "seed": int(self.seed),
            "logprobs": 0,
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": bool(self.ignore_eos),
            "skip_special_tokens": False,
        }
        return {"prompt": prompt, "sampling": sampling}


@dataclass
class RawOutput:
    """What an engine sampled for one request: tokens, per-token logprob (None: missing), reason,
    and the length of the prompt as the engine saw it (None: not reported)."""

    token_ids: list[int]
    logprobs: list[float | None]
    finish_reason: str = "stop"
    prompt_len: int | None = None

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> RawOutput:
        """From `_vllm_remote.run_on_llm`'s dict."""
        prompt_len = data.get("prompt_len")
        return cls(
            list(data["token_ids"]), list(data["logprobs"]), str(data.get("finish_reason", "stop")),
            None if prompt_len is None else int(prompt_len),
        )  # fmt: skip


@dataclass
class VllmGeneratorStats(WorkCounters):
    """Cumulative counters of a `VllmGenerator` (`reset` clears them).

    Attributes:
        generate_calls: ``generate`` calls.
        requests: requests sent to the engine.
        sampled_tokens: tokens returned (after cutting).
        invalid_logprob_samples: continuations with a missing or non-finite logprob.
        invalid_logprob_tokens: their bad tokens.
        cut_tokens: tokens an engine returned past a sample's own stop or budget (dropped).
    """

    generate_calls: int = 0
    requests: int = 0
    sampled_tokens: int = 0
    invalid_logprob_samples: int = 0
    invalid_logprob_tokens: int = 0
    cut_tokens: int = 0


def stop_token_map(tokenizer, texts: Sequence[str], eos_ids: Sequence[int] = ()) -> dict[int, str]:
    """``{token id: text}`` of the stop texts (each must be one token) plus the EOS ids.

    Raises ValueError naming a stop text that is not a single token.
    """
    out: dict[int, str] = {}
    for text in texts:
        token_id = tokenizer.convert_tokens_to_ids(text)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != text:
            raise ValueError(f"stop text {text!r} is not a single token of this tokenizer")
        out[int(token_id)] = text
    for e in eos_ids:
        out.setdefault(int(e), tokenizer.convert_ids_to_tokens(int(e)))
    return out


def collapse_image_pads(token_ids: Sequence[int], images: Sequence[Any]) -> list[int]:
    """``token_ids`` with each image slot's run of pad tokens collapsed to one pad (its first):
    the token prompt vLLM expects, one ``<|image_pad|>`` per image between vision start and end."""
    out: list[int] = []
    pos = 0
    for slot in sorted(images, key=lambda s: s.start):
        out.extend(token_ids[pos : slot.start])
        out.append(token_ids[slot.start])
        pos = slot.end
    out.extend(token_ids[pos:])
    return out


def build_request(
    state: TrajectoryState,
    params: SamplingParams,
    stops: Mapping[int, str],
    *,
    max_tokens_cap: int | None = None,
    max_model_len: int | None = None,
) -> VllmRequest | None:
    """The vLLM request continuing ``state`` by one turn, or None when no token may be sampled.

    The prompt is the state's tokens exactly (a forked state: its frozen prefix, through
    ``<tool_call>``) with its images in token order, so vLLM continues the prefix token for
    token. ``max_tokens`` is the smallest of the params' budget, ``max_tokens_cap`` (the engine's
    configured ``max_new_tokens``) and the room left in ``max_model_len``. The seed is derived
    from ``(params.seed, state.seed, len(state))`` as in the local generator.
    """
    budget = int(params.max_new_tokens)
    if max_tokens_cap is not None:
        budget = min(budget, int(max_tokens_cap))
    if max_model_len is not None:
        budget = min(budget, int(max_model_len) - len(state))
    if budget <= 0:
        return None
    images = [slot.image.image for slot in sorted(state.images, key=lambda s: s.start)]
    return VllmRequest(
        prompt_token_ids=collapse_image_pads(state.token_ids, state.images),
        expected_prompt_len=len(state),
        images=images,
        max_tokens=budget,
        stop_token_ids=tuple(sorted(stops)),
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        seed=derive_seed(params.seed, state.seed, len(state)) & _SEED_MASK,
        ignore_eos=bool(params.ignore_eos),
    )


def cut_continuation(raw: RawOutput, stops: Mapping[int, str], max_tokens: int) -> tuple[Continuation, int]:
    """Apply one sample's own stops and budget to an engine's output; returns (continuation, tokens cut).

    The continuation ends at its first stop token (kept, ``stop_reason="stop"``) or after
    ``max_tokens`` tokens (``"length"``). Logprobs are cut alongside; a missing one stays None
    here (`check_logprobs` turns it into NaN).
    """
    if len(raw.logprobs) != len(raw.token_ids):
        raise ValueError(
            f"engine output has {len(raw.token_ids)} tokens but {len(raw.logprobs)} logprob entries"
        )
    end, reason, stop = min(len(raw.token_ids), max_tokens), "length", None
    for i, token in enumerate(raw.token_ids[:end]):
        if token in stops:
            end, reason, stop = i + 1, "stop", stops[token]
            break
    cut = len(raw.token_ids) - end
    return Continuation(list(raw.token_ids[:end]), list(raw.logprobs[:end]), reason, stop), cut


def check_logprobs(logprobs: Sequence[float | None]) -> tuple[list[float], int]:
    """(logprobs with every missing or non-finite entry as NaN, number of such entries).

    A logprob must be a finite number <= 0 (a positive value is as invalid as NaN: it is not a
    log-probability). Nothing is replaced by a plausible number, so a downstream check cannot miss it.
    """
    out, bad = [], 0
    for value in logprobs:
        if value is None or not math.isfinite(value) or value > 0.0:
            out.append(math.nan)
            bad += 1
        else:
            out.append(float(value))
    return out, bad


def invalid_logprob_rows(generated: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """[R] bool: rows with a non-finite behaviour logprob on a generated token (to exclude from the loss)."""
    return (generated & ~torch.isfinite(logprobs)).any(dim=1)


class NemoVllmEngine:
    """Runs requests on NeMo-RL's ``VllmGeneration`` engines (one shard per data-parallel leader).

    The engines must be awake (between ``prepare_for_generation`` and ``finish_generation``) and
    use the synchronous engine (``vllm_cfg.async_engine: false``): the request function calls
    ``vllm.LLM.generate`` on the worker. Shards are contiguous so a question's N rollouts, and a
    prefix's K forks, land on the same engine and share its prefix cache.
    """

    def __init__(self, generation) -> None:
        cfg = getattr(generation, "cfg", {}) or {}
        if cfg.get("vllm_cfg", {}).get("async_engine", False):
            raise ValueError(
                "the AXPO vLLM generator needs policy.generation.vllm_cfg.async_engine: false "
                "(it calls the synchronous vllm.LLM of each NeMo-RL worker)"
            )
        self.generation = generation

    def _leaders(self) -> list:
        group = self.generation.worker_group
        return [group.workers[group.get_dp_leader_worker_idx(i)] for i in range(group.dp_size)]

    def run(self, requests: Sequence[VllmRequest]) -> list[RawOutput]:
        """Generate every request; outputs in request order."""
        import ray
        import ray.cloudpickle

        from axpo_nemo.nemo import _vllm_remote

        if not requests:
            return []
        # Ship the request function by value: the vLLM workers need nothing of this project.
        ray.cloudpickle.register_pickle_by_value(_vllm_remote)
        leaders = self._leaders()
        wire = [r.to_wire() for r in requests]
        per = -(-len(wire) // len(leaders))
        refs = [
            worker.__ray_call__.remote(_vllm_remote.run_on_vllm_worker, wire[i * per : (i + 1) * per])
            for i, worker in enumerate(leaders)
            if wire[i * per : (i + 1) * per]
        ]
        return [RawOutput.from_wire(out) for shard in ray.get(refs) for out in shard]


class LlmEngine:
    """Runs requests on a local ``vllm.LLM`` (evaluation outside a NeMo-RL cluster)."""

    def __init__(self, llm) -> None:
        self.llm = llm

    def run(self, requests: Sequence[VllmRequest]) -> list[RawOutput]:
        """Generate every request; outputs in request order."""
        from axpo_nemo.nemo._vllm_remote import run_on_llm

        return [RawOutput.from_wire(out) for out in run_on_llm(self.llm, [r.to_wire() for r in requests])]


@dataclass
class VllmGenerator:
    """The agent loop's `Generator` over a vLLM engine (see the module docstring).

    Args:
        engine: anything with ``run(requests) -> list[RawOutput]`` (`NemoVllmEngine`, `LlmEngine`).
        tokenizer: resolves the params' stop texts to token ids.
        eos_ids: the model's EOS token ids (stops unless ``ignore_eos``).
        max_tokens_cap: the engine's ``max_new_tokens`` (None: no cap).
        max_model_len: the engine's context length (None: unchecked).
    """

    engine: Any
    tokenizer: Any
    eos_ids: Sequence[int] = ()
    max_tokens_cap: int | None = None
    max_model_len: int | None = None
    stats: VllmGeneratorStats = field(default_factory=VllmGeneratorStats)

    def _stops(self, params: SamplingParams, cache: dict) -> dict[int, str]:
        key = (params.stop_token_texts, params.ignore_eos)
        if key not in cache:
            eos = () if params.ignore_eos else self.eos_ids
            cache[key] = stop_token_map(self.tokenizer, params.stop_token_texts, eos)
        return cache[key]

    def generate(
        self, states: Sequence[TrajectoryState], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Continuation]:
        """One continuation per state, in one engine call; never mutates the states."""
        params = per_state_params(states, params)
        self.stats.generate_calls += 1
        out: list[Continuation | None] = [None] * len(states)
        cache: dict = {}
        todo: list[tuple[int, VllmRequest, dict[int, str]]] = []
        for i, (state, p) in enumerate(zip(states, params, strict=True)):
            stops = self._stops(p, cache)
            request = build_request(
                state, p, stops, max_tokens_cap=self.max_tokens_cap, max_model_len=self.max_model_len
            )
            if request is None:
                out[i] = Continuation([], [], "length")
            else:
                todo.append((i, request, stops))
        raws = self.engine.run([r for _, r, _ in todo]) if todo else []
        if len(raws) != len(todo):
            raise RuntimeError(f"the vLLM engine returned {len(raws)} outputs for {len(todo)} requests")
        self.stats.requests += len(todo)
        for (i, request, stops), raw in zip(todo, raws, strict=True):
            expected = request.expected_prompt_len
            if raw.prompt_len is not None and expected is not None and raw.prompt_len != expected:
                raise RuntimeError(
                    f"vLLM expanded a prompt to {raw.prompt_len} tokens, the trajectory has {expected}: "
                    "its image placeholders do not match the policy's (check the processor's min/max "
                    "pixels on both sides)"
                )
            cont, cut = cut_continuation(raw, stops, request.max_tokens)
            cont.logprobs, bad = check_logprobs(cont.logprobs)
            self.stats.cut_tokens += cut
            self.stats.sampled_tokens += len(cont.token_ids)
            if bad:
                self.stats.invalid_logprob_samples += 1
                self.stats.invalid_logprob_tokens += bad
            out[i] = cont
        return out  # type: ignore[return-value]


def _eos_ids(tokenizer, model_path: str) -> list[int]:
    """EOS ids of a checkpoint: its generation config's and the tokenizer's."""
    ids: list[int] = []
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    except (OSError, ValueError):
        pass
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def standalone_vllm_generator(
    model_path: str, cfg, *, llm_factory: Callable[..., Any] | None = None
) -> VllmGenerator:
    """A `VllmGenerator` on a fresh ``vllm.LLM`` for ``model_path`` (evaluation outside training).

    Engine settings come from ``cfg.nemo.vllm`` (tensor_parallel, gpu_memory_utilization,
    enable_prefix_caching, precision, max_model_len, enforce_eager; defaults when the section is
    absent), ``cfg.rollout`` (max_new_tokens, max_total_tokens, max_images) and ``cfg.seed``.
    ``llm_factory`` replaces ``vllm.LLM`` (tests).
    """
    from transformers import AutoTokenizer

    from axpo_nemo.nemo import adapter

    vllm_cfg = getattr(getattr(cfg, "nemo", None), "vllm", None)

    def opt(name: str, default):
        value = getattr(vllm_cfg, name, None) if vllm_cfg is not None else None
        return default if value is None else value

    max_model_len = int(opt("max_model_len", cfg.rollout.max_total_tokens))
    precision = str(opt("precision", "bfloat16"))
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tensor_parallel_size": int(opt("tensor_parallel", 1)),
        "gpu_memory_utilization": float(opt("gpu_memory_utilization", 0.8)),
        "enable_prefix_caching": bool(opt("enable_prefix_caching", True)),
        "enforce_eager": bool(opt("enforce_eager", False)),
        "max_model_len": max_model_len,
        "dtype": "bfloat16" if precision == "fp8" else precision,
        "seed": int(cfg.seed),
        "logprobs_mode": "processed_logprobs",  # as NeMo-RL's engines, so eval and training sample alike
        "limit_mm_per_prompt": {"image": max(int(cfg.rollout.max_images), 1)},
        "trust_remote_code": False,
    }
    if precision == "fp8":
        kwargs["quantization"] = "fp8"
    llm = (llm_factory or adapter.vllm_llm_class())(**kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return VllmGenerator(
        LlmEngine(llm),
        tokenizer,
        eos_ids=_eos_ids(tokenizer, model_path),
        max_tokens_cap=int(cfg.rollout.max_new_tokens),
        max_model_len=max_model_len,
    )
