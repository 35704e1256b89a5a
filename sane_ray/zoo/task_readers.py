"""Readers of image data sets stored as files, for :mod:`sane_ray.zoo.task_sources`.

Three directory layouts the user may already have, each read into uint8 images (N, H, W, C)
and int64 labels per split, the same arrays an ``.npz`` task holds:

* an image folder ``DIR/{train,val,test}/<class name>/*.png|jpg|jpeg``;
* a Hugging Face ``save_to_disk`` DatasetDict (Arrow IPC *stream* files, read with pyarrow,
  so ``datasets`` is not needed);
* Parquet files ``train*.parquet``, ``val*``/``validation*``, ``test*`` or ``{train,val,test}/*.parquet``.

Images are decoded one at a time (a table batch at a time) into one buffer per split, so
the raw bytes of the whole data set are never held beside the decoded images. Every bad
input raises one :class:`~sane_ray.zoo.tasks.TaskDataError` line naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import posixpath
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from sane_ray import storage
from sane_ray.zoo.tasks import TASK_SPLITS, TaskDataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
BATCH_ROWS = 256
GRAY_MODES = {"1", "L", "LA"}
COLOR_MODES = {"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}

Arrays = dict[str, np.ndarray]  # x_train, y_train, ... as in an .npz task
Ref = tuple[tuple[int, ...], str]  # the first image's (H, W, C) and where it came from


def read_directory(uri: str, s3: storage.S3Options | None, image_column: str | None = None,
                   label_column: str | None = None) -> tuple[Arrays, int | None]:
    """The splits under directory ``uri`` and the class count the data declares (None: from the labels)."""
    files = storage.find(uri, s3)
    columns = (image_column, label_column)
    if "dataset_dict.json" in files:
        return _read_hf(uri, files, s3, columns)
    if any(f.endswith(".parquet") for f in files):
        return _read_parquet(uri, files, s3, columns), None
    return _read_folder(uri, files, s3)


class _Stack:
    """Decoded images of one split in one growing uint8 buffer, all of the reference shape (H, W, C)."""

    def __init__(self, capacity: int, ref: Ref | None) -> None:
        self.capacity, self.ref, self.n = max(capacity, 1), ref, 0
        self.buf: np.ndarray | None = None

    def add(self, image: np.ndarray, where: str) -> None:
        if self.ref is None:
            self.ref = (image.shape, where)
        if image.shape != self.ref[0]:
            raise TaskDataError(f"{where}: image is {_hwc(image.shape)} but {self.ref[1]} is {_hwc(self.ref[0])};"
                                " all images of a task need one size and channel count")
        if self.buf is None:
            self.buf = np.empty((self.capacity, *image.shape), np.uint8)
        elif self.n == len(self.buf):
            self.buf = np.concatenate([self.buf, np.empty_like(self.buf)])
        self.buf[self.n] = image
        self.n += 1

    def array(self) -> np.ndarray:
        assert self.buf is not None, "no image added"
        return self.buf[:self.n]


def _hwc(shape: tuple[int, ...]) -> str:
    h, w, c = shape
    return f"{h}x{w} with {c} channel(s)"


def decode_image(data: bytes, where: str) -> np.ndarray:
    """An encoded image as uint8 (H, W, C): grayscale keeps one channel, everything else becomes RGB."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
            known = mode in GRAY_MODES or mode in COLOR_MODES
            arr = np.asarray(im.convert("L" if mode in GRAY_MODES else "RGB")) if known else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise TaskDataError(f"{where}: not a readable image ({e})") from None
    if arr is None:
        raise TaskDataError(f"{where}: unsupported image mode {mode} (use 8-bit grayscale or RGB)")
    return arr[..., None] if arr.ndim == 2 else arr


def _require_splits(uri: str, present: set[str], layout: str) -> None:
    missing = [s for s in ("train", "test") if s not in present]
    if missing:
        raise TaskDataError(f"{uri}: no {' and no '.join(missing)} split (expected {layout})")


# ---------------------------------------------------------------- image folder


