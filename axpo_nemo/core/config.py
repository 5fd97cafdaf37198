"""Typed settings of the AXPO algorithm: resampling, advantages and loss.

These dataclasses are the single definition of every algorithm knob. The YAML schema in
`axpo_nemo.config` embeds them unchanged, and any other RL framework can build them directly.
Each field documents itself (`help`) and declares its valid values (`choices`, bounds); the same
declarations validate a dataclass built in code (`__post_init__`) and a YAML tree (with full key
paths), so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """Declare a documented config field with optional valid choices and numeric bounds.

    Example: ``r: float = setting(0.25, "budget ratio", ge=0.0, le=1.0)``. For a list field the
    choices and bounds apply to every element (``ks: list[int] = setting([1, 4], "...", ge=1)``).
    Mutable defaults (lists, dicts) are wrapped in a default factory.
    """
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_errors(obj: Any, prefix: str = "", schema: type | None = None) -> list[str]:
    """Check an object's fields against the choices and bounds its dataclass declares.

    ``obj`` is a dataclass instance, or any attribute-bearing node (e.g. an OmegaConf node) when
    ``schema`` names its dataclass. A list (or tuple) field's choices and bounds constrain each
    element (named ``key[i]``). Returns one message per violation, each starting with the field's
    key path (``prefix`` + field name). Nested dataclasses are not descended into.
    """
    errors = []
    for f in dataclasses.fields(schema or obj):
        meta = f.metadata
        if not meta:
            continue
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if value is None:
            continue
        is_list = isinstance(value, Sequence) and not isinstance(value, str)
        items = list(enumerate(value)) if is_list else [(None, value)]
        if meta.get("choices") is not None:
            bad = [v for _, v in items if v not in meta["choices"]]
            if bad:
                allowed = ", ".join(str(c) for c in meta["choices"])
                errors.append(f"{key}: must be one of {allowed} (got {bad[0]!r})")
                continue
        for i, item in items:
            problem = _bound_error(item, meta)
            if problem:
                errors.append(f"{key}{'' if i is None else f'[{i}]'}: {problem}")
                break  # one message per field
    return errors


_BOUNDS = (
    ("ge", lambda v, b: v >= b, ">="),
    ("gt", lambda v, b: v > b, ">"),
    ("le", lambda v, b: v <= b, "<="),
    ("lt", lambda v, b: v < b, "<"),
)


def _bound_error(value: Any, meta: Any) -> str | None:
    """Why a number breaks the declared bounds (None when it does not, or is no number)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isnan(value):
        return "must be a number (got nan)"
    for bound, ok, word in _BOUNDS:
        b = meta.get(bound)
        if b is not None and not ok(value, b):
            return f"must be {word} {b} (got {value!r})"
    return None


class ValidatedConfig:
    """Mixin: validate declared field constraints when a dataclass is built in code."""

    def __post_init__(self) -> None:
        errors = field_errors(self)
        if errors:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(errors))


SELECTION_MODES = ("uncertainty", "random", "confident")


@dataclass
class AXPOConfig(ValidatedConfig):
    """Tool-call resampling from a frozen thinking prefix (DESIGN.md §1, steps 1-6)."""

    r: float = setting(
        0.25,
        "Extra-generation budget as a fraction of the step's B·N rollouts. At most "
        "M = floor(r·B·N/K) prefixes are resampled per step.",
        ge=0.0,
        le=4.0,
    )
    k: int = setting(4, "Continuations K sampled from each selected prefix.", ge=1)
    selection: str = setting(
        "uncertainty",
        "Order of candidate prefixes: 'uncertainty' (least confident tool call first), "
        "'random' (seeded) or 'confident' (most confident first). Ablation switch.",
        choices=SELECTION_MODES,
    )
    prefix_fixing: bool = setting(
        True,
        "Resample from the frozen prefix up to the <tool_call> marker. False: the K extra "
        "rollouts are fresh full rollouts from the question, normalised with its group "
        "(budget-matched 'more samples'). Ablation switch.",
    )
    prefix_credit: bool = setting(
        True,
        "Credit a selected source's prefix tokens with r_prefix (1 if any continuation is "
        "correct). False: the prefix keeps the source's own advantage. Ablation switch.",
    )
    separate_groups: bool = setting(
        True,
        "Normalise each prefix's K continuations as their own advantage group. False: jointly "
        "with the N rollouts of the question's group. Ablation switch.",
    )


@dataclass
class AdvantageConfig(ValidatedConfig):
    """Group-relative advantage normalisation."""

    normalize_std: bool = setting(
        True,
        "Divide by the group's reward std (GRPO). False: only subtract the group mean "
        "(Dr.GRPO-style).",
    )
    epsilon: float = setting(1e-6, "Added to the std before dividing.", gt=0.0)


KL_TYPES = ("k1", "k2", "k3")


@dataclass
class LossConfig(ValidatedConfig):
    """Token-level PPO-clip policy loss with KL to a fixed reference policy."""

    clip_low: float = setting(0.2, "PPO ratio clip below: ratio >= 1 - clip_low.", ge=0.0, lt=1.0)
    clip_high: float = setting(
        0.28, "PPO ratio clip above: ratio <= 1 + clip_high (asymmetric, DAPO 'clip-higher').", ge=0.0
    )
    dual_clip: float | None = setting(
        None,
        "Dual-clip constant c > 1: for negative advantages the loss is capped at -A·c. null disables.",
        gt=1.0,
    )
    kl_coef: float = setting(0.01, "Coefficient β of the KL penalty to the reference policy.", ge=0.0)
    kl_type: str = setting(
        "k3",
        "KL estimator: 'k1' (log ratio), 'k2' (half squared log ratio), 'k3' (exp(d) - d - 1).",
        choices=KL_TYPES,
    )
    kl_input_clamp: float | None = setting(
        20.0, "Clamp the reference/policy log ratio to ±this before the KL estimator; null: off.", gt=0.0
    )
    kl_output_clamp: float | None = setting(
        10.0, "Clamp each token's KL value to ±this; null: off.", gt=0.0
    )
