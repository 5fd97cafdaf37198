"""Single-process backend: the HF transformers Qwen3-VL policy and its KV-cached sampler.

Exports resolve lazily (on first use), so importing the package imports neither torch nor
transformers. Its config sections live in `axpo_nemo.config`, the run infrastructure it shares
with the cluster backend (checkpoints, stop signals, metrics log) in `axpo_nemo.run`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from axpo_nemo.lazy import lazy_exports

if TYPE_CHECKING:
    from axpo_nemo.local.generator import GeneratorStats, LocalGenerator, mrope_positions, sample_tokens

__all__ = ["GeneratorStats", "LocalGenerator", "mrope_positions", "sample_tokens"]

#: Exported name -> the submodule that defines it.
_HOME = {name: "generator" for name in __all__}

__getattr__, __dir__ = lazy_exports(__name__, _HOME)
