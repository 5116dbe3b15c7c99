"""The Parquet layout of preprocessed videos: one place for column names and shapes.

A preprocessed dataset directory ``OUT`` holds:

- ``OUT/shards/*.parquet``: one row per successfully processed video (columns below).
- ``OUT/manifest/*.parquet``: one row per input video: ok, failed or retry, with the reason.
- ``OUT/classes.json``: the class names, index = 0-based label.
- ``OUT/dataset.json``: how it was made (source, flow algorithm, short side, splits, counts).
- ``OUT/_preprocess.lock``: while a preprocessing run works on ``OUT`` (host, pid, heartbeat).

Everything is plain Parquet with JPEG bytes, readable by pyarrow, DuckDB or Spark without stm.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import uuid
import zlib
from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stm import storage
from stm.config import JPEG_QUALITY
from stm.storage import join, read_json, resolve

logger = logging.getLogger(__name__)

# --- shard columns (one row per video) -------------------------------------------------------
VIDEO_ID = "video_id"  # string, unique within the dataset (relative path without extension)
LABEL = "label"  # int32, 0-based class index
CLASS_NAME = "class_name"  # string
NUM_FRAMES = "num_frames"  # int32, N decoded RGB frames (the container's count is never used)
FPS = "fps"  # float32, the source's average frame rate
HEIGHT = "height"  # int32, frame height after resizing (short side = --short-side)
WIDTH = "width"  # int32, frame width after resizing
RGB = "rgb"  # list<binary>, N colour JPEGs (RGB frames, HxWx3 once decoded)
FLOW_U = "flow_u"  # list<binary>, N-1 grayscale JPEGs; flow k is from frame k to k+1
FLOW_V = "flow_v"  # list<binary>, N-1 grayscale JPEGs; uint8 q = round(255 * (v + 20) / 40)
TRAIN_SPLITS = "train_splits"  # list<int8>, the split numbers (1-based) that train on this video
TEST_SPLITS = "test_splits"  # list<int8>, the split numbers (1-based) that test on this video
# list<uint32>: zlib.crc32 of each JPEG of rgb / flow_u / flow_v, written at preprocessing and
# checked by every reader before it decodes a JPEG (null in shards written before checksums)
RGB_CRC32 = "rgb_crc32"
FLOW_U_CRC32 = "flow_u_crc32"
FLOW_V_CRC32 = "flow_v_crc32"

# --- manifest columns (one row per input video) ----------------------------------------------
# string: "ok" | "failed" | "retry". failed: the video itself could not be processed (it does
# not decode, ...): a rerun skips it unless --retry-failed. retry: it failed for a reason not about
# the video (its group's task was lost, a full disk, out of memory, a network error): it counts
# as failed in that run's summary, and a plain rerun processes it again
STATUS = "status"
ERROR = "error"  # string, the reason for a failed (or retry) video, "" for ok ones
SHARD = "shard"  # string, the shard file name (relative to OUT/shards) holding an ok video

# --- flow quantisation (Feichtenhofer et al.; Simonyan & Zisserman) -------------------------
FLOW_BOUND = 20.0  # displacements are clipped to +-20 px before quantisation
FLOW_CENTER = 128.0  # uint8 value of zero motion used to centre the flow input

# --- file layout ------------------------------------------------------------------------------
SHARDS_DIR = "shards"  # OUT/shards/part-<hash>.parquet
MANIFEST_DIR = "manifest"  # OUT/manifest/part-<hash>.parquet (same name as its shard file)
CLASSES_FILE = "classes.json"  # ["ClassA", "ClassB", ...], index = label
DATASET_FILE = "dataset.json"  # source, flow algorithm, short side, number of splits, counts
UNREADABLE_DIR = "unreadable"  # OUT/unreadable/<dir>-<name>: files a rerun found unreadable
JPEG_COLUMNS = (RGB, FLOW_U, FLOW_V)  # written uncompressed (see write_table_atomic)
CHECKSUMS = {RGB: RGB_CRC32, FLOW_U: FLOW_U_CRC32, FLOW_V: FLOW_V_CRC32}  # JPEG column -> its crc32

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_RETRY = "retry"


# --- Arrow schemas ----------------------------------------------------------------------------
SHARD_SCHEMA = pa.schema(
    [
        pa.field(VIDEO_ID, pa.string(), nullable=False),
        pa.field(LABEL, pa.int32(), nullable=False),
        pa.field(CLASS_NAME, pa.string(), nullable=False),
        pa.field(NUM_FRAMES, pa.int32(), nullable=False),
        pa.field(FPS, pa.float32(), nullable=False),
        pa.field(HEIGHT, pa.int32(), nullable=False),
        pa.field(WIDTH, pa.int32(), nullable=False),
        pa.field(RGB, pa.list_(pa.binary()), nullable=False),
        pa.field(FLOW_U, pa.list_(pa.binary()), nullable=False),
        pa.field(FLOW_V, pa.list_(pa.binary()), nullable=False),
        pa.field(TRAIN_SPLITS, pa.list_(pa.int8()), nullable=False),
        pa.field(TEST_SPLITS, pa.list_(pa.int8()), nullable=False),
        pa.field(RGB_CRC32, pa.list_(pa.uint32()), nullable=True),
        pa.field(FLOW_U_CRC32, pa.list_(pa.uint32()), nullable=True),
        pa.field(FLOW_V_CRC32, pa.list_(pa.uint32()), nullable=True),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field(VIDEO_ID, pa.string(), nullable=False),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(ERROR, pa.string(), nullable=False),
        pa.field(SHARD, pa.string(), nullable=False),
    ]
)


# --- JPEG -------------------------------------------------------------------------------------
def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Encode an RGB (H, W, 3) or grayscale (H, W) uint8 image as JPEG bytes."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # OpenCV writes BGR
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {image.shape}")
    return buf.tobytes()


def decode_jpeg(data: bytes, gray: bool = False) -> np.ndarray:
    """Decode JPEG bytes to RGB (H, W, 3) uint8, or to (H, W) uint8 when ``gray``."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if gray:
        image = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    else:
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a decodable JPEG")
    return image if gray else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_table_atomic(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write a Parquet file atomically (see ``write_bytes_atomic``).

    Each video gets its own row group, so a reader can fetch one video without the others.
    The JPEG columns (``JPEG_COLUMNS``) are stored uncompressed: zstd saves almost nothing on
    JPEG bytes and costs a decompression on every read; the other columns are zstd. (Readers
    take the codec from each file, so shards written with zstd everywhere read as before.)
    ``ParquetStreamWriter`` writes the same file one video at a time.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=1, compression=_compression(table.schema))
    storage.write_bytes_atomic(fs, path, sink.getvalue().to_pybytes())


