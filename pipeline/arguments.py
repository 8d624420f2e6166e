"""Pipeline parameters from `name=value` command-line pairs, typed by the pipeline's signature."""

from __future__ import annotations

import json
from typing import Any

from kfp.dsl.graph_component import GraphComponent

from sam3_core.errors import InputError

SOURCE = "command line"


def _convert(name: str, kind: str, text: str) -> Any:
    try:
        if kind == "String":
            return text
        if kind == "Integer":
            return int(text)
        if kind == "Float":
            return float(text)
        if kind in ("List", "Dict"):
            value = json.loads(text)
            if not isinstance(value, list if kind == "List" else dict):
                raise ValueError(text)
            return value
    except ValueError as exc:
        example = {
            "List": """ (a JSON list, e.g. train_overrides='["train.log_every=1"]')""",
            "Dict": """ (a JSON object, e.g. sweep_grid='{"lr": [1e-4, 3e-4]}')""",
        }.get(kind, "")
        raise InputError(SOURCE, name, f"expected a {kind.lower()} value, got {text!r}{example}") from exc
    raise InputError(SOURCE, name, f"parameters of type {kind} cannot be set from the command line")


def parse_arguments(pipeline: GraphComponent, pairs: list[str]) -> dict[str, Any]:
    """`["max_steps=5", "source=ytvis"]` -> {"max_steps": 5, "source": "ytvis"}; lists and mappings as JSON."""
    inputs = pipeline.component_spec.inputs or {}
    arguments: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise InputError(SOURCE, pair, "expected name=value")
        if name not in inputs:
            raise InputError(SOURCE, name, f"not a pipeline parameter; choose from {sorted(inputs)}")
        arguments[name] = _convert(name, inputs[name].type, text)
    return arguments
