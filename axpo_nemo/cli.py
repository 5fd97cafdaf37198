"""The ``axpo`` command.

Every subcommand takes ``--config FILE`` (a path or a name under ``conf/``; default: the demo
config) followed by config overrides (``key=value``, ``+key=value``, ``++key=value``).

    axpo config show --config grpo axpo.r=0.5    # print the resolved config
    axpo config keys                             # every key with its type, default and meaning
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

from axpo_nemo import __version__

Handler = Callable[[argparse.Namespace], int]


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help="config file, or a name under conf/ such as 'grpo' or 'ablations/joint_groups' (default: demo)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides: key=value, +key=value, ++key=value"
    )


def _config_show(args: argparse.Namespace) -> int:
    from axpo_nemo.config import load_config_tree, to_yaml

    print(to_yaml(load_config_tree(args.config, args.overrides)), end="")
    return 0


def _config_keys(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from axpo_nemo.config import Config

    table = Table("key", "type", "default", "meaning", show_lines=False)

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
                walk(f.default_factory, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meaning = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                meaning += f" [{' | '.join(map(str, f.metadata['choices']))}]"
            table.add_row(prefix + f.name, str(f.type), repr(default), meaning)

    walk(Config, "")
    Console(width=args.width).print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``axpo`` command with all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="axpo",
        description="AXPO: reinforcement learning that teaches vision-language models to use their tools.",
    )
    parser.add_argument("--version", action="version", version=f"axpo-nemo {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = commands.add_parser("config", help="inspect configurations", description="Inspect configurations.")
    config_commands = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = config_commands.add_parser(
        "show",
        help="print the resolved config (defaults composed, overrides applied, validated)",
        description="Print the resolved config: defaults composed, overrides applied, validated.",
    )
    _add_config_args(show)
    show.set_defaults(handler=_config_show)
    keys = config_commands.add_parser(
        "keys", help="list every config key with its type, default and meaning", description="List config keys."
    )
    keys.add_argument("--width", type=int, default=None, help="table width in characters")
    keys.set_defaults(handler=_config_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``axpo`` console script; returns the process exit code."""
    from axpo_nemo.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"axpo: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
