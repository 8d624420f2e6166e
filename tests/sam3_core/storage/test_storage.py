"""Contract of sam3_core.storage, run against a local folder and a real (moto) S3 server."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import boto3
import pytest

from sam3_core import storage
from sam3_core.errors import ConfigError, InputError, StorageError
from tests.fixtures.network import free_port
from tests.fixtures.s3 import use_s3_server


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# ---------------------------------------------------------------------------- round trips


def test_bytes_round_trip(store_root: str) -> None:
    uri = storage.join(store_root, "blob.bin")
    storage.write_bytes(uri, b"\x00\x01binary\xff")
    assert storage.read_bytes(uri) == b"\x00\x01binary\xff"


def test_write_replaces_an_existing_object(store_root: str) -> None:
    uri = storage.join(store_root, "blob.bin")
    storage.write_bytes(uri, b"old content")
    storage.write_bytes(uri, b"new")
    assert storage.read_bytes(uri) == b"new"


def test_text_round_trip_is_utf8(store_root: str) -> None:
    uri = storage.join(store_root, "notes.txt")
    storage.write_text(uri, "zebra \u00e9t\u00e9 \u732b")
    assert storage.read_bytes(uri) == "zebra \u00e9t\u00e9 \u732b".encode()
    assert storage.read_text(uri) == "zebra \u00e9t\u00e9 \u732b"


def test_json_round_trip(store_root: str) -> None:
    uri = storage.join(store_root, "meta", "info.json")
    obj = {"videos": [{"id": 1, "name": "caf\u00e9"}], "score": 0.5, "none": None}
    storage.write_json(uri, obj)
    assert storage.read_json(uri) == obj


def test_write_json_is_compact_and_key_sorted_so_equal_objects_give_equal_bytes(store_root: str) -> None:
    uri = storage.join(store_root, "a.json")
    storage.write_json(uri, {"b": 1, "a": {"d": [1, 2], "c": "\u00e9"}})
    assert storage.read_bytes(uri) == '{"a":{"c":"\u00e9","d":[1,2]},"b":1}'.encode()


def test_read_json_of_malformed_file_names_uri_and_line(store_root: str) -> None:
    uri = storage.join(store_root, "bad.json")
    storage.write_text(uri, '{\n  "a": 1,\n  oops\n}')
    with pytest.raises(InputError, match=r"bad\.json: line 3 column 3: invalid JSON"):
        storage.read_json(uri)


def test_file_uri_and_plain_path_name_the_same_object(tmp_path: Path) -> None:
    storage.write_bytes(f"file://{tmp_path}/sub/x.bin", b"via file uri")
    assert storage.read_bytes(str(tmp_path / "sub" / "x.bin")) == b"via file uri"
    assert storage.list_files(f"file://{tmp_path}") == ["sub/x.bin"]
    assert storage.exists(f"file://{tmp_path}/sub/x.bin")


def test_local_write_creates_missing_parent_folders_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "a" / "b" / "c.bin"), b"x")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b", "a/b/c.bin"]


# ---------------------------------------------------------------------------- listing and existence


def test_list_files_is_recursive_relative_and_sorted(store_root: str) -> None:
    for key in ["z.json", "frames/vid2/00001.jpg", "frames/vid1/00000.jpg", "a.json"]:
        storage.write_bytes(storage.join(store_root, "ds", key), b"x")
    assert storage.list_files(storage.join(store_root, "ds")) == [
        "a.json",
        "frames/vid1/00000.jpg",
        "frames/vid2/00001.jpg",
        "z.json",
    ]


def test_list_files_treats_the_prefix_as_a_folder_not_a_name_prefix(store_root: str) -> None:
    storage.write_bytes(storage.join(store_root, "run", "last.pt"), b"x")
    storage.write_bytes(storage.join(store_root, "run2", "last.pt"), b"x")
    assert storage.list_files(storage.join(store_root, "run")) == ["last.pt"]


def test_list_files_of_a_missing_prefix_is_empty(store_root: str) -> None:
    assert storage.list_files(storage.join(store_root, "nothing-here")) == []


def test_exists_is_true_only_for_a_written_object(store_root: str) -> None:
    uri = storage.join(store_root, "dir", "obj.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"x")
    assert storage.exists(uri)
    assert not storage.exists(storage.join(store_root, "dir", "other.bin"))


def test_reading_a_missing_object_raises_storage_error_naming_the_uri(store_root: str) -> None:
    uri = storage.join(store_root, "missing", "obj.json")
    with pytest.raises(StorageError, match=rf"^{uri}: read failed"):
        storage.read_bytes(uri)


def test_missing_bucket_is_reported_with_what_to_do(s3_bucket: str) -> None:
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-xyz/k: write failed: the bucket does not exist"):
        storage.write_bytes("s3://no-such-bucket-xyz/k", b"x")


def test_unreachable_endpoint_is_reported_with_the_endpoint(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("SAM3PIPE_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match=rf"cannot reach the S3 endpoint {endpoint}"):
        storage.write_bytes(f"{s3_bucket}/k", b"x")


def test_endpoint_url_s3_takes_precedence_over_endpoint_url(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", os.environ["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    storage.write_bytes(f"{s3_bucket}/k", b"x")
    assert storage.read_bytes(f"{s3_bucket}/k") == b"x"


def test_unsupported_scheme_is_refused() -> None:
    with pytest.raises(StorageError, match=r"gs://bucket/key: unsupported URI scheme 'gs'"):
        storage.read_bytes("gs://bucket/key")


def test_invalid_numeric_setting_in_env_is_a_config_error(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAM3PIPE_MULTIPART_THRESHOLD_MB", "lots")
    with pytest.raises(ConfigError, match="SAM3PIPE_MULTIPART_THRESHOLD_MB='lots'"):
        storage.write_bytes(f"{s3_bucket}/k", b"x")


# ---------------------------------------------------------------------------- join


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://bucket/root", ("datasets", "abc/manifest.json"), "s3://bucket/root/datasets/abc/manifest.json"),
        ("s3://bucket/root/", ("x.json",), "s3://bucket/root/x.json"),
        ("s3://bucket", ("x.json",), "s3://bucket/x.json"),
        ("/data/store", ("runs", "r1"), "/data/store/runs/r1"),
        ("rel/store", ("a.json",), "rel/store/a.json"),
        ("file:///data/store", ("a.json",), "file:///data/store/a.json"),
    ],
)
def test_join_appends_relative_keys(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert storage.join(base, *parts) == expected


@pytest.mark.parametrize("base", ["s3://bucket/root", "/data/store"])
@pytest.mark.parametrize("part", ["..", "a/../../b", "/etc/passwd", "", "a//b", "./a", "s3://other/key"])
def test_join_refuses_parts_that_escape_or_alias_the_base(base: str, part: str) -> None:
    with pytest.raises(StorageError, match="refusing"):
        storage.join(base, "ok", part)


# ---------------------------------------------------------------------------- copies and transfers


def test_copy_local_to_s3_and_back(s3_bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(b"payload" * 100)
    storage.copy(str(source), f"{s3_bucket}/copied/src.bin")
    storage.copy(f"{s3_bucket}/copied/src.bin", str(tmp_path / "back" / "src.bin"))
    assert (tmp_path / "back" / "src.bin").read_bytes() == b"payload" * 100


def test_copy_between_two_s3_keys(s3_bucket: str) -> None:
    storage.write_bytes(f"{s3_bucket}/a/x.bin", b"x" * 10)
    storage.copy(f"{s3_bucket}/a/x.bin", f"{s3_bucket}/b/y.bin")
    assert storage.read_bytes(f"{s3_bucket}/b/y.bin") == b"x" * 10


def test_copy_within_the_same_store(store_root: str) -> None:
    storage.write_bytes(storage.join(store_root, "a.bin"), b"abc")
    storage.copy(storage.join(store_root, "a.bin"), storage.join(store_root, "sub", "b.bin"))
    assert storage.read_bytes(storage.join(store_root, "sub", "b.bin")) == b"abc"


def test_file_above_the_multipart_threshold_goes_up_in_parts_and_comes_back_identical(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAM3PIPE_MULTIPART_THRESHOLD_MB", "1")
    monkeypatch.setenv("SAM3PIPE_MULTIPART_CHUNK_MB", "5")
    source = tmp_path / "checkpoint.pt"
    source.write_bytes(os.urandom(11 * 1024 * 1024))
    storage.upload_file(source, f"{s3_bucket}/ckpt/checkpoint.pt")
    storage.download_file(f"{s3_bucket}/ckpt/checkpoint.pt", tmp_path / "downloaded.pt")

    etag = boto3.client("s3").head_object(Bucket=s3_bucket[5:], Key="ckpt/checkpoint.pt")["ETag"]
    assert etag.strip('"').endswith("-3")  # S3 marks multipart objects with the part count
    assert storage.sha256_file(tmp_path / "downloaded.pt") == storage.sha256_file(source)


def test_sha256_of_a_file_matches_the_digest_of_its_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    (tmp_path / "f.bin").write_bytes(data)
    assert storage.sha256_file(tmp_path / "f.bin") == storage.sha256_bytes(data)
    assert storage.sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# ---------------------------------------------------------------------------- deletion


def test_delete_removes_one_object_and_tolerates_a_missing_one(store_root: str) -> None:
    uri = storage.join(store_root, "a.bin")
    storage.write_bytes(uri, b"x")
    storage.delete(uri)
    storage.delete(uri)
    assert not storage.exists(uri)


def test_delete_prefix_removes_everything_below_it_and_nothing_beside_it(store_root: str) -> None:
    for key in ["run/a.bin", "run/ckpt/b.bin", "run2/c.bin"]:
        storage.write_bytes(storage.join(store_root, key), b"x")
    storage.delete_prefix(storage.join(store_root, "run"))
    assert storage.list_files(store_root) == ["run2/c.bin"]


def test_delete_prefix_refuses_a_whole_bucket(s3_bucket: str) -> None:
    with pytest.raises(StorageError, match="no object key"):
        storage.delete_prefix(s3_bucket)


# ---------------------------------------------------------------------------- atomic publish


def test_publish_dir_uploads_every_file_and_the_marker(store_root: str, tmp_path: Path) -> None:
    files = {"manifest.json": b"{}", "train.json": b"[1]", "frames/v1/0.jpg": b"jpg0", "frames/v1/1.jpg": b"jpg1"}
    _write_tree(tmp_path / "out", files)
    dest = storage.join(store_root, "datasets", "abc")
    assert not storage.is_published(dest)

    storage.publish_dir(tmp_path / "out", dest)

    assert storage.is_published(dest)
    assert storage.list_files(dest) == sorted(files)
    assert {rel: storage.read_bytes(storage.join(dest, rel)) for rel in files} == files


def test_failed_publish_leaves_no_marker_and_no_objects(store_root: str, tmp_path: Path) -> None:
    _write_tree(tmp_path / "out", {"manifest.json": b"{}", **{f"frames/{i:03d}.jpg": b"jpg" for i in range(12)}})
    (tmp_path / "out" / "frames" / "broken.jpg").symlink_to(tmp_path / "does-not-exist.jpg")
    dest = storage.join(store_root, "datasets", "abc")

    with pytest.raises(StorageError, match=r"broken\.jpg"):
        storage.publish_dir(tmp_path / "out", dest)

    assert not storage.is_published(dest)
    assert storage.list_files(dest) == []


def test_failed_republish_unpublishes_the_destination(store_root: str, tmp_path: Path) -> None:
    _write_tree(tmp_path / "good", {"manifest.json": b"{}", "a.bin": b"a"})
    _write_tree(tmp_path / "bad", {"manifest.json": b"{}", "a.bin": b"a"})
    (tmp_path / "bad" / "broken.bin").symlink_to(tmp_path / "does-not-exist")
    dest = storage.join(store_root, "out")
    storage.publish_dir(tmp_path / "good", dest)

    with pytest.raises(StorageError):
        storage.publish_dir(tmp_path / "bad", dest)

    assert not storage.is_published(dest)


def test_publish_dir_uses_a_custom_marker(store_root: str, tmp_path: Path) -> None:
    _write_tree(tmp_path / "out", {"DONE": b"", "a.bin": b"a"})
    dest = storage.join(store_root, "out")
    storage.publish_dir(tmp_path / "out", dest, marker="DONE")
    assert storage.is_published(dest, marker="DONE")
    assert not storage.is_published(dest)


def test_publish_dir_without_the_marker_file_uploads_nothing(store_root: str, tmp_path: Path) -> None:
    _write_tree(tmp_path / "out", {"a.bin": b"a"})
    dest = storage.join(store_root, "out")
    with pytest.raises(StorageError, match=r"manifest\.json: missing; write the marker"):
        storage.publish_dir(tmp_path / "out", dest)
    assert storage.list_files(dest) == []


# ---------------------------------------------------------------------------- read cache


def test_cached_path_downloads_once_and_then_serves_the_local_copy(s3_bucket: str, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/ckpt/best.pt"
    storage.write_bytes(uri, b"weights")
    first = storage.cached_path(uri, cache_dir=tmp_path / "cache")
    storage.delete(uri)  # a second download would now fail

    second = storage.cached_path(uri, cache_dir=tmp_path / "cache")

    assert second == first
    assert second.read_bytes() == b"weights"
    assert second.name == "best.pt"


def test_cached_path_defaults_to_the_cache_dir_from_env(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAM3PIPE_CACHE", str(tmp_path / "env-cache"))
    storage.write_bytes(f"{s3_bucket}/x.bin", b"x")
    assert storage.cached_path(f"{s3_bucket}/x.bin").is_relative_to(tmp_path / "env-cache")


def test_cached_path_accepts_a_matching_sha256(s3_bucket: str, tmp_path: Path) -> None:
    storage.write_bytes(f"{s3_bucket}/x.bin", b"weights")
    path = storage.cached_path(f"{s3_bucket}/x.bin", tmp_path / "cache", sha256=storage.sha256_bytes(b"weights"))
    assert path.read_bytes() == b"weights"


def test_cached_path_rejects_a_sha256_mismatch_and_removes_the_download(s3_bucket: str, tmp_path: Path) -> None:
    storage.write_bytes(f"{s3_bucket}/x.bin", b"tampered")
    with pytest.raises(StorageError, match="sha256 mismatch"):
        storage.cached_path(f"{s3_bucket}/x.bin", tmp_path / "cache", sha256=storage.sha256_bytes(b"weights"))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_cached_path_replaces_a_corrupt_cached_copy(s3_bucket: str, tmp_path: Path) -> None:
    storage.write_bytes(f"{s3_bucket}/x.bin", b"weights")
    path = storage.cached_path(f"{s3_bucket}/x.bin", tmp_path / "cache")
    path.write_bytes(b"bit rot")
    again = storage.cached_path(f"{s3_bucket}/x.bin", tmp_path / "cache", sha256=storage.sha256_bytes(b"weights"))
    assert again.read_bytes() == b"weights"


def test_cached_path_returns_local_files_in_place(tmp_path: Path) -> None:
    (tmp_path / "w.pt").write_bytes(b"weights")
    assert storage.cached_path(str(tmp_path / "w.pt")) == tmp_path / "w.pt"
    assert storage.cached_path(f"file://{tmp_path}/w.pt", sha256=storage.sha256_bytes(b"weights")) == tmp_path / "w.pt"


def test_cached_path_checks_the_sha256_of_local_files(tmp_path: Path) -> None:
    (tmp_path / "w.pt").write_bytes(b"weights")
    with pytest.raises(StorageError, match=r"w\.pt: sha256 mismatch"):
        storage.cached_path(str(tmp_path / "w.pt"), sha256=storage.sha256_bytes(b"other"))
    assert (tmp_path / "w.pt").exists()


# ---------------------------------------------------------------------------- the backend seam


class MemoryBackend(storage.Backend):
    """A whole storage scheme in one small class: objects in a dict, ``mem://bucket/key``."""

    remote = True

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.reads = 0
        self.fail_on: str | None = None

    def check(self, uri: str, *, need_key: bool = True) -> None:
        if need_key and not uri.split("://", 1)[1].partition("/")[2]:
            raise StorageError(f"{uri}: no key")

    def join(self, base: str, segments: list[str]) -> str:
        return "/".join([base.rstrip("/"), *segments])

    def read_bytes(self, uri: str) -> bytes:
        self.reads += 1
        if uri not in self.objects:
            raise KeyError(uri)
        return self.objects[uri]

    def write_bytes(self, uri: str, data: bytes) -> None:
        if self.fail_on and uri.endswith(self.fail_on):
            raise OSError(f"refused {uri}")
        self.objects[uri] = bytes(data)

    def exists(self, uri: str) -> bool:
        return uri in self.objects

    def size(self, uri: str) -> int:
        return len(self.read_bytes(uri))

    def list_files(self, prefix: str) -> list[str]:
        folder = prefix.rstrip("/") + "/"
        return sorted(uri[len(folder) :] for uri in self.objects if uri.startswith(folder))

    def upload_file(self, path: Path, uri: str) -> None:
        self.write_bytes(uri, path.read_bytes())

    def download_file(self, uri: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.read_bytes(uri))

    def copy(self, src: str, dst: str) -> None:
        self.write_bytes(dst, self.read_bytes(src))

    def delete(self, uri: str) -> None:
        self.objects.pop(uri, None)

    def delete_prefix(self, prefix: str) -> None:
        for rel in self.list_files(prefix):
            self.delete(self.join(prefix, [rel]))

    def explain(self, exc: BaseException) -> str:
        return "no such object" if isinstance(exc, KeyError) else str(exc)

    def failures(self) -> tuple[type[BaseException], ...]:
        return (KeyError, OSError)


