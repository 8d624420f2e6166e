"""PredictionDumper: upstream-identical merge, and the three routes that gather ranks' parts."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.seed_reference import seed_merge
from sam3_core import storage
from sam3_core.errors import ConfigError, StorageError
from sam3_core.predict.dumper import (
    PREDICTION_FILES,
    DumperConfig,
    PredictionDumper,
    VideoMerger,
    merge_parts,
    round_result,
    wait_for_objects,
)
from tests.fixtures.network import free_port


def _random_parts(rng: random.Random, world: int, num_images: int, per_rank: int) -> list[list[dict]]:
    """Ranks' results over overlapping images (padded-sampler duplicates) with many tied scores."""
    tied_scores = [0.1, 0.25, 0.5, 0.75, 0.9]
    parts = []
    for rank in range(world):
        part = []
        for k in range(per_rank):
            score = rng.choice(tied_scores) if rng.random() < 0.6 else rng.random()
            part.append(
                {
                    "image_id": rng.randrange(num_images),
                    "category_id": rng.randrange(3),
                    "bbox": [rng.uniform(0, 100) for _ in range(4)],
                    "score": score,
                    "origin": [rank, k],
                }
            )
        parts.append([round_result(r) for r in part])
    return parts


def test_merge_equals_upstream_on_random_parts_with_duplicates_and_ties() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        world = rng.randint(1, 4)
        parts = _random_parts(rng, world, num_images=rng.randint(1, 6), per_rank=rng.randint(0, 40))
        maxdets = rng.randint(1, 8)
        assert merge_parts(iter(parts), maxdets) == seed_merge(parts, maxdets)


def test_merge_drops_image_category_groups_an_earlier_rank_produced() -> None:
    rank0 = [{"image_id": 1, "category_id": 1, "score": 0.2}]
    rank1 = [{"image_id": 1, "category_id": 1, "score": 0.9}, {"image_id": 1, "category_id": 2, "score": 0.5}]
    assert merge_parts([rank0, rank1], maxdets=10) == [rank0[0], rank1[1]]


def test_merge_keeps_the_best_maxdets_per_image() -> None:
    part = [{"image_id": 1, "category_id": 1, "score": s} for s in (0.3, 0.9, 0.1, 0.7)]
    part.append({"image_id": 2, "category_id": 1, "score": 0.05})
    merged = merge_parts([part], maxdets=2)
    assert sorted(r["score"] for r in merged if r["image_id"] == 1) == [0.7, 0.9]
    assert [r["score"] for r in merged if r["image_id"] == 2] == [0.05]


def test_results_are_rounded_like_upstream_without_touching_the_input() -> None:
    result = {"image_id": 1, "category_id": 1, "bbox": [1.123456789, 2.0, 3.000004, 4.5], "score": 0.1234567}
    assert round_result(result) == {"image_id": 1, "category_id": 1, "bbox": [1.12346, 2.0, 3.0, 4.5], "score": 0.12346}
    assert result["score"] == 0.1234567


def test_video_merge_drops_video_category_groups_an_earlier_rank_produced() -> None:
    merger = VideoMerger()
    merger.add_part([{"video_id": 1, "category_id": 1, "score": 0.5}])
    merger.add_part([{"video_id": 1, "category_id": 1, "score": 0.6}, {"video_id": 2, "category_id": 1, "score": 0.7}])
    assert [r["score"] for r in merger.results()] == [0.5, 0.7]


def _rank_predictions(world: int) -> list[dict[str, list[dict]]]:
    """What each rank of the 2-process tests predicts; rank 1 repeats rank 0's last image and video."""
    rng = random.Random(7)
    predictions = []
    for rank in range(world):
        images = [rank * 3 + i for i in range(4)]
        bbox = [
            {
                "image_id": i,
                "category_id": c,
                "bbox": [rng.uniform(0, 50) for _ in range(4)],
                "score": rng.choice([0.5, rng.random()]),
            }
            for i in images
            for c in (1, 2)
            for _ in range(3)
        ]
        segm = [dict(r, segmentation={"size": [4, 4], "counts": "04"}, area=0.25) for r in bbox]
        video = [
            {
                "video_id": v,
                "category_id": 1,
                "score": 0.5 + v / 10,
                "bboxes": [None],
                "segmentations": [None],
                "areas": [None],
            }
            for v in (rank, rank + 1)
        ]
        predictions.append({"bbox": bbox, "segm": segm, "video": video})
    return predictions


