"""Math answers: math-verify under a wall-clock budget (SIGALRM in the main thread, else a pool of
helper processes that are killed when they overrun)."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from axpo_nemo.agent.rewards.config import RewardConfig
from axpo_nemo.agent.rewards.normalize import normalize_answer


class _MathTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so math-verify's handlers let it through."""


_mv_filter_installed = False


class _DropTimeoutDisabledWarning(logging.Filter):
    """Hide math-verify's 'timeout is disabled' warning: we enforce our own budget."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but that warning."""
        return "Timeout is disabled" not in record.getMessage()


def _install_mv_filter() -> None:
    """Attach the warning filter to math-verify's loggers once."""
    global _mv_filter_installed
    if not _mv_filter_installed:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
        _mv_filter_installed = True


def _as_float(x: Any) -> float | None:
    """A parsed math-verify value as a finite float when it is a plain number, else None."""
    try:
        import sympy

        if isinstance(x, sympy.Basic) and x.is_number and x.is_real:
            v = float(x)
            return v if math.isfinite(v) else None
    except Exception:
        return None
    return None


def _math_verify_check(
    golds: list[str], pred: str, float_rounding: int, rel_tol: float
) -> tuple[bool, dict[str, Any]]:
    """Parse and verify with math-verify, without any timeout of its own (the caller bounds it)."""
    from math_verify import parse, verify

    _install_mv_filter()
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    details: dict[str, Any] = {"pred_parsed": [str(p)[:200] for p in pred_parsed[:1]]}
    if not pred_parsed:
        details["method"] = "unparsable_pred"
    gold_strings = []
    word_golds: list[str] = []
    for g in golds:
        g_text = g if "\\boxed" in g else "\\boxed{" + g + "}"
        gold_parsed = parse(g_text, parsing_timeout=None)
        gold_strings.append([str(x)[:200] for x in gold_parsed[:1]])
        if not gold_parsed:
            word_golds.append(g)  # not math: compared as normalised strings below
            continue
        if pred_parsed and verify(
            gold_parsed, pred_parsed, float_rounding=float_rounding, timeout_seconds=None
        ):
            return True, {**details, "gold_parsed": gold_strings, "method": "math_verify"}
        if rel_tol > 0 and pred_parsed:
            gv, pv = _as_float(gold_parsed[0]), _as_float(pred_parsed[0])
            if gv is not None and pv is not None and math.isclose(gv, pv, rel_tol=rel_tol):
                return True, {**details, "gold_parsed": gold_strings, "method": "rel_tol"}
    details["gold_parsed"] = gold_strings
    # references that are words, not math ("yes", "\\text{east}"): normalised string match
    pn = normalize_answer(pred)
    if pn and any(pn == normalize_answer(g) for g in word_golds):
        return True, {**details, "method": "string"}
    details.setdefault("method", "math_verify")
    return False, details


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise `_MathTimeout` in the main thread after ``seconds``; restores any outer timer."""

    def handler(signum: int, frame: Any) -> None:
        """Interrupt the running check."""
        raise _MathTimeout()

    old_handler = signal.signal(signal.SIGALRM, handler)
    prev_delay, prev_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, old_handler)
            if prev_delay > 0:  # someone else's timer (e.g. pytest-timeout) was running
                remaining = max(prev_delay - (time.monotonic() - start), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, remaining, prev_interval)


_math_ready = False


def _warm_up_math() -> None:
    """Import math-verify and sympy and parse once, so the first timed check does not pay for it."""
    global _math_ready
    if _math_ready:
        return
    from math_verify import parse, verify

    _install_mv_filter()
    verify(
        parse("\\boxed{\\frac{1}{2}}", parsing_timeout=None),
        parse("\\boxed{0.5}", parsing_timeout=None),
        timeout_seconds=None,
    )
    _math_ready = True


def _check_in_main_thread(
    golds: list[str], pred: str, cfg: RewardConfig, timeout_s: float | None
) -> tuple[bool, dict[str, Any]]:
    """Run `_math_verify_check` under a SIGALRM budget (``timeout_s`` None: unbounded)."""
    if timeout_s is None:
        return _math_verify_check(golds, pred, cfg.math_float_rounding, cfg.math_rel_tol)
    _warm_up_math()  # one-off import cost stays outside the budget
    try:
        with _alarm(timeout_s):
            return _math_verify_check(golds, pred, cfg.math_float_rounding, cfg.math_rel_tol)
    except _MathTimeout:
        return False, {"method": "timeout", "error": f"math check exceeded {timeout_s:g} s"}


class _MathWorker:
    """A helper Python process that runs math checks, so a stuck one can be killed."""

    def __init__(self) -> None:
        code = "from axpo_nemo.agent.rewards.math_check import _worker_main; _worker_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )

    def run(self, payload: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """Send one job; its result, or None when it did not answer within ``timeout_s``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("math worker exited")
        return json.loads(line)

    def close(self) -> None:
        """Kill the process."""
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[union-attr]


