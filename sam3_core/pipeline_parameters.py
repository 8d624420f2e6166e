"""The pipeline parameters: one table of every knob a pipeline run takes, read by everything that names one.

An entry is one `name=value` a user sets per run (`sam3pipe run|submit|sweep|compile`, the KFP UI):
its type, its default, the Hydra key it sets in each component's config, the pipelines that take
it, whether a sweep or Katib trial may set it, its MLflow parent-row name, its help and its value
check. From this table the pipeline (`pipeline/`) builds the KFP pipeline signatures, each
component's overrides, the sweep's trial settings, a Katib trial's base parameters, `reproduce`'s
arguments and the typed command line; the MLflow package takes the parent-row params from it
(`parent_params`). It lives in the library, free of KFP and torch, so that both can read it
without the library importing the pipeline.

Defaults are the components' own (tests/pipeline/test_parameters.py composes each config and
compares); the demo's values are the profile `demo` (`PROFILES`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from sam3_core.errors import InputError

SOURCE = "pipeline parameters"

# The pipelines, and a Katib trial (one pod on a prepared dataset), that take parameters.
DATA_PREP, RUN, SWEEP, KATIB = "data-prep", "run", "sweep", "katib"
_EVERY = frozenset({DATA_PREP, RUN, SWEEP, KATIB})
_DATA = frozenset({DATA_PREP, RUN, SWEEP})
_TRAINING = frozenset({RUN, SWEEP, KATIB})
_CLUSTER = frozenset({RUN, SWEEP})
_SWEEPS = frozenset({SWEEP, KATIB})

# The components whose configs parameters set (`sam3_core/configs/<component>.yaml`).
COMPONENTS = ("data_prep", "train", "predict", "evaluate")
TRAINING_MODES = ("pod", "pytorchjob", "trainjob")
SWEEP_MODES = ("max", "min")

# A check takes a typed value and says what is wrong with it ("" when nothing is).
Check = Callable[[Any], str]


# ---------------------------------------------------------------------------- value checks


def integer(minimum: int) -> Check:
    def check(value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected int, got {value!r}"
        return f"must be >= {minimum}, got {value}" if value < minimum else ""

    return check


def above_zero(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected float, got {value!r}"
    return "" if math.isfinite(value) and value > 0 else f"must be a finite number > 0, got {value!r}"


def text(choices: Callable[[], Iterable[str]] | None = None, required: bool = False) -> Check:
    """One line of text; `choices` (called when checking, so they are read where they are defined) limits it."""

    def check(value: Any) -> str:
        if not isinstance(value, str):
            return f"expected str, got {value!r}"
        if "\n" in value:
            return f"must be one line, got {value!r}"
        if required and not value.strip():
            return "empty; give a value"
        allowed = tuple(choices()) if choices else ()
        return f"must be one of {allowed}, got {value!r}" if allowed and value not in allowed else ""

    return check


def metric_name(value: Any) -> str:
    problem = text(required=True)(value)
    if problem or re.fullmatch(r"[A-Za-z]+/[\w.\-]+", value):
        return problem
    return f"name a logged metric as <group>/<name>, e.g. val/segm_AP, got {value!r}"


def strings(value: Any) -> str:
    ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
    return "" if ok else f"expected a list of strings, got {value!r}"


def overrides(value: Any) -> str:
    """Extra Hydra overrides: a list of `key=value` strings Hydra's grammar reads."""
    from sam3_core.config import override_problem  # hydra's parser: imported when checking only

    problem = strings(value)
    if problem:
        return problem
    for index, item in enumerate(value):
        problem = override_problem(item)
        if problem:
            return f"[{index}]: {problem}"
    return ""


def override_sets(value: Any) -> str:
    ok = isinstance(value, list) and all(isinstance(item, Mapping) for item in value)
    return "" if ok else f"expected a list of setting -> value mappings, got {value!r}"


def grid(value: Any) -> str:
    return "" if isinstance(value, Mapping) else f"expected a mapping of setting -> [values], got {value!r}"


def _sources() -> tuple[str, ...]:
    from sam3_core.data.sources import SOURCES  # numpy: imported when checking only

    return SOURCES


