"""A small Qwen-style tokenizer built offline, plus the project's chat template.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on a tiny built-in
corpus (English, arithmetic, JSON tool calls), wrapped in transformers' `Qwen2Tokenizer`
so it behaves like the tokenizer of a real Qwen3-VL checkpoint: same pre-tokenizer regex
(digits split one by one), same NFC normalizer, same byte-level decoder and the same
special tokens referenced by text.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import AddedToken, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

__all__ = [
    "ADDED_TEXT_TOKENS",
    "SPECIAL_TOKENS",
    "build_tiny_tokenizer",
    "load_chat_template",
    "special_token_ids",
]

#: Control tokens that are "special": skipped by ``decode(..., skip_special_tokens=True)``.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Added tokens that are never split but are NOT special, so decoding keeps them (as in Qwen3).
ADDED_TEXT_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

_PARAGRAPHS = """\
The quick brown fox jumps over the lazy dog. A small model learns to answer questions about \
pictures, to think step by step, and to call tools when it needs more information.
You are a helpful assistant. Look at the image carefully and answer the question. If you are \
not sure, use a tool to zoom into the region of interest, then give the final answer.
The user asked how many apples are on the table. There are three red apples and two green \
apples, so the total number of apples is five.
Reinforcement learning trains a policy by sampling answers, scoring them with a reward, and \
making the good answers more likely. The advantage of an answer is its reward minus the mean \
reward of its group.
Let me think about this problem. First, I will read the chart. The bar for March is higher \
than the bar for February, which means the sales increased.
The weather today is sunny with a few clouds. The temperature is twenty degrees in the \
morning and twenty five degrees in the afternoon.
A triangle has three sides and three angles. The sum of the angles of a triangle is one \
hundred and eighty degrees. The area of a circle is pi times the radius squared.
Find the value of x such that the equation holds. Subtract seven from both sides, then \
divide both sides by three. Therefore the answer is four.
The image shows a street with cars, a red bus, people walking on the sidewalk and a tall \
building in the background. The text on the sign says "Open every day".
I should call the calculator tool to compute the product, because doing it by hand could \
introduce an error. The tool returned the result, so now I can answer.
Question: What is the color of the car on the left? Answer: The car on the left is blue.
Please crop the top left corner of the image and describe what you see in detail.
The final answer is \\boxed{42}. The final answer is \\boxed{3.5}. The answer is \\boxed{x = 2}.
"""

_NOUNS = """apple banana bicycle bird boat book bottle box bridge building bus cake camera car cat chair
chart city clock cloud computer cup desk dog door elephant field flower forest fruit garden girl glass
grass hand hat horse house island kitchen lake lamp leaf letter man map market mountain number ocean
orange paper park pencil person phone picture plane plate river road room school sheep shirt shoe sign
sky street sun table teacher tiger tower town train tree truck umbrella village wall watch water window
woman word world answer question problem equation function value result error reward policy model token
image region pixel object label score step reason method group sample batch gradient loss matrix vector
angle circle square triangle rectangle line point area length width height distance speed time price
percent fraction average total difference product quotient remainder digit integer decimal"""
_ADJECTIVES = """red green blue yellow black white small large tall short old new bright dark happy quiet
busy empty full heavy light round sharp soft warm cold wooden metal plastic simple correct wrong final
first second third last left right upper lower middle visible hidden important different similar"""
_VERBS = """shows contains holds describes counts measures compares finds returns computes crops rotates
zooms reads writes sees detects crosses carries opens closes follows explains checks solves answers"""
_TOOL_NAMES = ("calculator", "crop_image", "zoom_in", "search", "python", "rotate_image")


def _corpus() -> list[str]:
    """Return the deterministic built-in training corpus (a list of short documents)."""
    docs = [line for line in _PARAGRAPHS.splitlines() if line]
    for x in range(0, 60, 3):  # arithmetic
        for y in range(1, 40, 7):
            docs.append(f"{x} + {y} = {x + y}, {x} - {y} = {x - y}, {x} * {y} = {x * y}.")
            docs.append(f"What is {x} divided by {y}? It is about {x / y:.3f}.")
    nouns, adjectives, verbs = _NOUNS.split(), _ADJECTIVES.split(), _VERBS.split()
    for i in range(4 * len(nouns)):  # templated English over a few hundred common words
        noun, other = nouns[i % len(nouns)], nouns[(7 * i + 3) % len(nouns)]
        adj, adj2, verb = (
            adjectives[i % len(adjectives)],
            adjectives[5 * i % len(adjectives)],
            verbs[i % len(verbs)],
        )
        docs.append(f"The {adj} {noun} {verb} the {adj2} {other}.")
        docs.append(f"How many {noun}s are in the picture? I count {i % 9 + 1} {noun}s near the {other}.")
    for i, name in enumerate(_TOOL_NAMES * 6):  # JSON tool calls, schemas and results
        if name == "calculator":
            args: dict = {"expression": f"{i} * {i + 3} + 1"}
        else:
            args = {"bbox": [i, 2 * i, 10 * i + 20, 5 * i + 40], "image_id": i % 3}
        schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
        description = f"Run the {name.replace('_', ' ')} tool."
        docs.append(json.dumps({"name": name, "arguments": args}))
        docs.append(
            json.dumps(
                {
                    "type": "function",
                    "function": {"name": name, "description": description, "parameters": schema},
                }
            )
        )
        docs.append(json.dumps({"result": i * (i + 3) + 1, "ok": True, "error": None}))
    return docs


@functools.lru_cache(maxsize=8)
def _train_bpe(vocab_size: int) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Train the byte-level BPE once per process; returns (merges, vocab in id order)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].__getitem__)
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return merges, tuple(vocab)


@functools.cache
def load_chat_template() -> str:
    """Return the text of the project's Qwen3-VL-Thinking chat template (``chat_template.jinja``)."""
    return resources.files("axpo_nemo.models").joinpath("chat_template.jinja").read_text(encoding="utf-8")


