"""The synthetic multimodal tool task (``axpo data synth``): a small, deterministic dataset on
which a tiny Qwen3-VL can show what AXPO is about (tool use and accuracy over RL) in minutes.

Six question families, two answerable without tools and four that need one. The tool
families are multiple choice (2-4 options): without the tool a rollout can only guess, right
1/k of the time; with it, a right call shows the answer, which the policy copies:

========================  ===============  ==============================================
family                    tool             the right call (a small choice) / why
========================  ===============  ==============================================
``arith_small``           none             "What is 3 + 4?": the one-digit table, not
                                           held out (``SHARED_KEYS``: it is knowledge)
``color_mc``              none             dominant colour, 2-4 options: learnable,
                                           guessable (1/k)
``python_multiply``       python           ``print(a*b)``: both operands copied from
                                           the question; one digit off prints a number
                                           in no option
``python_area``           python           count the named colour's exact RGB triple over
                                           ``image`` (a 6-way choice)
``search_fact``           search           query ``"<relation> of <country>"`` (the name
                                           copied, the relation a 4-way choice); another
                                           relation retrieves another fact
``zoom_digit``            image_zoom_in    a 3x5-pixel digit, readable only in the crop;
                                           off by default (reading pixels is beyond a
                                           tiny vision tower trained for minutes)
========================  ===============  ==============================================

SFT trajectories answer a tool question with a call then the copied value (``tool_fraction``)
or, as right guesses a correctness-filtered distilled set would keep, directly with the letter
(``guess_fraction``), so the SFT policy uses the tool on only part of the tool questions. Early in
RL a group's tool rollouts are then often all wrong while guesses sometimes win: the situation
AXPO's resampling targets (docs/results.md).

Everything derives from ``SynthConfig.seed`` through string-seeded `random.Random` streams, so
the same config gives byte-identical files. Held-out questions are disjoint from the training
ones by construction: each question has a *key* (its operands, its colour and size, its
entity…), and a fixed hash of (family, key) puts every key in either the training or the
held-out partition, never both.

Outputs (`synthesize`): ``sft.jsonl`` (trajectories, `Sample.messages` holds the assistant turns
only: replaying them through the agent loop recomputes the tool observations), ``rl.jsonl`` and
``eval.jsonl`` (questions), ``images/*.png``, ``corpus.jsonl`` (the search corpus, for
``tools.search.corpus_path``) and ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from axpo_nemo.agent.protocol import format_assistant_turn
from axpo_nemo.agent.sample import Sample, write_samples
from axpo_nemo.agent.tools.search import STOPWORDS, BM25Backend, Passage, split_title
from axpo_nemo.config.synth import FAMILIES, FamilySpec, FamilyWeights, SynthConfig

__all__ = [
    "FAMILIES",
    "SPLITS",
    "FamilySpec",
    "FamilyWeights",
    "SynthConfig",
    "SynthResult",
    "synthesize",
]

SPLITS = ("sft", "rl", "eval")
SOURCE = "synth"
MANIFEST_VERSION = 1
# One key in EVAL_MODULUS (by a fixed hash) is held out for eval.
EVAL_MODULUS = 5
#: Families whose keys are not partitioned: the one-digit table is knowledge the model is meant to
#: have, so eval asks the same sums (holding out a fifth of its 155 entries asked for sums SFT never
#: taught, which a 2-layer model cannot infer: arith_small was right 4-8 % of the time).
SHARED_KEYS = frozenset({"arith_small"})
MAX_DRAWS = 5000  # rejection-sampling attempts per question before giving up
DEDUP_DRAWS = 64  # attempts at an unused key before a repeat is accepted

# Exact RGB values, so code can find a colour's pixels by equality.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 128, 0),
}
# Backgrounds of the area images: never a palette colour.
NEUTRALS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (0, 0, 0), (128, 128, 128))

# 3x5 bitmap digits: small enough to be unreadable once the image is shrunk to 128 px.
DIGIT_GLYPHS: dict[int, tuple[str, ...]] = {
    0: ("111", "101", "101", "101", "111"),
    1: ("010", "110", "010", "010", "111"),
    2: ("111", "001", "111", "100", "111"),
    3: ("111", "001", "111", "001", "111"),
    4: ("101", "101", "111", "001", "001"),
    5: ("111", "100", "111", "001", "111"),
    6: ("111", "100", "111", "101", "111"),
    7: ("111", "001", "010", "010", "010"),
    8: ("111", "101", "111", "101", "111"),
    9: ("111", "101", "111", "001", "111"),
}

# search_fact relations (the name is also the query's keyword): question and passage templates.
RELATIONS: dict[str, dict[str, Any]] = {
    "capital": {
        "question": "What is the capital of {e}?",
        "passage": "The capital of {e} is {v}.",
    },
    "currency": {
        "question": "What is the currency of {e}?",
        "passage": "The currency of {e} is the {v}.",
    },
    "river": {
        "question": "What is the main river of {e}?",
        "passage": "The main river of {e} is the {v}.",
    },
    "ruler": {
        "question": "Who is the ruler of {e}?",
        "passage": "The ruler of {e} is Queen {v}.",
    },
}
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "qu", "st", "th", "zh")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "x", "sh", "t", "m")
# Words of the passages: a made-up name equal to one would confuse retrieval.
_RESERVED = frozenset(
    w.lower() for spec in RELATIONS.values() for w in re.findall(r"[A-Za-z]{2,}", spec["passage"])
)


@dataclass
class SynthResult:
    """What `synthesize` wrote.

    Attributes:
        out_dir: the output folder.
        sft_path, rl_path, eval_path: the three sample files.
        corpus_path: the search corpus (``tools.search.corpus_path``).
        images_dir: the images folder (sample image paths are relative to ``out_dir``).
        manifest_path: ``manifest.json``.
        counts: split → family → number of samples.
        num_images: images written.
        num_passages: corpus passages.
        sft_tool_fraction: the share of SFT trajectories that call a tool.
        content_hash: sha256 over every file written except the manifest.
        elapsed_s: generation time.
    """

    out_dir: Path
    sft_path: Path
    rl_path: Path
    eval_path: Path
    corpus_path: Path
    images_dir: Path
    manifest_path: Path
    counts: dict[str, dict[str, int]]
    num_images: int
    num_passages: int
    sft_tool_fraction: float
    content_hash: str
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------- helpers


@dataclass
class _Item:
    """One generated question with its worked solution."""

    key: tuple
    question: str
    answer: str
    thinking: list[str]  # one per assistant turn
    tool_call: tuple[str, dict[str, Any]] | None = None
    render: Callable[[], Image.Image] | None = None  # the image, drawn only once the key is accepted
    options: dict[str, str] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def _rng(*parts: Any) -> random.Random:
    """An independent, stable random stream for ``parts`` (string seeds hash with sha512)."""
    return random.Random("|".join(str(p) for p in parts))


def _held_out(family: str, key: Any) -> bool:
    """Whether ``key`` belongs to the held-out (eval) partition: a fixed hash, seed-independent."""
    digest = hashlib.sha256(f"{family}|{key!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_MODULUS == 0


def _allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` over ``weights`` by largest remainder (ties: dict order); zero weights get 0."""
    active = {k: w for k, w in weights.items() if w > 0}
    out = dict.fromkeys(weights, 0)
    if total <= 0 or not active:
        return out
    s = sum(active.values())
    quotas = {k: total * w / s for k, w in active.items()}
    for k, q in quotas.items():
        out[k] = math.floor(q)
    rest = total - sum(out.values())
    order = sorted(active, key=lambda k: (-(quotas[k] - math.floor(quotas[k])), list(active).index(k)))
    for k in order[:rest]:
        out[k] += 1
    return out


