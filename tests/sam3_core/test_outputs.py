"""The output guard every component runs before it writes (sam3_core/outputs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sam3_core.errors import InputError
from sam3_core.outputs import Output, check_earlier, check_outputs, claim, overlap, published_dataset_around


def test_an_output_that_is_an_input_is_refused_naming_both() -> None:
    with pytest.raises(InputError, match=r"gt\.json: output: is the input gt=.*gt\.json"):
        check_outputs([Output("/data/gt.json", "output")], {"gt": "/data/gt.json"})


def test_the_same_file_written_as_a_relative_path_or_file_uri_is_the_same_input(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert overlap(Output("gt.json", "output"), "gt", f"file://{tmp_path}/gt.json")


def test_a_symlink_to_an_input_is_that_input(tmp_path: Path) -> None:
    (tmp_path / "gt.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "gt.json")
    assert overlap(Output(str(tmp_path / "link.json"), "output"), "gt", str(tmp_path / "gt.json"))


def test_an_output_inside_an_input_folder_is_refused() -> None:
    assert (
        overlap(Output("s3://b/ds/preds", "output.uri"), "data.uri", "s3://b/ds")
        == "lies inside the input data.uri=s3://b/ds"
    )


def test_a_sibling_sharing_a_name_prefix_is_not_inside() -> None:
    assert overlap(Output("s3://b/ds2/preds", "output.uri", folder=True), "data.uri", "s3://b/ds") is None
    assert overlap(Output("/a/ds2", "output.uri", folder=True), "data.uri", "/a/ds") is None


def test_only_a_folder_the_component_owns_may_not_contain_an_input() -> None:
    assert overlap(Output("/runs/a", "output.run_name", folder=True), "model.uri", "/runs/a/checkpoints/best.pt")
    assert overlap(Output("/runs/a", "output"), "model.uri", "/runs/a/checkpoints/best.pt") is None


def test_other_stores_never_overlap() -> None:
    assert overlap(Output("s3://b/x", "output"), "gt", "/b/x") is None


def test_an_output_inside_a_published_dataset_is_refused(tmp_path: Path) -> None:
    dataset = tmp_path / "datasets" / "abc"
    dataset.mkdir(parents=True)
    (dataset / "manifest.json").write_text(json.dumps({"dataset_id": "abc", "files": {}}))
    assert published_dataset_around(str(dataset / "eval" / "metrics.json")) == str(dataset)
    with pytest.raises(InputError, match=r"published dataset .*abc"):
        check_outputs([Output(str(dataset / "eval" / "metrics.json"), "output")], {})


def test_a_manifest_json_of_something_else_is_no_dataset(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"name": "a web app"}')
    assert published_dataset_around(str(tmp_path / "out" / "metrics.json")) is None
    (tmp_path / "manifest.json").write_text("not json")
    assert published_dataset_around(str(tmp_path / "out" / "metrics.json")) is None


def test_earlier_outputs_of_the_same_settings_may_be_written_again(tmp_path: Path) -> None:
    claim(str(tmp_path / "settings.json"), {"top_k": 3})
    check_earlier(
        Output(str(tmp_path), "output.uri"), str(tmp_path / "settings.json"), {"top_k": 3}, False, "x", lambda: True
    )


def test_earlier_outputs_of_other_settings_are_refused_naming_the_keys_unless_overwrite(tmp_path: Path) -> None:
    claim(str(tmp_path / "settings.json"), {"top_k": 3, "nms": False})
    args = (Output(str(tmp_path), "output.uri"), str(tmp_path / "settings.json"), {"top_k": 5, "nms": False})
    with pytest.raises(InputError, match=r"top_k: 3 -> 5\); pass output.overwrite=true"):
        check_earlier(*args, False, "output.overwrite", lambda: True)
    check_earlier(*args, True, "output.overwrite", lambda: True)


def test_outputs_without_a_record_are_refused_and_an_empty_place_is_free(tmp_path: Path) -> None:
    record = str(tmp_path / "settings.json")
    with pytest.raises(InputError, match=r"unknown settings \(no settings\.json\)"):
        check_earlier(Output(str(tmp_path), "output"), record, {"a": 1}, False, "overwrite", lambda: True)
    check_earlier(Output(str(tmp_path), "output"), record, {"a": 1}, False, "overwrite", lambda: False)
