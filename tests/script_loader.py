"""Load a script that is not part of the package (``tools/*.py``, ``slurm/lib/*.py``) as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Execute the script at ``path`` as the module ``name`` (default: its file stem) and return it.

    The module is entered in ``sys.modules`` under ``name`` before it runs, as an import would:
    dataclasses and pickling look their module up there.
    """
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
