"""Where videos come from: split-file parsers (UCF101, HMDB51) and folder-per-class (the synthetic
dataset of ``stm.data.synthetic`` is read as a UCF101-style split).

Every source yields a ``Listing``: the class names (index = 0-based label) and one ``VideoItem``
per input video, with the 1-based split numbers that train or test on it. A video that a split
file lists but that is not on disk is still an item (``missing`` holds the reason), so the job
records it as failed instead of dropping it silently.

``root`` and split directories are local paths or URIs (``s3://...``), listed through pyarrow's
filesystems.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from stm.config import SOURCES, UsageError
from stm.storage import join, resolve

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoItem:
    """One input video."""

    video_id: str  # unique, "<class>/<file name without extension>"
    path: str  # local path or URI of the file ("" when missing)
    label: int  # 0-based class index
    class_name: str
    train_splits: tuple[int, ...]  # 1-based split numbers that train on this video
    test_splits: tuple[int, ...]  # 1-based split numbers that test on this video
    missing: str = ""  # why the file is absent (listed in a split file, not on disk)


@dataclass(frozen=True)
class Listing:
    """The videos of a dataset and its class names (index = label)."""

    classes: tuple[str, ...]
    items: tuple[VideoItem, ...]
    num_splits: int


def list_videos(source: str, root: str, splits: str | None = None) -> Listing:
    """List the videos of ``source`` (one of ``SOURCES``) under ``root``.

    Args:
        source: "ucf101", "hmdb51", "folder" or "synthetic".
        root: the video folder (local path or URI).
        splits: the folder holding the split files (UCF101: classInd.txt, trainlist0k.txt,
            testlist0k.txt; HMDB51: <class>_test_split{k}.txt). Defaults to ``root``.
    """
    _require_dir(root, "--root")
    if source == "ucf101":
        return read_ucf101(root, splits or root)
    if source == "hmdb51":
        return read_hmdb51(root, splits or root)
    if source == "folder":
        return read_folder(root)
    if source == "synthetic":
        return read_ucf101(root, root)
    raise UsageError(f"unknown source {source!r} (valid: {', '.join(SOURCES)})")


# --- files ----------------------------------------------------------------------------------------
def _require_dir(uri: str, what: str) -> None:
    try:
        fs, path = resolve(uri)
        kind = fs.get_file_info(path).type
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} {uri}: {' '.join(str(e).split())}") from e
    if kind != pafs.FileType.Directory:
        raise UsageError(f"{what} {uri} is not an existing directory")


def _list_files(root: str) -> list[str]:
    """Relative '/'-separated paths of all non-hidden files under ``root``."""
    fs, base = resolve(root)
    base = base.rstrip("/")
    out = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base) + 1 :].replace("\\", "/")
        if not any(part.startswith(".") for part in rel.split("/")):
            out.append(rel)
    return sorted(out)


class _FileIndex:
    """Case-insensitive lookup of listed file names among the files under a root.

    Split files and archives disagree on case (UCF101 lists HandstandPushups/v_HandStandPushups_*);
    a path is matched on its lower-cased relative path, else on its lower-cased base name when that
    is unique (archives extracted flat).
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._by_path: dict[str, str] = {}
        by_name: dict[str, list[str]] = {}
        for rel in _list_files(root):
            self._by_path.setdefault(rel.lower(), rel)
            by_name.setdefault(posixpath.basename(rel).lower(), []).append(rel)
        self._by_name = {k: v[0] for k, v in by_name.items() if len(v) == 1}

    def find(self, listed: str) -> str | None:
        key = listed.replace("\\", "/").strip("/").lower()
        return self._by_path.get(key) or self._by_name.get(posixpath.basename(key))


def _find_file(directory: str, name: str) -> str | None:
    """The URI of the file ``name`` (case-insensitive) directly in ``directory``, or None."""
    fs, base = resolve(directory)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return None
    for info in fs.get_file_info(pafs.FileSelector(base)):
        if info.type == pafs.FileType.File and info.base_name.lower() == name.lower():
            return join(directory, info.base_name)
    return None


