"""Load, compose, override and validate the YAML config tree.

* A YAML file may start with ``defaults: parent.yaml`` (or a list); parents are resolved relative
  to the file, merged in order, and the file itself is merged last.
* Command-line overrides follow NeMo-RL/Hydra: ``key=value`` sets an existing key, ``+key=value``
  adds a key that does not exist yet, ``++key=value`` sets or adds. Only open sections (a
  free-form mapping: ``nemo.overrides``) take new keys; every other section has the schema's keys,
  and an unknown one is an error naming the closest key or where the section's keys are listed.
  Values are parsed as YAML (``null``, ``true``, ``[1, 2]``, ``1e-6``).
* Everything is checked against the typed schema (`Config`): an unknown key, a wrong type or a
  value outside its declared range fails at start-up with one line naming the full key path and,
  when there is one, the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from axpo_nemo.config.schema import Config
from axpo_nemo.core.config import field_errors

#: Config used when none is named: the embedded one-machine default.
DEFAULT_CONFIG = "demo"
#: The repository's config folder (present in source checkouts and editable installs).
SOURCE_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
#: The configs an installed package carries (``pip install .`` puts ``conf/`` at ``axpo_nemo/conf``).
PACKAGE_CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(ValueError):
    """A config problem, described in one line that names the offending key or file."""


def _register_resolvers() -> None:
    # The arithmetic resolvers NeMo-RL's configs use, so their interpolations work here too.
    for name, fn in {
        "add": lambda *xs: sum(xs),
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
        "max": lambda *xs: max(xs),
    }.items():
        if not OmegaConf.has_resolver(name):
            with warnings.catch_warnings():  # renamed in omegaconf 2.4; containers pin 2.3
                warnings.simplefilter("ignore", UserWarning)
                OmegaConf.register_new_resolver(name, fn)


_register_resolvers()


def config_dirs() -> list[Path]:
    """The folders config names are looked up in, in order: ``./conf`` in the working directory,
    the installed package's configs, the source tree's ``conf/`` (those that exist)."""
    dirs = [Path.cwd() / "conf", PACKAGE_CONF_DIR, SOURCE_CONF_DIR]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


def find_config(name: str | Path) -> Path:
    """Resolve a config name to a file: an existing path, else ``<dir>/<name>[.yaml]`` for the
    first of `config_dirs` that has it."""
    path = Path(name)
    candidates = [path, path.with_suffix(".yaml")] if path.suffix != ".yaml" else [path]
    dirs = config_dirs()
    for root in dirs:
        candidates += [root / path, root / path.with_suffix(".yaml")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(["the working directory", *map(str, dirs)])
    raise ConfigError(f"config file not found: {name} (looked in {looked})")


def _schema_keys(cls: type = Config, prefix: str = "") -> Iterator[str]:
    for f in dataclasses.fields(cls):
        yield prefix + f.name
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            yield from _schema_keys(f.default_factory, prefix + f.name + ".")


def closest_key(key: str) -> str | None:
    """The valid key path most like ``key`` (for 'did you mean' hints), or None."""
    keys = list(_schema_keys())
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if match:
        return match[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[match[0]] if match else None


def open_sections(cls: type = Config, prefix: str = "") -> list[str]:
    """The key paths of the sections that take new keys (free-form mappings, e.g. ``nemo.overrides``)."""
    found = []
    for f in dataclasses.fields(cls):
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(factory):
            found += open_sections(factory, f"{prefix}{f.name}.")
        elif factory is not None and isinstance(factory(), dict):
            found.append(prefix + f.name)
    return found


def _unknown_key(key: str, where: str, op: str = "") -> ConfigError:
    """The one-line error for an unknown key: the closest valid key, else where the keys are listed."""
    hint = closest_key(key)
    if hint and hint != key:
        return ConfigError(f"unknown config key '{key}'{where}; did you mean '{hint}'?")
    keys = set(_schema_keys())
    parts = key.split(".")
    section = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in keys), "")
    adds = f"; '{op}' adds keys only under {', '.join(open_sections())}" if op else ""
    listing = f"axpo config keys {section}" if section else "axpo config keys"
    return ConfigError(f"unknown config key '{key}'{where}{adds}; `{listing}` lists the valid keys")


def _error(exc: OmegaConfBaseException, where: str, op: str = "") -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(getattr(exc, "msg", exc)).splitlines()[0]
    where = f" ({where})" if where else ""
    if isinstance(exc, ConfigKeyError | ConfigAttributeError):
        return _unknown_key(key, where, op)
    return ConfigError(f"invalid value for '{key}'{where}: {msg}")


def _compose(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """The files of a ``defaults:`` chain, parents first, each with its own keys."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise ConfigError(f"config defaults form a cycle: {cycle}")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if node is None or not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must hold a mapping at top level")
    parents = node.pop("defaults", None) or []
    if isinstance(parents, str):
        parents = [parents]
    files: list[tuple[Path, DictConfig]] = []
    for parent in parents:
        parent_path = path.parent / str(parent)
        if not parent_path.suffix:
            parent_path = parent_path.with_suffix(".yaml")
        if not parent_path.is_file():
            raise ConfigError(f"{path}: defaults entry '{parent}' not found at {parent_path}")
        files += _compose(parent_path, (*chain, path))
    files.append((path, node))
    return files


