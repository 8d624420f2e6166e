"""Every value of the evaluate config is checked when the config is built: one ConfigError naming the key."""

from __future__ import annotations

import pytest

from sam3_core.config import load_config
from sam3_core.errors import ConfigError
from sam3_core.evaluate.report import EvaluateConfig


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("metrics=[map,tracking]", "evaluate.metrics"),
        ("metrics=[hota,hota]", "evaluate.metrics"),
        ("score_threshold=nan", "evaluate.score_threshold"),
        ("score_threshold=1.5", "evaluate.score_threshold"),
        ("score_threshold=-0.1", "evaluate.score_threshold"),
        ("workers=-1", "evaluate.workers"),
        ("workers=100000", "evaluate.workers"),
        ("iou_types=[]", "evaluate.iou_types"),
        ("iou_types=[mask]", "evaluate.iou_types"),
        ("iou_types=[bbox,bbox]", "evaluate.iou_types"),
        ("max_dets=[1,10]", "evaluate.max_dets"),
        ("max_dets=[10,1,100]", "evaluate.max_dets"),
        ("max_dets=[0,10,100]", "evaluate.max_dets"),
        ("backend=detectron", "evaluate.backend"),
        ("kind=images", "evaluate.kind"),
        ("output=out/pr_curves.png", "evaluate.output"),
        ("output=out/video_np_results.json", "evaluate.output"),
        ("output=out/", "evaluate.output"),
    ],
)
def test_bad_value_is_a_config_error_naming_the_key_and_the_value(override, key):
    with pytest.raises(ConfigError) as error:
        load_config("evaluate", EvaluateConfig, [override])

    message = str(error.value)
    assert message.startswith(f"{key}=") and "\n" not in message


def test_wrongly_typed_value_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="workers"):
        load_config("evaluate", EvaluateConfig, ["workers=many"])


def test_defaults_build():
    cfg = load_config("evaluate", EvaluateConfig, [])

    assert (cfg.metrics, cfg.score_threshold, cfg.workers) == ([], 0.5, 0)
