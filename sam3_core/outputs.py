"""The one guard every component runs before it writes: an output never replaces what it must not.

A component names what it will write (`Output`: a file, or a folder it owns whole, and the config
key that names it) and what it reads (config key -> URI). `check_outputs` refuses, before any work:

- an output that is an input, lies inside an input folder, or (a folder it owns) contains an input:
  writing it would destroy or alias what the run reads; `overwrite=true` does not lift this;
- an output inside a published, content-addressed dataset (a folder whose `manifest.json` carries a
  `dataset_id`): its bytes are what its id promises, and every run that used it relies on that.

`check_earlier` refuses to replace an earlier output made by other settings unless the component's
`overwrite` key is true: each component keeps a record of the settings that made its outputs (its
`claim`); the same settings may write again (a retried step writes the same files).

URIs are compared by their normalised form: local paths resolved (symlinks and `..` followed),
`file://` as the path it names, `s3://bucket/key` without a trailing slash.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam3_core import storage
from sam3_core.errors import InputError, Sam3PipeError, StoreUnreachableError
from sam3_core.storage.backend import scheme_of
from sam3_core.storage.local import local_path

logger = logging.getLogger(__name__)

# what a published dataset's marker holds (sam3_core.data.prep writes it; read here without importing it)
DATASET_MARKER = "manifest.json"
_DATASET_KEYS = ("dataset_id", "files")


@dataclass(frozen=True)
class Output:
    """Something a component writes: a file, or a folder it owns whole (`folder=True`)."""

    uri: str
    key: str
    folder: bool = False


def _parts(uri: str) -> tuple[str, tuple[str, ...]]:
    """(scheme, path segments) of a URI, local paths absolute and resolved."""
    uri = str(uri)
    scheme = scheme_of(uri)
    if scheme in ("", "file"):
        try:
            resolved = Path(local_path(uri)).expanduser().resolve(strict=False)
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: compare as written
            resolved = Path(posixpath.abspath(str(local_path(uri))))
        return "", tuple(part for part in resolved.as_posix().split("/") if part)
    rest = uri.split("://", 1)[1]
    return scheme, tuple(part for part in rest.split("/") if part)


def _within(inner: tuple[str, tuple[str, ...]], outer: tuple[str, tuple[str, ...]]) -> bool:
    """True when `inner` is `outer` or lies below it."""
    return inner[0] == outer[0] and inner[1][: len(outer[1])] == outer[1]


def overlap(output: Output, key: str, uri: str) -> str | None:
    """Why writing `output` would touch the input `key`=`uri`, or None."""
    out, inp = _parts(output.uri), _parts(uri)
    if out == inp:
        return f"is the input {key}={uri}"
    if _within(out, inp):
        return f"lies inside the input {key}={uri}"
    if output.folder and _within(inp, out):
        return f"contains the input {key}={uri}"
    return None


def _is_dataset_manifest(uri: str) -> bool:
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except (Sam3PipeError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(manifest, dict) and all(key in manifest for key in _DATASET_KEYS)


def _ancestors(uri: str, include_self: bool) -> list[str]:
    """`uri`'s folders from the nearest up to the root (bucket), as URIs of its own scheme."""
    scheme, parts = _parts(uri)
    depth = len(parts) if include_self else len(parts) - 1
    if scheme:
        bucket = parts[0] if parts else ""
        below = [f"{scheme}://" + "/".join(parts[:n]) for n in range(depth, 1, -1)]
        return below + ([f"{scheme}://{bucket}"] if bucket else [])
    return ["/" + "/".join(parts[:n]) for n in range(depth, -1, -1)]


def published_dataset_around(uri: str, include_self: bool = True) -> str | None:
    """The published dataset folder that `uri` is or lies in, or None."""
    for folder in _ancestors(uri, include_self):
        marker = storage.join(folder, DATASET_MARKER)
        try:
            found = storage.exists(marker)
        except StoreUnreachableError:
            raise
        except Sam3PipeError:  # a folder this process may not list (an ancestor of the store): not a dataset
            continue
        if found and _is_dataset_manifest(marker):
            return folder
    return None


def check_outputs(outputs: Sequence[Output], inputs: Mapping[str, str]) -> None:
    """Refuse outputs that would replace or alias an input, or write into a published dataset (see module doc)."""
    for output in outputs:
        for key, uri in inputs.items():
            if not uri:
                continue
            why = overlap(output, key, uri)
            if why:
                raise InputError(
                    output.uri,
                    output.key,
                    f"{why}: a run never writes over what it reads (overwrite=true does not change this); "
                    f"point {output.key} somewhere else",
                )
        dataset = published_dataset_around(output.uri)
        if dataset is not None:
            raise InputError(
                output.uri,
                output.key,
                f"lies inside the published dataset {dataset}, whose files are fixed by its id "
                "(overwrite=true does not change this); "
                f"point {output.key} somewhere else",
            )


def changed_settings(before: Mapping[str, Any], after: Mapping[str, Any], shown: int = 4) -> str:
    """`key: old -> new, ...` for the settings that differ (the first few, then a count)."""
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k, "(unset)") != after.get(k, "(unset)"))
    text = ", ".join(f"{k}: {before.get(k, '(unset)')!r} -> {after.get(k, '(unset)')!r}" for k in keys[:shown])
    return text + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def check_earlier(
    output: Output,
    record_uri: str,
    settings: Mapping[str, Any],
    overwrite: bool,
    overwrite_key: str,
    has_outputs: Callable[[], bool],
) -> None:
    """Refuse to replace what `output` holds from other settings unless `overwrite_key`=true.

    `record_uri` is where the component recorded the settings of what it wrote (`{"settings": ...}`);
    `has_outputs` tells whether earlier outputs are there without such a record.
    """
    if overwrite:
        return
    current = json.loads(json.dumps(dict(settings), default=str))
    if storage.exists(record_uri):
        try:
            recorded = storage.read_json(record_uri)
        except InputError:
            recorded = None
        before = recorded.get("settings") if isinstance(recorded, dict) else None
        if before == current:
            return
        what = (
            f"outputs made with other settings ({changed_settings(before, current)})"
            if isinstance(before, dict)
            else f"outputs whose record {posixpath.basename(record_uri)} is unreadable"
        )
    elif has_outputs():
        what = f"outputs of unknown settings (no {posixpath.basename(record_uri)})"
    else:
        return
    raise InputError(
        output.uri,
        output.key,
        f"already holds {what}; pass {overwrite_key}=true to replace them, or write somewhere else",
    )


def claim(record_uri: str, settings: Mapping[str, Any], **extra: Any) -> None:
    """Record the settings that make the outputs next to them (before the outputs change)."""
    storage.write_json(record_uri, {**extra, "settings": json.loads(json.dumps(dict(settings), default=str))})
