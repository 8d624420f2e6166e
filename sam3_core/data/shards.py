"""Data prep spread over pods: a plan, one shard per pod, a merge that publishes the one dataset.

``plan_shards`` checks the source's structure (not its masks) and writes the plan, with the
resolved config and each shard's videos, to ``<store>/datasets/.parts/<content hash>/``.
``prepare_shard`` stages its videos exactly as a single process would and publishes them with
a report (``report.json`` last) below the plan; ``merge_shards`` checks that every shard's part
is complete, writes the split annotations and the manifest from the reports, and publishes the
dataset with the manifest last (frames copied server-side from the parts). The published bytes
and id are those of ``prepare_dataset`` on one machine, for any number of shards.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam3_core import storage
from sam3_core.data.prep import (
    FORMAT_VERSION,
    MANIFEST,
    MAX_WORKERS,
    DataPrepConfig,
    PreparedDataset,
    describe,
    guard_store,
    load_checked_source,
    publish_or_reuse,
    split_for,
    stage_settings,
    verify_published,
    worker_count,
    write_dataset_files,
    write_json_file,
)
from sam3_core.data.sources import json_sha256
from sam3_core.data.sources.vos import VosConfig
from sam3_core.data.staging import StagedVideo, stage_videos
from sam3_core.data.synthetic import SyntheticConfig
from sam3_core.data.ytvis import Category, Track, Video, VideoDataset, to_json
from sam3_core.errors import ConfigError, InputError, Sam3PipeError

logger = logging.getLogger(__name__)

PARTS = ".parts"
PLAN = "plan.json"
REPORT = "report.json"
RESULT = "result.json"


@dataclass(frozen=True)
class ShardPlan:
    """Where the plan lives in the store (``<store>/datasets/.parts/<key>``) and how many shards it has."""

    uri: str
    shards: int


def plan_shards(cfg: DataPrepConfig, shards: int) -> ShardPlan:
    """Check the source's structure and split its videos into ``shards`` balanced by frame count.

    Masks are not checked here (each shard checks its own); the plan, with the resolved config,
    is written to the store for the shards and the merge to read. The plan's folder is named
    after its content, so rerunning the same data prep finds the same plan, and once a merge
    has published its dataset (``result.json``), shards and merge reuse it instead of working.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_WORKERS:
        raise ConfigError(f"data prep shards: must be an integer in [1, {MAX_WORKERS}], got {shards!r}")
    guard_store(cfg)
    with tempfile.TemporaryDirectory(prefix="sam3pipe-plan-") as tmp:
        source = load_checked_source(cfg, Path(tmp), video_ids=[])
    plan = {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "description": describe(cfg, source),
        "categories": [{"id": c.id, "name": c.name} for c in source.dataset.categories],
        "videos": [v.id for v in source.dataset.videos],
        "split": split_for(cfg, source),
        "shards": assign_shards(source.dataset.videos, shards),
    }
    uri = storage.join(cfg.store, "datasets", PARTS, json_sha256(plan)[:16])
    storage.write_json(storage.join(uri, PLAN), plan)
    logger.info("planned %d shard(s) of %d video(s) at %s", shards, len(plan["videos"]), uri)
    return ShardPlan(uri, shards)


def assign_shards(videos: list[Video], shards: int) -> list[list[int]]:
    """Video ids per shard: longest videos first to the shard with the fewest frames; each list in source order."""
    order = {v.id: i for i, v in enumerate(videos)}
    loads, parts = [0] * shards, [[] for _ in range(shards)]
    for video in sorted(videos, key=lambda v: (-v.length, order[v.id])):
        lightest = min(range(shards), key=lambda s: (loads[s], s))
        loads[lightest] += video.length
        parts[lightest].append(video.id)
    return [sorted(part, key=order.__getitem__) for part in parts]


def _read_plan(plan_uri: str) -> tuple[dict[str, Any], DataPrepConfig]:
    plan = storage.read_json(storage.join(plan_uri, PLAN))
    if plan.get("format_version") != FORMAT_VERSION:
        raise InputError(
            plan_uri, "format_version", f"plan of format {plan.get('format_version')}; run the plan step again"
        )
    config = dict(plan["config"])
    config["synthetic"] = SyntheticConfig(**config["synthetic"])
    config["vos"] = VosConfig(**config.get("vos", {}))
    return plan, DataPrepConfig(**config)


def _shard_uri(plan_uri: str, index: int) -> str:
    return storage.join(plan_uri, f"shard-{index:05d}")