def _compression(schema: pa.Schema) -> dict[str, str]:
    return {name: "none" if name in JPEG_COLUMNS else "zstd" for name in schema.names}


class ParquetStreamWriter:
    """A Parquet file written one table at a time (each row its own row group, the compression
    of ``write_table_atomic``) that appears at ``path`` only once complete (``commit``).

    Local filesystems: the file is written under a temp name in ``path``'s folder
    (``storage.TMP_PREFIX``) and renamed; a process killed before ``commit`` leaves only the
    temp file (``stm.data.preprocess`` deletes such leftovers). Object stores: written straight
    to ``path``; an object appears only when its upload completes, so a killed process leaves
    nothing. ``via_temp=True`` writes through a temp name on object stores too (``commit``
    then copies it over ``path``): for rewriting a file while reading it. The file is opened at
    the first ``write``: without one, ``commit`` writes nothing. As a context manager: ``commit``
    on success, ``abort`` on an exception.
    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        path: str,
        schema: pa.Schema | None = None,
        via_temp: bool | None = None,
    ) -> None:
        self.fs, self.path = fs, path
        self.schema = SHARD_SCHEMA if schema is None else schema
        self.via_temp = not storage.is_object_store(fs) if via_temp is None else via_temp
        self._target: str | None = None  # the temp file (local) or the object being uploaded
        self._sink = None
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append ``table``'s rows, one row group each."""
        if self._writer is None:
            self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
            if not self.via_temp:
                self._target = self.path
            else:
                head, name = posixpath.split(self.path)
                self._target = posixpath.join(
                    head, f"{storage.TMP_PREFIX}{uuid.uuid4().hex}-{name}.tmp"
                )
            self._sink = self.fs.open_output_stream(self._target)
            self._writer = pq.ParquetWriter(
                self._sink, self.schema, compression=_compression(self.schema)
            )
        self._writer.write_table(table, row_group_size=1)
        self.rows += table.num_rows

    def commit(self) -> bool:
        """Finish the file and publish it at ``path``; False when nothing was written."""
        if self._writer is None:
            return False
        try:
            self._writer.close()
            self._sink.close()
            if self._target != self.path:
                # rename(2), atomic on POSIX; object stores: a copy, which replaces the object
                # in one step, then a delete
                self.fs.move(self._target, self.path)
        except BaseException:
            self.abort()
            raise
        self._writer = self._sink = self._target = None
        return True

    def abort(self) -> None:
        """Drop what was written (never raises)."""
        if self._writer is None:
            return
        for close in (self._writer.close, self._sink.close):
            with contextlib.suppress(Exception):  # the write failed already: clean up only
                close()  # an S3 upload completes here: the object is deleted below
        try:
            if self.fs.get_file_info(self._target).type != pafs.FileType.NotFound:
                self.fs.delete_file(self._target)
        except Exception as e:  # noqa: BLE001 - a leftover temp file is deleted by the next run
            logger.warning("could not delete %s: %s", self._target, e)
        self._writer = self._sink = self._target = None

    def __enter__(self) -> ParquetStreamWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def list_parquet(fs: pafs.FileSystem, directory: str) -> list[str]:
    """The finished Parquet files of a directory (in-flight temp files are skipped), sorted."""
    if fs.get_file_info(directory).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=False))
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and not i.base_name.startswith((".", "_"))
    )