def _read_folder(uri: str, files: list[str], s3: storage.S3Options | None) -> tuple[Arrays, int]:
    """``DIR/<split>/<class>/<image>``: classes sorted by name; val and test may lack some of train's."""
    items: dict[str, list[tuple[str, str]]] = {s: [] for s in TASK_SPLITS}  # split -> (class, relative path)
    for rel in files:
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] in items and parts[2].lower().endswith(IMAGE_SUFFIXES):
            items[parts[0]].append((parts[1], rel))
    _require_splits(uri, {s for s, v in items.items() if v}, "DIR/{train,val,test}/<class>/*.png|jpg|jpeg, "
                    "a Hugging Face save_to_disk directory or Parquet files")
    classes = sorted({c for c, _ in items["train"]})
    for split in ("val", "test"):
        extra = sorted({c for c, _ in items[split]} - set(classes))
        if extra:
            raise TaskDataError(f"{storage.join(uri, split)}: class {extra[0]!r} has no images in train "
                                f"(train has {len(classes)} classes)")
    index = {c: i for i, c in enumerate(classes)}
    arrays: Arrays = {}
    ref: Ref | None = None
    for split, found in items.items():
        if not found:
            continue
        stack = _Stack(len(found), ref)
        for _, rel in found:
            path = storage.join(uri, rel)
            stack.add(decode_image(storage.read_bytes(path, s3), path), path)
        arrays[f"x_{split}"], ref = stack.array(), stack.ref
        arrays[f"y_{split}"] = np.array([index[c] for c, _ in found], np.int64)
    return arrays, len(classes)


# ---------------------------------------------------------------- tables (Hugging Face Arrow, Parquet)


def split_of(name: str) -> str | None:
    """The split a file or split name belongs to: its base name's prefix, else the innermost directory's."""
    for part in reversed(name.split("/")):
        for split in TASK_SPLITS:
            if part.startswith(split):
                return split
    return None


def _read_hf(uri: str, files: list[str], s3: storage.S3Options | None,
             columns: tuple[str | None, str | None]) -> tuple[Arrays, int | None]:
    """A DatasetDict saved by ``save_to_disk``: ``dataset_dict.json`` lists the splits, one directory each."""
    listed = _json(storage.join(uri, "dataset_dict.json"), s3).get("splits") or []
    dirs: dict[str, str] = {}
    for name in listed:
        split = split_of(name)
        if split is None or split in dirs:
            log.warning("%s: ignoring split %r (not train, val/validation or test, or a second one)", uri, name)
            continue
        dirs[split] = name
    _require_splits(uri, set(dirs), f"dataset_dict.json to list them; it lists {', '.join(listed) or 'none'}")
    arrays: Arrays = {}
    ref: Ref | None = None
    for split, name in dirs.items():
        shards = sorted(storage.join(uri, f) for f in files
                        if posixpath.dirname(f) == name and posixpath.basename(f).startswith("data-")
                        and f.endswith(".arrow"))
        if not shards:
            raise TaskDataError(f"{storage.join(uri, name)}: no data-*.arrow files for split {name!r}")
        arrays[f"x_{split}"], arrays[f"y_{split}"], ref = _table_split(
            shards, lambda u, pick: _arrow_batches(u, s3, pick), 0, columns, ref)
    return arrays, _hf_num_classes(uri, dirs["train"], files, s3, columns[1])


def _hf_num_classes(uri: str, split: str, files: list[str], s3: storage.S3Options | None,
                    label_column: str | None) -> int | None:
    """The class count of the ClassLabel feature in the split's ``dataset_info.json``, if it has one."""
    if f"{split}/dataset_info.json" not in files:
        return None
    features = _json(storage.join(uri, split, "dataset_info.json"), s3).get("features") or {}
    name = label_column or next((c for c in LABEL_COLUMNS if c in features), None)
    feature = features.get(name) if isinstance(features.get(name), dict) else {}
    if feature.get("_type") != "ClassLabel":
        return None
    return len(feature["names"]) if feature.get("names") else feature.get("num_classes")


def _json(uri: str, s3: storage.S3Options | None) -> dict:
    try:
        return json.loads(storage.read_bytes(uri, s3))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{uri}: not valid JSON ({e})") from None


def _read_parquet(uri: str, files: list[str], s3: storage.S3Options | None,
                  columns: tuple[str | None, str | None]) -> Arrays:
    """Parquet files assigned to splits by name (``train*``, ``val*``/``validation*``, ``test*``, or their directory)."""
    shards: dict[str, list[str]] = {s: [] for s in TASK_SPLITS}
    for rel in files:
        if rel.endswith(".parquet"):
            split = split_of(rel)
            if split is None:
                log.warning("%s: ignoring %s (its name says no split: train, val/validation or test)", uri, rel)
            else:
                shards[split].append(storage.join(uri, rel))
    _require_splits(uri, {s for s, v in shards.items() if v},
                    "train*.parquet, val*.parquet (optional), test*.parquet or DIR/{train,val,test}/*.parquet")
    arrays: Arrays = {}
    ref: Ref | None = None
    for split, found in shards.items():
        if found:
            capacity = sum(_parquet_rows(u, s3) for u in found)
            arrays[f"x_{split}"], arrays[f"y_{split}"], ref = _table_split(
                found, lambda u, pick: _parquet_batches(u, s3, pick), capacity, columns, ref)
    return arrays