def _read_lines(uri: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines; tolerates CRLF, BOM, trailing spaces."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        text = f.read().decode("utf-8-sig", errors="replace")
    return [(i, s.strip()) for i, s in enumerate(text.splitlines(), 1) if s.strip()]


def _stem(rel: str) -> str:
    return posixpath.splitext(posixpath.basename(rel))[0]


# --- UCF101 ---------------------------------------------------------------------------------------
def read_ucf101(root: str, splits: str) -> Listing:
    """UCF101-style splits: classInd.txt ("1 ApplyEyeMakeup", 1-based), trainlist0k.txt
    ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1") and testlist0k.txt (no label).

    Labels become 0-based. File names match case-insensitively. A listed video that is not under
    ``root`` becomes an item with ``missing`` set.
    """
    _require_dir(splits, "--splits")
    class_file = _find_file(splits, "classInd.txt")
    if class_file is None:
        raise UsageError(f"classInd.txt not found in {splits}")
    classes: list[str] = []
    for lineno, line in _read_lines(class_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(classes) + 1:
            raise UsageError(f"{class_file}:{lineno}: expected '{len(classes) + 1} ClassName'")
        classes.append(parts[1])
    if not classes:
        raise UsageError(f"{class_file} lists no classes")
    by_lower = {c.lower(): i for i, c in enumerate(classes)}

    lists: list[tuple[int, str, str]] = []  # (split, "train" | "test", uri)
    for k in range(1, 10):
        train = _find_file(splits, f"trainlist{k:02d}.txt")
        test = _find_file(splits, f"testlist{k:02d}.txt")
        if train is None and test is None:
            break
        if train is None or test is None:
            raise UsageError(
                f"split {k}: found only one of trainlist{k:02d}.txt, testlist{k:02d}.txt"
            )
        lists += [(k, "train", train), (k, "test", test)]
    if not lists:
        raise UsageError(f"trainlist01.txt / testlist01.txt not found in {splits}")

    entries: dict[str, dict] = {}  # lower-cased listed path -> fields
    for split, kind, uri in lists:
        for lineno, line in _read_lines(uri):
            parts = line.split()
            listed = parts[0].replace("\\", "/")
            if kind == "train":
                if len(parts) != 2 or not parts[1].isdigit():
                    raise UsageError(f"{uri}:{lineno}: expected 'Class/video.avi label'")
                label = int(parts[1]) - 1
                if not 0 <= label < len(classes):
                    raise UsageError(f"{uri}:{lineno}: label {parts[1]} not in classInd.txt")
            else:
                folder = posixpath.dirname(listed).lower()
                if folder not in by_lower:
                    raise UsageError(f"{uri}:{lineno}: class folder of {listed!r} not in classInd")
                label = by_lower[folder]
            entry = entries.setdefault(
                listed.lower(), {"listed": listed, "label": label, "train": [], "test": []}
            )
            entry[kind].append(split)
    index = _FileIndex(root)
    return Listing(tuple(classes), _items(entries, classes, index), len(lists) // 2)


def _items(entries: dict[str, dict], classes: list[str], index: _FileIndex) -> tuple:
    items = []
    for entry in entries.values():
        found = index.find(entry["listed"])
        name = classes[entry["label"]]
        stem = _stem(found or entry["listed"])
        items.append(
            VideoItem(
                video_id=f"{name}/{stem}",
                path=join(index.root, found) if found else "",
                label=entry["label"],
                class_name=name,
                train_splits=tuple(sorted(set(entry["train"]))),
                test_splits=tuple(sorted(set(entry["test"]))),
                missing=""
                if found
                else f"listed in the split files but not found: {entry['listed']}",
            )
        )
    return tuple(sorted(items, key=lambda it: it.video_id))


# --- HMDB51 ---------------------------------------------------------------------------------------
_HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<k>\d+)\.txt$", re.IGNORECASE)


def read_hmdb51(root: str, splits: str) -> Listing:
    """HMDB51 splits: "<class>_test_split{k}.txt" with lines "name.avi tag" where tag 1 = train,
    2 = test, 0 = unused in that split. Classes sorted by name; videos under ``root/<class>/``.
    """
    _require_dir(splits, "--splits")
    fs, base = resolve(splits)
    files: list[tuple[str, int, str]] = []
    for info in fs.get_file_info(pafs.FileSelector(base)):
        m = _HMDB_SPLIT.match(info.base_name)
        if info.type == pafs.FileType.File and m:
            files.append((m["cls"], int(m["k"]), join(splits, info.base_name)))
    if not files:
        raise UsageError(f"no <class>_test_split<k>.txt files in {splits}")
    classes = sorted({c for c, _, _ in files})
    num_splits = max(k for _, k, _ in files)
    entries: dict[str, dict] = {}
    for cls, k, uri in sorted(files):
        for lineno, line in _read_lines(uri):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise UsageError(f"{uri}:{lineno}: expected 'video.avi 0|1|2'")
            listed = f"{cls}/{parts[0]}"
            entry = entries.setdefault(
                listed.lower(),
                {"listed": listed, "label": classes.index(cls), "train": [], "test": []},
            )
            if parts[1] == "1":
                entry["train"].append(k)
            elif parts[1] == "2":
                entry["test"].append(k)
    return Listing(tuple(classes), _items(entries, classes, _FileIndex(root)), num_splits)


# --- folder per class -----------------------------------------------------------------------------
FOLDER_TEST_PERCENT = 20  # share of videos (by group) in the test set of the folder source's split
_UCF_CLIP = re.compile(r"(_g\d+)_c\d+$", re.IGNORECASE)


def folder_split_is_test(video_id: str) -> bool:
    """The deterministic split of the folder source: test when a hash of the video's group is in
    the bottom ``FOLDER_TEST_PERCENT`` percent.

    The group is the video id with a UCF101-style clip suffix removed ("v_X_g08_c03" -> "v_X_g08"),
    so clips cut from one recording never land on both sides; otherwise it is the video id.
    """
    group = _UCF_CLIP.sub(r"\1", video_id)
    digest = hashlib.sha1(group.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < FOLDER_TEST_PERCENT


def read_folder(root: str) -> Listing:
    """``root/<class>/<video>`` (nested folders allowed): classes sorted by name, one split
    (``folder_split_is_test``). Every non-hidden file is an input; one that is not a video is
    recorded as failed, not skipped.
    """
    files = [rel for rel in _list_files(root) if "/" in rel]  # files at the top level are no videos
    classes = sorted({rel.split("/", 1)[0] for rel in files})
    if not classes:
        raise UsageError(f"no <class>/<video> files under {root}")
    items = []
    for rel in files:
        cls = rel.split("/", 1)[0]
        video_id = posixpath.splitext(rel)[0]
        test = folder_split_is_test(video_id)
        items.append(
            VideoItem(
                video_id=video_id,
                path=join(root, rel),
                label=classes.index(cls),
                class_name=cls,
                train_splits=() if test else (1,),
                test_splits=(1,) if test else (),
            )
        )
    ids = [it.video_id for it in items]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise UsageError(f"two files share the video id {dup!r} (same name, other extension)")
    return Listing(tuple(classes), tuple(items), 1)