_POOL_LOCK = threading.Lock()
_IDLE_WORKERS: list[_MathWorker] = []
_MAX_IDLE_WORKERS = max(2, min(8, os.cpu_count() or 2))
# first use pays the interpreter start-up and imports; later jobs get only the budget
_WORKER_STARTUP_S = 30.0


def _close_idle_workers() -> None:
    """Terminate the idle helper processes (at interpreter exit)."""
    with _POOL_LOCK:
        workers = list(_IDLE_WORKERS)
        _IDLE_WORKERS.clear()
    for w in workers:
        w.close()


atexit.register(_close_idle_workers)


def _check_in_process(golds: list[str], pred: str, cfg: RewardConfig) -> tuple[bool, dict[str, Any]]:
    """Run the check in a helper process, killing it if it overruns the budget."""
    with _POOL_LOCK:
        worker = _IDLE_WORKERS.pop() if _IDLE_WORKERS else None
    fresh = worker is None
    worker = worker or _MathWorker()
    payload = {
        "golds": golds,
        "pred": pred,
        "float_rounding": cfg.math_float_rounding,
        "rel_tol": cfg.math_rel_tol,
        "timeout_s": cfg.math_timeout_s,
    }
    wait = cfg.math_timeout_s + 1.0 + (_WORKER_STARTUP_S if fresh else 0.0)
    try:
        out = worker.run(payload, wait)
    except Exception as e:
        worker.close()
        return False, {"method": "error", "error": f"math worker failed: {e!r}"}
    if out is None:
        worker.close()
        return False, {"method": "timeout", "error": f"math check exceeded {cfg.math_timeout_s:g} s"}
    with _POOL_LOCK:
        keep = len(_IDLE_WORKERS) < _MAX_IDLE_WORKERS
        if keep:
            _IDLE_WORKERS.append(worker)
    if not keep:
        worker.close()
    return bool(out.get("correct")), dict(out.get("details") or {})


def _worker_main() -> None:
    """Entry point of a helper process: JSON jobs on stdin, JSON results on stdout."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # nothing but results may reach the protocol stream
    logging.disable(logging.CRITICAL)
    _warm_up_math()
    cfg_cache: dict[tuple[int, float], RewardConfig] = {}
    for line in sys.stdin:
        try:
            job = json.loads(line)
            key = (int(job["float_rounding"]), float(job["rel_tol"]))
            if key not in cfg_cache:
                cfg_cache[key] = RewardConfig(math_float_rounding=key[0], math_rel_tol=key[1])
            correct, details = _check_in_main_thread(
                list(job["golds"]), str(job["pred"]), cfg_cache[key], float(job["timeout_s"])
            )
        except Exception as e:
            correct, details = False, {"method": "error", "error": repr(e)[:500]}
        out.write(json.dumps({"correct": correct, "details": _jsonable(details)}) + "\n")


def _jsonable(obj: Any) -> Any:
    """Details made JSON-safe (non-serialisable leaves become strings)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def check_math(
    golds: Sequence[str], pred: str, cfg: RewardConfig | None = None
) -> tuple[bool, dict[str, Any]]:
    """Whether ``pred`` equals any of ``golds`` mathematically, within ``cfg.math_timeout_s``.

    Returns ``(correct, details)``; timeouts and math-verify errors count as wrong.
    """
    cfg = cfg or RewardConfig()
    golds = [str(g) for g in golds]
    in_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    mode = cfg.math_timeout_mode
    try:
        if mode == "none":
            return _check_in_main_thread(golds, pred, cfg, None)
        if mode == "auto" and in_main:
            return _check_in_main_thread(golds, pred, cfg, cfg.math_timeout_s)
        return _check_in_process(golds, pred, cfg)
    except _MathTimeout:
        return False, {"method": "timeout", "error": f"math check exceeded {cfg.math_timeout_s:g} s"}
    except Exception as e:
        return False, {"method": "error", "error": repr(e)[:500]}
