"""Optimizer, learning-rate schedule and state-snapshot helpers shared by the SFT and RL trainers.

RNG capture/restore lives in `axpo_nemo.run.rng` (it stores the states in checkpointable types).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "WarmupCosineSchedule",
    "build_adamw",
    "clip_and_step",
    "clone_state",
]


def build_adamw(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay only on matrices (not norms or biases).

    ``foreach=False`` keeps the update a plain per-parameter loop, identical from run to run.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, foreach=False)


class WarmupCosineSchedule:
    """Linear warm-up from 0 to the base LR over ``warmup_steps``, then cosine decay to ``min_lr_ratio``.

    ``lr(step) = base · f(step)``: ``f = (step + 1) / warmup`` during warm-up (so the first update
    is not wasted at LR 0), then ``min + (1 - min) · (1 + cos(π·p)) / 2`` with p the fraction of
    the decay phase done (held at its end after ``total_steps``). Call `apply` before each
    optimizer step and `step` after it; the state is just the step counter.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
    ) -> None:
        self.optimizer = optimizer
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), 1)
        self.min_lr_ratio = float(min_lr_ratio)
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs, strict=True):
            g["initial_lr"] = lr
        self.last_step = 0

    def factor(self, step: int) -> float:
        """The LR multiplier at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self) -> float:
        """Set the optimizer's LRs for the current step; returns the first group's LR."""
        f = self.factor(self.last_step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * f
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        """Advance to the next step."""
        self.last_step += 1

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position and settings."""
        return {
            "last_step": self.last_step,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "base_lrs": list(self.base_lrs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.last_step = int(state["last_step"])
        self.warmup_steps = int(state["warmup_steps"])
        self.total_steps = int(state["total_steps"])
        self.min_lr_ratio = float(state["min_lr_ratio"])
        self.base_lrs = list(state["base_lrs"])


def clip_and_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float
) -> tuple[float, bool]:
    """Clip gradients to ``grad_clip`` (0: no clipping) and step; returns (grad norm, stepped).

    Every trainable parameter takes part, with a zero gradient if nothing reached it (e.g. the
    vision tower on a text-only batch), so an update does not depend on which rows happened to
    be computed. A non-finite gradient norm skips the update (gradients are dropped), so one bad
    batch cannot poison the weights or the Adam moments.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return 0.0, False
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False))
    stepped = math.isfinite(norm)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, stepped


def clone_state(obj: Any) -> Any:
    """A deep copy of a (nested) state dict whose tensors are detached clones.

    ``module.state_dict()`` returns live references to the parameters; a checkpoint taken in
    memory must not change when training continues.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return type(obj)((k, clone_state(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(clone_state(v) for v in obj)
    return obj