# --- readers ----------------------------------------------------------------------------------
def shards_dataset(out: str) -> pads.Dataset:
    """The shards of a preprocessed dataset ``out`` as a pyarrow dataset (one row per video)."""
    fs, root = resolve(out)
    return pads.dataset(
        list_parquet(fs, posixpath.join(root, SHARDS_DIR)),
        schema=SHARD_SCHEMA,
        filesystem=fs,
        format="parquet",
    )


def read_manifest(out: str) -> pa.Table:
    """The manifest of ``out``: one row per input video (video_id, status, error, shard)."""
    fs, root = resolve(out)
    files = list_parquet(fs, posixpath.join(root, MANIFEST_DIR))
    if not files:
        return MANIFEST_SCHEMA.empty_table()
    return pads.dataset(files, schema=MANIFEST_SCHEMA, filesystem=fs, format="parquet").to_table()


def read_classes(out: str) -> list[str]:
    """The class names of ``out`` (index = label)."""
    fs, root = resolve(out)
    classes = read_json(fs, posixpath.join(root, CLASSES_FILE))
    if classes is None:
        raise FileNotFoundError(f"{join(out, CLASSES_FILE)} does not exist")
    return list(classes)


def read_dataset_info(out: str) -> dict:
    """The description of ``out`` written by the preprocessing job (``dataset.json``)."""
    fs, root = resolve(out)
    info = read_json(fs, posixpath.join(root, DATASET_FILE))
    if info is None:
        raise FileNotFoundError(f"{join(out, DATASET_FILE)} does not exist")
    return dict(info)


def in_split(table: pa.Table, split: int, train: bool) -> np.ndarray:
    """A boolean mask over ``table``'s rows: the videos that train (or test) on ``split`` (1-based).

    ``table`` needs the ``train_splits`` / ``test_splits`` column, e.g.
    ``t = shards_dataset(out).to_table(columns=[VIDEO_ID, TRAIN_SPLITS])``.
    """
    column = table.column(TRAIN_SPLITS if train else TEST_SPLITS).combine_chunks()
    parents = pc.list_parent_indices(column).to_numpy()
    values = pc.list_flatten(column).to_numpy()
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[parents[values == split]] = True
    return mask


def shard_rows(rows: Sequence[dict]) -> pa.Table:
    """Build a shard table (``SHARD_SCHEMA``) from row dicts; the checksum columns are computed
    here from the JPEG lists when a row lacks them."""
    full = []
    for row in rows:
        sums = {c: row.get(c) or checksums(row[jpegs]) for jpegs, c in CHECKSUMS.items()}
        full.append({**row, **sums})
    return pa.Table.from_pylist(full, schema=SHARD_SCHEMA)


# --- integrity --------------------------------------------------------------------------------
class CorruptVideo(ValueError):
    """A stored video whose bytes disagree with their checksums, or that does not decode."""

    def __init__(self, video_id: str, problem: str):
        super().__init__(f"{video_id}: {problem}")
        self.video_id, self.problem = video_id, problem


def checksums(jpegs: Sequence) -> list[int]:
    """zlib.crc32 of each JPEG (bytes or any buffer, e.g. a ``pyarrow.Buffer``)."""
    return [zlib.crc32(j) for j in jpegs]


def check_jpeg(video_id: str, column: str, index: int, data, expected: int | None) -> None:
    """Raise ``CorruptVideo`` when JPEG ``column[index]`` disagrees with its checksum
    (``expected``; None: the shard predates checksums, nothing to compare) or does not start
    with a JPEG's start-of-image marker (what a device decoder is given is checked here)."""
    if expected is not None and zlib.crc32(data) != int(expected):
        raise CorruptVideo(video_id, f"{column}[{index}] does not match its checksum")
    if bytes(memoryview(data)[:2]) != JPEG_SOI:
        raise CorruptVideo(video_id, f"{column}[{index}] is not a JPEG")


JPEG_SOI = b"\xff\xd8"  # the first two bytes of every JPEG


def row_problem(row: Mapping) -> str | None:
    """What is wrong with a stored row, or None: list lengths that disagree with num_frames, or
    a JPEG that disagrees with its checksum. Rows without checksums are decoded instead (the
    only check they allow). ``row``: a shard row as ``to_pylist`` gives it."""
    n = int(row[NUM_FRAMES])
    for column, length in ((RGB, n), (FLOW_U, n - 1), (FLOW_V, n - 1)):
        jpegs, sums = row[column], row.get(CHECKSUMS[column])
        if len(jpegs) != length:
            return f"{column} holds {len(jpegs)} JPEGs, not {length}"
        if sums is not None and len(sums) != length:
            return f"{CHECKSUMS[column]} holds {len(sums)} checksums, not {length}"
        for k, data in enumerate(jpegs):
            if sums is not None:
                if zlib.crc32(data) != sums[k]:
                    return f"{column}[{k}] does not match its checksum"
            elif cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None:
                return f"{column}[{k}] is not a decodable JPEG"
    return None