def build_tiny_tokenizer(bpe_vocab_size: int = 1024, *, chat_template: bool = True) -> Qwen2Tokenizer:
    """Build a small Qwen-style byte-level BPE tokenizer, fully offline.

    Args:
        bpe_vocab_size: target size of the BPE vocabulary (256 byte symbols + merges). The
            special tokens are appended after it, so ``len(tokenizer)`` is ``bpe_vocab_size + 13``
            when the corpus yields enough merges.
        chat_template: attach the project's chat template (see :func:`load_chat_template`).

    Returns:
        A fresh ``transformers.Qwen2Tokenizer`` (the class real Qwen3-VL checkpoints load as):
        ``eos_token="<|im_end|>"``, ``pad_token="<|endoftext|>"``, no bos/unk. Every text in
        :data:`SPECIAL_TOKENS` and :data:`ADDED_TEXT_TOKENS` is a single token; the former are
        special, the latter survive ``skip_special_tokens=True``. Encoding applies NFC
        normalisation (as Qwen does), so ``decode(encode(t)) == t`` for any NFC text.

    The BPE training is cached per process; each call returns a new tokenizer object, so
    callers may mutate theirs (padding side, extra tokens) without affecting others.
    """
    merges, bpe_vocab = _train_bpe(bpe_vocab_size)
    vocab = {token: i for i, token in enumerate(bpe_vocab)}
    for token in SPECIAL_TOKENS + ADDED_TEXT_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=4096,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TEXT_TOKENS])
    if chat_template:
        tokenizer.chat_template = load_chat_template()
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Map each Qwen3-VL control token text (:data:`SPECIAL_TOKENS` + :data:`ADDED_TEXT_TOKENS`) to its id.

    Works for the tiny tokenizer and real Qwen3-VL tokenizers alike (lookup by text).

    Raises:
        KeyError: naming the token when the tokenizer does not have it as a single token.
    """
    ids = {}
    for text in SPECIAL_TOKENS + ADDED_TEXT_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(text)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != text:
            raise KeyError(f"tokenizer {type(tokenizer).__name__} has no single token for {text!r}")
        ids[text] = token_id
    return ids