@pytest.fixture
def mem() -> MemoryBackend:
    backend = MemoryBackend()
    storage.register_backend("mem", backend)
    return backend


def test_a_new_scheme_is_one_backend_class_and_gets_publish_and_rollback(mem: MemoryBackend, tmp_path: Path) -> None:
    _write_tree(tmp_path / "ok", {"manifest.json": b"{}", "frames/0.jpg": b"a", "train.json": b"[]"})
    storage.publish_dir(tmp_path / "ok", "mem://bucket/datasets/ok")
    assert storage.is_published("mem://bucket/datasets/ok")
    assert storage.list_files("mem://bucket/datasets/ok") == ["frames/0.jpg", "manifest.json", "train.json"]

    _write_tree(tmp_path / "bad", {"manifest.json": b"{}", "frames/0.jpg": b"a", "train.json": b"[]"})
    mem.fail_on = "train.json"
    with pytest.raises(StorageError, match=r"mem://bucket/datasets/bad/train\.json: write failed: refused"):
        storage.publish_dir(tmp_path / "bad", "mem://bucket/datasets/bad")
    assert storage.list_files("mem://bucket/datasets/bad") == []


def test_a_new_scheme_is_read_through_the_caches(mem: MemoryBackend, tmp_path: Path) -> None:
    storage.write_bytes("mem://bucket/ckpt.pt", b"weights")
    assert storage.cached_path("mem://bucket/ckpt.pt", tmp_path / "cache").read_bytes() == b"weights"
    with pytest.raises(StorageError, match="mem://bucket/nope: read failed: no such object"):
        storage.read_bytes("mem://bucket/nope")


