"""The Qwen3-VL-Thinking agent protocol at token level (DESIGN.md §2).

`ChatProtocol` wraps a Qwen3-VL processor and does four things:

* builds the initial prompt (system prompt with the tools' schemas via the chat template's
  ``tools=``, user message with the question's images and text) into token ids with every
  ``<|image_pad|>`` expanded to the image's token count;
* parses an assistant turn: ``<think>…</think>``, ``<tool_call>`` blocks (malformed ones come back
  as calls with an ``error``, never as exceptions) and the final ``\\boxed{}`` answer;
* renders tool responses as the tokens that follow a generated ``</tool_call>``: close the
  assistant turn, a user turn of ``<tool_response>`` blocks (text and images), and the next
  assistant generation prompt. The text comes from the chat template itself (a conversation with a
  sentinel assistant message is rendered and cut at the sentinel), so the observation tokens are
  exactly what the template would produce for the whole conversation: no template drift;
* turns images into `ProcessedImage`\\ s once (pixel values and grid), shared by every trajectory
  that shows them.

Special tokens are looked up by text, so the same code runs on the tiny tokenizer and on real
Qwen3-VL tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from PIL import Image

__all__ = [
    "ChatProtocol",
    "Observation",
    "ParsedToolCall",
    "ParsedTurn",
    "ProcessedImage",
    "Prompt",
    "ToolResponse",
    "extract_boxed",
    "format_assistant_turn",
    "format_tool_call",
    "parse_tool_call",
    "parse_turn",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
#: How the chat template renders one image before the processor expands the pad.
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END

# Error kinds of a call that could not be parsed (ToolResult.error uses the same vocabulary).
MALFORMED_JSON = "malformed_json"
MISSING_NAME = "missing_name"
UNKNOWN_TOOL = "unknown_tool"
BAD_ARGUMENTS = "bad_arguments"
INCOMPLETE = "incomplete"

_SENTINEL = "@@axpo-observation-split@@"
_TOOL_TEXT = "@@axpo-tool-text-{}@@"  # where a tool response's text goes in the rendered template


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    """An image with its processor outputs, computed once and shared by every trajectory showing it.

    Attributes:
        image: the PIL image (RGB).
        pixel_values: [patches, patch_dim] flattened patches from the image processor.
        grid_thw: [3] long, the patch grid (t, h, w).
        num_tokens: ``<|image_pad|>`` tokens it occupies (``grid_thw.prod() // merge**2``).
    """

    image: Image.Image
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    num_tokens: int

    @cached_property
    def fingerprint(self) -> str:
        """A content hash of the processed pixels: equal images give equal fingerprints."""
        h = hashlib.blake2b(digest_size=16)
        h.update(str(tuple(self.grid_thw.tolist())).encode())
        h.update(self.pixel_values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class ImageSlot:
    """Where an image sits in a token sequence: its pad run is ``[start, start + num_tokens)``.

    The ``<|vision_start|>`` token is at ``start - 1`` and ``<|vision_end|>`` at ``end``.
    """

    image: ProcessedImage
    start: int

    @property
    def end(self) -> int:
        """One past the last ``<|image_pad|>`` token."""
        return self.start + self.image.num_tokens

    def shifted(self, offset: int) -> ImageSlot:
        """The same image ``offset`` tokens further along."""
        return ImageSlot(self.image, self.start + offset)


@dataclass
class Prompt:
    """An encoded initial prompt.

    Attributes:
        token_ids: the prompt's tokens, image pads expanded, ending with the generation prompt.
        images: the question's images and where their pad runs are.
        messages: the chat messages it was rendered from (for re-rendering a trajectory).
        tool_schemas: the tool schemas declared in the system prompt.
    """

    token_ids: list[int]
    images: list[ImageSlot]
    messages: list[dict[str, Any]]
    tool_schemas: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ToolResponse:
    """What one tool call shows the model: text and (already capped) images."""

    text: str
    images: list[ProcessedImage] = field(default_factory=list)


@dataclass
class Observation:
    """Tokens appended after a tool-calling turn, with the images inside them (offsets relative)."""

    token_ids: list[int]
    images: list[ImageSlot]
    text: str


@dataclass
class ParsedToolCall:
    """One ``<tool_call>`` block.

    Attributes:
        name: the tool's name when it could be read, else None.
        arguments: the arguments dict when valid, else None.
        error: None when the call is well formed, else its kind (``malformed_json``,
            ``missing_name``, ``unknown_tool``, ``bad_arguments``, ``incomplete``).
        message: a human-readable explanation of ``error`` (shown to the model).
        raw: the text between the markers.
    """

    name: str | None
    arguments: dict[str, Any] | None
    error: str | None = None
    message: str = ""
    raw: str = ""

    @property
    def well_formed(self) -> bool:
        """True when the call names a known tool with a JSON-object argument."""
        return self.error is None


@dataclass
class ParsedTurn:
    """An assistant turn's structure.

    Attributes:
        thinking: the text inside ``<think>…</think>`` (None when the turn never closed it).
        content: the text after ``</think>`` (the whole text when no think block was open).
        tool_calls: the turn's tool calls in order.
        answer: the last ``\\boxed{}`` content after ``</think>``, if any.
    """

    thinking: str | None
    content: str
    tool_calls: list[ParsedToolCall]
    answer: str | None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` in ``text`` (braces may nest), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    return None


def parse_tool_call(raw: str, tool_names: Collection[str] | None = None) -> ParsedToolCall:
    """Parse the JSON between ``<tool_call>`` and ``</tool_call>``; never raises.

    A missing ``arguments`` key means no arguments (``{}``). ``tool_names=None`` accepts any name.
    """
    try:
        obj = json.loads(raw.strip())
    except (json.JSONDecodeError, RecursionError) as err:
        return ParsedToolCall(None, None, MALFORMED_JSON, f"the tool call is not valid JSON ({err})", raw)
    if not isinstance(obj, dict):
        return ParsedToolCall(
            None,
            None,
            MALFORMED_JSON,
            'the tool call must be a JSON object {"name": …, "arguments": {…}}',
            raw,
        )
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ParsedToolCall(None, None, MISSING_NAME, 'the tool call has no "name" string', raw)
    if tool_names is not None and name not in tool_names:
        known = ", ".join(sorted(tool_names)) or "none"
        return ParsedToolCall(name, None, UNKNOWN_TOOL, f"unknown tool {name!r} (available: {known})", raw)
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return ParsedToolCall(name, None, BAD_ARGUMENTS, '"arguments" must be a JSON object', raw)
    return ParsedToolCall(name, arguments, None, "", raw)


_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL)


def _split_thinking(text: str, think_open: bool) -> tuple[str | None, str]:
    """(thinking, content): a think block is open when the prompt opened it or the text starts one."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        text, think_open = stripped[len(THINK_OPEN) :], True
    if not think_open:
        return None, text
    if THINK_CLOSE not in text:
        return None, ""
    thinking, content = text.split(THINK_CLOSE, 1)
    return thinking.strip("\n"), content


def parse_turn(
    text: str, tool_names: Collection[str] | None = None, *, think_open: bool = True
) -> ParsedTurn:
    """Parse an assistant turn's generated text (what follows the generation prompt).

    Args:
        text: the decoded turn.
        tool_names: known tools; calls to others get ``unknown_tool``. None accepts any name.
        think_open: the generation prompt already opened ``<think>`` (Qwen3-VL-Thinking).

    Tool calls are found anywhere in the turn (the stop on ``</tool_call>`` fires anywhere too);
    an unterminated ``<tool_call>`` at the end is an ``incomplete`` call. The answer is the last
    ``\\boxed{}`` after ``</think>``.
    """
    thinking, content = _split_thinking(text, think_open)
    calls = []
    for m in _CALL_RE.finditer(text):
        if m.group(2):
            calls.append(parse_tool_call(m.group(1), tool_names))
        else:
            calls.append(
                ParsedToolCall(
                    None, None, INCOMPLETE, "the tool call was cut off before </tool_call>", m.group(1)
                )
            )
    answer_text = _CALL_RE.sub("", content)
    return ParsedTurn(thinking, content, calls, extract_boxed(answer_text))


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """Render a call the way Qwen3 emits it: ``<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>``."""
    body = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def format_assistant_turn(
    thinking: str,
    *,
    text: str = "",
    tool_calls: Sequence[tuple[str, Mapping[str, Any]]] = (),
    answer: str | None = None,
) -> str:
    """The generated text of a well-formed turn (after the ``<think>\\n`` generation prompt).

    ``thinking\\n</think>\\n\\n`` then ``text``, the boxed ``answer`` and the tool calls, one per
    line. Used to script model outputs in tests and to build SFT targets.
    """
    parts = [text] if text else []
    if answer is not None:
        parts.append(f"The answer is \\boxed{{{answer}}}.")
    parts.extend(format_tool_call(name, args) for name, args in tool_calls)
    return f"{thinking}\n{THINK_CLOSE}\n\n" + "\n".join(parts)


class ChatProtocol:
    """Prompt building, turn parsing and observation rendering for one Qwen3-VL processor.

    Args:
        processor: a Qwen3-VL processor (``image_processor``, ``tokenizer``, chat template).
    """

    def __init__(self, processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.merge_size = int(processor.image_processor.merge_size)
        self.ids = {text: self.token_id(text) for text in (
            TOOL_CALL_OPEN, TOOL_CALL_CLOSE, THINK_OPEN, THINK_CLOSE, IM_START, IM_END,
            VISION_START, VISION_END, IMAGE_PAD,
        )}  # fmt: skip
        self.tool_call_open_id = self.ids[TOOL_CALL_OPEN]
        self.tool_call_close_id = self.ids[TOOL_CALL_CLOSE]
        self.im_end_id = self.ids[IM_END]
        self.image_pad_id = self.ids[IMAGE_PAD]
        self.generation_prompt = self._generation_prompt()
        self.think_open = THINK_OPEN in self.generation_prompt and THINK_CLOSE not in self.generation_prompt
        # Every added token (control tokens, special or not), longest first: in tool text each is
        # tokenized as the plain characters it is spelled with.
        controls = set(self.tokenizer.get_added_vocab()) | set(self.tokenizer.all_special_tokens)
        controls = sorted((t for t in controls if len(t) > 1), key=len, reverse=True)
        self._control_re = re.compile("(?=(" + "|".join(map(re.escape, controls)) + "))") if controls else None
        self._control_max_len = max(map(len, controls), default=0)
        self._check_tool_text_verbatim()

    def token_id(self, text: str) -> int:
        """The id of a control token, looked up by text; KeyError when it is not a single token."""
        token_id = self.tokenizer.convert_tokens_to_ids(text)
        if token_id is None or self.tokenizer.convert_ids_to_tokens(token_id) != text:
            raise KeyError(f"tokenizer has no single token for {text!r}")
        return int(token_id)

    # -- rendering ---------------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None, **kwargs: Any) -> str:
        """The chat template's text for ``messages`` (images as unexpanded placeholders)."""
        return self.processor.apply_chat_template(messages, tools=tools or None, tokenize=False, **kwargs)

    def _generation_prompt(self) -> str:
        """What ``add_generation_prompt=True`` appends, e.g. ``<|im_start|>assistant\\n<think>\\n``."""
        messages = [{"role": "user", "content": "x"}]
        bare = self.render(messages)
        full = self.render(messages, add_generation_prompt=True)
        if not full.startswith(bare):
            raise ValueError("chat template: the generation prompt is not a suffix of the conversation")
        return full[len(bare) :]

    def _check_tool_text_verbatim(self) -> None:
        """`render_observation` places tool text into the rendered template itself: the template
        must insert it unchanged (no trimming or escaping)."""
        text = "  \n@@axpo-probe@@ {x} \n\n"
        for num_images in (0, 1):
            message = self.tool_message(text, num_images)
            rendered = self.render([{"role": "user", "content": "x"}, message])
            if text not in rendered:
                raise ValueError("chat template: tool message text is not inserted verbatim")

    @property
    def assistant_prefix(self) -> str:
        """The part of the generation prompt inside the assistant message (``<think>\\n``)."""
        head = f"{IM_START}assistant\n"
        gp = self.generation_prompt
        return gp[len(head) :] if gp.startswith(head) else ""

    @staticmethod
    def sanitize_tool_text(text: str) -> str:
        """Defuse vision control tokens in tool output (``<|image_pad|>`` → ``<image_pad>``).

        A tool's text (a web page, a program's output) is tokenized as plain text anyway
        (`render_observation`); this keeps it from reading like an image placeholder too.
        """
        for token in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD):
            text = text.replace(token, token.replace("|", ""))
        return text

    def process_image(self, image: Image.Image) -> ProcessedImage:
        """Run the image processor once: pixel values, grid and token count."""
        image = image.convert("RGB")
        out = self.processor.image_processor(images=[image], return_tensors="pt")
        grid = out["image_grid_thw"][0].to(torch.long)
        return ProcessedImage(image, out["pixel_values"], grid, int(grid.prod()) // self.merge_size**2)

    def _plain_cuts(self, text: str, plain: Sequence[tuple[int, int]]) -> list[int]:
        """Where to split ``text`` so that no control token overlapping a ``plain`` span is whole:
        inside every such occurrence (at the span's start, or one character in)."""
        if self._control_re is None:
            return []
        cuts = set()
        for a, b in plain:
            lo, hi = max(a - self._control_max_len + 1, 0), min(b + self._control_max_len - 1, len(text))
            for m in self._control_re.finditer(text, lo, hi):
                start, end = m.start(), m.start() + len(m.group(1))
                if start < b and end > a:
                    cuts.add(max(start + 1, a))
        return sorted(cuts)

    def encode(
        self, text: str, images: Sequence[ProcessedImage], plain: Sequence[tuple[int, int]] = ()
    ) -> tuple[list[int], list[ImageSlot]]:
        """Tokenize template text, expanding the i-th ``<|image_pad|>`` to image i's token count.

        ``plain`` spans (``[start, end)`` character offsets; tool output) are tokenized as plain
        text: a control token spelled there (``<|im_end|>``, ``<tool_call>``, ``<|image_pad|>``...)
        becomes the ordinary tokens of its characters, never the control token. Text without
        control tokens tokenizes exactly as one string.

        Returns the token ids and each image's slot. Raises ValueError when the number of
        placeholders and images differ.
        """
        cuts = self._plain_cuts(text, plain)
        segments = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        placeholders = sum(segment.count(IMAGE_PAD) for segment in segments)
        if placeholders != len(images):
            raise ValueError(f"text has {placeholders} image placeholders but {len(images)} images were given")
        ids: list[int] = []
        pending = iter(images)
        for segment in segments:
            pieces = segment.split(IMAGE_PAD)
            expanded = pieces[0] + "".join(IMAGE_PAD * next(pending).num_tokens + rest for rest in pieces[1:])
            ids += self.tokenizer(expanded, add_special_tokens=False)["input_ids"]
        slots, i = [], 0
        for img in images:
            while ids[i] != self.image_pad_id:
                i += 1
            slots.append(ImageSlot(img, i))
            i += img.num_tokens
        return ids, slots

    def build_prompt(
        self,
        question: str,
        images: Sequence[Image.Image | ProcessedImage] = (),
        tools: Sequence[Any] = (),
        system_prompt: str | None = None,
    ) -> Prompt:
        """Encode the initial prompt: optional system prompt, tool schemas, images then question.

        ``tools`` are `Tool` objects (their ``schema()`` is declared) or schema dicts.
        """
        processed = [img if isinstance(img, ProcessedImage) else self.process_image(img) for img in images]
        schemas = [t if isinstance(t, dict) else t.schema() for t in tools]
        messages: list[dict[str, Any]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        content = [{"type": "image"} for _ in processed] + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        text = self.render(messages, schemas, add_generation_prompt=True)
        ids, slots = self.encode(text, processed)
        return Prompt(ids, slots, messages, schemas)

    @staticmethod
    def tool_message(text: str, num_images: int = 0) -> dict[str, Any]:
        """A ``tool`` chat message: the response text, then its images (as placeholders)."""
        if not num_images:
            return {"role": "tool", "content": text}
        parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        parts += [{"type": "image"} for _ in range(num_images)]
        return {"role": "tool", "content": parts}

    def render_observation(
        self, responses: Sequence[ToolResponse], *, turn_closed: bool = False
    ) -> Observation:
        """Tokens that follow a tool-calling turn: end of turn, tool responses, next generation prompt.

        ``turn_closed``: the turn already ended with ``<|im_end|>`` (calls made without stopping on
        ``</tool_call>``), so the observation starts right after it.

        The responses' text is tokenized as plain text (see `encode`): a program's output or a web
        page spelling ``<|im_end|><|im_start|>system`` cannot open a turn of its own.
        """
        messages = [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": _SENTINEL},
            *(self.tool_message(_TOOL_TEXT.format(i), len(r.images)) for i, r in enumerate(responses)),
        ]
        rest = self.render(messages, add_generation_prompt=True).split(_SENTINEL, 1)[1]
        if turn_closed and rest.startswith(IM_END):
            rest = rest[len(IM_END) :]
        text, plain = "", []
        for i, response in enumerate(responses):
            before, rest = rest.split(_TOOL_TEXT.format(i), 1)
            text += before
            plain.append((len(text), len(text) + len(response.text)))
            text += response.text
        text += rest
        ids, slots = self.encode(text, [img for r in responses for img in r.images], plain)
        return Observation(ids, slots, text)

    # -- parsing -----------------------------------------------------------------------------

    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids to text, control tokens included."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def parse_turn(self, text: str, tool_names: Collection[str] | None = None) -> ParsedTurn:
        """`parse_turn` with this template's thinking convention."""
        return parse_turn(text, tool_names, think_open=self.think_open)

    def tool_call_spans(self, token_ids: Sequence[int]) -> list[tuple[int, int, bool]]:
        """``(start, end, closed)`` of each tool call in a turn's tokens, by marker token id.

        ``start`` is the ``<tool_call>`` token, ``end`` one past ``</tool_call>`` (or the turn's
        end when the call was cut off, ``closed=False``).
        """
        spans, start = [], None
        for i, tok in enumerate(token_ids):
            if tok == self.tool_call_open_id:
                if start is not None:  # a second opener before a closer: the first is cut off
                    spans.append((start, i, False))
                start = i
            elif tok == self.tool_call_close_id and start is not None:
                spans.append((start, i + 1, True))
                start = None
        if start is not None:
            spans.append((start, len(token_ids), False))
        return spans

    def parse_turn_tokens(
        self, token_ids: Sequence[int], tool_names: Collection[str] | None = None
    ) -> tuple[ParsedTurn, list[tuple[int, int]]]:
        """Parse a turn from its tokens; tool calls are delimited by the marker *tokens*.

        Returns the parsed turn and each call's ``(start, end)`` span relative to ``token_ids``
        (aligned with ``parsed.tool_calls``). Marker-like text that the model spelled with
        ordinary tokens is not a call.
        """
        parsed = self.parse_turn(self.decode(token_ids), tool_names)
        spans, calls = [], []
        for start, end, closed in self.tool_call_spans(token_ids):
            body = self.decode(token_ids[start + 1 : end - 1 if closed else end])
            if closed:
                calls.append(parse_tool_call(body, tool_names))
            else:
                calls.append(
                    ParsedToolCall(
                        None, None, INCOMPLETE, "the tool call was cut off before </tool_call>", body
                    )
                )
            spans.append((start, end))
        parsed.tool_calls = calls
        return parsed, spans
