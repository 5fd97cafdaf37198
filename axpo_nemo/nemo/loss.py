"""`AXPOLossFn`: the AXPO policy loss as a NeMo-RL (v0.7.0) ``LossFunction``.

AXPO's loss is token-level PPO-clip with asymmetric clipping and a k1/k2/k3 KL to a fixed
reference (DESIGN.md §1 step 7); what makes it AXPO is *which* tokens carry loss and with which
advantage — per-token advantages ``[B, S]`` from `assemble_advantages` (resampled continuations,
credited source prefixes, frozen prefixes at 0) and its loss mask. Both travel in the train data
(`axpo_nemo.nemo.train_data`), so the clipped-PG and reference-KL arithmetic is NeMo-RL's own
``ClippedPGLossFn``, built from our `LossConfig`:

==========================  =====================================
`LossConfig`                ``ClippedPGLossConfig``
==========================  =====================================
clip_low / clip_high        ratio_clip_min / ratio_clip_max
dual_clip                   ratio_clip_c
kl_coef / kl_type           reference_policy_kl_penalty / _type
kl_input/output_clamp       kl_input/output_clamp_value
(always)                    token_level_loss = True
==========================  =====================================

Around that call `AXPOLossFn` (1) checks the micro-batch's keys and shapes, (2) enforces the mask
``token_mask · sample_mask`` on the advantages and zeroes every logprob off it — a zero-weight
padding row or an excluded row may hold anything there, and NeMo-RL's masked means multiply, so a
NaN off the mask would otherwise poison the loss — and (3) adds AXPO's metrics. NeMo-RL sums each
metric over micro-batches (and Megatron divides by the number of global batches), so every AXPO
metric is a micro-batch sum divided by the *global* ``global_valid_toks`` / ``global_valid_seqs``:
the sum over a global batch's micro-batches is the global value.

Importable without NeMo-RL: NeMo-RL is imported through `axpo_nemo.nemo.adapter` when the loss is
built. Workers unpickle the object, so ``axpo_nemo`` must import in the policy workers' environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from axpo_nemo.core.config import LossConfig
from axpo_nemo.nemo.train_data import PREFIX_END_KEY, RESAMPLED_KEY

#: ``ClippedPGLossConfig`` keys that `LossConfig` sets (override them through `LossConfig`).
_OWNED_KEYS = {
    "ratio_clip_min": "clip_low",
    "ratio_clip_max": "clip_high",
    "ratio_clip_c": "dual_clip",
    "reference_policy_kl_penalty": "kl_coef",
    "reference_policy_kl_type": "kl_type",
    "kl_input_clamp_value": "kl_input_clamp",
    "kl_output_clamp_value": "kl_output_clamp",
}
#: ``ClippedPGLossConfig`` keys a cluster config may still set (off-policy corrections).
EXTRA_PG_KEYS = (
    "use_importance_sampling_correction",
    "truncated_importance_sampling_type",
    "truncated_importance_sampling_ratio",
    "truncated_importance_sampling_ratio_min",
    "use_on_policy_kl_approximation",
    "force_on_policy_ratio",
)
#: Keys every micro-batch must carry (prev/reference logprobs are added by the training loop).
REQUIRED_KEYS = ("input_ids", "token_mask", "sample_mask", "advantages", "generation_logprobs")
#: Logprob keys sanitised off the loss mask ([B, S] ones; ``curr_logprobs_unfiltered`` is [B, S-1]).
_LOGPROB_KEYS = ("prev_logprobs", "generation_logprobs", "reference_policy_logprobs")
#: The metrics `AXPOLossFn` adds to ClippedPGLossFn's.
AXPO_METRIC_NAMES = (
    "axpo_resampled_token_share",
    "axpo_source_prefix_token_share",
    "axpo_resampled_sample_share",
    "axpo_advantage_mean",
    "axpo_advantage_abs_mean",
)


def clipped_pg_config(cfg: LossConfig, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``ClippedPGLossConfig`` fields for ``cfg`` (module docstring: the mapping).

    ``overrides`` may set only `EXTRA_PG_KEYS`; a key `LossConfig` owns, or anything that would
    turn the loss into something other than token-level PPO-clip, raises ValueError.
    """
    fields: dict[str, Any] = {
        "token_level_loss": True,
        "disable_ppo_ratio": False,
        "sequence_level_importance_ratios": False,
        "use_kl_in_reward": False,
        "use_cispo": False,
        "positive_example_nll_weight": 0.0,
        "ratio_clip_min": float(cfg.clip_low),
        "ratio_clip_max": float(cfg.clip_high),
        "ratio_clip_c": None if cfg.dual_clip is None else float(cfg.dual_clip),
        "reference_policy_kl_penalty": float(cfg.kl_coef),
        "reference_policy_kl_type": cfg.kl_type,
        "kl_input_clamp_value": None if cfg.kl_input_clamp is None else float(cfg.kl_input_clamp),
        "kl_output_clamp_value": None if cfg.kl_output_clamp is None else float(cfg.kl_output_clamp),
    }
    for key, value in (overrides or {}).items():
        if key in _OWNED_KEYS:
            raise ValueError(f"loss override {key!r}: set it through loss.{_OWNED_KEYS[key]} instead")
        if key not in EXTRA_PG_KEYS:
            raise ValueError(
                f"loss override {key!r} is not supported by AXPOLossFn (token-level PPO-clip); "
                f"allowed: {', '.join(EXTRA_PG_KEYS)}"
            )
        fields[key] = value
    return fields


def _share(total: torch.Tensor, denominator) -> float:
    """``total / denominator`` as a float, 0 when the global count is 0 (nothing to normalise)."""
    den = float(denominator)
    return float(total) / den if den > 0 else 0.0


