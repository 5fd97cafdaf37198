"""Settings of a Pass@k evaluation (`EvalConfig`), apart from `axpo_nemo.eval.passk` so that loading
a config imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from axpo_nemo.core.config import ValidatedConfig, setting

__all__ = ["EvalConfig"]


@dataclass
class EvalConfig(ValidatedConfig):
    """How a question file is evaluated."""

    samples_per_question: int = setting(
        4, "Rollouts n per question; at least max(ks) (unbiased pass@k needs n >= k).", ge=1
    )
    ks: list[int] = setting([1, 4], "The k of each reported Pass@k (each >= 1 and <= samples_per_question).", ge=1)
    batch_size: int = setting(
        32, "Trajectories run through the agent loop together (per generator call) at most.", ge=1
    )
    temperature: float = setting(
        1.0, "Sampling temperature (overrides the agent loop's). 0: greedy, then n must be 1.", ge=0.0
    )
    top_p: float = setting(1.0, "Nucleus sampling mass (overrides the agent loop's).", gt=0.0, le=1.0)
    max_questions: int | None = setting(None, "Evaluate only the first this many questions; null: all.", ge=1)
    seed: int = setting(0, "Base seed: every rollout's seed derives from (seed, question id, sample index).")
    max_text_chars: int = setting(
        4000, "Final-turn text kept per rollout in the results file (its tail); 0: none.", ge=0
    )

    def __post_init__(self) -> None:
        """Check bounds, that every k is in [1, n], and that greedy decoding uses n = 1."""
        super().__post_init__()
        errors = []
        if not self.ks:
            errors.append("ks: give at least one k")
        elif any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in self.ks):
            errors.append(f"ks: every k must be an integer >= 1 (got {list(self.ks)})")
        elif max(self.ks) > self.samples_per_question:
            errors.append(
                f"ks: max k ({max(self.ks)}) exceeds samples_per_question ({self.samples_per_question}); "
                "unbiased pass@k needs n >= k"
            )
        if self.temperature == 0 and self.samples_per_question != 1:
            errors.append(
                "temperature: 0 (greedy) makes every sample identical; set samples_per_question: 1 "
                "and ks: [1]"
            )
        if errors:
            raise ValueError("EvalConfig: " + "; ".join(errors))
        self.ks = sorted(set(self.ks))