def _dump_from_rank(rank: int, world: int, cfg: DumperConfig, dest: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        predictions = _rank_predictions(world)[rank]
        dumper = PredictionDumper(cfg)
        dumper.add("bbox", predictions["bbox"])
        dumper.add("segm", predictions["segm"])
        dumper.add_video(predictions["video"])
        written = dumper.dump(dest)
        assert (written is None) == (rank != 0)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("route", ["collective", "filesystem", "store"])
@pytest.mark.integration
def test_two_gloo_ranks_dump_the_upstream_merge(
    route: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    shared_dir = str(tmp_path / "shared")
    store_uri = request.getfixturevalue("s3_bucket") + "/gather" if route == "store" else ""
    dest = store_uri.replace("/gather", "/predictions") if route == "store" else str(tmp_path / "predictions")
    cfg = DumperConfig(maxdets=4, gather=route, shared_dir=shared_dir, store_uri=store_uri, timeout_s=60)

    mp.spawn(_dump_from_rank, args=(2, cfg, dest), nprocs=2, join=True)

    predictions = _rank_predictions(2)
    for kind in ("bbox", "segm"):
        expected = seed_merge([[round_result(r) for r in p[kind]] for p in predictions], maxdets=4)
        assert storage.read_json(storage.join(dest, PREDICTION_FILES[kind])) == expected
    videos = storage.read_json(storage.join(dest, PREDICTION_FILES["video"]))
    assert [v["video_id"] for v in videos] == [0, 1, 2]
    assert storage.list_files(shared_dir) == [] and (not store_uri or storage.list_files(store_uri) == [])


def test_single_process_dump_writes_every_file(tmp_path: Path) -> None:
    dumper = PredictionDumper(DumperConfig(maxdets=1))
    dumper.add(
        "bbox", [{"image_id": 1, "category_id": 1, "bbox": [0.1234567, 0, 1, 1], "score": s} for s in (0.3, 0.8)]
    )
    written = dumper.dump(str(tmp_path))
    assert written is not None and set(written) == set(PREDICTION_FILES)
    assert json.loads((tmp_path / PREDICTION_FILES["bbox"]).read_text()) == [
        {"image_id": 1, "category_id": 1, "bbox": [0.12346, 0, 1, 1], "score": 0.8}
    ]
    assert json.loads((tmp_path / PREDICTION_FILES["segm"]).read_text()) == []


def test_dump_starts_a_new_round_with_nothing_accumulated(tmp_path: Path) -> None:
    dumper = PredictionDumper(DumperConfig())
    dumper.add("bbox", [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])
    dumper.dump(str(tmp_path / "first"))
    dumper.dump(str(tmp_path / "second"))
    assert json.loads((tmp_path / "second" / PREDICTION_FILES["bbox"]).read_text()) == []


def test_unknown_iou_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="keypoints"):
        PredictionDumper(DumperConfig()).add("keypoints", [])


def test_waiting_for_a_part_that_never_comes_names_it(tmp_path: Path) -> None:
    present, missing = str(tmp_path / "part-00000.json"), str(tmp_path / "part-00001.json")
    storage.write_json(present, [])
    with pytest.raises(StorageError, match=re.escape("part-00001.json: 1 prediction part")):
        wait_for_objects([present, missing], timeout_s=0.3, poll_interval_s=0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gather": "nccl"}, "dumper.gather must be one of"),
        ({"gather": "filesystem"}, "needs dumper.shared_dir"),
        ({"gather": "filesystem", "shared_dir": "s3://bucket/x"}, "must be a local path"),
        ({"gather": "store"}, "needs dumper.store_uri"),
        ({"maxdets": 0}, "dumper.maxdets"),
    ],
)
def test_invalid_knobs_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DumperConfig(**kwargs)