def _mc(rng: random.Random, correct: str, others: list[str], cfg: SynthConfig) -> tuple[dict[str, str], str]:
    """Options ``{letter: text}`` holding ``correct`` and distinct distractors; returns (options, letter)."""
    k = rng.randint(cfg.min_options, min(cfg.max_options, len(others) + 1))
    choices = [correct, *rng.sample(others, k - 1)]
    rng.shuffle(choices)
    options = {"ABCDEF"[i]: c for i, c in enumerate(choices)}
    return options, "ABCDEF"[choices.index(correct)]


def _with_options(question: str, options: dict[str, str]) -> str:
    """One ``X. text`` line per option, then the question.

    The question comes last so that what a policy copies from it (operands, a colour, a country)
    sits right before its answer at a fixed distance, as in ``arith_small``; after 2-4 option
    lines full of digits, a 2-layer model copied operands at p ~ 0.1 per digit.
    """
    return "".join(f"{k}. {v}\n" for k, v in options.items()) + question


def _number_distractors(rng: random.Random, value: int, n: int = 6) -> list[str]:
    """``n`` distinct numbers other than ``value``, within a factor of two of it (same magnitude)."""
    lo, hi = max(1, value // 2), max(value * 2, value + 2 * n)
    out: set[int] = set()
    while len(out) < n:
        x = rng.randint(lo, hi)
        if x != value:
            out.add(x)
    return [str(x) for x in sorted(out)]


def _clutter(
    draw: ImageDraw.ImageDraw, rng: random.Random, size: int, colors: list, n: int, max_frac: float
) -> None:
    """Draw ``n`` random rectangles/ellipses in ``colors``, each at most ``max_frac`` of the side."""
    for _ in range(n):
        w = rng.randint(max(2, size // 16), max(3, int(size * max_frac)))
        h = rng.randint(max(2, size // 16), max(3, int(size * max_frac)))
        x, y = rng.randint(0, size - w), rng.randint(0, size - h)
        color = colors[rng.randrange(len(colors))]
        if rng.random() < 0.5:
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=color)
        else:
            draw.ellipse((x, y, x + w - 1, y + h - 1), fill=color)


# --------------------------------------------------------------------------- families


def _arith_small(rng: random.Random, cfg: SynthConfig, ctx: _Context) -> _Item:
    """One-digit addition or subtraction (non-negative result): answerable without tools."""
    a, b = rng.randint(0, cfg.arith_max), rng.randint(0, cfg.arith_max)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    value = a + b if op == "+" else a - b
    return _Item(
        key=(a, op, b),
        question=f"What is {a} {op} {b}?",
        answer=str(value),
        thinking=[f"{a} {op} {b} = {value}."],
        metadata={"operands": [a, b], "op": op},
    )


def _color_mc(rng: random.Random, cfg: SynthConfig, ctx: _Context) -> _Item:
    """The dominant colour of an image with smaller shapes in other colours, as multiple choice."""
    names = list(PALETTE)
    dominant = rng.choice(names)
    options, letter = _mc(rng, dominant, [n for n in names if n != dominant], cfg)
    layout = rng.getrandbits(32)
    size = cfg.image_size

    def render() -> Image.Image:
        img = Image.new("RGB", (size, size), PALETTE[dominant])
        lr = random.Random(layout)
        others = [PALETTE[n] for n in names if n != dominant]
        _clutter(ImageDraw.Draw(img), lr, size, others, lr.randint(2, 5), 0.22)
        return img

    return _Item(
        key=(dominant, tuple(options.values()), layout),
        question=_with_options("Which colour covers most of the image?", options),
        answer=letter,
        thinking=[f"Most of the image is {dominant}, option {letter}."],
        render=render,
        options=options,
        metadata={"color": dominant},
    )


#: The thinking before a tool call: the decision to act and nothing the call must copy. AXPO
#: freezes this prefix and resamples the call, so what the call gets right or wrong (operands,
#: a colour's triple, a country's name) must come after it: with the operands restated in the
#: thinking ("I will use python for 7 * 3."), a prefix that restated them wrong doomed all K
#: resamples of it (docs/results.md).
CALL_THINKING = {"python": "I will use python.", "search": "I will search."}
#: The thinking after the tool's observation; the answer then copies the printed number or the
#: first result's name straight from the observation. (Restating it in the thinking first was
#: one more copy to get wrong: the SFT model restated numbers at p ~ 0.1-0.5 per digit while its
#: box, copying from the observation, was right.)
AFTER_CALL_THINKING = {"python": "python printed the answer.", "search": "The first result names the answer."}


#: Operands as words for ``multiply_words`` (0..20).
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)  # fmt: skip


def _python_multiply(rng: random.Random, cfg: SynthConfig, ctx: _Context) -> _Item:
    """``What is a*b?`` or, with ``multiply_words``, ``What is seven times six?`` (operands in
    multiply_min..multiply_max); ``print(a*b)`` prints the answer."""
    a, b = rng.randint(cfg.multiply_min, cfg.multiply_max), rng.randint(cfg.multiply_min, cfg.multiply_max)
    product = a * b
    options, letter = _mc(rng, str(product), _number_distractors(rng, product), cfg)
    stem = f"What is {NUMBER_WORDS[a]} times {NUMBER_WORDS[b]}?" if cfg.multiply_words else f"What is {a}*{b}?"
    return _Item(
        key=(min(a, b), max(a, b)),  # a * b and b * a are the same question
        question=_with_options(stem, options),
        answer=letter,
        thinking=[
            CALL_THINKING["python"],
            AFTER_CALL_THINKING["python"],
        ],
        tool_call=("python", {"code": f"print({a}*{b})"}),
        options=options,
        metadata={"operands": [a, b], "value": str(product)},
    )


def _python_area(rng: random.Random, cfg: SynthConfig, ctx: _Context) -> _Item:
    """The pixel area of a rectangle drawn last (fully visible) in an exact palette colour."""
    size = cfg.image_size
    color = rng.choice(list(PALETTE))
    side_max = cfg.area_max_side or size // 3
    w, h = rng.randint(cfg.area_min_side, side_max), rng.randint(cfg.area_min_side, side_max)
    x, y = rng.randint(0, size - w), rng.randint(0, size - h)
    layout = rng.getrandbits(32)
    area = w * h

    def render() -> Image.Image:
        lr = random.Random(layout)
        img = Image.new("RGB", (size, size), NEUTRALS[lr.randrange(len(NEUTRALS))])
        draw = ImageDraw.Draw(img)
        _clutter(draw, lr, size, [PALETTE[n] for n in PALETTE if n != color], lr.randint(1, 3), 0.3)
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=PALETTE[color])  # last: fully visible
        if int((np.asarray(img) == PALETTE[color]).all(2).sum()) != area:  # what the code will count
            raise RuntimeError(f"synth: python_area image count differs from {w}x{h}")
        return img

    rgb = ",".join(str(c) for c in PALETTE[color])
    options, letter = _mc(rng, str(area), _number_distractors(rng, area), cfg)
    return _Item(
        key=(color, w, h),
        question=_with_options(f"How many pixels does the {color} rectangle cover?", options),
        answer=letter,
        thinking=[CALL_THINKING["python"], AFTER_CALL_THINKING["python"]],
        tool_call=("python", {"code": f"print((np.array(image)==({rgb})).all(2).sum())"}),
        render=render,
        options=options,
        metadata={"color": color, "rect_px": [x, y, x + w, y + h], "value": str(area)},
    )


def _search_fact(rng: random.Random, cfg: SynthConfig, ctx: _Context) -> _Item:
    """A made-up fact about a made-up country; the query '<relation> of <country>' retrieves it first.

    Every question ends "... <relation> of <country>?", so the query's country follows the same
    " of" token as in the question: one token of context for the copy. (In "Which river flows
    through X?" the name's first piece followed nothing the query repeats, and the SFT model
    copied it at chance.)
    """
    entity, relation = ctx.pick_fact(rng)
    value = ctx.facts[entity][relation]
    spec = RELATIONS[relation]
    others = sorted({v for facts in ctx.facts.values() for v in facts.values()} - {value})
    options, letter = _mc(rng, value, rng.sample(others, min(8, len(others))), cfg)
    return _Item(
        key=(entity, relation),
        question=_with_options(spec["question"].format(e=entity), options),
        answer=letter,
        thinking=[
            CALL_THINKING["search"],
            AFTER_CALL_THINKING["search"],
        ],
        tool_call=("search", {"query": f"{relation} of {entity}"}),
        options=options,
        metadata={
            "entity": entity,
            "relation": relation,
            "value": value,
            "passage_id": ctx.passage_id(entity, relation),
        },
    )


def _zoom_digit(rng: random.Random, cfg: SynthConfig, ctx: _Context) -> _Item:
    """A 3x5 digit in a small white box; the reference box covers it with a margin."""
    size = cfg.image_size
    scale = max(1, size // 256)  # 1-pixel strokes at 256 px: mush after shrinking to 128
    pad, border = 3 * scale, scale
    box_w, box_h = 3 * scale + 2 * (pad + border), 5 * scale + 2 * (pad + border)
    digit = rng.randrange(10)
    options, letter = _mc(rng, str(digit), [str(d) for d in range(10) if d != digit], cfg)
    x0, y0 = rng.randint(4, size - box_w - 4), rng.randint(4, size - box_h - 4)
    layout = rng.getrandbits(32)
    background = rng.choice(list(PALETTE))

    def render() -> Image.Image:
        lr = random.Random(layout)
        img = Image.new("RGB", (size, size), PALETTE[background])
        draw = ImageDraw.Draw(img)
        _clutter(draw, lr, size, [PALETTE[n] for n in PALETTE if n != background], lr.randint(2, 4), 0.2)
        draw.rectangle((x0, y0, x0 + box_w - 1, y0 + box_h - 1), fill=(0, 0, 0))
        draw.rectangle(
            (x0 + border, y0 + border, x0 + box_w - 1 - border, y0 + box_h - 1 - border), fill=(255, 255, 255)
        )
        gx, gy = x0 + border + pad, y0 + border + pad
        for row, bits in enumerate(DIGIT_GLYPHS[digit]):
            for col, bit in enumerate(bits):
                if bit == "1":
                    px, py = gx + col * scale, gy + row * scale
                    draw.rectangle((px, py, px + scale - 1, py + scale - 1), fill=(0, 0, 0))
        return img

    margin = 4 * scale
    box_px = [x0, y0, x0 + box_w, y0 + box_h]
    bbox = [
        max(0, math.floor((x0 - margin) * 1000 / size)),
        max(0, math.floor((y0 - margin) * 1000 / size)),
        min(1000, math.ceil((x0 + box_w + margin) * 1000 / size)),
        min(1000, math.ceil((y0 + box_h + margin) * 1000 / size)),
    ]
    return _Item(
        key=(digit, tuple(options.values()), x0, y0),
        question=_with_options("Which digit is written in the small white box?", options),
        answer=letter,
        thinking=[
            "The digit is too small to read. I will zoom into the white box.",
            f"The zoomed box shows {digit}, option {letter}.",
        ],
        tool_call=("image_zoom_in", {"bbox_2d": bbox}),
        render=render,
        options=options,
        metadata={"digit": digit, "label_box_px": box_px},
    )


_GENERATORS: dict[str, Callable[[random.Random, SynthConfig, _Context], _Item]] = {
    "arith_small": _arith_small,
    "color_mc": _color_mc,
    "python_multiply": _python_multiply,
    "python_area": _python_area,
    "search_fact": _search_fact,
    "zoom_digit": _zoom_digit,
}


# --------------------------------------------------------------------------- the made-up world


class _Context:
    """Shared state of one generation: the made-up facts, and the split being generated."""

    def __init__(self, cfg: SynthConfig, questions: dict[str, int]) -> None:
        """Invent enough countries for ``questions`` search questions per partition (train/eval)."""
        self.split = "sft"
        rng = _rng(cfg.seed, "world")
        used: set[str] = set()
        per = len(RELATIONS)
        need = {p: math.ceil(n / per * 1.5) + 2 if n else 0 for p, n in questions.items()}
        self.entities: dict[str, list[str]] = {"train": [], "eval": []}
        self.distractors: list[str] = []
        self.facts: dict[str, dict[str, str]] = {}
        while len(self.distractors) < cfg.corpus_distractors or any(
            len(self.entities[p]) < need[p] for p in need
        ):
            entity = self._name(rng, used)
            self.facts[entity] = {rel: self._name(rng, used) for rel in RELATIONS}
            part = "eval" if _held_out("search_fact", entity) else "train"
            if len(self.entities[part]) < need[part]:
                self.entities[part].append(entity)
            elif len(self.distractors) < cfg.corpus_distractors:
                self.distractors.append(entity)
            else:
                del self.facts[entity]
        self.ids = {
            (entity, rel): f"fact-{i:04d}-{rel}" for i, entity in enumerate(self.facts) for rel in RELATIONS
        }

    @staticmethod
    def _name(rng: random.Random, used: set[str]) -> str:
        """A fresh made-up proper name (2-3 syllables, 4-8 letters), unique in this world."""
        while True:
            parts = [
                rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                for _ in range(rng.choice((2, 2, 3)))
            ]
            name = "".join(parts).capitalize()
            low = name.lower()
            # short names are cheap to copy; stopwords are dropped by the BM25 tokenizer
            if 4 <= len(name) <= 8 and low not in used and low not in STOPWORDS and low not in _RESERVED:
                used.add(low)
                return name

    def pick_fact(self, rng: random.Random) -> tuple[str, str]:
        """A (country, relation) of the current split's partition."""
        pool = self.entities["eval" if self.split == "eval" else "train"]
        return rng.choice(pool), rng.choice(list(RELATIONS))

    def passage_id(self, entity: str, relation: str) -> str:
        """The corpus id of the passage stating ``relation`` of ``entity``."""
        return self.ids[(entity, relation)]

    def corpus(self, seed: int) -> list[dict[str, str]]:
        """Every fact as a Search-R1 record ``{"id", "contents": '"Title"\\ntext'}``, shuffled."""
        records = [
            {"id": self.ids[(e, rel)], "contents": f'"{e}"\n' + RELATIONS[rel]["passage"].format(e=e, v=v)}
            for e, facts in self.facts.items()
            for rel, v in facts.items()
        ]
        _rng(seed, "corpus").shuffle(records)
        return records


# --------------------------------------------------------------------------- generation


def _draw(family: str, split: str, index: int, cfg: SynthConfig, ctx: _Context, used: set) -> _Item:
    """A question of ``family`` in ``split``'s partition, preferring keys not used yet."""
    rng = _rng(cfg.seed, split, index, family)
    want_eval = split == "eval"
    fallback = None
    for attempt in range(MAX_DRAWS):
        item = _GENERATORS[family](rng, cfg, ctx)
        # search_fact partitions by country (ctx.pick_fact), the others by key hash
        in_eval = (
            want_eval
            if family in SHARED_KEYS
            else _held_out(family, item.key[0] if family == "search_fact" else item.key)
        )
        if in_eval != want_eval:
            continue
        if (family, item.key) not in used or (want_eval and family in SHARED_KEYS):
            return item
        fallback = fallback or item
        if attempt >= DEDUP_DRAWS:
            return fallback
    if fallback is not None:
        return fallback
    raise ValueError(
        f"synth: family {family!r} has no question in the {split} partition after {MAX_DRAWS} draws; "
        "widen its value range (e.g. arith_max, multiply_min/max)"
    )


#: The thinking of an SFT trajectory that answers a tool question without the tool. Every tool
#: trajectory's thinking starts "I will" too, then names its tool ("use python", "search"): the
#: choice to act is one token of the prefix (`CALL_THINKING`).
GUESS_THINKING = "I will answer without a tool."


def _sft_turns(item: _Item, guess: bool = False) -> list[str]:
    """The worked assistant turns: a tool call then the answer, or the answer directly.

    After a tool call the answer is the number or name the tool printed, copied (the verifier
    maps an option's text to its letter); a ``guess`` answers a tool question's letter directly.
    """
    if guess:
        return [format_assistant_turn(GUESS_THINKING, answer=item.answer)]
    if item.tool_call is None:
        return [format_assistant_turn(item.thinking[0], answer=item.answer)]
    return [
        format_assistant_turn(item.thinking[0], tool_calls=[item.tool_call]),
        format_assistant_turn(item.thinking[1], answer=item.metadata.get("value", item.answer)),
    ]


def _family_counts(cfg: SynthConfig) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(split → family → count, family → SFT guesses): SFT honours ``tool_fraction`` and
    ``guess_fraction``; RL and eval follow the weights."""
    weights = cfg.weights.as_dict()
    tool_w = {k: w for k, w in weights.items() if FAMILIES[k].tool}
    plain_w = {k: w for k, w in weights.items() if not FAMILIES[k].tool}
    n_tool = round(cfg.tool_fraction * cfg.num_sft)
    n_guess = round(cfg.guess_fraction * cfg.num_sft)
    calls, guesses = _allocate(n_tool, tool_w), _allocate(n_guess, tool_w)
    sft = {**calls, **_allocate(cfg.num_sft - n_tool - n_guess, plain_w)}
    counts = {
        "sft": {k: sft[k] + guesses.get(k, 0) for k in FAMILIES},
        "rl": _allocate(cfg.num_rl, weights),
        "eval": _allocate(cfg.num_eval, weights),
    }
    return counts, {k: guesses.get(k, 0) for k in FAMILIES}


def _save_png(img: Image.Image, path: Path) -> None:
    """Write a PNG with fixed settings (no metadata), so equal images give equal bytes."""
    tmp = path.with_suffix(".png.tmp")
    img.save(tmp, format="PNG", optimize=False, compress_level=6)
    tmp.replace(path)


_IMAGE_NAME = re.compile(r"^(sft|rl|eval)-\d+\.png$")


def synthesize(cfg: SynthConfig, out_dir: str | Path) -> SynthResult:
    """Generate the synthetic tool task into ``out_dir`` (see the module docstring).

    Writes ``sft.jsonl``, ``rl.jsonl``, ``eval.jsonl``, ``images/``, ``corpus.jsonl`` and
    ``manifest.json``; stale images from an earlier run in ``images/`` are removed. Raises
    ValueError when a family cannot fill its partition (a value range too narrow).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    counts, guesses = _family_counts(cfg)
    search_q = {
        "train": counts["sft"]["search_fact"] + counts["rl"]["search_fact"],
        "eval": counts["eval"]["search_fact"],
    }
    ctx = _Context(cfg, search_q)

    used: set = set()
    samples: dict[str, list[Sample]] = {}
    image_names: list[str] = []
    for split in SPLITS:
        ctx.split = split
        # (family, answered without the tool): the first guesses[f] SFT rows of a tool family guess
        order = [(f, split == "sft" and j < guesses[f]) for f in FAMILIES for j in range(counts[split][f])]
        _rng(cfg.seed, split, "order").shuffle(order)
        rows = []
        for i, (family, guess) in enumerate(order):
            item = _draw(family, split, i, cfg, ctx, used)
            used.add((family, item.key))
            spec = FAMILIES[family]
            images = []
            if item.render is not None:
                name = f"{split}-{i:05d}.png"
                _save_png(item.render(), images_dir / name)
                image_names.append(name)
                images.append(f"images/{name}")
            metadata = {"family": family, **item.metadata}
            if item.tool_call is not None:
                metadata["reference_call"] = {"name": item.tool_call[0], "arguments": item.tool_call[1]}
            if guess:
                metadata["sft_guess"] = True
            rows.append(
                Sample(
                    id=f"synth-{split}-{i:05d}",
                    question=item.question,
                    answer=item.answer,
                    answer_type=spec.answer_type,
                    images=images,
                    candidates=item.candidates,
                    options=item.options,
                    allowed_tools=[spec.tool] if spec.tool else [],
                    source=SOURCE,
                    category=family,
                    messages=[{"role": "assistant", "content": t} for t in _sft_turns(item, guess)]
                    if split == "sft"
                    else [],
                    metadata=metadata,
                )
            )
        samples[split] = rows

    corpus = ctx.corpus(cfg.seed)
    _check_retrieval(corpus, [s for rows in samples.values() for s in rows if s.category == "search_fact"])

    keep = set(image_names)
    for stale in images_dir.iterdir():
        if _IMAGE_NAME.match(stale.name) and stale.name not in keep:
            stale.unlink()
    paths = {split: out / f"{split}.jsonl" for split in SPLITS}
    for split in SPLITS:
        write_samples(samples[split], paths[split])
    corpus_path = out / "corpus.jsonl"
    tmp = corpus_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in corpus), encoding="utf-8")
    tmp.replace(corpus_path)

    digest = hashlib.sha256()
    for rel in (
        [f"{s}.jsonl" for s in SPLITS] + ["corpus.jsonl"] + [f"images/{n}" for n in sorted(image_names)]
    ):
        digest.update(rel.encode() + b"\0")
        digest.update((out / rel).read_bytes())
    content_hash = digest.hexdigest()
    n_sft = len(samples["sft"])
    tool_frac = sum(1 for s in samples["sft"] if len(s.messages) > 1) / n_sft if n_sft else 0.0
    enabled = {f for split in counts.values() for f, n in split.items() if n}
    manifest = {
        "version": MANIFEST_VERSION,
        "generator": "axpo_nemo.data.synth",
        "seed": cfg.seed,
        "config": asdict(cfg),
        "files": {s: f"{s}.jsonl" for s in SPLITS} | {"corpus": "corpus.jsonl", "images": "images"},
        "counts": counts,
        "sft_guesses": guesses,
        "totals": {s: len(samples[s]) for s in SPLITS},
        "families": {
            name: {"tool": spec.tool, "answer_type": spec.answer_type, "description": spec.description}
            for name, spec in FAMILIES.items()
        },
        "tools": sorted({FAMILIES[f].tool for f in enabled if FAMILIES[f].tool}),
        "sft_tool_fraction": round(tool_frac, 6),
        "num_images": len(image_names),
        "num_passages": len(corpus),
        "content_hash": content_hash,
    }
    manifest_path = out / "manifest.json"
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)
    return SynthResult(
        out_dir=out,
        sft_path=paths["sft"],
        rl_path=paths["rl"],
        eval_path=paths["eval"],
        corpus_path=corpus_path,
        images_dir=images_dir,
        manifest_path=manifest_path,
        counts=counts,
        num_images=len(image_names),
        num_passages=len(corpus),
        sft_tool_fraction=tool_frac,
        content_hash=content_hash,
        elapsed_s=time.perf_counter() - start,
    )


def _check_retrieval(corpus: list[dict[str, str]], questions: list[Sample]) -> None:
    """Every search question's reference query must rank its fact's passage first (BM25, as the tool does)."""
    if not questions:
        return
    backend = BM25Backend(Passage(*split_title(r["contents"]), 0.0, r["id"]) for r in corpus)
    for s in questions:
        query = s.metadata["reference_call"]["arguments"]["query"]
        top = backend.search(query, 1)
        if not top or top[0].id != s.metadata["passage_id"]:
            raise RuntimeError(f"synth: query {query!r} does not retrieve passage {s.metadata['passage_id']}")
