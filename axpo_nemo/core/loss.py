"""Token-level PPO-clip loss with asymmetric clipping, optional dual clip and reference KL.

Per loss token t with ratio ρ = exp(logπ - logπ_old) and advantage A:

    pg_t  = max(-A·ρ, -A·clip(ρ, 1 - ε_low, 1 + ε_high))
    pg_t  = min(pg_t, -A·c)                       (dual clip, only where A < 0)
    kl_t  = estimator(logπ_ref - logπ)            (k1 | k2 | k3, optional clamps)
    loss  = Σ_t mask_t · (pg_t + β·kl_t) / N_tokens

N_tokens is the number of loss tokens in the *global* batch, so a trainer that splits the batch
into micro-batches (or data-parallel ranks) passes the same ``num_tokens`` to each call and sums
the results: the sum equals the loss of the whole batch (DESIGN.md §1 step 7). Returned metrics
are normalised the same way, so they also sum across micro-batches.
"""

from __future__ import annotations

import torch

from axpo_nemo.core.config import LossConfig


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Per-token KL(π || π_ref) estimate from sampled tokens (Schulman's k1/k2/k3)."""
    delta = ref_logprobs - logprobs
    if cfg.kl_input_clamp is not None:
        delta = delta.clamp(-cfg.kl_input_clamp, cfg.kl_input_clamp)
    if cfg.kl_type == "k1":
        kl = -delta
    elif cfg.kl_type == "k2":
        kl = 0.5 * delta.square()
    else:
        kl = delta.exp() - delta - 1.0
    if cfg.kl_output_clamp is not None:
        kl = kl.clamp(-cfg.kl_output_clamp, cfg.kl_output_clamp)
    return kl


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: LossConfig | None = None,
    ref_logprobs: torch.Tensor | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The AXPO/GRPO policy loss over one (micro-)batch.

    Args:
        logprobs: [R, S] current policy logprobs of the tokens (differentiable).
        old_logprobs: [R, S] logprobs of the policy that sampled (or was last synced), no grad.
        advantages: [R, S] per-token advantages (e.g. `StepAdvantages.advantages`).
        loss_mask: [R, S] tokens that carry loss.
        cfg: clipping and KL settings (defaults: ε_low 0.2, ε_high 0.28, k3, β 0.01).
        ref_logprobs: [R, S] reference-policy logprobs; required when ``cfg.kl_coef > 0``.
        num_tokens: loss tokens in the global batch; defaults to this batch's ``loss_mask.sum()``.

    Returns:
        (loss, metrics): a scalar to backpropagate, and detached sums already divided by
        ``num_tokens``: ``pg_loss``, ``kl_penalty``, ``clip_fraction_low``,
        ``clip_fraction_high``, ``dual_clip_fraction``, ``ratio_mean``; plus ``num_tokens``.
    """
    cfg = cfg or LossConfig()
    mask = loss_mask.to(logprobs.dtype)
    # Masked positions may hold NaN/inf (padding, dropped rows); NaN·0 is NaN, so zero them first.
    keep = loss_mask.to(torch.bool)
    logprobs = torch.where(keep, logprobs, 0.0)
    old_logprobs = torch.where(keep, old_logprobs, 0.0)
    advantages = torch.where(keep, advantages, 0.0)
    if ref_logprobs is not None:
        ref_logprobs = torch.where(keep, ref_logprobs, 0.0)
    if num_tokens is None:
        num_tokens = mask.sum()
    denom = torch.as_tensor(num_tokens, dtype=logprobs.dtype, device=logprobs.device).clamp(min=1.0)

    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(-advantages * ratio, -advantages * clipped)
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if cfg.dual_clip is not None:
        cap = -advantages * cfg.dual_clip
        dual = (advantages < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
    token_loss = pg
    kl = torch.zeros_like(pg)
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("policy_loss: kl_coef > 0 needs ref_logprobs")
        kl = kl_estimate(logprobs, ref_logprobs, cfg)
        token_loss = pg + cfg.kl_coef * kl
    loss = (token_loss * mask).sum() / denom

    with torch.no_grad():
        m = mask.detach()
        metrics = {
            "pg_loss": (pg.detach() * m).sum() / denom,
            "kl_penalty": (kl.detach() * m).sum() / denom,
            "clip_fraction_low": (((ratio < 1.0 - cfg.clip_low) & (advantages < 0)).to(m.dtype) * m).sum() / denom,
            "clip_fraction_high": (((ratio > 1.0 + cfg.clip_high) & (advantages > 0)).to(m.dtype) * m).sum()
            / denom,
            "dual_clip_fraction": (dual.to(m.dtype) * m).sum() / denom,
            "ratio_mean": (ratio.detach() * m).sum() / denom,
            "num_tokens": m.sum(),
        }
    return loss, metrics
