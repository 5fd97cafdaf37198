"""Check that an installed distribution's requirements are met in this Python environment.

    python containers/check_deps.py axpo-nemo

The Dockerfile installs axpo-nemo with ``--no-deps`` into NeMo-RL's venvs (so the image's pinned
stack stays as it is) and runs this in each venv: exit 0 when every requirement (without extras)
is installed within its version range, else exit 1 listing each missing or out-of-range one.
"""

from __future__ import annotations

import sys
from importlib import metadata


def unmet(dist: str) -> list[str]:
    """The requirements of ``dist`` that this environment does not satisfy, one line each."""
    from packaging.requirements import Requirement

    problems = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra, or another platform's
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name}: not installed (needs {req.specifier or 'any version'})")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}: {version} installed, needs {req.specifier}")
    return problems


def main(argv: list[str]) -> int:
    """Command-line entry; returns the exit status."""
    if len(argv) != 1:
        print("usage: check_deps.py DISTRIBUTION", file=sys.stderr)
        return 2
    where = sys.prefix
    try:
        problems = unmet(argv[0])
    except metadata.PackageNotFoundError:
        print(f"{argv[0]} is not installed in {where}", file=sys.stderr)
        return 1
    if problems:
        print(f"{argv[0]} in {where}: unmet requirements:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"{argv[0]} in {where}: all requirements met")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
