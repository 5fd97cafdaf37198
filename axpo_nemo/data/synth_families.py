"""The synthetic task's question families: one generator per family, and the made-up world
(countries and their facts) the search family asks about. `axpo_nemo.data.synth` draws from them,
splits and writes the dataset; the table of families and what each teaches is in its docstring.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from axpo_nemo.agent.tools.search import STOPWORDS
from axpo_nemo.config.synth import SynthConfig

# One key in EVAL_MODULUS (by a fixed hash) is held out for eval.
EVAL_MODULUS = 5
#: Families whose keys are not partitioned: the one-digit table is knowledge the model is meant to
#: have, so eval asks the same sums (holding out a fifth of its 155 entries asked for sums SFT never
#: taught, which a 2-layer model cannot infer: arith_small was right 4-8 % of the time).
SHARED_KEYS = frozenset({"arith_small"})
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


# --------------------------------------------------------------------------- helpers


@dataclass
class Item:
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


def seeded_rng(*parts: Any) -> random.Random:
    """An independent, stable random stream for ``parts`` (string seeds hash with sha512)."""
    return random.Random("|".join(str(p) for p in parts))


def held_out(family: str, key: Any) -> bool:
    """Whether ``key`` belongs to the held-out (eval) partition: a fixed hash, seed-independent."""
    digest = hashlib.sha256(f"{family}|{key!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_MODULUS == 0


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
    """``n`` distinct numbers other than ``value``, within a factor of two of it (same magnitude),
    none starting with ``value``'s first digit.

    A policy copies the answer from a tool's output digit by digit, and a small model copies the
    next digit by looking up what followed the current one earlier in the context (an induction
    head). With options such as 42 and 45 beside an output of 42, the digit after "4" had three
    candidates, and the SFT models miscopied three in four right calls' answers (docs/results.md).
    """
    lead = str(value)[0]
    lo, hi = max(1, value // 2), max(value * 2, value + 2 * n)
    pool = [x for x in range(lo, hi + 1) if x != value and not str(x).startswith(lead)]
    while len(pool) < n:  # only for tiny values: widen upwards
        hi += 1
        if not str(hi).startswith(lead):
            pool.append(hi)
    return [str(x) for x in sorted(rng.sample(pool, n))]


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


def _arith_small(rng: random.Random, cfg: SynthConfig, ctx: SynthWorld) -> Item:
    """One-digit addition or subtraction (non-negative result): answerable without tools."""
    a, b = rng.randint(0, cfg.arith_max), rng.randint(0, cfg.arith_max)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a
    value = a + b if op == "+" else a - b
    return Item(
        key=(a, op, b),
        question=f"What is {a} {op} {b}?",
        answer=str(value),
        thinking=[f"{a} {op} {b} = {value}."],
        metadata={"operands": [a, b], "op": op},
    )


def _color_mc(rng: random.Random, cfg: SynthConfig, ctx: SynthWorld) -> Item:
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

    return Item(
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


def _python_multiply(rng: random.Random, cfg: SynthConfig, ctx: SynthWorld) -> Item:
    """``What is a*b?`` or, with ``multiply_words``, ``What is seven times six?`` (operands in
    multiply_min..multiply_max); ``print(a*b)`` prints the answer."""
    a, b = rng.randint(cfg.multiply_min, cfg.multiply_max), rng.randint(cfg.multiply_min, cfg.multiply_max)
    product = a * b
    options, letter = _mc(rng, str(product), _number_distractors(rng, product), cfg)
    stem = (
        f"What is {NUMBER_WORDS[a]} times {NUMBER_WORDS[b]}?" if cfg.multiply_words else f"What is {a}*{b}?"
    )
    return Item(
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


def _python_area(rng: random.Random, cfg: SynthConfig, ctx: SynthWorld) -> Item:
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
    return Item(
        key=(color, w, h),
        question=_with_options(f"How many pixels does the {color} rectangle cover?", options),
        answer=letter,
        thinking=[CALL_THINKING["python"], AFTER_CALL_THINKING["python"]],
        tool_call=("python", {"code": f"print((np.array(image)==({rgb})).all(2).sum())"}),
        render=render,
        options=options,
        metadata={"color": color, "rect_px": [x, y, x + w, y + h], "value": str(area)},
    )


def _search_fact(rng: random.Random, cfg: SynthConfig, ctx: SynthWorld) -> Item:
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
    return Item(
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


def _zoom_digit(rng: random.Random, cfg: SynthConfig, ctx: SynthWorld) -> Item:
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
    return Item(
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


GENERATORS: dict[str, Callable[[random.Random, SynthConfig, SynthWorld], Item]] = {
    "arith_small": _arith_small,
    "color_mc": _color_mc,
    "python_multiply": _python_multiply,
    "python_area": _python_area,
    "search_fact": _search_fact,
    "zoom_digit": _zoom_digit,
}


# --------------------------------------------------------------------------- the made-up world


class SynthWorld:
    """Shared state of one generation: the made-up facts, and the split being generated."""

    def __init__(self, cfg: SynthConfig, questions: dict[str, int]) -> None:
        """Invent enough countries for ``questions`` search questions per partition (train/eval)."""
        self.split = "sft"
        rng = seeded_rng(cfg.seed, "world")
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
            part = "eval" if held_out("search_fact", entity) else "train"
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
        seeded_rng(seed, "corpus").shuffle(records)
        return records


# --------------------------------------------------------------------------- generation