def _model_presets() -> list[str]:
    folder = resources.files("sam3_core.configs").joinpath("model")
    return sorted(item.name.removesuffix(".yaml") for item in folder.iterdir() if item.name.endswith(".yaml"))


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Parameter:
    """One pipeline parameter.

    `hydra` maps a component to the key the value sets in its config (a str value "" sets
    nothing: the component's own default applies). `recorded` is where the train component's
    config records the value, when that is not its `hydra` key (`model=tiny` selects a preset,
    recorded as `model.preset`). `trial`: a sweep or Katib trial may set it. `compare_as`: its
    param name on the MLflow parent row of a pipeline run ("" = not shown there).
    """

    name: str
    type: type
    default: Any
    help: str
    pipelines: frozenset[str]
    hydra: Mapping[str, str] = field(default_factory=dict)
    recorded: str = ""
    trial: bool = False
    compare_as: str = ""
    check: Check | None = None

    def typed(self, value: Any) -> Any:
        """`value` as this parameter's type where that loses nothing: KFP hands numbers inside
        lists and mappings over as floats (2 -> 2.0), and a float parameter takes an int."""
        if self.type is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def problem(self, value: Any) -> str:
        """What is wrong with a typed value ("" when nothing is)."""
        if self.check is not None:
            problem = self.check(value)
        elif isinstance(value, bool) or not isinstance(value, self.type):
            problem = f"expected {self.type.__name__}, got {value!r}"
        else:
            problem = ""
        if not problem and self.hydra:
            texts = value if isinstance(value, list) else [value]
            bad = [item for item in texts if isinstance(item, str) and ("'" in item or "\\" in item)]
            problem = f"quotes and backslashes are not supported: {bad[0]!r}" if bad else ""
        return problem

    def checked(self, value: Any, source: str = SOURCE) -> Any:
        """The typed value, or an InputError `<source>: <name>: <what is wrong>`."""
        value = self.typed(value)
        problem = self.problem(value)
        if problem:
            raise InputError(source, self.name, problem)
        return value

    def config_key(self) -> str:
        """Where the train component's resolved config holds this value ("" when it holds none)."""
        return self.recorded or self.hydra.get("train", "")


DEFAULT_LR = 5e-4

