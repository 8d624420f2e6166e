"""Hydra structured configs: each domain owns its dataclass, this module composes them.

A component's primary config is `sam3_core/configs/<name>.yaml`, whose defaults list starts
with `<name>_schema` (the dataclass registered here) so every key is type-checked, and may
pull preset groups such as `model: tiny`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sam3_core.errors import ConfigError

T = TypeVar("T")
CONFIG_MODULE = "sam3_core.configs"


def register(name: str, schema: type, group: str | None = None) -> None:
    """Register a dataclass as `<name>_schema` (or as `<group>/<name>_schema`)."""
    ConfigStore.instance().store(group=group, name=f"{name}_schema", node=schema)


def load_config(name: str, schema: type[T], overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Compose `<name>.yaml` with Hydra overrides and return it as the typed dataclass."""
    register(name, schema)
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=name, overrides=list(overrides))
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        key = getattr(exc, "full_key", None)
        where = f" {key}:" if key else ""
        raise ConfigError(f"config '{name}':{where} {first_line}") from exc


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
