"""Storage: local paths or URIs (``s3://``, ``gs://``, ``file://``) through pyarrow's filesystems,
atomic writes, and small text/JSON files. Every file stm writes that a reader may see half
written goes through ``write_bytes_atomic``.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path

import pyarrow.fs as pafs

TMP_PREFIX = ".tmp-"  # in-flight files: ".tmp-<uuid>-<name>.tmp", skipped by every reader


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a local path or a URI."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    """Join a local path or a URI with relative parts ('/'-separated for URIs); a URI's query
    string (``s3://bucket/prefix?region=us-east-1``) stays at the end."""
    if "://" in uri:
        base, sep, query = uri.partition("?")
        return posixpath.join(base, *parts) + sep + query
    return os.path.join(uri, *parts)


def is_object_store(fs: pafs.FileSystem) -> bool:
    """Object stores publish an upload in one step; other filesystems need temp + rename."""
    return fs.type_name in ("s3", "gcs", "abfs")


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing/the old file or all of it."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if is_object_store(fs):  # an object appears only once its upload completes
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = _tmp_path(path)
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)  # rename(2): atomic on POSIX, replaces an existing file
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)


def write_json_atomic(fs: pafs.FileSystem, path: str, obj: object) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_bytes_atomic(fs, path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(fs: pafs.FileSystem, path: str) -> object | None:
    """Read a JSON file, or None when it does not exist."""
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _tmp_path(path: str) -> str:
    head, name = posixpath.split(path)
    return posixpath.join(head, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}.tmp")


def absolute(path: str) -> str:
    """A URI as it is (without a trailing slash), a local path made absolute: Ray workers and
    Tune trials run in other directories."""
    if "://" in path:
        base, sep, query = path.partition("?")
        return base.rstrip("/") + sep + query
    return str(Path(path).resolve())


def read_text(uri: str) -> str | None:
    """A small text file's content, or None when it cannot be read."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def write_text(uri: str, text: str) -> None:
    """Write a small text file atomically (its folder made first)."""
    fs, path = resolve(uri)
    write_bytes_atomic(fs, path, text.encode())
