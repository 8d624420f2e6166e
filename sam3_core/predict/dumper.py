"""Collect COCO and YTVIS predictions on every rank, gather them to rank 0, merge, publish.

The merge keeps upstream SAM3's semantics to the byte (its PredictionDumper), so numbers stay
comparable with Meta's evaluation: scores and box coordinates rounded to 5 decimals, at most
`maxdets` predictions per image chosen with the same min-heap and the same tie behaviour, and
(image, category) groups that an earlier rank already produced dropped, because a padded
DistributedSampler hands the last samples to several ranks. Unlike upstream, merging streams
over the ranks' parts and flattens in linear time (upstream's `sum(lists, [])` is quadratic in
the number of images).

Three routes bring the parts to rank 0, because clusters differ in what they share:
`collective` (torch.distributed, the default process group), `filesystem` (a directory every
pod mounts) and `store` (an object-store prefix, for pods without a shared disk).
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sam3_core import comm, storage
from sam3_core.artifacts import PREDICTION_FILES
from sam3_core.config_checks import check_choice, check_float, check_int, check_uri
from sam3_core.errors import ConfigError, StorageError

logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
ROUTES = ("collective", "filesystem", "store")
DECIMALS = 5

Part = dict[str, list[dict]]


@dataclass
class DumperConfig:
    """How many predictions per image to keep and how the ranks' parts reach rank 0."""

    # predictions kept per image in the COCO files (upstream's maxdets)
    maxdets: int = 100
    # how the ranks' parts reach rank 0: collective, filesystem or store
    gather: str = "collective"
    # gather=filesystem: a folder every rank mounts
    shared_dir: str = ""
    # gather=store: an object-store prefix every rank can write
    store_uri: str = ""
    # how long rank 0 waits for the other ranks' parts
    timeout_s: float = 600.0
    poll_interval_s: float = 0.5

    def __post_init__(self) -> None:
        check_int("dumper.maxdets", self.maxdets, minimum=1)
        check_choice("dumper.gather", self.gather, ROUTES)
        check_uri("dumper.shared_dir", self.shared_dir)
        check_uri("dumper.store_uri", self.store_uri)
        check_float("dumper.timeout_s", self.timeout_s, 0.0, low_open=True)
        check_float("dumper.poll_interval_s", self.poll_interval_s, 0.0, self.timeout_s, low_open=True)
        if self.gather == "filesystem" and not self.shared_dir:
            raise ConfigError("dumper.gather=filesystem needs dumper.shared_dir: a directory every rank mounts")
        if self.gather == "filesystem" and storage.is_remote(self.shared_dir):
            raise ConfigError(
                f"dumper.shared_dir must be a local path, got {self.shared_dir!r}; "
                "use dumper.gather=store with dumper.store_uri for an object store"
            )
        if self.gather == "store" and not self.store_uri:
            raise ConfigError("dumper.gather=store needs dumper.store_uri: an object-store prefix every rank can write")


def round_result(result: dict) -> dict:
    """The result as upstream dumps it: box coordinates and score rounded to 5 decimals."""
    rounded = dict(result)
    if "bbox" in rounded:
        rounded["bbox"] = [round(coord, DECIMALS) for coord in rounded["bbox"]]
    rounded["score"] = round(rounded["score"], DECIMALS)
    return rounded


class _ByScore:
    """Heap entry ordered by score alone, so ties move exactly as in upstream's heap."""

    __slots__ = ("result", "score")

    def __init__(self, result: dict) -> None:
        self.result = result
        self.score = result["score"]

    def __lt__(self, other: _ByScore) -> bool:
        return self.score < other.score


class TopKMerger:
    """Streaming merge of the ranks' COCO results, fed one part at a time in rank order."""

    def __init__(self, maxdets: int) -> None:
        self.maxdets = maxdets
        self._heaps: dict[Any, list[_ByScore]] = {}
        self._seen: set[tuple[Any, Any]] = set()

    def add_part(self, part: Iterable[dict]) -> None:
        """Fold in one rank's results, skipping (image, category) groups earlier parts produced."""
        seen, heaps, maxdets = self._seen, self._heaps, self.maxdets
        part_groups: set[tuple[Any, Any]] = set()
        for result in part:
            image_id = result["image_id"]
            group = (image_id, result["category_id"])
            if group in seen:
                continue
            part_groups.add(group)
            heap = heaps.get(image_id)
            if heap is None:
                heap = heaps[image_id] = []
            if len(heap) < maxdets:
                heapq.heappush(heap, _ByScore(result))
            else:
                heapq.heappushpop(heap, _ByScore(result))
        seen.update(part_groups)

    def results(self) -> list[dict]:
        """Images in first-seen order, each image's kept results in heap order (as upstream)."""
        merged: list[dict] = []
        for heap in self._heaps.values():
            merged.extend(entry.result for entry in heap)
        return merged


def merge_parts(parts: Iterable[Iterable[dict]], maxdets: int) -> list[dict]:
    """Merge the ranks' COCO results (in rank order) into one list with upstream's semantics."""
    merger = TopKMerger(maxdets)
    for part in parts:
        merger.add_part(part)
    return merger.results()


