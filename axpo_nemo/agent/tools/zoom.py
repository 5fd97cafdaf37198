"""The image zoom tool: crop a region of one of the trajectory's images and enlarge it.

Boxes are in Qwen3-VL's relative coordinate system: integers 0-1000 along each axis of the
ORIGINAL image (``x_px = x / 1000 · width``), whatever size the model saw it at. The tool crops
and resizes in one step (`PIL.Image.Image.resize` with ``box=``), so a huge source image never
gets a full-size intermediate copy, and the output's size is capped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageColor

from axpo_nemo.agent.tools.base import ToolContext, ToolResult, argument_object, unexpected_arguments
from axpo_nemo.core.config import ValidatedConfig, setting

COORD_MAX = 1000.0
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
}


@dataclass
class ZoomConfig(ValidatedConfig):
    """Settings of the image zoom tool."""

    min_box_px: int = setting(
        28,
        "Boxes narrower or shorter than this (in original-image pixels) are widened around their "
        "centre to this size, staying inside the image.",
        ge=1,
    )
    max_aspect_ratio: float = setting(
        100.0, "Boxes (after widening) longer than this many times their short side are refused.", gt=1.0
    )
    min_short_side: int = setting(
        224, "The crop is upscaled (keeping its aspect ratio) until its short side reaches this.", ge=1
    )
    max_long_side: int = setting(2048, "The output's long side never exceeds this.", ge=1)
    max_pixels: int = setting(
        2048 * 2048, "The output's pixel count never exceeds this (it is downscaled if needed).", ge=1
    )
    resample: str = setting("bicubic", "Resampling filter.", choices=tuple(_RESAMPLE))
    background: str = setting(
        "white", "Colour transparent pixels are composited onto (a PIL colour name or '#rrggbb')."
    )

    def __post_init__(self) -> None:
        """Check the declared bounds and that ``background`` is a colour PIL knows."""
        super().__post_init__()
        try:
            ImageColor.getrgb(self.background)
        except ValueError:
            raise ValueError(f"ZoomConfig: background: unknown colour {self.background!r}") from None


def _bad(text: str) -> ToolResult:
    """A ``bad_arguments`` failure."""
    return ToolResult.failure("bad_arguments", text)


def _is_number(v: Any) -> bool:
    """A real int or float (bools are not numbers here)."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_bbox(value: Any) -> tuple[list[float] | None, str | None]:
    """Validate a ``bbox_2d`` argument: a list of 4 finite numbers.

    Returns ``(box, None)`` or ``(None, reason)``.
    """
    if not isinstance(value, list | tuple):
        return (
            None,
            f"bbox_2d must be a list of 4 numbers [x1, y1, x2, y2], got {type(value).__name__} {_short(value)}.",
        )
    if len(value) != 4:
        return None, f"bbox_2d must have exactly 4 numbers [x1, y1, x2, y2], got {len(value)}."
    for i, v in enumerate(value):
        if not _is_number(v):
            return None, f"bbox_2d[{i}] must be a number, got {type(v).__name__} {_short(v)}."
        if not math.isfinite(v):
            return None, f"bbox_2d[{i}] must be a finite number, got {v}."
    return [float(v) for v in value], None


def _short(v: Any, n: int = 60) -> str:
    """A length-capped repr for error messages."""
    try:
        r = repr(v)
    except Exception:
        r = "<unprintable>"
    return r if len(r) <= n else r[: n - 3] + "..."


def _fmt(v: float) -> str:
    """A coordinate as an integer when it is one."""
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


def _expand(lo: int, hi: int, size: int, extent: int) -> tuple[int, int]:
    """Widen the pixel span ``[lo, hi)`` around its centre to ``size`` (at most ``extent``),
    shifted to stay inside ``[0, extent]``."""
    size = min(size, extent)
    if hi - lo >= size:
        return lo, hi
    lo = (lo + hi - size) // 2
    lo = min(max(lo, 0), extent - size)
    return lo, lo + size


