"""Hydra structured configs: each domain owns its dataclass, this module composes them.

A component's primary config is `sam3_core/configs/<name>.yaml`, whose defaults list starts
with `<name>_schema` (the dataclass registered here) so every key is type-checked, and may
pull preset groups such as `model: tiny`.

Overrides come from people typing paths, so two things are friendlier than plain Hydra: a value
Hydra's grammar cannot read unquoted (a path with a non-ASCII letter, `'`, `#`, `(`...) is quoted
for the user when quoting makes it a plain string, and every other failure becomes one line
that names the key and says what to write instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
from typing import Any, TypeVar

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from sam3_core.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")
CONFIG_MODULE = "sam3_core.configs"
QUOTING_HINT = "quote the value: key='value' (in a shell: \"key='value'\")"

# `[+|++|~]key=value`; keys are dotted names, group overrides may carry a package (`group@pkg`).
_OVERRIDE = re.compile(r"^(?P<key>(?:\+\+|\+|~)?[\w./@-]+)=(?P<value>.*)$", re.DOTALL)
# Old section names still read, each with a warning that names the new one: old prefix -> new prefix.
RENAMED_SECTIONS = {"tracking.": "mlflow."}
# Values that mean structure (list, dict) or are quoted already: a parse error there is the user's to fix.
_STRUCTURED_START = ("[", "{", "'", '"')


# What each `<name>_schema` was registered from: registering converts the whole dataclass tree (a third
# of a load), so it is redone only for another schema or environment (defaults may read it: the store's does).
_REGISTERED: dict[tuple[str | None, str], tuple[type, frozenset[tuple[str, str]]]] = {}


def register(name: str, schema: type, group: str | None = None) -> None:
    """Register a dataclass as `<name>_schema` (or as `<group>/<name>_schema`), unless it is already."""
    source = (schema, frozenset(os.environ.items()))
    if _REGISTERED.get((group, name)) == source:
        return
    ConfigStore.instance().store(group=group, name=f"{name}_schema", node=schema)
    _REGISTERED[(group, name)] = source


@functools.cache
def _schema_config(schema: type) -> DictConfig:
    """The dataclass as a structured config, read-only: what keys it has (built once per schema)."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def quote_value(value: str) -> str:
    """`value` as a single-quoted Hydra string that reads back as exactly `value`.

    Inside quotes Hydra unescapes only backslashes that precede a quote or end the string,
    so only those backslashes are doubled, and each quote gets one backslash.
    """
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"'{escaped}'"


def _parse_error(parser: OverridesParser, override: str) -> str | None:
    """Hydra's complaint about one override, or None when it reads."""
    try:
        parser.parse_overrides([override])
    except OverrideParseException as exc:
        return str(exc).strip().splitlines()[0]
    return None


def override_problem(override: str) -> str | None:
    """Why Hydra cannot read one override as a component would get it (quoted where needed), or None."""
    return _parse_error(OverridesParser.create(), lenient_overrides([override])[0])


def lenient_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The overrides with unreadable plain values quoted, so `model.uri=/data/vidéos/a.pt` just works.

    Only values that fail to parse and parse once quoted are touched; lists, dicts and values
    the user quoted are left for Hydra to judge.
    """
    parser = OverridesParser.create()
    out = []
    for override in overrides:
        match = _OVERRIDE.match(override)
        value = match["value"] if match else ""
        if match and value and not value.startswith(_STRUCTURED_START) and _parse_error(parser, override):
            quoted = f"{match['key']}={quote_value(value)}"
            if _parse_error(parser, quoted) is None:
                override = quoted
        out.append(override)
    return out


def renamed_keys(overrides: list[str]) -> list[str]:
    """The overrides with keys of renamed sections (`tracking.enabled=false`) under their new names."""
    out = []
    for override in overrides:
        match = _OVERRIDE.match(override)
        key = match["key"].lstrip("+~") if match else ""
        old = next((prefix for prefix in RENAMED_SECTIONS if key.startswith(prefix)), None)
        if match and old:
            new_key = RENAMED_SECTIONS[old] + key[len(old) :]
            logger.warning("%s is now %s (the %s* keys are read for now; rename them)", key, new_key, old)
            override = override.replace(key, new_key, 1)
        out.append(override)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a structured config, leaves and sections."""
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            dotted = f"{prefix}{key}"
            keys.append(dotted)
            keys.extend(_schema_keys(node._get_node(key), dotted + "."))
    return keys


