"""The ``axpo`` command.

Every subcommand takes ``--config FILE`` (a path or a name under ``conf/``; default: the demo
config) followed by config overrides (``key=value``, ``+key=value``, ``++key=value``).

    axpo config show --config grpo axpo.r=0.5    # print the resolved config
    axpo config keys --config grpo tools         # the tools.* keys of a config, with their meaning
    axpo tools list                              # the enabled tools' schemas
    axpo tools run image_zoom_in --args '{"bbox_2d": [0, 0, 500, 500]}' --image photo.png
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from axpo_nemo.cli.errors import DEBUG_ENV, USER_ERRORS, one_line
from axpo_nemo.cli.parser import build_parser

__all__ = ["DEBUG_ENV", "USER_ERRORS", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``axpo`` console script; returns the process exit code.

    A user error (see `USER_ERRORS`; config errors included) prints one line on stderr and exits
    with 2; ``--debug`` or ``AXPO_DEBUG=1`` shows its traceback instead.
    """
    from axpo_nemo.config import ConfigError

    parser = build_parser()
    # Overrides may follow options (`run NAME --args … key=value`), which argparse leaves unparsed;
    # so may --debug.
    args, extra = parser.parse_known_args(argv)
    debug = args.debug or "--debug" in extra or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    extra = [x for x in extra if x != "--debug"]
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.handler(args)
    except ConfigError as exc:
        if debug:
            raise
        print(f"axpo: config error: {one_line(exc)}", file=sys.stderr)
        return 2
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"axpo: {one_line(exc)}", file=sys.stderr)
        return 2
