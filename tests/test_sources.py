"""Sources: UCF101 / HMDB51 split files with their quirks, folder-per-class, synthetic videos."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from stm.config import UsageError
from stm.data.decode import decode_video
from stm.data.sources import folder_split_is_test, list_videos
from stm.data.synthetic import (
    SYNTHETIC_CLASSES,
    generate_synthetic,
    render_synthetic,
    synthetic_scene,
)


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def write(path: Path, lines: list[str], newline: str = "\r\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(newline.join(lines).encode() + newline.encode())


@pytest.fixture
def ucf(tmp_path: Path) -> tuple[Path, Path]:
    """A UCF101-like tree with the official archive's quirks: CRLF, trailing spaces, a class
    folder and file names whose case differs from the split files, a listed file that is absent."""
    videos, splits = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    touch(videos / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g01_c01.avi")
    touch(videos / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi")
    touch(videos / "HandstandPushups" / "v_HandStandPushups_g01_c01.avi")
    touch(videos / "HandstandPushups" / "v_HandStandPushups_g08_c02.avi")
    write(splits / "classInd.txt", ["1 ApplyEyeMakeup ", "2 HandstandPushups  "])
    write(
        splits / "trainlist01.txt",
        [
            "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1 ",
            "HandstandPushups/v_HandstandPushups_g08_c02.avi 2",
            "",
        ],
    )
    write(
        splits / "testlist01.txt",
        [
            "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
            "HandstandPushups/v_HandstandPushups_g01_c01.avi ",
            "HandstandPushups/v_HandstandPushups_g02_c01.avi",  # listed, not on disk
        ],
    )
    write(splits / "trainlist02.txt", ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1"], "\n")
    write(splits / "testlist02.txt", ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"], "\n")
    return videos, splits


def test_ucf101_split_files(ucf: tuple[Path, Path]) -> None:
    videos, splits = ucf
    listing = list_videos("ucf101", str(videos), str(splits))
    assert listing.classes == ("ApplyEyeMakeup", "HandstandPushups")
    assert listing.num_splits == 2
    items = {it.video_id: it for it in listing.items}
    assert len(items) == 5

    a = items["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01"]
    assert (a.label, a.train_splits, a.test_splits) == (0, (2,), (1,))
    assert a.path == os.path.join(videos, "ApplyEyeMakeup", "v_ApplyEyeMakeup_g01_c01.avi")

    # case-insensitive match; the id uses the classInd name and the file's real name
    h = items["HandstandPushups/v_HandStandPushups_g08_c02"]
    assert (h.label, h.class_name, h.train_splits, h.test_splits) == (
        1,
        "HandstandPushups",
        (1,),
        (),
    )
    assert h.path.endswith(os.path.join("HandstandPushups", "v_HandStandPushups_g08_c02.avi"))
    assert not h.missing
    assert items["HandstandPushups/v_HandStandPushups_g01_c01"].test_splits == (1,)

    gone = items["HandstandPushups/v_HandstandPushups_g02_c01"]
    assert gone.path == "" and "not found" in gone.missing and gone.label == 1


def test_ucf101_usage_errors(ucf: tuple[Path, Path], tmp_path: Path) -> None:
    videos, splits = ucf
    with pytest.raises(UsageError, match="not an existing directory"):
        list_videos("ucf101", str(tmp_path / "nope"), str(splits))
    with pytest.raises(UsageError, match="classInd.txt not found"):
        list_videos("ucf101", str(videos), str(videos))
    (splits / "testlist02.txt").unlink()
    with pytest.raises(UsageError, match="only one of"):
        list_videos("ucf101", str(videos), str(splits))
    write(splits / "testlist02.txt", ["Nope/v_x.avi"])
    with pytest.raises(UsageError, match=r"testlist02.txt:1: class folder"):
        list_videos("ucf101", str(videos), str(splits))
    with pytest.raises(UsageError, match="unknown source"):
        list_videos("kinetics", str(videos))
    assert issubclass(UsageError, ValueError)


def test_hmdb51_split_files(tmp_path: Path) -> None:
    videos, splits = tmp_path / "hmdb51", tmp_path / "testTrainMulti_7030_splits"
    for cls, names in {"wave": ["w1.avi", "w2.avi"], "brush_hair": ["b1.avi", "B2.avi"]}.items():
        for name in names:
            touch(videos / cls / name)
    tags = {  # split k: {name: tag}
        1: {"w1.avi": 1, "w2.avi": 2, "w3.avi": 1},
        2: {"w1.avi": 2, "w2.avi": 0, "w3.avi": 1},
        3: {"w1.avi": 1, "w2.avi": 1, "w3.avi": 0},
    }
    for k, t in tags.items():
        write(splits / f"wave_test_split{k}.txt", [f"{n} {tag} " for n, tag in t.items()])
        write(splits / f"brush_hair_test_split{k}.txt", ["b1.avi 1 ", "b2.avi 2 "])
    listing = list_videos("hmdb51", str(videos), str(splits))
    assert listing.classes == ("brush_hair", "wave")  # sorted
    assert listing.num_splits == 3
    items = {it.video_id: it for it in listing.items}
    assert set(items) == {"brush_hair/b1", "brush_hair/B2", "wave/w1", "wave/w2", "wave/w3"}
    w1, w2 = items["wave/w1"], items["wave/w2"]
    assert (w1.label, w1.train_splits, w1.test_splits) == (1, (1, 3), (2,))
    assert (w2.train_splits, w2.test_splits) == ((3,), (1,))  # tag 0: unused in split 2
    assert items["brush_hair/B2"].test_splits == (1, 2, 3) and not items["brush_hair/B2"].missing
    assert items["wave/w3"].missing and items["wave/w3"].train_splits == (1, 2)
    with pytest.raises(UsageError, match="_test_split"):
        list_videos("hmdb51", str(videos), str(videos))


def test_folder_source_and_its_deterministic_split(tmp_path: Path) -> None:
    for rel in ["b/x.mp4", "a/v_A_g01_c01.avi", "a/v_A_g01_c02.avi", "a/sub/y.mkv", "a/.hidden"]:
        touch(tmp_path / rel)
    touch(tmp_path / "readme.txt")  # top-level files are not videos of a class
    listing = list_videos("folder", str(tmp_path))
    assert listing.classes == ("a", "b") and listing.num_splits == 1
    ids = [it.video_id for it in listing.items]
    assert ids == ["a/sub/y", "a/v_A_g01_c01", "a/v_A_g01_c02", "b/x"]
    for it in listing.items:
        assert it.label == listing.classes.index(it.class_name)
        assert sorted(it.train_splits + it.test_splits) == [1]
        assert bool(it.test_splits) == folder_split_is_test(it.video_id)
    # clips of one UCF-style group land on the same side; about 20% of groups are test
    assert folder_split_is_test("a/v_A_g01_c01") == folder_split_is_test("a/v_A_g01_c02")
    share = np.mean([folder_split_is_test(f"c/video_{i}") for i in range(2000)])
    assert 0.17 < share < 0.23


def test_synthetic_identities_differ_only_in_hue() -> None:
    """Grayscale (what flow sees) is the same for both identities; colour is not. A frame alone
    does not show the motion: the object's position is uniform over the frame (it wraps)."""
    scene = synthetic_scene(0, width=48, height=32, num_frames=6)
    other = dataclasses.replace(scene, identity="teal" if scene.identity == "red" else "red")
    a, b = render_synthetic(scene), render_synthetic(other)
    gray = [np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in x]).astype(int) for x in (a, b)]
    assert np.abs(gray[0] - gray[1]).max() <= 1
    assert np.abs(a.astype(int) - b).max() > 60
    assert {synthetic_scene(i).motion for i in range(6)} == {"up", "down", "sideways"}
    assert len(SYNTHETIC_CLASSES) == 6