Pick = Callable[[pa.Schema], list[str]]


@contextlib.contextmanager
def _reading(uri: str) -> Iterator[None]:
    """pyarrow's and the storage's read errors as one TaskDataError line naming ``uri``."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        raise TaskDataError(f"{uri}: not a readable {posixpath.splitext(uri)[1][1:]} file ({e})") from None


def _arrow_batches(uri: str, s3: storage.S3Options | None, pick: Pick) -> Iterator[pa.RecordBatch]:
    fs, path = storage.pyarrow_fs(uri, s3)
    with fs.open_input_stream(path) as f:
        reader = pa.ipc.open_stream(f)
        names = pick(reader.schema)
        for batch in reader:
            yield batch.select(names)


def _parquet_batches(uri: str, s3: storage.S3Options | None, pick: Pick) -> Iterator[pa.RecordBatch]:
    fs, path = storage.pyarrow_fs(uri, s3)
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f)
        yield from table.iter_batches(batch_size=BATCH_ROWS, columns=pick(table.schema_arrow))


def _parquet_rows(uri: str, s3: storage.S3Options | None) -> int:
    fs, path = storage.pyarrow_fs(uri, s3)
    with _reading(uri), fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _table_split(shards: list[str], batches: Callable[[str, Pick], Iterator[pa.RecordBatch]], capacity: int,
                 columns: tuple[str | None, str | None], ref: Ref | None) -> tuple[np.ndarray, np.ndarray, Ref]:
    """One split's images and labels from its table files, a batch at a time."""
    stack, labels = _Stack(capacity or BATCH_ROWS, ref), []
    for uri in shards:
        row = 0
        with _reading(uri):
            for batch in batches(uri, lambda schema: _pick_columns(uri, schema, *columns)):
                for data in _image_bytes(batch.column(0)):
                    where = f"{uri} row {row}"
                    if data is None:
                        raise TaskDataError(f"{where}: no image bytes (images stored by path only are not supported)")
                    stack.add(decode_image(data, where), where)
                    row += 1
                labels.append(_labels(uri, batch.column(1)))
    if not stack.n:
        raise TaskDataError(f"{shards[0]}: the split is empty (no rows)")
    return stack.array(), np.concatenate(labels), stack.ref


def _pick_columns(uri: str, schema: pa.Schema, image_column: str | None, label_column: str | None) -> list[str]:
    """The image and label column names, checked to hold image bytes and integer labels."""
    image = _find_column(uri, schema.names, image_column, IMAGE_COLUMNS, "image")
    label = _find_column(uri, schema.names, label_column, LABEL_COLUMNS, "label")
    kind = schema.field(image).type
    if pa.types.is_struct(kind):
        kind = kind.field("bytes").type if kind.get_field_index("bytes") >= 0 else kind
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise TaskDataError(f"{uri}: column {image!r} is {schema.field(image).type}, not image bytes "
                            "(binary, or a struct with a binary 'bytes' field)")
    if not pa.types.is_integer(schema.field(label).type):
        raise TaskDataError(f"{uri}: column {label!r} is {schema.field(label).type}, not integer labels")
    return [image, label]


def _find_column(uri: str, names: list[str], given: str | None, defaults: tuple[str, ...], what: str) -> str:
    wanted = (given,) if given else defaults
    found = next((c for c in wanted if c in names), None)
    if found is None:
        raise TaskDataError(f"{uri}: no {what} column {' or '.join(map(repr, wanted))} "
                            f"(columns: {', '.join(names)}); name it with {what}_column")
    return found


def _image_bytes(column: pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(column.type):  # the Hugging Face Image feature: {bytes, path}
        column = column.field("bytes")
    return column.to_pylist()


def _labels(uri: str, column: pa.Array) -> np.ndarray:
    if column.null_count:
        raise TaskDataError(f"{uri}: {column.null_count} missing label(s)")
    return column.to_numpy(zero_copy_only=False).astype(np.int64)
