"""Fixtures shared by several test modules, and the Python 3.11 shim for NeMo-RL's config classes."""

import importlib.util
import sys
import typing

import pytest
import torch


def _nemo_rl_typed_dicts_on_python_311() -> bool:
    """Let NeMo-RL v0.7.0's pydantic ``MasterConfig`` classes build on Python 3.11; True if installed.

    v0.7.0's ``algorithms/grpo.py`` and ``algorithms/sft.py`` define ``MasterConfig(BaseModel)`` with
    fields typed by ``typing.TypedDict`` classes (``PolicyConfig``, ``GRPOConfig``, ...). pydantic
    builds the schema when the class is created, and before Python 3.12 it refuses ``typing.TypedDict``
    ("Please use `typing_extensions.TypedDict` instead of `typing.TypedDict` on Python < 3.12": 3.11's
    TypedDict lacks ``__orig_bases__``), so the modules fail at import. That is the only obstacle on
    3.11: their source compiles (no 3.12 syntax) and imports no 3.12-only ``typing`` name. Pointing
    ``typing.TypedDict`` at ``typing_extensions.TypedDict`` (the backport pydantic asks for, same
    semantics, ``NotRequired`` included) before anything imports ``nemo_rl`` lets the unmodified
    modules import. Applied only where NeMo-RL is importable and Python is older than 3.12.
    """
    if sys.version_info >= (3, 12) or importlib.util.find_spec("nemo_rl") is None:
        return False
    if "nemo_rl" in sys.modules:
        raise RuntimeError("nemo_rl was imported before the TypedDict shim; its config classes would not build")
    import typing_extensions

    typing.TypedDict = typing_extensions.TypedDict
    return True


NEMO_RL_TYPED_DICT_SHIM = _nemo_rl_typed_dicts_on_python_311()


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-model work on one torch thread (steady timings on a shared 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The keyword arguments of every ``torch.nn.functional.scaled_dot_product_attention`` call."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls
