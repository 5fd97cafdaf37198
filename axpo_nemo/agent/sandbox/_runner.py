"""Runs the model's code inside the confined per-call child and reports back over a pipe.

The code runs as ``__main__`` with the question's images preloaded (``image``, ``images``,
``image_1``...), ``show(obj)`` to return an image, and ``plt.show()`` returning the open
figures. Afterwards the images it produced are downscaled, PNG-encoded and written as frames
to the result pipe, followed by a status frame. Everything here runs in the untrusted process:
the worker validates what it reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import linecache
import math
import os
import struct
import sys
import traceback
from collections.abc import Iterator
from typing import Any, NoReturn

from PIL import Image

from axpo_nemo.agent.sandbox._protocol import exception_name

CODE_NAME = "<code>"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_FRAME = struct.Struct("!cI")
_MAX_TRACEBACK_CHARS = 64 * 1024


def write_frame(fd: int, kind: bytes, payload: bytes) -> None:
    """Write one ``kind | length | payload`` frame to the result pipe."""
    data = memoryview(_FRAME.pack(kind, len(payload)) + payload)
    while data:
        data = data[os.write(fd, data) :]


def read_frames(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Parse result-pipe frames; a truncated tail is ignored."""
    pos = 0
    while pos + _FRAME.size <= len(data):
        kind, n = _FRAME.unpack_from(data, pos)
        pos += _FRAME.size
        if pos + n > len(data):
            return
        yield kind, data[pos : pos + n]
        pos += n


class _ImportBlocker:
    """A meta-path finder refusing heavy frameworks (saves memory and time; not a boundary)."""

    def __init__(self, blocked: list[str]) -> None:
        self.blocked = frozenset(blocked)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        """Refuse blocked modules; defer everything else to the next finder."""
        if name.partition(".")[0] in self.blocked:
            raise ImportError(f"module {name!r} is not available in this sandbox")


def _to_pil(obj: Any) -> Image.Image:
    """A PIL image from a PIL image, a numpy array or a matplotlib figure."""
    if isinstance(obj, Image.Image):
        return obj
    if hasattr(obj, "savefig"):
        buf = io.BytesIO()
        obj.savefig(buf, format="png")
        buf.seek(0)
        return Image.open(buf)
    import numpy as np

    arr = np.asarray(obj)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = np.nan_to_num(arr.astype(np.float64))
        if arr.size and arr.max() <= 1.0 and arr.min() >= 0.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"cannot show an array of shape {arr.shape}; expected HxW, HxWx3 or HxWx4")
    return Image.fromarray(arr)


def _encode(img: Image.Image, max_pixels: int) -> bytes:
    """Downscale to at most ``max_pixels`` and PNG-encode."""
    w, h = img.size
    if w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        img.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))  # cheap for JPEG files
        w, h = img.size
        scale = math.sqrt(max_pixels / (w * h))
        if scale < 1:
            img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BILINEAR)
    if img.mode not in ("RGB", "RGBA", "L", "LA"):
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class _Outputs:
    """Images the code produced, in order: shown, plotted, then saved in the working directory."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def show(self, obj: Any = None) -> None:
        """Return an image to the model: a PIL image, a numpy array or a matplotlib figure
        (default: every open figure)."""
        if obj is None:
            self.capture_figures()
        else:
            self.items.append(obj)

    def capture_figures(self) -> None:
        """Queue every open matplotlib figure and close them (what ``plt.show()`` does here)."""
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        for num in plt.get_fignums():
            self.items.append(plt.figure(num))
        plt.close("all")


def _saved_images(workdir: str) -> list[str]:
    try:
        entries = [e for e in os.scandir(workdir) if e.is_file(follow_symlinks=False)]
    except OSError:
        return []
    entries = [e for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES)]
    entries.sort(key=lambda e: (e.stat(follow_symlinks=False).st_mtime_ns, e.name))
    return [e.path for e in entries]


def _emit_images(outputs: _Outputs, workdir: str, fd: int, max_images: int, max_pixels: int) -> int:
    """Encode and send the produced images; returns how many were dropped (over the cap or bad)."""
    outputs.capture_figures()
    items: list[Any] = outputs.items + _saved_images(workdir)
    dropped = max(len(items) - max_images, 0)
    Image.MAX_IMAGE_PIXELS = max(max_pixels * 64, 10**8)
    for item in items[:max_images]:
        try:
            img = Image.open(item) if isinstance(item, str) else _to_pil(item)
            write_frame(fd, b"I", _encode(img, max_pixels))
        except Exception as e:
            dropped += 1
            print(f"[sandbox] could not return an image: {type(e).__name__}: {e}", file=sys.stderr)
    return dropped


def _print_exception(exc: BaseException) -> None:
    """Print a traceback starting at the model's code (the runner's frames are noise)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != CODE_NAME:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    if len(text) > _MAX_TRACEBACK_CHARS:  # e.g. a 10 MB exception message
        half = _MAX_TRACEBACK_CHARS // 2
        text = f"{text[:half]}\n... [{len(text) - 2 * half} characters omitted] ...\n{text[-half:]}"
    sys.stderr.write(text)


def _namespace(images: list[Image.Image], outputs: _Outputs) -> dict[str, Any]:
    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__, "__doc__": None}
    ns["images"] = list(images)
    ns["image"] = images[0] if images else None
    for i, img in enumerate(images, 1):
        ns[f"image_{i}"] = img
    ns["show"] = outputs.show
    ns["Image"] = Image
    for name, module in (("np", "numpy"), ("plt", "matplotlib.pyplot")):
        if module in sys.modules:
            ns[name] = sys.modules[module]
    return ns


def run(code: str, images: list[Image.Image], opts: Any, workdir: str, result_fd: int) -> NoReturn:
    """Execute ``code``, send images and a status frame on ``result_fd``, and exit the process."""
    outputs = _Outputs()
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.show = lambda *args, **kwargs: outputs.capture_figures()
    sys.meta_path.insert(0, _ImportBlocker(opts.blocked_modules))
    linecache.cache[CODE_NAME] = (len(code), None, code.splitlines(True), CODE_NAME)
    status: dict[str, Any] = {"status": "ok"}
    exit_code = 0
    try:
        exec(compile(code, CODE_NAME, "exec"), _namespace(images, outputs))
    except SystemExit as e:
        if e.code not in (None, 0):
            if not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
            exit_code = e.code if isinstance(e.code, int) and e.code & 0xFF else 1  # 256 would read as 0
            status = {"status": "exit", "code": e.code if isinstance(e.code, int) else 1}
    except BaseException as e:
        exit_code = 1
        status = {"status": "exception", "type": exception_name(type(e).__name__)}
        try:
            _print_exception(e)
        except BaseException:
            with contextlib.suppress(BaseException):
                sys.stderr.write(f"{type(e).__name__} (traceback unavailable)\n")
    try:
        status["images_dropped"] = _emit_images(
            outputs, workdir, result_fd, opts.max_images, opts.max_image_pixels
        )
    except BaseException as e:
        status["image_error"] = f"{type(e).__name__}: {e}"
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    with contextlib.suppress(BaseException):
        write_frame(result_fd, b"S", json.dumps(status).encode())
    os._exit(exit_code & 0xFF)
