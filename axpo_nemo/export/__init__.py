"""Export: complete Hugging Face Qwen3-VL folders from local runs and checkpoints (`hf`), and
quantized exports (`quantize`). Cluster checkpoints are exported by `axpo_nemo.nemo.export_megatron`,
which builds on these.

Exports resolve lazily (on first use): importing the package imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from axpo_nemo.lazy import lazy_exports

if TYPE_CHECKING:
    from axpo_nemo.export.hf import export_checkpoint, export_from_state_dict, export_hf

__all__ = ["export_checkpoint", "export_from_state_dict", "export_hf"]

#: Exported name -> the submodule it is taken from.
_HOME = {name: "hf" for name in __all__}

__getattr__, __dir__ = lazy_exports(__name__, _HOME)
