"""The parameter table (`sam3_core/pipeline_parameters.py`) as the pipeline uses it.

- `pipeline_function`: a pipeline function whose signature (what KFP reads: names, types,
  defaults, the docstring's help) is generated from the table.
- `arguments`: the pipeline parameters a KFP component takes, picked by its own signature.
- `checked`: every value checked by its entry, then the rules between parameters; the CLI runs it
  before anything is compiled, submitted or run, and the pipelines' first component runs it again
  in the cluster (a run started from the KFP UI).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from sam3_core import pipeline_parameters as table
from sam3_core.errors import InputError

if TYPE_CHECKING:  # the component bodies import this module in the pods, where importing kfp.dsl here is circular
    from kfp.dsl.base_component import BaseComponent


def pipeline_function(
    name: str, pipeline: str, body: Callable[[dict[str, Any]], Any], returns: Any, summary: str, defaults: Mapping
) -> Callable[..., Any]:
    """A function KFP reads as a pipeline: one argument per parameter of `pipeline`, typed by the table.

    Its defaults are the table's with `defaults` on top; calling it calls `body` with the arguments
    by name (KFP calls a pipeline function with its parameters' channels, in signature order).
    """
    parameters = table.of_pipeline(pipeline)
    values = {**table.defaults(pipeline), **defaults}
    names = [parameter.name for parameter in parameters]

    def function(*channels: Any) -> Any:
        return body(dict(zip(names, channels, strict=True)))

    function.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=values[p.name], annotation=p.type
            )
            for p in parameters
        ],
        return_annotation=returns,
    )
    function.__name__ = function.__qualname__ = name
    function.__doc__ = "\n".join([summary, "", "Args:", *(f"    {p.name}: {p.help}" for p in parameters)])
    return function


def arguments(component: BaseComponent, values: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline parameters in `values` that `component` takes (its inputs named like them)."""
    inputs = component.component_spec.inputs or {}
    return {name: value for name, value in values.items() if name in inputs and name in table.BY_NAME}


def checked(values: Mapping[str, Any], source: str = table.SOURCE) -> dict[str, Any]:
    """The values typed and checked by their entries, then together; an InputError names the first bad one."""
    unknown = sorted(set(values) - set(table.BY_NAME))
    if unknown:
        raise InputError(source, unknown[0], f"not a pipeline parameter; choose from {sorted(table.BY_NAME)}")
    out = {name: table.BY_NAME[name].checked(value, source) for name, value in values.items()}
    if out.get("training_mode") == "pod" and out.get("nodes", 1) != 1:
        raise InputError(
            source, "nodes", "training_mode=pod runs on one node; use training_mode=pytorchjob or trainjob"
        )
    if "sweep_trials" in out and "sweep_grid" in out:
        from pipeline import sweep

        sweep.expand(out["sweep_trials"], out["sweep_grid"])
    return out


def pod_gpus(training_mode: str, gpus: int) -> int:
    """The GPUs the train pod itself requests: none when it only launches and watches a job."""
    return gpus if training_mode == "pod" else 0
