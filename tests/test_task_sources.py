"""Tasks from data (``sane_ray.zoo.task_sources``): every source, normalization, val carving, bad inputs."""

from __future__ import annotations

import io
import json
import logging
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sane_ray import storage
from sane_ray.zoo.task_sources import ClassMismatch, TaskDataError, check_task, load_task
from sane_ray.zoo.tasks import TASKS, Normalization, get_task

SPLITS = ("train", "val", "test")
HF_NAMES = {"train": "train", "val": "validation", "test": "test"}


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """60 scikit-learn digits as uint8 (N, 8, 8): per class 3 train, 1 val, 2 test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    picks = np.concatenate([np.flatnonzero(d.target == c)[:6] for c in range(10)])
    x = np.round(d.images[picks] * 255 / 16).astype(np.uint8)
    y, k = d.target[picks].astype(np.int64), np.tile(np.arange(6), 10)
    masks = {"train": k < 3, "val": k == 3, "test": k >= 4}
    return {f"{a}_{s}": (x if a == "x" else y)[m] for s, m in masks.items() for a in "xy"}


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_npz(path, arrays: dict) -> str:
    np.savez(path, **arrays)
    return str(path)


def write_folder(root, arrays: dict, splits=SPLITS) -> str:
    for s in splits:
        for i, (img, label) in enumerate(zip(arrays[f"x_{s}"], arrays[f"y_{s}"])):
            d = root / s / f"digit{label}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:03d}.png").write_bytes(png(img))
    return str(root)


def image_table(arrays: dict, split: str, image="image", label="label", struct=True) -> pa.Table:
    data = [png(img) for img in arrays[f"x_{split}"]]
    images = pa.array([{"bytes": b, "path": None} for b in data], pa.struct([("bytes", pa.binary()),
                                                                              ("path", pa.string())]))
    return pa.table({image: images if struct else pa.array(data, pa.binary()),
                     label: pa.array(arrays[f"y_{split}"], pa.int64())})


def write_hf(root, arrays: dict, names: int = 10) -> str:
    """A DatasetDict as ``datasets.DatasetDict.save_to_disk`` writes it (Arrow stream files)."""
    root.mkdir()
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(HF_NAMES.values())}))
    features = {"image": {"_type": "Image"}, "label": {"names": [str(i) for i in range(names)], "_type": "ClassLabel"}}
    for split, name in HF_NAMES.items():
        (root / name).mkdir()
        table = image_table(arrays, split)
        with pa.ipc.new_stream(str(root / name / "data-00000-of-00001.arrow"), table.schema) as w:
            for batch in table.to_batches(max_chunksize=7):
                w.write_batch(batch)
        (root / name / "dataset_info.json").write_text(json.dumps({"features": features}))
        (root / name / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                            "_split": name}))
    return str(root)


def assert_one_line(excinfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def assert_same_task(a, b) -> None:
    assert (a.num_classes, a.input_shape, a.normalization) == (b.num_classes, b.input_shape, b.normalization)
    for s in SPLITS:
        assert torch.equal(a.split(s).x, b.split(s).x) and torch.equal(a.split(s).y, b.split(s).y), s


# ---------------------------------------------------------------- sources


def test_registered_names_unchanged():
    for name in TASKS:
        a, b = load_task(name), get_task(name)
        assert_same_task(a, b)
        assert a.name == name
    norm = get_task("digits").normalization
    assert norm.divisor == 16.0 and norm.stats == "train" and len(norm.mean) == len(norm.std) == 1
    assert json.loads(json.dumps(norm.to_dict()))["mean"] == list(norm.mean)
    with pytest.raises(ValueError, match="own normalization"):
        load_task("digits", normalize="train")


def test_npz_uint8_scaled_like_to_tensor(tmp_path, digits):
    task = load_task(write_npz(tmp_path / "d.npz", digits))
    assert (task.input_shape, task.num_classes, task.normalization) == ((1, 8, 8), 10, Normalization(255.0))
    assert (len(task.train), len(task.val), len(task.test)) == (30, 10, 20)
    expected = torch.from_numpy(digits["x_test"]).float().div(255).unsqueeze(1)
    assert torch.equal(task.test.x, expected) and task.test.x.dtype == torch.float32
    assert torch.equal(task.test.y, torch.from_numpy(digits["y_test"]))


def test_npz_nhwc_float_nchw_and_declared_classes(tmp_path, digits):
    rgb = {k: np.stack([v, v // 2, 255 - v], axis=-1) if k.startswith("x") else v for k, v in digits.items()}
    task = load_task(write_npz(tmp_path / "rgb.npz", {**rgb, "num_classes": 12}))
    assert task.input_shape == (3, 8, 8) and task.num_classes == 12
    assert torch.equal(task.train.x[:, 1], torch.from_numpy(digits["x_train"] // 2).float() / 255)
    floats = {k: (v[:, None] / 7.0).astype(np.float32) if k.startswith("x") else v for k, v in digits.items()}
    task = load_task(write_npz(tmp_path / "f.npz", floats))
    assert torch.equal(task.val.x, torch.from_numpy(floats["x_val"])) and task.normalization == Normalization()


def test_normalization_given_and_train(tmp_path, digits):
    path = write_npz(tmp_path / "d.npz", digits)
    task = load_task(path, mean=[0.5], std=[0.25])
    assert torch.equal(task.val.x, (torch.from_numpy(digits["x_val"]).float().div(255).unsqueeze(1) - 0.5) / 0.25)
    assert task.normalization == Normalization(255.0, (0.5,), (0.25,), "given")
    task = load_task(path, normalize="train")
    assert abs(float(task.train.x.mean())) < 1e-5 and abs(float(task.train.x.std(correction=0)) - 1) < 1e-4
    raw = digits["x_train"] / 255.0
    assert task.normalization.stats == "train" and task.normalization.mean == pytest.approx((raw.mean(),))
    assert task.normalization.std == pytest.approx((raw.std(),))


def test_image_folder_round_trips_to_npz(tmp_path, digits):
    folder = load_task(write_folder(tmp_path / "folder", digits))
    npz = load_task(write_npz(tmp_path / "d.npz", digits))
    assert_same_task(folder, npz)
    assert torch.equal(folder.train.x.mul(255).round().to(torch.uint8).squeeze(1), torch.from_numpy(digits["x_train"]))


def test_image_folder_rgb_and_jpeg(tmp_path):
    for split in ("train", "test"):
        for c in ("b_cat", "a_dog"):
            d = tmp_path / "rgb" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (6, 4), (10 * i, 100, 200)).save(d / f"{i}.jpg")
    task = load_task(str(tmp_path / "rgb"))
    assert task.input_shape == (3, 4, 6) and task.num_classes == 2
    assert task.test.y.tolist() == [0, 0, 0, 1, 1, 1]  # a_dog sorts first


def test_hf_save_to_disk(tmp_path, digits):
    hf = load_task(write_hf(tmp_path / "hf", digits))
    assert_same_task(hf, load_task(write_npz(tmp_path / "d.npz", digits)))
    assert load_task(write_hf(tmp_path / "hf12", digits, names=12)).num_classes == 12  # ClassLabel names


def test_parquet_layouts_and_columns(tmp_path, digits):
    npz = load_task(write_npz(tmp_path / "d.npz", digits))
    flat = tmp_path / "flat"
    flat.mkdir()
    for split, name in HF_NAMES.items():
        pq.write_table(image_table(digits, split), flat / f"{name}-00000-of-00001.parquet", row_group_size=8)
    assert_same_task(load_task(str(flat)), npz)
    nested = tmp_path / "nested"
    for split in ("train", "test"):
        (nested / split).mkdir(parents=True)
        pq.write_table(image_table(digits, split, "pixels", "target", struct=False), nested / split / "part-0.parquet")
    task = load_task(str(nested), image_column="pixels", label_column="target")
    assert (len(task.train), len(task.val), len(task.test)) == (24, 6, 20)  # val carved from train


def test_npz_and_parquet_over_s3(s3, tmp_path, digits):
    uri = f"s3://{s3['bucket']}/tasks/d.npz"
    storage.write_bytes_atomic(uri, open(write_npz(tmp_path / "d.npz", digits), "rb").read())
    assert_same_task(load_task(uri), load_task(str(tmp_path / "d.npz")))
    for split, name in HF_NAMES.items():
        buf = io.BytesIO()
        pq.write_table(image_table(digits, split), buf)
        storage.write_bytes_atomic(f"s3://{s3['bucket']}/pq/{name}.parquet", buf.getvalue())
    assert_same_task(load_task(f"s3://{s3['bucket']}/pq"), load_task(str(tmp_path / "d.npz")))


def test_val_carved_stratified_deterministic_disjoint(tmp_path, caplog):
    y = np.repeat(np.arange(4), [10, 10, 5, 6])
    arrays = {"x_train": np.arange(len(y), dtype=np.float32).reshape(-1, 1, 1, 1), "y_train": y,
              "x_test": np.zeros((4, 1, 1, 1), np.float32), "y_test": np.arange(4)}
    path = write_npz(tmp_path / "noval.npz", arrays)
    with caplog.at_level(logging.INFO, logger="sane_ray.zoo.task_sources"):
        a = load_task(path, split_seed=3)
    assert "no val split; carved 6 of 31" in caplog.text
    b, c = load_task(path, split_seed=3), load_task(path, split_seed=4)
    ids = {s: a.split(s).x.flatten().long() for s in ("train", "val")}
    assert torch.equal(a.val.x, b.val.x) and not torch.equal(a.val.x, c.val.x)
    assert not set(ids["train"].tolist()) & set(ids["val"].tolist())
    assert sorted(ids["train"].tolist() + ids["val"].tolist()) == list(range(len(y)))
    assert torch.equal(a.val.y, torch.from_numpy(y[ids["val"].numpy()]))
    assert torch.bincount(a.val.y).tolist() == [2, 2, 1, 1]  # 20% of each class (6 of 31 in all)


def test_entry_point(tmp_path, monkeypatch, digits):
    (tmp_path / "my_tasks.py").write_text(
        "import numpy as np\n"
        "from sane_ray.zoo.tasks import get_task\n"
        f"DATA = dict(np.load({str(write_npz(tmp_path / 'd.npz', digits))!r}))\n"
        "def arrays():\n    return DATA\n"
        "def task():\n    return get_task('digits_transposed')\n"
        "def nothing():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert_same_task(load_task("my_tasks:arrays"), load_task(str(tmp_path / "d.npz")))
    assert_same_task(load_task("my_tasks:task"), get_task("digits_transposed"))
    with pytest.raises(TaskDataError) as e:
        load_task("my_tasks:nothing")
    assert_one_line(e, "my_tasks:nothing", "int")
    with pytest.raises(TaskDataError) as e:
        load_task("my_tasks:missing")
    assert_one_line(e, "my_tasks:missing", "no missing")
    sys.modules.pop("my_tasks", None)


def test_check_task_shapes_and_classes():
    task = get_task("digits")
    assert check_task(task, (1, 8, 8), 10, "digits") is None
    with pytest.raises(TaskDataError) as e:
        load_task("digits", expect_shape=(3, 32, 32))
    assert_one_line(e, "digits", "(1, 8, 8)", "(3, 32, 32)")
    with pytest.raises(TaskDataError) as e:
        check_task(task, (1, 8, 8), 100, "digits")
    assert_one_line(e, "digits", "10 classes", "100 outputs")
    assert check_task(task, None, 100, "digits", allow_new_classes=True) == ClassMismatch(10, 100)
    assert load_task("digits", expect_classes=100, allow_new_classes=True).num_classes == 10


# ---------------------------------------------------------------- bad inputs: one line naming the file


def bad(spec: str, *needles: str, **kwargs) -> None:
    with pytest.raises(TaskDataError) as e:
        load_task(spec, **kwargs)
    assert_one_line(e, *needles)


def test_bad_npz(tmp_path, digits):
    data = open(write_npz(tmp_path / "d.npz", digits), "rb").read()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    bad(str(tmp_path / "cut.npz"), "cut.npz", "not a readable .npz")
    bad(str(tmp_path / "absent.npz"), "absent.npz", "no such file")
    no_test = {k: v for k, v in digits.items() if k != "y_test"}
    bad(write_npz(tmp_path / "missing.npz", no_test), "missing.npz", "missing y_test")
    no_y_val = {k: v for k, v in digits.items() if k != "y_val"}
    bad(write_npz(tmp_path / "half_val.npz", no_y_val), "half_val.npz", "missing y_val")
    empty = {**digits, "x_val": digits["x_val"][:0], "y_val": digits["y_val"][:0]}
    bad(write_npz(tmp_path / "empty.npz", empty), "empty.npz", "val split is empty")
    bad(write_npz(tmp_path / "labels.npz", {**digits, "y_test": digits["y_test"] + 1}), "labels.npz",
        "test split has label 10 outside [0, 10)")
    bad(write_npz(tmp_path / "neg.npz", {**digits, "y_val": digits["y_val"] - 1}), "neg.npz", "val", "label -1")
    bad(write_npz(tmp_path / "len.npz", {**digits, "y_train": digits["y_train"][:-1]}), "len.npz",
        "x_train has 30 samples but y_train has 29")
    bad(write_npz(tmp_path / "size.npz", {**digits, "x_test": digits["x_test"][:, :7]}), "size.npz",
        "(1, 7, 8)", "(1, 8, 8)")
    bad(str(tmp_path / "d.npz"), "d.npz", "(1, 8, 8)", "(3, 32, 32)", expect_shape=(3, 32, 32))
    bad(str(tmp_path / "d.npz"), "d.npz", "10 classes", "100 outputs", expect_classes=100)


def test_bad_image_folder(tmp_path, digits):
    root = tmp_path / "f"
    write_folder(root, digits)
    broken = root / "train" / "digit3" / "broken.png"
    broken.write_bytes(b"not a png")
    bad(str(root), "broken.png", "not a readable image")
    broken.unlink()
    odd = root / "test" / "digit5" / "odd.png"
    odd.write_bytes(png(np.zeros((9, 8), np.uint8)))
    bad(str(root), "odd.png", "9x8", "8x8")
    odd.unlink()
    (root / "test" / "digit11").mkdir()
    (root / "test" / "digit11" / "x.png").write_bytes(png(digits["x_test"][0]))
    bad(str(root), str(root / "test"), "'digit11'")
    bad(write_folder(tmp_path / "no_test", digits, splits=("train", "val")), "no_test", "no test split")
    bad(str(tmp_path / "nowhere"), "nowhere", "no such file or directory", "digits")


def test_bad_tables(tmp_path, digits):
    hf = write_hf(tmp_path / "hf5", digits, names=5)
    bad(hf, "hf5", "train split has label 5 outside [0, 5)")
    arrow = tmp_path / "hf5" / "test" / "data-00000-of-00001.arrow"
    arrow.write_bytes(arrow.read_bytes()[:100])
    bad(hf, str(arrow), "not a readable arrow file")
    root = tmp_path / "pq"
    root.mkdir()
    for split in ("train", "test"):
        pq.write_table(image_table(digits, split), root / f"{split}.parquet")
    (root / "test.parquet").write_bytes(b"PAR1 garbage")
    bad(str(root), "test.parquet", "not a readable parquet file")
    pq.write_table(image_table(digits, "test", label="y"), root / "test.parquet")
    bad(str(root), "test.parquet", "no label column 'label' or 'labels'", "columns: image, y")
