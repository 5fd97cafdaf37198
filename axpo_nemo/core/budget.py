"""The resampling budget M = floor(r·B·N / K), exactly and without torch, so config-time code
(the cluster memory plan, ``max_rows_per_step``) computes the same M as the training step."""

from __future__ import annotations

from fractions import Fraction

__all__ = ["resample_budget"]


def resample_budget(num_rollouts: int, r: float, k: int) -> int:
    """M = floor(r·B·N / K), with B·N = ``num_rollouts``, computed exactly (no float rounding).

    ``r`` is read as the decimal it was written as (0.29 is 29/100), so r·B·N = 29 for
    B·N = 100, where the float product 0.29 · 100 = 28.999… would floor to 28.
    """
    return int(Fraction(r).limit_denominator(10**9) * num_rollouts // k)
