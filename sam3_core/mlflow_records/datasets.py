"""Dataset lineage: the published dataset a run read, as an MLflow dataset input.

A dataset published by data prep is described by its `manifest.json` (contract: `dataset_id`,
`source`, `split`, `counts`, `files`): the input's digest is the dataset id, its source the
dataset URI, its profile the counts, so the runs table's Dataset column names the data and
runs on the same data share one dataset entry. A ground-truth file that is not part of a
published dataset (evaluate on a loose file) is described by its own sha256.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sam3_core import storage
from sam3_core.errors import InputError, StorageError
from sam3_core.mlflow_records import mlflow_api
from sam3_core.mlflow_records.lineage import content_sha256

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

MANIFEST = "manifest.json"
# MLflow keeps digests of at most 36 characters.
MAX_DIGEST = 36
# Digest length of a loose file (the same length as data prep's dataset ids).
LOOSE_DIGEST = 16
# What each component does with its data, as MLflow's dataset context.
CONTEXTS = {"train": "training", "predict": "prediction", "evaluate": "evaluation"}


@dataclass(frozen=True)
class DatasetRef:
    """What a run records about its data; enough to find it again and check it did not change."""

    dataset_id: str
    uri: str
    name: str
    counts: dict[str, Any] = field(default_factory=dict)
    # the file the component read when it is one file of the dataset (evaluate's val.json)
    file: str = ""
    # False for a loose file: its digest is its own sha256, there is no manifest
    published: bool = True

    def as_input(self, context: str) -> DatasetInput:
        scheme = self.uri.split("://", 1)[0] if "://" in self.uri else "local"
        dataset = mlflow_api.Dataset(
            name=self.name,
            digest=self.dataset_id[:MAX_DIGEST],
            source_type=scheme,
            source=json.dumps({"uri": self.uri}),
            profile=json.dumps(self.counts, sort_keys=True) if self.counts else None,
        )
        tag = mlflow_api.InputTag(mlflow_api.MLFLOW_DATASET_CONTEXT, context)
        return mlflow_api.DatasetInput(dataset, [tag])

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset_id": self.dataset_id,
            "uri": self.uri,
            "name": self.name,
            "counts": self.counts,
            "file": self.file,
            "published": self.published,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetRef:
        return cls(
            data["dataset_id"],
            data["uri"],
            data["name"],
            dict(data.get("counts") or {}),
            data.get("file", ""),
            bool(data.get("published", True)),
        )


def _published(uri: str) -> dict[str, Any] | None:
    manifest = storage.join(uri, MANIFEST)
    return storage.read_json(manifest) if storage.exists(manifest) else None


def describe(uri: str) -> DatasetRef:
    """The dataset at `uri`: a published dataset folder, a file inside one, or a loose file."""
    uri = uri.rstrip("/")
    manifest = _published(uri)
    file = ""
    if manifest is None and "/" in uri:
        folder, file = posixpath.split(uri)
        manifest = _published(folder)
        if manifest is not None and file in manifest.get("files", {}):
            uri = folder
        else:
            manifest, file = None, ""
    if manifest is None:
        try:
            digest = content_sha256(uri)[:LOOSE_DIGEST]
        except StorageError as exc:
            raise InputError(uri, "dataset", f"cannot be read for its lineage ({exc})") from exc
        return DatasetRef(digest, uri, posixpath.basename(uri) or uri, published=False)
    try:
        dataset_id = str(manifest["dataset_id"])
        source = manifest.get("source") or {}
    except (KeyError, TypeError) as exc:
        raise InputError(storage.join(uri, MANIFEST), "dataset_id", "missing; re-run data_prep") from exc
    kind = source.get("kind", "dataset") if isinstance(source, dict) else "dataset"
    return DatasetRef(dataset_id, uri, f"{kind}-{dataset_id}", dict(manifest.get("counts") or {}), file)


def changed_files(ref: DatasetRef) -> list[str]:
    """Files of the dataset whose bytes differ from its manifest (or that are gone); [] when intact.

    The manifest itself must still name the same dataset id; a loose file must keep its digest.
    """
    if not ref.published:
        try:
            digest = content_sha256(ref.uri)[:LOOSE_DIGEST]
        except StorageError:
            return [f"{ref.uri} (gone)"]
        return [] if digest == ref.dataset_id else [f"{ref.uri} (sha256 {digest}, recorded {ref.dataset_id})"]
    manifest = _published(ref.uri)
    if manifest is None:
        return [MANIFEST]
    if str(manifest.get("dataset_id")) != ref.dataset_id:
        return [f"{MANIFEST} (dataset_id {manifest.get('dataset_id')}, recorded {ref.dataset_id})"]
    changed = []
    for rel, entry in sorted(manifest.get("files", {}).items()):
        uri = storage.join(ref.uri, rel)
        try:
            actual = content_sha256(uri)
        except StorageError:
            changed.append(f"{rel} (gone)")
            continue
        if actual != entry.get("sha256"):
            changed.append(f"{rel} (sha256 {actual[:12]}, manifest {str(entry.get('sha256'))[:12]})")
    return changed
