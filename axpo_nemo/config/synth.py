"""Settings of the synthetic tool task (`SynthConfig`, `FamilyWeights`) and its question families
(`FAMILIES`), apart from the generator in `axpo_nemo.data.synth` so that loading a config imports
no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from axpo_nemo.core.config import ValidatedConfig, setting

__all__ = ["FAMILIES", "FamilySpec", "FamilyWeights", "SynthConfig"]


@dataclass(frozen=True)
class FamilySpec:
    """A question family: the tool it needs (None: none) and how its answers are checked."""

    name: str
    tool: str | None
    answer_type: str
    description: str


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec("arith_small", None, "math", "one-digit addition or subtraction"),
        FamilySpec("color_mc", None, "multiple_choice", "the image's dominant colour, 2-4 options"),
        FamilySpec(
            "python_multiply", "python", "multiple_choice", "product of two numbers, 2-4 options"
        ),
        FamilySpec(
            "python_area", "python", "multiple_choice", "pixel area of a coloured rectangle, 2-4 options"
        ),
        FamilySpec(
            "search_fact", "search", "multiple_choice", "a made-up fact about a made-up country, 2-4 options"
        ),
        FamilySpec("zoom_digit", "image_zoom_in", "multiple_choice", "a tiny digit in a white box"),
    )
}


@dataclass
class FamilyWeights(ValidatedConfig):
    """Relative frequency of each question family (0 switches a family off)."""

    arith_small: float = setting(1.0, "No tool: one-digit addition/subtraction ('What is 3 + 4?').", ge=0.0)
    color_mc: float = setting(
        1.0, "No tool: the image's dominant colour as multiple choice (2-4 options).", ge=0.0
    )
    python_multiply: float = setting(
        1.0,
        "python: the product of two numbers (multiply_min..multiply_max) among 2-4 options; print(a * b) prints it.",
        ge=0.0,
    )
    python_area: float = setting(
        0.75,
        "python: the pixels covered by a coloured rectangle among 2-4 options, counted by code "
        "over `image` (the colour's exact RGB triple is the call's choice).",
        ge=0.0,
    )
    search_fact: float = setting(
        1.0,
        "search: a made-up fact ('capital of Zorblat') among 2-4 options, stated by the top "
        "passage for the query '<country> <relation>'.",
        ge=0.0,
    )
    zoom_digit: float = setting(
        0.0,
        "image_zoom_in: a tiny digit in a white box, readable only in a crop (multiple choice). Off "
        "by default: the answer must be read from the crop's pixels, which a tiny vision tower "
        "trained for minutes does not learn; for larger models.",
        ge=0.0,
    )

    def as_dict(self) -> dict[str, float]:
        """Family name → weight, in `FAMILIES` order."""
        return {name: float(getattr(self, name)) for name in FAMILIES}


@dataclass
class SynthConfig(ValidatedConfig):
    """Settings of the synthetic multimodal tool task (``axpo data synth``)."""

    seed: int = setting(0, "Seed of everything generated; the same config gives byte-identical files.")
    num_sft: int = setting(200, "SFT trajectories (sft.jsonl).", ge=0)
    num_rl: int = setting(64, "RL questions (rl.jsonl).", ge=0)
    num_eval: int = setting(32, "Held-out evaluation questions (eval.jsonl), disjoint from sft/rl.", ge=0)
    tool_fraction: float = setting(
        0.25,
        "Share of SFT trajectories that call a tool (tool families); the rest answer directly. "
        "RL and eval questions follow the family weights alone.",
        ge=0.0,
        le=1.0,
    )
    guess_fraction: float = setting(
        0.0,
        "Share of SFT trajectories that answer a tool family's multiple-choice question directly, "
        "without the tool: right guesses, as a correctness-filtered distilled SFT set keeps them. "
        "They teach the policy that acting is optional, so RL starts with tool use on only part "
        "of the tool questions (tool_fraction + guess_fraction <= 1; the rest are no-tool families).",
        ge=0.0,
        le=1.0,
    )
    weights: FamilyWeights = field(default_factory=FamilyWeights)
    image_size: int = setting(
        256,
        "Side of the square images in pixels. The tiny processor shrinks images to 128 px, which "
        "is what makes zoom_digit's 3x5 digit unreadable without a crop.",
        ge=64,
        le=2048,
    )
    arith_max: int = setting(9, "arith_small: operands range over 0..arith_max.", ge=2, le=99)
    multiply_min: int = setting(12, "python_multiply: smallest operand.", ge=2)
    multiply_max: int = setting(99, "python_multiply: largest operand.", ge=3)
    multiply_words: bool = setting(
        False,
        "python_multiply: spell the operands as words ('What is seven times six?'), so that writing "
        "print(7*6) maps each word to its digits (a choice the model learns, like a colour's RGB "
        "triple) instead of copying digits that the options repeat. Needs multiply_max <= 20.",
    )
    area_min_side: int = setting(4, "python_area: shortest side of the counted rectangle, in pixels.", ge=1)
    area_max_side: int = setting(
        0,
        "python_area: longest side of the counted rectangle, in pixels (0: a third of image_size). "
        "Sides up to 3 keep every count one digit, so the answer copied from python's output is "
        "one token.",
        ge=0,
    )
    min_options: int = setting(2, "Multiple-choice questions have at least this many options.", ge=2, le=6)
    max_options: int = setting(4, "Multiple-choice questions have at most this many options.", ge=2, le=6)
    corpus_distractors: int = setting(
        16, "search_fact: extra made-up countries in the corpus that no question asks about.", ge=0
    )

    def __post_init__(self) -> None:
        """Check bounds, then that the families can fill the requested splits."""
        super().__post_init__()
        if isinstance(self.weights, dict):  # built from a plain mapping (e.g. YAML)
            self.weights = FamilyWeights(**self.weights)
        errors = []
        if self.multiply_min > self.multiply_max:
            errors.append(f"multiply_min ({self.multiply_min}) must be <= multiply_max ({self.multiply_max})")
        if self.multiply_words and self.multiply_max > 20:
            errors.append(f"multiply_words needs multiply_max <= 20 (got {self.multiply_max})")
        if self.area_max_side and self.area_min_side > self.area_max_side:
            errors.append(f"area_min_side ({self.area_min_side}) must be <= area_max_side ({self.area_max_side})")
        if max(self.area_min_side, self.area_max_side) > self.image_size // 2:
            errors.append(f"area sides must be at most image_size // 2 ({self.image_size // 2})")
        if self.min_options > self.max_options:
            errors.append(f"min_options ({self.min_options}) must be <= max_options ({self.max_options})")
        w = self.weights.as_dict()
        tool_w = sum(v for k, v in w.items() if FAMILIES[k].tool)
        plain_w = sum(v for k, v in w.items() if not FAMILIES[k].tool)
        if (self.num_rl or self.num_eval or self.num_sft) and tool_w + plain_w <= 0:
            errors.append("weights: at least one family needs a positive weight")
        if self.num_sft and self.tool_fraction > 0 and tool_w <= 0:
            errors.append(
                "tool_fraction > 0 needs a tool family with a positive weight (weights.python_*, ...)"
            )
        if self.tool_fraction + self.guess_fraction > 1:
            errors.append(
                f"tool_fraction + guess_fraction ({self.tool_fraction} + {self.guess_fraction}) must be <= 1"
            )
        if self.num_sft and self.guess_fraction > 0 and tool_w <= 0:
            errors.append("guess_fraction > 0 needs a tool family with a positive weight")
        if self.num_sft and self.tool_fraction + self.guess_fraction < 1 and plain_w <= 0:
            errors.append(
                "tool_fraction < 1 needs a no-tool family with a positive weight "
                "(weights.arith_small, weights.color_mc), or set tool_fraction: 1"
            )
        if errors:
            raise ValueError("SynthConfig: " + "; ".join(errors))
