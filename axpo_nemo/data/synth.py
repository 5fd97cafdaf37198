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
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from axpo_nemo.agent.protocol import format_assistant_turn
from axpo_nemo.agent.sample import Sample, write_samples
from axpo_nemo.agent.tools.search import BM25Backend, Passage, split_title
from axpo_nemo.config.synth import FAMILIES, FamilySpec, FamilyWeights, SynthConfig
from axpo_nemo.data.synth_families import (  # noqa: F401 (re-exported: the task constants tests and docs name)
    AFTER_CALL_THINKING,
    CALL_THINKING,
    EVAL_MODULUS,
    GENERATORS,
    NUMBER_WORDS,
    PALETTE,
    RELATIONS,
    SHARED_KEYS,
    Item,
    SynthWorld,
    held_out,
    seeded_rng,
)

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
MAX_DRAWS = 5000  # rejection-sampling attempts per question before giving up
DEDUP_DRAWS = 64  # attempts at an unused key before a repeat is accepted

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


def _draw(family: str, split: str, index: int, cfg: SynthConfig, ctx: SynthWorld, used: set) -> Item:
    """A question of ``family`` in ``split``'s partition, preferring keys not used yet."""
    rng = seeded_rng(cfg.seed, split, index, family)
    want_eval = split == "eval"
    fallback = None
    for attempt in range(MAX_DRAWS):
        item = GENERATORS[family](rng, cfg, ctx)
        # search_fact partitions by country (ctx.pick_fact), the others by key hash
        in_eval = (
            want_eval
            if family in SHARED_KEYS
            else held_out(family, item.key[0] if family == "search_fact" else item.key)
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


def _sft_turns(item: Item, guess: bool = False) -> list[str]:
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
    ctx = SynthWorld(cfg, search_q)

    used: set = set()
    samples: dict[str, list[Sample]] = {}
    image_names: list[str] = []
    for split in SPLITS:
        ctx.split = split
        # (family, answered without the tool): the first guesses[f] SFT rows of a tool family guess
        order = [(f, split == "sft" and j < guesses[f]) for f in FAMILIES for j in range(counts[split][f])]
        seeded_rng(cfg.seed, split, "order").shuffle(order)
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
