"""The parameter table (sam3_core/pipeline_parameters.py) against everything that reads it: the KFP
components' literal signatures, the generated pipeline signatures, the components' own defaults,
the overrides each parameter sets, profiles, the MLflow parent row, and the checks that stop a bad
value before the first component runs."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from pipeline import component_bodies, kfp_components
from pipeline.arguments import parse_arguments
from pipeline.pipeline import build_data_prep_pipeline, build_pipeline, build_sweep_pipeline
from pipeline.settings import load_settings
from sam3_core import pipeline_parameters as table
from sam3_core.errors import InputError

# the KFP component whose config each parameter's Hydra key sets
CONFIG_COMPONENT = {"data_prep": "data_prep_plan", "train": "train", "predict": "predict", "evaluate": "evaluate"}


def signature(component: str) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(getattr(kfp_components, component)).parameters)


def components() -> list[str]:
    return [field.name for field in kfp_components.Components.__dataclass_fields__.values()]


@pytest.mark.parametrize("component", components())
def test_a_component_argument_named_like_a_parameter_has_the_tables_type(component: str) -> None:
    arguments = signature(component)

    wrong = {
        name: (argument.annotation, table.BY_NAME[name].type)
        for name, argument in arguments.items()
        if name in table.BY_NAME and argument.annotation is not table.BY_NAME[name].type
    }
    assert wrong == {}
    # a default would be a second default: the pipeline passes every parameter a component takes
    assert [name for name in arguments if name in table.BY_NAME and arguments[name].default is not inspect._empty] == []


@pytest.mark.parametrize("config", sorted(CONFIG_COMPONENT))
def test_a_component_takes_every_parameter_that_sets_a_key_of_its_config(config: str) -> None:
    expected = {parameter.name for parameter in table.PARAMETERS if config in parameter.hydra}

    assert expected | {f"{config}_overrides"} <= set(signature(CONFIG_COMPONENT[config]))


def test_the_first_component_takes_every_parameter() -> None:
    assert set(signature("check_parameters")) - {"pipeline"} == set(table.BY_NAME)


@pytest.mark.parametrize(
    ("build", "pipeline"),
    [(build_pipeline, table.RUN), (build_sweep_pipeline, table.SWEEP), (build_data_prep_pipeline, table.DATA_PREP)],
)
def test_a_pipelines_signature_is_its_tables_parameters_with_their_types_defaults_and_help(
    build: Any, pipeline: str
) -> None:
    built = build(load_settings())
    inputs = built.component_spec.inputs
    signature = inspect.signature(built.pipeline_func).parameters

    assert list(signature) == [parameter.name for parameter in table.of_pipeline(pipeline)]
    for parameter in table.of_pipeline(pipeline):
        assert signature[parameter.name].annotation is parameter.type
        assert inputs[parameter.name].default == parameter.default
        assert inputs[parameter.name].description == parameter.help


def test_compiled_defaults_may_be_given() -> None:
    inputs = build_pipeline(load_settings(), {"max_steps": 7}).component_spec.inputs

    assert inputs["max_steps"].default == 7 and inputs["lr"].default == table.BY_NAME["lr"].default


def test_every_default_and_every_profile_value_passes_its_check() -> None:
    for parameter in table.PARAMETERS:
        assert parameter.checked(parameter.default) == parameter.default
    for values in table.PROFILES.values():
        for name, value in values.items():
            assert table.BY_NAME[name].checked(value) == value


def test_the_tables_defaults_are_the_components_own() -> None:
    from sam3_core.config import flatten, load_config
    from sam3_core.data.prep import DataPrepConfig
    from sam3_core.mlflow_records.settings import DEFAULT_EXPERIMENT, MlflowConfig
    from sam3_core.predict.predictor import PredictConfig
    from sam3_core.train.config import TrainConfig

    configs = {
        "data_prep": flatten(load_config("data_prep", DataPrepConfig)),
        "train": flatten(load_config("train", TrainConfig, ["data.uri=x"])),
        "predict": flatten(load_config("predict", PredictConfig, ["data.uri=x"])),
    }
    compared = 0
    for parameter in table.PARAMETERS:
        if parameter.default == "":  # "" sets nothing: the component's own default applies
            continue
        for config, key in parameter.hydra.items():
            recorded = parameter.recorded if key == "model" else key  # `model=tiny` selects a preset
            assert configs[config][recorded] == parameter.default, (parameter.name, config)
            compared += 1
    assert compared  # model_preset, max_steps, lr, ... (a default of "" sets nothing)
    assert table.BY_NAME["mlflow_experiment"].default == DEFAULT_EXPERIMENT
    assert table.BY_NAME["registered_model"].default == MlflowConfig().registered_model_name


def test_a_parameter_sets_its_key_in_each_component_it_feeds() -> None:
    values = {"model_preset": "full", "lr": 1e-4, "freeze_prefixes": ["a.b", "c"], "checkpoint": "", "gpus": 2}

    assert table.hydra_overrides("train", values) == [
        "model='full'",
        "optim.lr=0.0001",
        "model.freeze=['a.b','c']",
    ]
    assert table.hydra_overrides("predict", values) == ["model='full'"]
    assert table.hydra_overrides("evaluate", values) == []


def test_a_value_hydra_cannot_take_quoted_is_refused_by_name() -> None:
    with pytest.raises(InputError, match=r"pipeline parameters: checkpoint: quotes and backslashes are not supported"):
        table.BY_NAME["checkpoint"].checked("s3://b/it's.pt")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("lr", -1.0, "lr: must be a finite number > 0, got -1.0"),
        ("lr", float("nan"), "lr: must be a finite number > 0"),
        ("max_steps", -5, "max_steps: must be >= 1, got -5"),
        ("max_steps", 2.5, "max_steps: expected int, got 2.5"),
        ("model_preset", "huge", "model_preset: must be one of ('full', 'tiny'), got 'huge'"),
        ("source", "youtube", "source: must be one of"),
        ("best_metric", "bbox_AP", "best_metric: name a logged metric as <group>/<name>"),
        ("train_overrides", ["train.max_steps=[1"], "train_overrides: [0]: "),
        ("freeze_prefixes", "backbone", "freeze_prefixes: expected a list of strings"),
        ("sweep_mode", "best", "sweep_mode: must be one of ('max', 'min')"),
    ],
)
def test_a_bad_value_is_one_error_naming_the_parameter(name: str, value: Any, says: str) -> None:
    with pytest.raises(InputError) as refused:
        table.BY_NAME[name].checked(value)

    assert str(refused.value).startswith(f"pipeline parameters: {says}")


def test_numbers_that_went_through_kfp_get_their_type_back() -> None:
    assert table.BY_NAME["max_steps"].checked(400.0) == 400
    assert table.BY_NAME["lr"].checked(1) == 1.0


def test_the_first_component_stops_a_bad_value_from_the_kfp_ui() -> None:
    values = {**table.defaults(table.RUN), "lr": -1.0}

    with pytest.raises(InputError, match=r"pipeline parameters: lr: must be a finite number > 0"):
        component_bodies.check_parameters({**values, "pipeline": table.RUN})


def test_the_first_component_says_how_many_gpus_the_train_pod_requests() -> None:
    values = {**table.defaults(table.RUN), "training_mode": "trainjob", "gpus": 8, "nodes": 2}

    assert component_bodies.check_parameters({**values, "pipeline": table.RUN}) == 0
    assert component_bodies.check_parameters({**values, "training_mode": "pod", "nodes": 1, "pipeline": table.RUN}) == 8


def test_a_profile_sets_its_values_and_the_users_own_win() -> None:
    assert parse_arguments(table.RUN, ["max_steps=3", "profile=demo"]) == {
        "max_steps": 3,
        "lr": 1e-3,
        "best_metric": "val/bbox_AP",
        "data_prep_overrides": ["synthetic.distinct_categories=true"],
        "train_overrides": ["train.ema_decay=0.99", "train.val_max_frames=64"],
    }


def test_an_unknown_profile_is_one_error_naming_the_choices() -> None:
    with pytest.raises(InputError, match=r"command line: profile: unknown profile 'fast'; choose one of \['demo'\]"):
        parse_arguments(table.RUN, ["profile=fast"])


def test_the_defaults_of_every_parameter_are_checked_with_the_given_ones() -> None:
    with pytest.raises(InputError, match="command line: nodes: training_mode=pod runs on one node"):
        parse_arguments(table.RUN, ["nodes=2"])


def test_a_katib_trial_takes_the_parameters_marked_for_it() -> None:
    from pipeline import katib

    assert set(katib.BASE_PARAMETERS) | set(katib.OBJECTIVE) == {p.name for p in table.of_pipeline(table.KATIB)}


def test_the_mlflow_parent_row_compares_the_parameters_marked_in_the_table() -> None:
    from sam3_core.mlflow_records.settings import DEFAULT_PARENT_PARAMS

    marked = {parameter.compare_as: parameter.config_key() for parameter in table.PARAMETERS if parameter.compare_as}
    assert marked.items() <= DEFAULT_PARENT_PARAMS.items()
    assert {"lr", "max_steps", "preset", "frames_per_clip", "batch_size", "freeze", "best_metric"} <= set(marked)
