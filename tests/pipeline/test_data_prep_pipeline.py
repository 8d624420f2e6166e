"""Data prep sharded across pods: plan -> one pod per shard (dsl.ParallelFor) -> merge, through kfp.local."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.compile import compile_pipeline
from pipeline.local import run_pipeline
from pipeline.pipeline import build_data_prep_pipeline
from pipeline.settings import load_settings
from sam3_core import storage
from sam3_core.data.prep import DataPrepConfig, prepare_dataset
from sam3_core.data.shards import assign_shards, merge_shards, plan_shards, prepare_shard
from sam3_core.data.synthetic import SyntheticConfig
from sam3_core.data.ytvis import Video
from sam3_core.errors import InputError

VIDEOS = SyntheticConfig(num_videos=5, frames_per_video=3, height=40, width=56, min_size=10, max_size=20)
OVERRIDES = [
    "synthetic.num_videos=5",
    "synthetic.frames_per_video=3",
    "synthetic.height=40",
    "synthetic.width=56",
    "synthetic.min_size=10",
    "synthetic.max_size=20",
    "resize_max_side=28",
    "val_fraction=0.4",
]


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def prep_config(store: Path | str, **changes: Any) -> DataPrepConfig:
    base = DataPrepConfig(source="synthetic", synthetic=VIDEOS, store=str(store), resize_max_side=28, val_fraction=0.4)
    return dataclasses.replace(base, **changes)


@pytest.mark.integration
def test_three_shards_through_kfp_local_give_the_one_process_dataset_id_and_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = prepare_dataset(prep_config(tmp_path / "one-process"))
    store = tmp_path / "sharded"
    monkeypatch.setenv("SAM3PIPE_STORE", str(store))
    task = run_pipeline(
        build_data_prep_pipeline(load_settings()),
        {"source": "synthetic", "store": str(store), "data_prep_shards": 3, "data_prep_overrides": OVERRIDES},
        tmp_path / "kfp",
    )
    assert task.outputs["dataset_id"] == one.dataset_id
    assert files_of(Path(task.outputs["dataset_uri"])) == files_of(Path(one.uri))
    # the shards' parts are gone; the plan and its result stay so a rerun reuses the dataset
    (plan_dir,) = (store / "datasets" / ".parts").iterdir()
    assert sorted(p.name for p in plan_dir.iterdir()) == ["plan.json", "result.json"]


def test_the_fan_out_width_is_an_integer_pipeline_parameter(tmp_path: Path) -> None:
    compiled = compile_pipeline(load_settings(), tmp_path / "pipeline.yaml")
    spec = next(yaml.safe_load_all(compiled.read_text()))
    width = spec["root"]["inputDefinitions"]["parameters"]["data_prep_shards"]
    assert width["parameterType"] == "NUMBER_INTEGER" and width["defaultValue"] == 1
    plan = spec["root"]["dag"]["tasks"]["data-prep-plan"]
    assert plan["inputs"]["parameters"]["data_prep_shards"]["componentInputParameter"] == "data_prep_shards"
    fan_out = spec["components"]["comp-data-prep"]["dag"]["tasks"]
    loop = next(task for task in fan_out.values() if "parameterIterator" in task)
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--shards"
    assert set(fan_out["data-prep-merge"]["dependentTasks"]) == {loop["taskInfo"]["name"]}


def test_shards_balance_frames_and_keep_the_source_order() -> None:
    videos = [Video(id=i, width=8, height=8, file_names=("f",) * n) for i, n in enumerate([9, 1, 4, 4, 2, 8], 1)]
    shards = assign_shards(videos, 3)
    assert sorted(i for part in shards for i in part) == [1, 2, 3, 4, 5, 6]
    frames = [sum(videos[i - 1].length for i in part) for part in shards]
    assert max(frames) - min(frames) <= 1 and all(part == sorted(part) for part in shards)
    assert assign_shards(videos, 8)[6:] == [[], []]


def test_a_merge_with_an_unfinished_shard_names_it_and_publishes_nothing(tmp_path: Path) -> None:
    plan = plan_shards(prep_config(tmp_path), 3)
    prepare_shard(plan.uri, 0)
    prepare_shard(plan.uri, 2)
    with pytest.raises(InputError, match=r"shard 1: not published at .*shard-00001; run that shard"):
        merge_shards(plan.uri)
    assert [name for name in (tmp_path / "datasets").iterdir() if name.name != ".parts"] == []


def test_once_merged_a_plan_is_reused_without_staging_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plan = plan_shards(prep_config(tmp_path), 2)
    for index in range(2):
        prepare_shard(plan.uri, index)
    first = merge_shards(plan.uri)
    with caplog.at_level("INFO", logger="sam3_core.data.shards"):
        prepare_shard(plan.uri, 1)
        again = merge_shards(plan.uri)
    assert again == first
    assert "shard 1 has nothing to do" in caplog.text and "reusing it" in caplog.text


def test_a_shard_of_a_plan_whose_annotations_changed_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "src"
    from sam3_core.data.synthetic import generate

    annotations = generate(VIDEOS, source)
    cfg = DataPrepConfig(
        source="ytvis",
        annotations=str(annotations),
        frames_root=str(source),
        store=str(tmp_path / "store"),
        val_fraction=0.4,
    )
    plan = plan_shards(cfg, 2)
    raw = json.loads(annotations.read_text())
    raw["categories"][0]["name"] = "renamed thing"
    annotations.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"annotations\.json: \$: changed since the plan step"):
        prepare_shard(plan.uri, 0)
    assert not storage.is_published(storage.join(plan.uri, "shard-00000"), "report.json")