def test_synthetic_videos_are_deterministic(tmp_path: Path) -> None:
    kw = {"num_videos": 7, "width": 48, "height": 32, "num_frames": 5}
    one = generate_synthetic(str(tmp_path / "one"), seed=3, **kw)
    two = generate_synthetic(str(tmp_path / "two"), seed=3, **kw)
    other = generate_synthetic(str(tmp_path / "other"), seed=4, **kw)
    listing = list_videos("synthetic", one)
    assert listing.classes == SYNTHETIC_CLASSES and len(listing.items) == 7
    assert not any(it.test_splits for it in listing.items)  # only the 5th of a class is test
    for it in listing.items:
        assert it.label == SYNTHETIC_CLASSES.index(it.class_name)
        frames = decode_video(it.path).frames
        assert frames.shape == (5, 32, 48, 3)
        same = decode_video(it.path.replace(one, two)).frames
        np.testing.assert_array_equal(frames, same)
    first = listing.items[0].path
    differs = decode_video(first.replace(one, other)).frames.astype(int)
    assert np.abs(differs - decode_video(first).frames).mean() > 5
    # a complete dataset with the same parameters is left alone
    stamp = os.stat(listing.items[0].path).st_mtime_ns
    generate_synthetic(one, seed=3, **kw)
    assert os.stat(listing.items[0].path).st_mtime_ns == stamp