def unknown_keys(node: Any, schema: Any, prefix: str = "") -> list[str]:
    """Keys of `node` that the dataclass behind `schema` does not have (added with `+key=...`)."""
    if not (isinstance(node, DictConfig) and isinstance(schema, DictConfig)):
        return []
    if not dataclasses.is_dataclass(OmegaConf.get_type(schema)):
        return []  # a free-form dict field: any key is fine
    known = set(schema.keys())
    unknown = []
    for key in node.keys():
        if key not in known:
            unknown.append(f"{prefix}{key}")
        else:
            unknown.extend(unknown_keys(node._get_node(key), schema._get_node(key), f"{prefix}{key}."))
    return unknown


def _no_such_key(key: str, schema: type) -> str:
    """`key: no such key; did you mean ...?` with the closest keys of the schema."""
    known = _schema_keys(_schema_config(schema))
    close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"the keys are those of {schema.__name__}"
    return f"{key}: no such key; {hint}"


def _omegaconf_cause(exc: BaseException) -> OmegaConfBaseException | None:
    """The innermost OmegaConf error behind a Hydra error: it names the key and the real problem."""
    found = exc if isinstance(exc, OmegaConfBaseException) else None
    seen = exc.__cause__
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            found = seen
        seen = seen.__cause__
    return found


def explain(exc: BaseException, overrides: list[str], schema: type) -> str:
    """One line for a Hydra / OmegaConf failure: the key, what is wrong, what to write instead."""
    if isinstance(exc, OverrideParseException):
        parser = OverridesParser.create()
        bad = next((o for o in overrides if _parse_error(parser, o)), None)
        where = f"cannot read the override {bad!r}" if bad else "cannot read an override"
        return f"{where}: {_first_line(exc)}; check brackets and commas, or {QUOTING_HINT}"
    if isinstance(exc, MissingConfigException):
        options = re.findall(r"^\t(\S+)$", str(exc).split("Config search path")[0], flags=re.MULTILINE)
        available = f"; available: {', '.join(options)}" if options else ""
        return f"{_first_line(exc)}{available}"
    cause = _omegaconf_cause(exc)
    key = getattr(cause, "full_key", None) if cause is not None else None
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return _no_such_key(str(key), schema)
    if isinstance(cause, MissingMandatoryValue) and key:
        # OmegaConf's words kept: scripts and tests look for "missing mandatory value"
        return f"{key}: missing mandatory value: {str(key).rsplit('.', 1)[-1]}; pass {key}=<value>"
    if "Ambiguous value" in str(exc):
        return (
            f"{_first_line(exc)}: write key=[a,b] for a list, or key='a,b' for a string with a comma "
            "(in a shell: \"key='a,b'\")"
        )
    if cause is not None and key:
        return f"{key}: {_first_line(cause)}"
    return _first_line(exc)


def _refuse_hydra_settings(name: str, overrides: list[str]) -> None:
    """`hydra.run.dir=...` and friends configure Hydra's app runner, which components do not use: Hydra's
    compose API would drop them without a word."""
    for override in overrides:
        match = _OVERRIDE.match(override)
        key = match["key"].lstrip("+~") if match else ""
        if re.split(r"[./@]", key, maxsplit=1)[0] == "hydra":
            raise ConfigError(
                f"config '{name}': {key}: Hydra's own settings do not apply here (a component writes no Hydra "
                "output folder or log file); its outputs go where its output keys say (output.store, output.uri, "
                "output=...), its log to stderr"
            )


def load_config(name: str, schema: type[T], overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Compose `<name>.yaml` with Hydra overrides and return it as the typed dataclass."""
    register(name, schema)
    _refuse_hydra_settings(name, list(overrides))
    overrides = lenient_overrides(renamed_keys(list(overrides)))
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=name, overrides=overrides)
        unknown = unknown_keys(cfg, _schema_config(schema))
        if unknown:
            raise ConfigError(f"config '{name}': {_no_such_key(unknown[0], schema)}")
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"config '{name}': {explain(exc, overrides, schema)}") from exc
    except RecursionError:
        raise ConfigError(f"config '{name}': an override is nested too deeply to read") from None


def defaults_yaml(name: str, schema: type) -> str:
    """`<name>.yaml` with no override, as YAML: what `--help` shows (`???` marks a value to give)."""
    register(name, schema)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return OmegaConf.to_yaml(compose(config_name=name))


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, as saved next to every run."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values, the form MLflow params and KFP parameters use."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