_OVERRIDE = re.compile(r"^(?P<op>\+\+|\+|~)?(?P<key>[A-Za-z_][\w\-]*(?:\.[\w\-]+)*)(?:=(?P<value>.*))?$", re.S)
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_MISSING = object()


def parse_value(text: str) -> Any:
    """Parse an override's value as YAML; numbers in exponent form (1e-6) become floats."""
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


#: Top-level sections of NeMo-RL's GRPO/SFT master config that this schema does not have (its
#: own ``sft``, ``data`` and ``cluster`` come first): an override of one of these belongs under
#: ``nemo.overrides`` (a NeMo-RL user types ``logger.wandb.name=...`` out of habit).
NEMO_RL_SECTIONS = frozenset({"policy", "grpo", "loss_fn", "env", "logger", "checkpointing"})


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Apply ``key=value`` / ``+key=value`` / ``++key=value`` overrides in place."""
    for item in overrides:
        m = _OVERRIDE.match(item.strip())
        if not m or m["value"] is None:
            raise ConfigError(f"override '{item}' is not of the form key=value, +key=value or ++key=value")
        op, key, value = m["op"] or "", m["key"], parse_value(m["value"])
        if op == "~":
            raise ConfigError(f"override '{item}': deleting keys is not supported; set it to null instead")
        exists = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False) is not _MISSING
        if not exists and key.split(".", 1)[0] in NEMO_RL_SECTIONS:
            raise ConfigError(
                f"unknown config key '{key}' (override '{item}'): NeMo-RL master-config keys go under "
                f"nemo.overrides: ++nemo.overrides.{key}={m['value']}"
            )
        if op == "" and not exists:
            raise _unknown_key(key, f" (override '{item}')")
        if op == "+" and exists:
            raise ConfigError(
                f"override '{item}': '+' adds a new key but '{key}' already exists; use {key}=... or ++{key}=..."
            )
        try:
            OmegaConf.update(cfg, key, value, merge=True, force_add=False)
        except OmegaConfBaseException as exc:
            raise _error(exc, f"override '{item}'", op) from exc


def _constraint_errors(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    errors = field_errors(node, prefix, schema=schema)
    for f in dataclasses.fields(schema):
        child = node.get(f.name)
        child_type = OmegaConf.get_type(child) if isinstance(child, DictConfig) else None
        if child_type is not None and dataclasses.is_dataclass(child_type):
            errors += _constraint_errors(child, child_type, f"{prefix}{f.name}.")
    return errors


def load_config_tree(config: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose, override and validate a config; returns the typed, resolved OmegaConf tree."""
    return _load(config, overrides)[0]


def _load(config: str | Path | None, overrides: Sequence[str]) -> tuple[DictConfig, Config]:
    """The validated tree and the `Config` built from it."""
    schema = OmegaConf.structured(Config)
    for path, node in _compose(find_config(config or DEFAULT_CONFIG)):
        try:
            schema = OmegaConf.merge(schema, node)
        except OmegaConfBaseException as exc:
            raise _error(exc, f"in {path}") from exc
    apply_overrides(schema, overrides)
    try:
        OmegaConf.resolve(schema)
    except OmegaConfBaseException as exc:
        raise _error(exc, "while resolving interpolations") from exc
    errors = _constraint_errors(schema, Config)
    if errors:
        raise ConfigError(f"invalid config: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    # Building the dataclasses runs their own checks across fields (e.g. every eval k at most
    # eval.samples_per_question), so a tree that validates here can be built anywhere.
    try:
        built = OmegaConf.to_object(schema)
    except OmegaConfBaseException as exc:
        raise _error(exc, "") from exc
    except ValueError as exc:
        raise ConfigError(f"invalid config: {str(exc).splitlines()[0]}") from exc
    return schema, built


def load_config(config: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a config file (default: the demo config) with overrides as a typed `Config`.

    Raises `ConfigError` with a one-line message naming the bad key or file.
    """
    return _load(config, overrides)[1]


def to_yaml(cfg: Config | DictConfig) -> str:
    """Render a config as YAML (as ``axpo config show`` prints it)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(node)
