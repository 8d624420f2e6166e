"""Hyper-parameter sweeps: the spec, its trials, each trial's outcome in the store, the best trial.

A sweep spec is a list of override sets, a grid, or both (pipeline parameters `sweep_trials` and
`sweep_grid`; the CLI's `--sweep SPEC` fills the one matching the JSON's type):

    [{"lr": 1e-4}, {"lr": 3e-4, "frames_per_clip": 4}]          two trials, as listed
    {"lr": [1e-4, 3e-4], "frames_per_clip": [2, 4]}              four trials, every combination

Keys are the pipeline parameters a trial may set (`TRIAL_PARAMETERS`: the parameter table's entries
marked `trial`) or dotted Hydra keys of the train component (`optim.weight_decay`, `optim.grad_clip`,
...). Each trial is one train -> predict -> evaluate branch of the pipeline's ParallelFor, with its
own pipeline run id `<sweep id>-<trial id>` (its training folder and its MLflow parent run). A
trial's component that fails writes the trial's outcome record and lets the sweep go on; the last
component reads every record, picks the best trial by the named metric and fails only when no
trial succeeded.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sam3_core import pipeline_parameters, storage
from sam3_core.errors import InputError, Sam3PipeError

if TYPE_CHECKING:
    from sam3_core.mlflow_records.sweeps import TrialResult

logger = logging.getLogger(__name__)

SOURCE = "sweep"
MODES = pipeline_parameters.SWEEP_MODES
MAX_TRIALS = 256
# the pipeline parameters a trial may set
TRIAL_PARAMETERS = pipeline_parameters.trial_parameters()
_HYDRA_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_SCALARS = (str, int, float, bool)
SUCCEEDED, FAILED = "succeeded", "failed"
# shown in the Markdown table besides the objective
HEADLINE_METRICS = ("video_mask_mAP_50_95", "video_bbox_mAP_50_95", "segm_AP", "bbox_AP")


def _integral(value: Any) -> Any:
    """2.0 -> 2: KFP passes a spec through a protobuf Struct, where every number is a float."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _check_value(key: str, value: Any, where: str) -> Any:
    """One trial setting, type- and range-checked; returns the value as the trial uses it."""
    parameter = TRIAL_PARAMETERS.get(key)
    if parameter is None and not _HYDRA_KEY.match(key):
        raise InputError(
            SOURCE,
            where,
            f"{key!r} is not a sweepable setting: use one of {sorted(TRIAL_PARAMETERS)} "
            "or a dotted Hydra key of the train component (e.g. optim.weight_decay)",
        )
    if parameter is None:
        scalars = value if isinstance(value, list) else [value]
        if not all(isinstance(item, _SCALARS) for item in scalars):
            raise InputError(
                SOURCE, where, f"{key}: expected a number, string, boolean or a list of them, got {value!r}"
            )
        return [_integral(item) for item in value] if isinstance(value, list) else _integral(value)
    value = parameter.typed(value)
    problem = parameter.problem(value)
    if problem:
        raise InputError(SOURCE, where, f"{key}: {problem}")
    return value


