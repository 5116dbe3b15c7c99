"""The Parquet layout of preprocessed videos: one place for column names and shapes.

A preprocessed dataset directory ``OUT`` holds:

- ``OUT/shards/*.parquet``: one row per successfully processed video (columns below).
- ``OUT/manifest/*.parquet``: one row per input video: ok or failed, with the reason.
- ``OUT/classes.json``: the class names, index = 0-based label.

Everything is plain Parquet with JPEG bytes, readable by pyarrow, DuckDB or Spark without stm.
"""

from __future__ import annotations

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

# --- manifest columns (one row per input video) ----------------------------------------------
STATUS = "status"  # string: "ok" | "failed"
ERROR = "error"  # string, the reason for a failed video, "" for ok ones
SHARD = "shard"  # string, the shard file name (relative to OUT/shards) holding an ok video

# --- flow quantisation (Feichtenhofer et al.; Simonyan & Zisserman) -------------------------
FLOW_BOUND = 20.0  # displacements are clipped to +-20 px before quantisation
FLOW_CENTER = 128.0  # uint8 value of zero motion used to centre the flow input
