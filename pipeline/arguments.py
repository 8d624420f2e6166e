"""Pipeline parameters from `name=value` command-line pairs, typed and checked by the parameter table.

`profile=<name>` starts from a named set of values (`sam3_core.pipeline_parameters.PROFILES`, e.g.
`profile=demo`); the user's own pairs win, wherever they stand on the line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pipeline.parameters import checked
from sam3_core import pipeline_parameters as table
from sam3_core.errors import InputError

SOURCE = "command line"
PROFILE = "profile"
_WHAT = {table.KATIB: "a parameter of a Katib trial"}
_EXAMPLES = {
    list: """ (a JSON list, e.g. train_overrides='["train.log_every=1"]')""",
    dict: """ (a JSON object, e.g. sweep_grid='{"lr": [1e-4, 3e-4]}')""",
}


def _convert(parameter: table.Parameter, text: str) -> Any:
    kind = parameter.type
    try:
        if kind is str:
            return text
        if kind in (list, dict):
            value = json.loads(text)
            if not isinstance(value, kind):
                raise ValueError(text)
            return value
        return kind(text)
    except ValueError as exc:
        raise InputError(
            SOURCE, parameter.name, f"expected a {kind.__name__} value, got {text!r}{_EXAMPLES.get(kind, '')}"
        ) from exc


def parse_arguments(pipeline: str, pairs: list[str], given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`["max_steps=5", "source=ytvis"]` -> {"max_steps": 5, "source": "ytvis"} for `pipeline`'s parameters.

    Returns the values set (the profile's, `given`'s such as a sweep spec, then the pairs); every
    parameter of the pipeline, these on its defaults, is checked, so a bad value stops the command
    before anything is compiled, submitted or run.
    """
    known = {parameter.name: parameter for parameter in table.of_pipeline(pipeline)}
    profile: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise InputError(SOURCE, pair, "expected name=value")
        if name == PROFILE:
            profile = table.profile(text, SOURCE)
        elif name in known:
            values[name] = _convert(known[name], text)
        else:
            what = _WHAT.get(pipeline, "a pipeline parameter")
            raise InputError(SOURCE, name, f"not {what}; choose from {sorted([*known, PROFILE])}")
    chosen = {**{k: v for k, v in profile.items() if k in known}, **(given or {}), **values}
    typed = checked({**table.defaults(pipeline), **chosen}, SOURCE)
    return {name: typed[name] for name in chosen}