class VideoMerger:
    """Concatenate the ranks' YTVIS results, dropping (video, category) groups an earlier rank produced."""

    def __init__(self) -> None:
        self._merged: list[dict] = []
        self._seen: set[tuple[Any, Any]] = set()

    def add_part(self, part: Iterable[dict]) -> None:
        part_groups: set[tuple[Any, Any]] = set()
        for result in part:
            group = (result["video_id"], result["category_id"])
            if group in self._seen:
                continue
            part_groups.add(group)
            self._merged.append(result)
        self._seen.update(part_groups)

    def results(self) -> list[dict]:
        return self._merged


def wait_for_objects(uris: list[str], timeout_s: float, poll_interval_s: float) -> None:
    """Block until every URI exists; a rank that never delivers becomes an error, not a hang."""
    deadline = time.monotonic() + timeout_s
    missing = list(uris)
    while True:
        missing = [uri for uri in missing if not storage.exists(uri)]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise StorageError(
                f"{missing[0]}: {len(missing)} prediction part(s) still missing after "
                f"{timeout_s:g}s; "
                "check the other ranks' logs, or raise dumper.timeout_s if they are just slow"
            )
        time.sleep(poll_interval_s)


def _gather_collective(part: Part, rank: int, world: int, sink: Callable[[Part], None]) -> None:
    received = comm.gather_object(part, dst=0)
    if received is None:
        return
    for index in range(world):
        sink(received[index])  # type: ignore[arg-type]
        received[index] = None


def _gather_via_storage(
    root: str, part: Part, rank: int, world: int, cfg: DumperConfig, sink: Callable[[Part], None]
) -> None:
    """Each rank writes its part under a folder unique to this gather; rank 0 reads them in rank order."""
    token = comm.broadcast_object(uuid.uuid4().hex if rank == 0 else None, src=0)
    folder = storage.join(root, f"gather-{token}")
    part_uris = [storage.join(folder, f"part-{r:05d}.json") for r in range(world)]
    storage.write_json(part_uris[rank], part)
    if rank == 0:
        wait_for_objects(part_uris, cfg.timeout_s, cfg.poll_interval_s)
        for uri in part_uris:
            sink(storage.read_json(uri))
        storage.delete_prefix(folder)
    comm.barrier()


class PredictionDumper:
    """Per-rank accumulator of predictions; `dump` gathers, merges and publishes on rank 0."""

    def __init__(self, cfg: DumperConfig) -> None:
        self.cfg = cfg
        self._part: Part = {kind: [] for kind in PREDICTION_FILES}

    def reset(self) -> None:
        """Forget this rank's predictions (a new evaluation round)."""
        self._part = {kind: [] for kind in PREDICTION_FILES}

    def add(self, iou_type: str, results: Iterable[dict]) -> None:
        """Accumulate COCO results of one iou type, rounded as upstream dumps them."""
        if iou_type not in IOU_TYPES:
            raise ConfigError(f"iou type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
        self._part[iou_type].extend(round_result(result) for result in results)

    def add_video(self, results: Iterable[dict]) -> None:
        """Accumulate YTVIS masklet results (see sam3_core.predict.association)."""
        self._part["video"].extend(results)

    def gather(self) -> Part | None:
        """Bring every rank's part to rank 0 and merge; rank 0 gets {kind: results}, other ranks None.

        Every rank of the default process group must call this, in the same order.
        """
        rank, world = comm.rank(), comm.world_size()
        coco = {iou_type: TopKMerger(self.cfg.maxdets) for iou_type in IOU_TYPES}
        video = VideoMerger()

        def sink(part: Part) -> None:
            for iou_type, merger in coco.items():
                merger.add_part(part[iou_type])
            video.add_part(part["video"])

        part = self._part
        self.reset()
        logger.info(
            "rank %d/%d gathering %s predictions via %s",
            rank,
            world,
            ", ".join(f"{len(v)} {k}" for k, v in part.items()),
            self.cfg.gather,
        )
        if world == 1:
            sink(part)
        elif self.cfg.gather == "collective":
            _gather_collective(part, rank, world, sink)
        else:
            root = self.cfg.shared_dir if self.cfg.gather == "filesystem" else self.cfg.store_uri
            _gather_via_storage(root, part, rank, world, self.cfg, sink)
        if rank != 0:
            return None
        merged = {iou_type: merger.results() for iou_type, merger in coco.items()}
        merged["video"] = video.results()
        return merged

    def dump(self, dest_uri: str) -> dict[str, str] | None:
        """Gather, merge and write one JSON per kind under `dest_uri`; rank 0 gets {kind: uri}."""
        merged = self.gather()
        if merged is None:
            return None
        written = {}
        for kind, name in PREDICTION_FILES.items():
            uri = storage.join(dest_uri, name)
            storage.write_json(uri, merged[kind])
            written[kind] = uri
            logger.info("wrote %d %s predictions to %s", len(merged[kind]), kind, uri)
        return written