def prepare_shard(plan_uri: str, index: int) -> str:
    """Stage shard ``index`` of the plan and publish its frames and report below the plan; return that URI."""
    plan, cfg = _read_plan(plan_uri)
    if not 0 <= index < len(plan["shards"]):
        raise InputError(plan_uri, "shards", f"no shard {index}; the plan has {len(plan['shards'])}")
    dest = _shard_uri(plan_uri, index)
    done = _merged(plan_uri)
    if done is not None:
        logger.info("the plan's dataset is already published at %s; shard %d has nothing to do", done.uri, index)
        return dest
    if storage.is_published(dest, REPORT):
        logger.info("shard %d already published at %s", index, dest)
        return dest
    ids = plan["shards"][index]
    with tempfile.TemporaryDirectory(prefix="sam3pipe-shard-") as tmp:
        source = load_checked_source(cfg, Path(tmp) / "source", video_ids=ids)
        if describe(cfg, source) != plan["description"]:
            raise InputError(source.annotations, "$", "changed since the plan step; run the whole data prep again")
        chosen = set(ids)
        source.dataset = VideoDataset(
            videos=[v for v in source.dataset.videos if v.id in chosen],
            tracks=[t for t in source.dataset.tracks if t.video_id in chosen],
            categories=source.dataset.categories,
        )
        staging = Path(tmp) / "staging"
        staged = stage_videos(source, stage_settings(cfg), staging, worker_count(cfg))
        report = to_json(VideoDataset([s.video for s in staged], [t for s in staged for t in s.tracks], []))
        report["files"] = {rel: record for s in staged for rel, record in s.files.items()}
        write_json_file(staging / REPORT, report)
        storage.publish_dir(staging, dest, REPORT)
    logger.info("shard %d: %d video(s) published at %s", index, len(ids), dest)
    return dest


def merge_shards(plan_uri: str) -> PreparedDataset:
    """Check that every shard of the plan is complete, then publish the dataset with its manifest last."""
    plan, cfg = _read_plan(plan_uri)
    done = None if cfg.overwrite else _merged(plan_uri)
    if done is not None:
        verify_published(done.uri)
        logger.info("dataset %s of this plan already published at %s; reusing it", done.dataset_id, done.uri)
        return done
    staged: dict[int, StagedVideo] = {}
    sources: dict[str, str | Path] = {}
    for index, ids in enumerate(plan["shards"]):
        part = _shard_uri(plan_uri, index)
        if not storage.is_published(part, REPORT):
            raise InputError(plan_uri, f"shard {index}", f"not published at {part}; run that shard (again) first")
        report = storage.read_json(storage.join(part, REPORT))
        shard_videos = _staged_from_report(report)
        if [s.video.id for s in shard_videos] != ids:
            raise InputError(part, REPORT, f"holds videos {[s.video.id for s in shard_videos]}, the plan says {ids}")
        present = set(storage.list_files(storage.join(part, "frames")))
        for video in shard_videos:
            for rel in video.files:
                if rel.removeprefix("frames/") not in present:
                    raise InputError(part, rel, "listed in the shard's report but missing; run that shard again")
                sources[rel] = storage.join(part, rel)
            staged[video.video.id] = video
    categories = [Category(c["id"], c["name"]) for c in plan["categories"]]
    with tempfile.TemporaryDirectory(prefix="sam3pipe-merge-") as tmp:
        out = Path(tmp)
        manifest = write_dataset_files(
            out, [staged[i] for i in plan["videos"]], categories, plan["description"], plan["split"]
        )
        dest = storage.join(cfg.store, "datasets", manifest["dataset_id"])
        sources.update({rel: out / rel for rel in ("train.json", "val.json", "val_frames_coco.json")})
        publish_or_reuse(
            dest, out / MANIFEST, cfg.overwrite, lambda: storage.publish(sources, dest, MANIFEST, out / MANIFEST)
        )
    storage.write_json(storage.join(plan_uri, RESULT), {"dataset_uri": dest, "dataset_id": manifest["dataset_id"]})
    for index in range(len(plan["shards"])):
        try:
            storage.delete_prefix(_shard_uri(plan_uri, index))
        except Sam3PipeError as exc:
            logger.warning("could not remove shard %d's part (%s); delete it by hand", index, exc)
    return PreparedDataset(uri=dest, dataset_id=manifest["dataset_id"])


def _merged(plan_uri: str) -> PreparedDataset | None:
    """The plan's dataset if a merge already published it (and it is still there)."""
    result_uri = storage.join(plan_uri, RESULT)
    if not storage.exists(result_uri):
        return None
    result = storage.read_json(result_uri)
    if not storage.is_published(result["dataset_uri"], MANIFEST):
        return None
    return PreparedDataset(uri=result["dataset_uri"], dataset_id=result["dataset_id"])


def _staged_from_report(report: dict[str, Any]) -> list[StagedVideo]:
    """The staged videos a shard reported (written by our own code, so read without re-validation)."""
    by_video: dict[int, list[Track]] = {}
    for ann in report["annotations"]:
        by_video.setdefault(ann["video_id"], []).append(
            Track(
                id=ann["id"],
                video_id=ann["video_id"],
                category_id=ann["category_id"],
                segmentations=tuple(ann["segmentations"]),
                bboxes=tuple(tuple(b) if b is not None else None for b in ann["bboxes"]),
                areas=tuple(ann["areas"]),
                iscrowd=ann["iscrowd"],
            )
        )
    staged = []
    for entry in report["videos"]:
        video = Video(
            id=entry["id"],
            width=entry["width"],
            height=entry["height"],
            file_names=tuple(entry["file_names"]),
            negative_category_ids=tuple(entry.get("negative_category_ids", ())),
        )
        files = {rel: report["files"][rel] for rel in video.file_names}
        staged.append(StagedVideo(video, by_video.get(video.id, []), files))
    return staged