def output_size(crop_w: int, crop_h: int, cfg: ZoomConfig) -> tuple[int, int]:
    """The size a ``crop_w × crop_h`` crop is shown at: upscaled to ``min_short_side``, capped by
    ``max_long_side`` and ``max_pixels`` (downscaled if the crop itself exceeds them)."""
    short, long = min(crop_w, crop_h), max(crop_w, crop_h)
    scale = max(1.0, cfg.min_short_side / short)
    scale = min(scale, cfg.max_long_side / long, math.sqrt(cfg.max_pixels / (crop_w * crop_h)))
    return max(1, round(crop_w * scale)), max(1, round(crop_h * scale))


def _to_rgb(img: Image.Image, background: str) -> Image.Image:
    """Any mode → RGB; transparency is composited onto ``background``."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGB", rgba.size, background)
        base.paste(rgba, mask=rgba.getchannel("A"))
        return base
    if img.mode.startswith("I") or img.mode == "F":
        # high-bit-depth greyscale: stretch the region's own value range to 8 bits
        if img.mode not in ("I", "F"):
            img = img.convert("I")
        lo, hi = img.getextrema()
        k = 255.0 / ((hi - lo) or 1)
        img = img.point(lambda v: v * k - lo * k).convert("L")
    return img.convert("RGB")


class ImageZoomTool:
    """Crop a box of one of the trajectory's images and return it enlarged (``image_zoom_in``).

    Arguments: ``bbox_2d`` ([x1, y1, x2, y2] in 0-1000 relative coordinates of the original
    image), ``label`` (optional name of the object), ``image_index`` (optional; 0, the
    question's first image, by default); any other argument is a ``bad_arguments`` error. Never
    raises.
    """

    name = "image_zoom_in"

    def __init__(self, cfg: ZoomConfig | None = None) -> None:
        """Build the tool with its settings."""
        self.cfg = cfg or ZoomConfig()

    def schema(self) -> dict[str, Any]:
        """The function schema shown to the model."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": (
                    "Zoom in on a region of an image: crops the bounding box and returns it "
                    "enlarged. Use it to read small text or inspect details."
                ),
                "parameters": {
                    "type": "object",
                    "properties": {
                        "bbox_2d": {
                            "type": "array",
                            "items": {"type": "number"},
                            "minItems": 4,
                            "maxItems": 4,
                            "description": (
                                "The region as [x1, y1, x2, y2], top-left then bottom-right corner, "
                                "in relative coordinates from 0 to 1000 of the image's width and height."
                            ),
                        },
                        "label": {
                            "type": "string",
                            "description": "Optional name of the object in the region.",
                        },
                        "image_index": {
                            "type": "integer",
                            "description": "Which image to zoom into: 0 (default) is the question's first image, "
                            "then any later images in the conversation in order.",
                        },
                    },
                    "required": ["bbox_2d"],
                },
            },
        }

    def __call__(self, arguments: Any, context: ToolContext) -> ToolResult:
        """Zoom; any problem comes back as an error `ToolResult`."""
        try:
            return self._zoom(arguments, context)
        except Exception as e:  # the contract: never raise
            return ToolResult.failure("crashed", f"image_zoom_in failed: {type(e).__name__}: {e}")

    def _zoom(self, arguments: Any, context: ToolContext) -> ToolResult:
        """Validate the arguments, then crop and resize."""
        cfg = self.cfg
        arguments = argument_object(arguments, '{"bbox_2d": [x1, y1, x2, y2]}')
        if isinstance(arguments, ToolResult):
            return arguments
        unexpected = unexpected_arguments(arguments, self.name, ("bbox_2d", "label", "image_index"))
        if unexpected is not None:
            return unexpected
        if "bbox_2d" not in arguments:
            return _bad("missing required argument bbox_2d: [x1, y1, x2, y2] in 0-1000 coordinates.")
        box, why = parse_bbox(arguments["bbox_2d"])
        if box is None:
            return _bad(why or "invalid bbox_2d.")
        label = arguments.get("label")
        if label is not None and not isinstance(label, str):
            return _bad(f"label must be a string, got {type(label).__name__}.")

        images = list(getattr(context, "images", None) or [])
        if not images:
            return ToolResult.failure("no_image", "there is no image to zoom into in this conversation.")
        idx = arguments.get("image_index", 0)
        if idx is None:
            idx = 0
        if _is_number(idx) and float(idx).is_integer():
            idx = int(idx)
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(images):
            valid = "0" if len(images) == 1 else f"0 to {len(images) - 1}"
            return _bad(
                f"image_index must be an integer from {valid} ({len(images)} image(s) available), got {_short(idx)}."
            )
        img = images[idx]
        width, height = img.size
        if width < 1 or height < 1:
            return ToolResult.failure("bad_image", f"image {idx} is empty ({width}x{height}).")

        x1, y1, x2, y2 = (min(max(v, 0.0), COORD_MAX) for v in box)
        if x2 <= x1 or y2 <= y1:
            return _bad(
                f"bbox_2d [{', '.join(_fmt(v) for v in box)}] is empty or inverted: give the top-left corner "
                f"first and the bottom-right second, with x1 < x2 and y1 < y2, in 0-1000 coordinates."
            )
        # original-image pixels: the smallest integer box covering the requested one
        left = min(width - 1, math.floor(x1 / COORD_MAX * width + 1e-6))
        top = min(height - 1, math.floor(y1 / COORD_MAX * height + 1e-6))
        right = max(left + 1, min(width, math.ceil(x2 / COORD_MAX * width - 1e-6)))
        bottom = max(top + 1, min(height, math.ceil(y2 / COORD_MAX * height - 1e-6)))
        expanded = (right - left) < cfg.min_box_px or (bottom - top) < cfg.min_box_px
        left, right = _expand(left, right, cfg.min_box_px, width)
        top, bottom = _expand(top, bottom, cfg.min_box_px, height)
        cw, ch = right - left, bottom - top
        ratio = max(cw / ch, ch / cw)
        if ratio > cfg.max_aspect_ratio:
            return _bad(
                f"bbox_2d is too elongated ({cw}x{ch} px, aspect ratio {ratio:.0f} > {cfg.max_aspect_ratio:g}); "
                f"choose a less extreme region."
            )
        out_w, out_h = output_size(cw, ch, cfg)
        crop = self._crop_resize(img, (left, top, right, bottom), (out_w, out_h))
        shown = [
            round(left / width * COORD_MAX),
            round(top / height * COORD_MAX),
            round(right / width * COORD_MAX),
            round(bottom / height * COORD_MAX),
        ]
        what = f'"{label.strip()}" ' if label and label.strip() else ""
        text = (
            f"Zoomed into {what}[{', '.join(str(v) for v in shown)}] of image {idx} "
            f"({cw}x{ch} px region, shown at {out_w}x{out_h})."
        )
        return ToolResult(
            text=text,
            images=[crop],
            metadata={
                "image_index": idx,
                "bbox_2d": shown,
                "pixel_box": (left, top, right, bottom),
                "output_size": (out_w, out_h),
                "expanded": expanded,
                "label": label,
            },
        )

    def _crop_resize(
        self, img: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int]
    ) -> Image.Image:
        """Crop ``box`` and resize it to ``size`` in one step; RGB out."""
        cfg = self.cfg
        resample = _RESAMPLE[cfg.resample]
        bg = cfg.background
        if img.mode in ("1", "P") or img.mode.startswith("I;16"):
            # palette/bilevel/16-bit images only resize well after conversion: crop first (for a
            # big shrink, subsample to twice the output size first so the RGB copy stays small)
            cw, ch = box[2] - box[0], box[3] - box[1]
            if cw * ch > 4 * size[0] * size[1]:
                pre = img.resize(
                    (min(cw, 2 * size[0]), min(ch, 2 * size[1])), Image.Resampling.NEAREST, box=box
                )
            else:
                pre = img.crop(box)
            crop = _to_rgb(pre, bg)
            return crop.resize(size, resample) if crop.size != size else crop
        if (box[2] - box[0], box[3] - box[1]) == size:
            out = img.crop(box)
        else:
            out = img.resize(size, resample, box=box, reducing_gap=2.0)
        return _to_rgb(out, bg)


__all__ = ["ImageZoomTool", "ZoomConfig", "output_size", "parse_bbox"]