PARAMETERS: tuple[Parameter, ...] = (
    Parameter(
        "source",
        str,
        "synthetic",
        '"synthetic" (generated videos), "ytvis" (YouTube-VIS / OVIS), "saco" (SA-Co/VEval) or "mp4" (video files).',
        _DATA,
        hydra={"data_prep": "source"},
        check=text(_sources),
    ),
    Parameter(
        "annotations",
        str,
        "",
        "URI of the annotation JSON (file sources).",
        _DATA,
        hydra={"data_prep": "annotations"},
        check=text(),
    ),
    Parameter(
        "frames_root",
        str,
        "",
        "URI the annotation's frame or video file names are relative to (file sources).",
        _DATA,
        hydra={"data_prep": "frames_root"},
        check=text(),
    ),
    Parameter(
        "data_prep_shards",
        int,
        1,
        "Data-prep pods the videos are spread over (the fan-out width); any width gives the same dataset.",
        _DATA,
        check=integer(1),
    ),
    Parameter(
        "model_preset",
        str,
        "tiny",
        '"tiny" (CPU-sized) or "full" (the official SAM3 architecture).',
        _TRAINING,
        hydra={"train": "model", "predict": "model"},
        recorded="model.preset",
        trial=True,
        compare_as="preset",
        check=text(_model_presets),
    ),
    Parameter(
        "checkpoint",
        str,
        "",
        'URI of weights to start from (ours or the official SAM3 checkpoint); "" = random init.',
        _TRAINING,
        hydra={"train": "model.uri"},
        trial=True,
        check=text(),
    ),
    Parameter(
        "base_checkpoint",
        str,
        "",
        "URI of the base SAM3 checkpoint (the official sam3.pt, or one in its layout); when set, the base is "
        "predicted and evaluated like the fine-tuned model and compared with it, and the fine-tuned detector is "
        "exported with the base's tracker as SAM3's video checkpoint; \"\" = neither.",
        frozenset({RUN}),
        check=text(),
    ),
    Parameter(
        "max_steps",
        int,
        200,
        "Optimiser steps.",
        _TRAINING,
        hydra={"train": "train.max_steps"},
        trial=True,
        compare_as="max_steps",
        check=integer(1),
    ),
    Parameter(
        "lr",
        float,
        DEFAULT_LR,
        "Peak learning rate.",
        _TRAINING,
        hydra={"train": "optim.lr"},
        trial=True,
        compare_as="lr",
        check=above_zero,
    ),
    Parameter(
        "batch_size",
        int,
        2,
        "Clips per process per step.",
        _TRAINING,
        hydra={"train": "data.batch_size"},
        trial=True,
        compare_as="batch_size",
        check=integer(1),
    ),
    Parameter(
        "frames_per_clip",
        int,
        2,
        "Frames of each training clip.",
        _TRAINING,
        hydra={"train": "data.clips.frames_per_clip"},
        trial=True,
        compare_as="frames_per_clip",
        check=integer(1),
    ),
    Parameter(
        "freeze_prefixes",
        list,
        [],
        'Parameter-name prefixes to freeze, e.g. ["backbone.vision_backbone"].',
        _TRAINING,
        hydra={"train": "model.freeze"},
        trial=True,
        compare_as="freeze",
        check=strings,
    ),
    Parameter(
        "best_metric",
        str,
        "val/segm_AP",
        "The metric whose best step is kept as best.pt (the registered model), e.g. val/bbox_AP.",
        _TRAINING,
        hydra={"train": "train.best_metric"},
        trial=True,
        compare_as="best_metric",
        check=metric_name,
    ),
    Parameter(
        "store",
        str,
        "",
        'Object-store root for datasets and runs; "" = SAM3PIPE_STORE of the pods.',
        _EVERY,
        hydra={"data_prep": "store", "train": "output.store"},
        check=text(),
    ),
    Parameter(
        "mlflow_experiment",
        str,
        "sam3pipe",
        "MLflow experiment of the runs.",
        _TRAINING,
        recorded="mlflow.experiment_name",
        check=text(required=True),
    ),
    Parameter(
        "training_mode",
        str,
        "pod",
        '"pod" (torchrun over one pod\'s GPUs), "pytorchjob" (multi-node PyTorchJob, Training Operator) or '
        '"trainjob" (multi-node TrainJob, Kubeflow Trainer v2).',
        _CLUSTER,
        check=text(lambda: TRAINING_MODES),
    ),
    Parameter(
        "gpus",
        int,
        0,
        "GPUs of the training pod, or per node with training_mode=pytorchjob or trainjob.",
        _TRAINING,
        check=integer(0),
    ),
    Parameter("nodes", int, 1, "Nodes (pods) of the PyTorchJob or TrainJob.", _CLUSTER, check=integer(1)),
    Parameter("predict_gpus", int, 0, "GPUs of the prediction pod.", _CLUSTER, check=integer(0)),
    Parameter(
        "data_prep_overrides",
        list,
        [],
        'Extra Hydra overrides of data prep, e.g. ["synthetic.num_videos=8"].',
        _DATA,
        check=overrides,
    ),
    Parameter(
        "train_overrides",
        list,
        [],
        "Extra Hydra overrides of training (of every trial's, in a sweep).",
        _TRAINING,
        check=overrides,
    ),
    Parameter(
        "tracker_steps",
        int,
        0,
        "Steps of SAM3's tracker trained after the detector (train.stage=tracker: the detector's best checkpoint, "
        "frozen; the tracker from base_checkpoint's, else random), best by val/vos_JF_mean, registered as "
        "sam3-video-tracker and exported with base_checkpoint; 0 = no tracker stage.",
        frozenset({RUN}),
        check=integer(0),
    ),
    Parameter(
        "tracker_overrides",
        list,
        [],
        "Extra Hydra overrides of the tracker stage (train.stage=tracker), e.g. tracker_train.trainable=all.",
        frozenset({RUN}),
        check=overrides,
    ),
    Parameter("predict_overrides", list, [], "Extra Hydra overrides of prediction.", _TRAINING, check=overrides),
    Parameter("evaluate_overrides", list, [], "Extra Hydra overrides of evaluation.", _TRAINING, check=overrides),
    Parameter(
        "sweep_trials",
        list,
        [],
        'Override sets, one trial each, e.g. [{"lr": 1e-4}, {"lr": 3e-4, "frames_per_clip": 4}].',
        frozenset({SWEEP}),
        check=override_sets,
    ),
    Parameter(
        "sweep_grid",
        dict,
        # the default learning rate and twice it
        {"lr": [DEFAULT_LR, 2 * DEFAULT_LR]},
        'Values per setting, one trial per combination, e.g. {"lr": [1e-4, 3e-4]}.',
        frozenset({SWEEP}),
        check=grid,
    ),
    Parameter(
        "sweep_metric",
        str,
        "video_mask_mAP_50_95",
        "Evaluation metric the best trial is picked by, e.g. video_mask_mAP_50_95 or segm_AP.",
        _SWEEPS,
        check=text(required=True),
    ),
    Parameter("sweep_mode", str, "max", '"max" or "min" of sweep_metric.', _SWEEPS, check=text(lambda: SWEEP_MODES)),
    Parameter(
        "registered_model",
        str,
        "sam3-video",
        'Model Registry name; the best trial\'s checkpoint gets the alias "candidate".',
        _SWEEPS,
        check=text(required=True),
    ),
)