# ---------------------------------------------------------------------------- bounded read cache


def test_the_read_cache_stays_within_its_size_and_evicts_the_least_recently_used(
    mem: MemoryBackend, tmp_path: Path
) -> None:
    cache = storage.ReadCache(tmp_path / "cache", max_bytes=1000)
    for i in range(8):
        storage.write_bytes(f"mem://bucket/f{i}", bytes([i]) * 300)
    cache.read_bytes("mem://bucket/f0")
    for i in range(1, 8):
        cache.read_bytes(f"mem://bucket/f{i}")
        cache.read_bytes("mem://bucket/f0")  # f0 stays the most recently used
    held = cache.sweep()
    assert held <= 1000
    reads = mem.reads
    assert cache.read_bytes("mem://bucket/f0") == bytes([0]) * 300 and mem.reads == reads, "f0 was evicted"
    assert cache.read_bytes("mem://bucket/f1") == bytes([1]) * 300 and mem.reads == reads + 1, "f1 was kept"


def test_the_read_cache_serves_hits_without_the_store_and_checks_sha256(mem: MemoryBackend, tmp_path: Path) -> None:
    cache = storage.ReadCache(tmp_path / "cache", max_bytes=10_000)
    storage.write_bytes("mem://bucket/frame.jpg", b"jpeg bytes")
    digest = storage.sha256_bytes(b"jpeg bytes")
    assert cache.read_bytes("mem://bucket/frame.jpg", digest) == b"jpeg bytes"
    storage.delete("mem://bucket/frame.jpg")
    assert cache.read_bytes("mem://bucket/frame.jpg", digest) == b"jpeg bytes"
    storage.write_bytes("mem://bucket/other.jpg", b"tampered")
    with pytest.raises(StorageError, match=r"other\.jpg: sha256 mismatch after download"):
        cache.read_bytes("mem://bucket/other.jpg", digest)


