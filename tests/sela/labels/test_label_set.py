"""Label sets: round trip through parquet, deterministic bytes, shape checks."""

import hashlib

import numpy as np
import pytest

from sela.labels.label_set import label_table, labels_of_head, read_label_set, write_label_set


def test_round_trip_and_deterministic_bytes(tmp_path):
    keys = [f"img/{i:03d}" for i in range(50)]
    labels = np.random.default_rng(0).integers(0, 10, size=(3, 50))
    confidence = np.random.default_rng(1).random((3, 50)).astype(np.float32)
    table = label_table(keys, labels, confidence, selected_head=2)
    write_label_set(table, tmp_path / "a.parquet")
    write_label_set(label_table(keys, labels, confidence, 2), tmp_path / "b.parquet")
    back = read_label_set(tmp_path / "a.parquet")
    assert back.column("key").to_pylist() == keys
    np.testing.assert_array_equal(labels_of_head(back, 2), labels[2])
    np.testing.assert_array_equal(back.column("label").to_numpy(), labels[2])
    np.testing.assert_array_equal(back.column("confidence_head_1").to_numpy(), confidence[1])
    digest = [hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in ("a.parquet", "b.parquet")]
    assert digest[0] == digest[1]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape mismatch"):
        label_table(["a", "b"], np.zeros((1, 3), int), np.zeros((1, 3)), 0)
    with pytest.raises(ValueError, match="out of range"):
        label_table(["a"], np.zeros((2, 1), int), np.zeros((2, 1)), 2)