class AXPOLossFn:
    """AXPO's policy loss for NeMo-RL workers: NeMo-RL's ClippedPGLossFn on AXPO's advantages/masks.

    Attributes read by NeMo-RL (v0.7.0): ``loss_type`` (TOKEN_LEVEL: the workers compute
    ``global_valid_toks`` from ``token_mask[:, 1:] * sample_mask``), ``input_type`` (LOGPROB: it
    receives ``next_token_logprobs`` [B, S-1]), ``reference_policy_kl_penalty`` (``prepare_loss_input``
    computes unfiltered logprobs for the KL when top-k/top-p is on and this is non-zero) and
    ``use_linear_ce_fusion`` (False: ClippedPGLossFn expects logprobs computed from logits).

    Args:
        cfg: clipping and KL settings (defaults: ε_low 0.2, ε_high 0.28, k3, β 0.01).
        overrides: optional `EXTRA_PG_KEYS` settings passed to ``ClippedPGLossConfig``.
    """

    use_linear_ce_fusion = False

    def __init__(self, cfg: LossConfig | None = None, overrides: Mapping[str, Any] | None = None) -> None:
        from axpo_nemo.nemo import adapter

        pg_loss_cls, pg_config_cls = adapter.clipped_pg_loss()
        self.cfg = cfg or LossConfig()
        self.pg_config = pg_config_cls(**clipped_pg_config(self.cfg, overrides))
        self.pg_loss = pg_loss_cls(self.pg_config)
        self.loss_type = self.pg_loss.loss_type
        self.input_type = self.pg_loss.input_type
        self.reference_policy_kl_penalty = self.pg_loss.reference_policy_kl_penalty

    def __call__(
        self,
        next_token_logprobs: torch.Tensor,
        data: Mapping[str, Any],
        global_valid_seqs: torch.Tensor,
        global_valid_toks: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss of one micro-batch, already divided by the global token count, and its metrics.

        ``data`` is the micro-batch (a ``BatchedDataDict`` slice, or a plain dict of one unpadded
        sequence under sequence packing) with at least `REQUIRED_KEYS`, plus ``prev_logprobs`` and
        ``reference_policy_logprobs`` as ClippedPGLossFn needs them.
        """
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise KeyError(f"AXPOLossFn: the train data lacks {missing} (see axpo_nemo.nemo.train_data)")
        token_mask = data["token_mask"]
        if token_mask.dim() != 2:
            raise ValueError(f"AXPOLossFn: token_mask must be [B, S], got {tuple(token_mask.shape)}")
        rows, width = token_mask.shape
        for key in ("advantages", "generation_logprobs", *_LOGPROB_KEYS):
            if key in data and tuple(data[key].shape) != (rows, width):
                raise ValueError(
                    f"AXPOLossFn: {key} has shape {tuple(data[key].shape)}, expected {(rows, width)} like token_mask"
                )
        if tuple(data["sample_mask"].shape) != (rows,):
            raise ValueError(
                f"AXPOLossFn: sample_mask has shape {tuple(data['sample_mask'].shape)}, expected ({rows},)"
            )
        if tuple(next_token_logprobs.shape) != (rows, width - 1):
            raise ValueError(
                f"AXPOLossFn: next_token_logprobs has shape {tuple(next_token_logprobs.shape)}, "
                f"expected {(rows, width - 1)} (one less than the sequence)"
            )

        weight = token_mask.to(torch.float32) * data["sample_mask"].to(torch.float32)[:, None]
        keep = weight > 0
        inner = dict(data.items())
        inner["advantages"] = torch.where(keep, data["advantages"], 0.0)
        for key in _LOGPROB_KEYS:
            if key in data:
                inner[key] = torch.where(keep, data[key], 0.0)
        if "curr_logprobs_unfiltered" in data:
            inner["curr_logprobs_unfiltered"] = torch.where(
                keep[:, 1:], data["curr_logprobs_unfiltered"], 0.0
            )
        logprobs = torch.where(keep[:, 1:], next_token_logprobs, 0.0)

        loss, metrics = self.pg_loss(logprobs, inner, global_valid_seqs, global_valid_toks)
        with torch.no_grad():
            metrics.update(self._axpo_metrics(inner, weight, global_valid_seqs, global_valid_toks))
        return loss, metrics

    @staticmethod
    def _axpo_metrics(
        data: Mapping[str, Any], weight: torch.Tensor, global_valid_seqs, global_valid_toks
    ) -> dict[str, float]:
        """AXPO's per-micro-batch metrics, normalised by the global counts (module docstring)."""
        rows, width = weight.shape
        loss_weight = weight[:, 1:]
        advantages = data["advantages"][:, 1:].to(torch.float32)
        zeros = torch.zeros(rows, device=weight.device)
        resampled = data.get(RESAMPLED_KEY, zeros).to(weight.device, torch.float32)
        prefix_end = data.get(PREFIX_END_KEY, zeros).to(weight.device)
        in_prefix = (torch.arange(1, width, device=weight.device)[None, :] < prefix_end[:, None]).to(
            torch.float32
        )
        sample_mask = data["sample_mask"].to(torch.float32)
        return {
            "axpo_resampled_token_share": _share((loss_weight * resampled[:, None]).sum(), global_valid_toks),
            "axpo_source_prefix_token_share": _share((loss_weight * in_prefix).sum(), global_valid_toks),
            "axpo_resampled_sample_share": _share((sample_mask * resampled).sum(), global_valid_seqs),
            "axpo_advantage_mean": _share((loss_weight * advantages).sum(), global_valid_toks),
            "axpo_advantage_abs_mean": _share((loss_weight * advantages.abs()).sum(), global_valid_toks),
        }