def test_an_object_larger_than_the_whole_cache_is_read_but_not_kept(mem: MemoryBackend, tmp_path: Path) -> None:
    cache = storage.ReadCache(tmp_path / "cache", max_bytes=10)
    storage.write_bytes("mem://bucket/big", b"x" * 100)
    assert cache.read_bytes("mem://bucket/big") == b"x" * 100
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------------------- failing fast


class _Status(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's status and counts them."""

    def _answer(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def status_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """An S3 endpoint on 127.0.0.1 that answers every request with ``server.status`` (set by the test)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    server.hits, server.status = 0, 503  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    use_s3_server(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}", tmp_path)
    yield server
    server.shutdown()
    server.server_close()


def test_transient_errors_are_retried_a_bounded_number_of_times(status_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAM3PIPE_S3_MAX_ATTEMPTS", "3")
    with pytest.raises(StorageError, match="s3://b/k: existence check failed"):
        storage.exists("s3://b/k")
    assert status_server.hits == 3


def test_errors_that_are_not_transient_are_not_retried(status_server) -> None:
    status_server.status = 403
    with pytest.raises(StorageError, match="access denied"):
        storage.exists("s3://b/k")
    assert status_server.hits == 1


def test_no_retry_starts_past_the_total_deadline(status_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAM3PIPE_S3_MAX_ATTEMPTS", "10")
    monkeypatch.setenv("SAM3PIPE_S3_DEADLINE_S", "0.05")  # shorter than the first backoff
    with pytest.raises(StorageError):
        storage.exists("s3://b/k")
    assert status_server.hits == 1


def test_a_refused_connection_says_how_often_it_was_tried(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("SAM3PIPE_S3_MAX_ATTEMPTS", "2")
    with pytest.raises(StorageError, match=r"cannot reach the S3 endpoint .* after 2 attempt\(s\)"):
        storage.read_bytes(f"{s3_bucket}/k")


@pytest.mark.parametrize("value", ["not a url", "ftp://store:21", "http://", "http://minio:port"])
def test_a_malformed_endpoint_url_is_a_named_config_error(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with pytest.raises(ConfigError, match=rf"environment variable AWS_ENDPOINT_URL={value!r}: "):
        storage.read_bytes("s3://bucket/key")


def test_a_store_path_through_a_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "store").write_text("a file")
    with pytest.raises(StorageError, match=rf"delete failed: {tmp_path / 'store'} is a file, not a folder"):
        storage.delete(str(tmp_path / "store" / "datasets" / "manifest.json"))