BY_NAME: dict[str, Parameter] = {parameter.name: parameter for parameter in PARAMETERS}

# Named sets of values a run may start from (`profile=<name>`); the user's own values win.
PROFILES: dict[str, dict[str, Any]] = {
    # `make demo`: the tiny model from scratch on the synthetic videos, 600 steps at 1e-3 with a weight
    # average, best by val/bbox_AP on 64 frames (boxes still improve at the end while masks plateau
    # early). The objects of a video have categories of their own: a model trained from scratch for
    # minutes paints one mask over every object of a category, so videos with look-alike objects
    # measured instance separation the demo cannot teach, seed by seed. Same machine, same table
    # (docs/training.md has the seeds' spread and the time).
    "demo": {
        "max_steps": 600,
        "lr": 1e-3,
        "best_metric": "val/bbox_AP",
        "data_prep_overrides": ["synthetic.distinct_categories=true"],
        "train_overrides": ["train.ema_decay=0.99", "train.val_max_frames=64"],
    },
}


def of_pipeline(pipeline: str) -> tuple[Parameter, ...]:
    """The parameters a pipeline (or a Katib trial) takes, in table order."""
    return tuple(parameter for parameter in PARAMETERS if pipeline in parameter.pipelines)


def trial_parameters() -> dict[str, Parameter]:
    """The parameters a sweep or Katib trial may set, by name."""
    return {parameter.name: parameter for parameter in PARAMETERS if parameter.trial}


def defaults(pipeline: str) -> dict[str, Any]:
    """A pipeline's parameters at their defaults (fresh copies of lists and mappings)."""
    return {parameter.name: _copy(parameter.default) for parameter in of_pipeline(pipeline)}


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(item) for item in value]
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    return value


def profile(name: str, source: str = SOURCE) -> dict[str, Any]:
    """The values of a named profile."""
    if name not in PROFILES:
        raise InputError(source, "profile", f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return _copy(PROFILES[name])


def parent_params() -> dict[str, str]:
    """MLflow parent-row param name -> the train config key holding it, for every compared parameter."""
    return {parameter.compare_as: parameter.config_key() for parameter in PARAMETERS if parameter.compare_as}


def hydra_literal(value: Any, name: str) -> str:
    """A value in Hydra's override grammar: strings quoted (URIs hold ':' and '/', IDs ','), lists bracketed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if "'" in value or "\\" in value:
            raise InputError(SOURCE, name, f"quotes and backslashes are not supported: {value!r}")
        return f"'{value}'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_literal(item, name) for item in value) + "]"
    return repr(value)


def hydra_overrides(component: str, values: Mapping[str, Any]) -> list[str]:
    """The overrides the parameters in `values` set in `component`'s config, in table order."""
    out = []
    for parameter in PARAMETERS:
        key = parameter.hydra.get(component)
        if key is None or parameter.name not in values:
            continue
        value = values[parameter.name]
        if value != "":
            out.append(f"{key}={hydra_literal(value, parameter.name)}")
    return out