def expand(trials: Sequence[Any], grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The trials' settings: the listed override sets, then every combination of the grid."""
    if not isinstance(trials, list) or not isinstance(grid, Mapping):
        raise InputError(SOURCE, "sweep_trials", "expected a list of override sets and a grid mapping")
    sets: list[dict[str, Any]] = []
    for index, overrides in enumerate(trials):
        where = f"sweep_trials[{index}]"
        if not isinstance(overrides, Mapping) or not overrides:
            raise InputError(SOURCE, where, f"expected a non-empty mapping of setting -> value, got {overrides!r}")
        sets.append({key: _check_value(key, value, where) for key, value in overrides.items()})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise InputError(SOURCE, f"sweep_grid.{key}", f"expected a non-empty list of values, got {values!r}")
    axes = [[_check_value(key, value, f"sweep_grid.{key}") for value in values] for key, values in grid.items()]
    sets += [dict(zip(grid, combination)) for combination in itertools.product(*axes)] if grid else []
    if not sets:
        raise InputError(
            SOURCE, "sweep_trials", "no trials: give a grid ({setting: [values]}) or a list of override sets"
        )
    if len(sets) > MAX_TRIALS:
        raise InputError(SOURCE, "sweep_grid", f"{len(sets)} trials; at most {MAX_TRIALS} per sweep")
    seen: set[str] = set()
    for overrides in sets:
        key = repr(sorted(overrides.items()))
        if key in seen:
            raise InputError(SOURCE, "sweep_trials", f"the trial {overrides} is listed twice")
        seen.add(key)
    return sets


def check_objective(metric: str, mode: str) -> str:
    """The evaluator's metric name the best trial is picked by (an `eval/` prefix is accepted)."""
    if mode not in MODES:
        raise InputError(SOURCE, "sweep_mode", f"must be one of {MODES}, got {mode!r}")
    name = metric.removeprefix("eval/")
    if not name:
        raise InputError(SOURCE, "sweep_metric", "empty; name an evaluation metric, e.g. video_mask_mAP_50_95")
    return name


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def label(overrides: Mapping[str, Any]) -> str:
    """`lr=0.0001 frames_per_clip=2`: how a trial shows in logs and MLflow run names."""
    return " ".join(f"{key}={_text(value)}" for key, value in overrides.items())


def plan_trials(sets: list[dict[str, Any]], dataset_uri: str, sweep_id: str) -> list[dict[str, Any]]:
    """The ParallelFor's items: everything a trial's components need besides the pipeline parameters.

    The dataset URI travels inside each item rather than as a separate loop input: kfp.local
    (2.17.3) hands a loop's iterations the item in place of any other upstream task output.
    """
    trials = []
    for index, overrides in enumerate(sets):
        trial_id = f"t{index}"
        trials.append(
            {
                "trial_id": trial_id,
                "run_name": f"{trial_id} {label(overrides)}"[:120],
                "params": overrides,
                "dataset_uri": dataset_uri,
                "sweep_id": sweep_id,
                "pipeline_run_id": f"{sweep_id}-{trial_id}",
            }
        )
    return trials


def settings(trial: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's settings with their types back (a loop item reaches a component as a Struct of floats)."""
    return {key: _check_value(key, value, trial["trial_id"]) for key, value in trial["params"].items()}


def parameters(trial: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline parameters of this trial: the base values with the trial's own on top."""
    params = settings(trial)
    return {key: params.get(key, value) for key, value in base.items()}


def hydra_overrides(trial: Mapping[str, Any]) -> list[str]:
    """The trial's dotted settings as train overrides."""
    return [
        f"{key}={pipeline_parameters.hydra_literal(value, key)}"
        for key, value in settings(trial).items()
        if key not in TRIAL_PARAMETERS
    ]


def sweep_root(store: str, sweep_id: str) -> str:
    return storage.join(store, "sweeps", sweep_id)


def record_uri(store: str, trial: Mapping[str, Any]) -> str:
    return storage.join(sweep_root(store, trial["sweep_id"]), "trials", f"{trial['trial_id']}.json")


def write_record(store: str, trial: Mapping[str, Any], record: dict[str, Any]) -> None:
    storage.write_json(record_uri(store, trial), {"trial_id": trial["trial_id"], **record})


def failed(component: str, error: BaseException) -> dict[str, Any]:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return {"status": FAILED, "component": component, "error": f"{component}: {type(error).__name__}: {first_line}"}


def succeeded(metrics: Mapping[str, float], checkpoint_uri: str, run_uri: str, metrics_uri: str) -> dict[str, Any]:
    return {
        "status": SUCCEEDED,
        "metrics": dict(metrics),
        "checkpoint_uri": checkpoint_uri,
        "run_uri": run_uri,
        "metrics_uri": metrics_uri,
    }


def read_results(store: str, trials: Sequence[Mapping[str, Any]]) -> list[TrialResult]:
    """Each trial's outcome; a trial without a record was killed (its component failed outside our code)."""
    from sam3_core.mlflow_records.sweeps import (
        TrialResult,  # mlflow: only the sweep's last component needs it
    )

    results = []
    for trial in trials:
        uri = record_uri(store, trial)
        record = storage.read_json(uri) if storage.exists(uri) else None
        ok = record is not None and record.get("status") == SUCCEEDED
        if record is None:
            error = "no outcome recorded: a component of this trial was killed or failed outside sam3pipe (see its KFP logs)"
        else:
            error = record.get("error", "")
        results.append(
            TrialResult(
                trial_id=trial["trial_id"],
                pipeline_run_id=trial["pipeline_run_id"],
                run_name=trial["run_name"],
                params=settings(trial),
                succeeded=ok,
                metrics={k: float(v) for k, v in (record or {}).get("metrics", {}).items()} if ok else {},
                checkpoint_uri=(record or {}).get("checkpoint_uri", "") if ok else "",
                error=error,
            )
        )
    return results


def best_trial(results: Sequence[TrialResult], metric: str, mode: str) -> TrialResult | None:
    """The succeeded trial with the best finite value of `metric`; the earliest trial wins a tie.

    None when no trial succeeded; an InputError when trials succeeded but none reports `metric`.
    """
    done = [r for r in results if r.succeeded]
    scored = [r for r in done if math.isfinite(r.metrics.get(metric, math.nan))]
    if done and not scored:
        available = sorted({name for r in done for name in r.metrics})
        raise InputError(
            SOURCE, "sweep_metric", f"{metric!r} is not an evaluation metric of the trials; choose from {available}"
        )
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    order = {r.trial_id: index for index, r in enumerate(results)}
    return max(scored, key=lambda r: (sign * r.metrics[metric], -order[r.trial_id]))


def table(results: Sequence[TrialResult], metric: str, best: TrialResult | None) -> list[dict[str, Any]]:
    """One row per trial: id, status, its settings, the objective, every evaluation metric, its error."""
    settings = list(dict.fromkeys(key for r in results for key in r.params))
    names = sorted({name for r in results for name in r.metrics if name != metric})
    rows = []
    for r in results:
        row: dict[str, Any] = {"trial": r.trial_id, "status": _status(r, best)}
        row.update({key: _text(r.params[key]) if key in r.params else "" for key in settings})
        row[metric] = r.metrics.get(metric)
        row.update({name: r.metrics.get(name) for name in names})
        row["checkpoint_uri"] = r.checkpoint_uri
        row["error"] = r.error
        rows.append(row)
    return rows


def _status(result: TrialResult, best: TrialResult | None) -> str:
    if best is not None and result.trial_id == best.trial_id:
        return "best"
    return SUCCEEDED if result.succeeded else FAILED


def markdown(rows: Sequence[Mapping[str, Any]], metric: str, mode: str) -> str:
    """The table as Markdown (the KFP UI renders it; so does MLflow's artifact view).

    It shows the trials' settings, the objective and the headline metrics; the JSON table has them all.
    """
    columns = list(rows[0]) if rows else []
    first_metric = columns.index(metric) if metric in columns else len(columns)
    headline = [name for name in HEADLINE_METRICS if name in columns and name != metric]
    shown = [*columns[:first_metric], metric, *headline, "error"] if rows else []

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value).replace("|", "\\|")

    lines = [
        f"Sweep: best trial by {metric} ({mode})",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
        *("| " + " | ".join(cell(row.get(key)) for key in shown) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


def load_spec(text: str) -> dict[str, Any]:
    """`--sweep SPEC` -> the sweep pipeline's spec arguments; SPEC is JSON or a .json/.yaml file.

    A list becomes `sweep_trials`, a mapping `sweep_grid`, a mapping with either key both.
    """
    import json

    import yaml

    where = text if len(text) < 80 else "--sweep"
    try:
        if text.lstrip().startswith(("{", "[")):  # inline JSON, however long: never looked up as a file name
            spec = json.loads(text)
        else:
            spec = yaml.safe_load(storage.read_text(text))
    except RecursionError:
        raise InputError(
            where, "sweep", "nested too deeply to read (thousands of levels of lists or objects)"
        ) from None
    except (OSError, ValueError, yaml.YAMLError, Sam3PipeError) as exc:
        raise InputError(
            where, "sweep", f"expected JSON (or a JSON/YAML file) of a grid or a list of override sets: {exc}"
        ) from None
    if isinstance(spec, list):
        arguments: dict[str, Any] = {"sweep_trials": spec, "sweep_grid": {}}
    elif isinstance(spec, dict) and set(spec) & {"sweep_trials", "sweep_grid"}:
        arguments = {"sweep_trials": spec.get("sweep_trials", []), "sweep_grid": spec.get("sweep_grid", {})}
    elif isinstance(spec, dict):
        arguments = {"sweep_trials": [], "sweep_grid": spec}
    else:
        raise InputError(
            where, "sweep", f"expected a grid mapping or a list of override sets, got {type(spec).__name__}"
        )
    expand(arguments["sweep_trials"], arguments["sweep_grid"])
    return arguments
