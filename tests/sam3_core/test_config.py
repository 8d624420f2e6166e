"""Composing configs from overrides people type: any path is a value, every mistake one line that says what to do."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from sam3_core.config import lenient_overrides, load_config, quote_value, unknown_keys
from sam3_core.config_checks import check_choice, check_float, check_int, check_str, check_uri
from sam3_core.errors import ConfigError
from sam3_core.predict.predictor import PredictConfig

PATHS = [
    "/data/vidéos/modèle.pt",
    "/data/日本/a.pt",
    "/data/it's mine.pt",
    "/data/a#b/(1)!.pt",
    "/data/~user/a;b&c.pt",
    'C:\\models\\"quoted"\\',
    "/trailing/backslash\\",
    "s3://bucket/a b/ç.pt",
]


def _predict(*overrides: str) -> PredictConfig:
    return load_config("predict", PredictConfig, ["data.uri=/d", *overrides])


@pytest.mark.parametrize("value", PATHS)
def test_a_quoted_value_reads_back_as_exactly_the_value(value):
    parsed = OverridesParser.create().parse_overrides([f"key={quote_value(value)}"])[0]
    assert parsed.value() == value


@pytest.mark.parametrize("path", PATHS)
def test_any_path_is_accepted_unquoted_as_a_string_value(path):
    assert _predict(f"model.uri={path}").model.uri == path


def test_values_hydra_reads_are_left_as_they_are():
    overrides = ["model=full", "postprocess.top_k=3", "model.freeze=[a,b]", "model.uri='/x y'", "+a=1", "~b"]
    assert lenient_overrides(overrides) == overrides


def test_a_comma_still_needs_quotes_and_the_error_says_how():
    with pytest.raises(ConfigError) as raised:
        _predict("model.uri=/data/a,b.pt")
    assert "key='a,b'" in str(raised.value) and "\n" not in str(raised.value)
    assert _predict("model.uri='/data/a,b.pt'").model.uri == "/data/a,b.pt"


def test_an_unreadable_list_names_the_override_and_how_to_quote():
    with pytest.raises(ConfigError) as raised:
        _predict("model.freeze=[a,b")
    message = str(raised.value)
    assert "'model.freeze=[a,b'" in message and "key='value'" in message and "\n" not in message


@pytest.mark.parametrize("override", ["postprocess.topk=3", "+postprocess.topk=3"])
def test_a_misspelt_key_is_refused_with_the_closest_keys(override):
    with pytest.raises(ConfigError, match=r"postprocess\.topk: no such key; did you mean postprocess\.top_k"):
        _predict(override)


def test_a_missing_required_value_says_which_key_to_pass():
    with pytest.raises(ConfigError, match=r"data\.uri: missing mandatory value: uri; pass data\.uri=<value>"):
        load_config("predict", PredictConfig, [])


def test_a_value_of_the_wrong_type_names_its_key():
    with pytest.raises(ConfigError, match=r"postprocess\.top_k: Value 'many'"):
        _predict("postprocess.top_k=many")


def test_an_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: full, tiny"):
        _predict("model=huge")


def test_a_value_check_in_a_dataclass_reaches_the_user_as_it_is():
    with pytest.raises(ConfigError, match=r"^detection\.nms_iou_threshold must be a finite number in \[0, 1\], got -1"):
        _predict("detection.nms_iou_threshold=-1")


def test_an_old_section_name_is_read_under_its_new_name_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="sam3_core.config"):
        cfg = _predict("tracking.enabled=false", "mlflow.model_alias=kept")
    assert cfg.mlflow.enabled is False and cfg.mlflow.model_alias == "kept"
    assert "tracking.enabled is now mlflow.enabled" in caplog.text


@dataclass
class _Nested:
    weights: dict[str, float] = field(default_factory=dict)


def test_free_form_dict_fields_take_any_key():
    node = OmegaConf.merge(OmegaConf.structured(_Nested), {"weights": {"anything": 1.0}})
    assert unknown_keys(node, OmegaConf.structured(_Nested)) == []


@pytest.mark.parametrize(
    ("check", "value", "expected"),
    [
        (lambda v: check_int("k", v, minimum=1), True, "an integer >= 1, got True"),
        (lambda v: check_int("k", v, minimum=1), 0, "an integer >= 1, got 0"),
        (lambda v: check_int("k", v, 0, 10), 11, "an integer in [0, 10], got 11"),
        (lambda v: check_float("k", v, 0.0, 1.0), math.nan, "a finite number in [0, 1], got nan"),
        (lambda v: check_float("k", v, 0.0, low_open=True), 0.0, "a finite number > 0, got 0.0"),
        (lambda v: check_float("k", v, 0.0, 1.0, high_open=True), 1.0, "a finite number in [0, 1), got 1.0"),
        (lambda v: check_float("k", v), "0.5", "a finite number, got '0.5'"),
        (lambda v: check_choice("k", v, ("a", "b")), "c", "one of a, b, got 'c'"),
        (lambda v: check_str("k", v, required=True), " ", "a non-empty string, got ' '"),
        (lambda v: check_str("k", v, optional=True), 3, "a string or null, got 3"),
    ],
)
def test_a_failed_check_names_the_key_what_it_must_be_and_the_value(check, value, expected):
    with pytest.raises(ConfigError) as raised:
        check(value)
    assert str(raised.value) == f"k must be {expected}"


def test_a_uri_with_an_unsupported_scheme_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^output\.uri: gs://b/x: unsupported URI scheme 'gs'"):
        check_uri("output.uri", "gs://b/x")
    check_uri("output.uri", "s3://b/x")
    check_uri("output.uri", "file:///x")
    check_uri("output.uri", "relative/x")


@pytest.mark.parametrize("store", ["", "/data/elsewhere"])
def test_every_component_stores_under_sam3pipe_store_else_the_one_local_default(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sam3_core import storage
    from sam3_core.data.prep import DataPrepConfig
    from sam3_core.train.config import TrainConfig

    monkeypatch.setenv(storage.STORE_ENV, store)

    stores = {
        load_config("data_prep", DataPrepConfig).store,
        load_config("train", TrainConfig, ["data.uri=/d"]).output.store,
        _predict().output.store,
    }
    assert stores == {store or storage.DEFAULT_STORE}
