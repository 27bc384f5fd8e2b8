"""WebDataset shards: round trip, byte-identical rewrites, shard splitting and shard/manifest consistency."""

import errno
import hashlib
import io
import itertools
import os
from pathlib import Path
from unittest.mock import Mock

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sela.data import shards
from sela.data.sources import Sample, decode_image, iter_digit_samples
from sela.data.shards import (
    LoadedShards,
    ShardStore,
    manifest_hash,
    read_manifest,
    read_shards,
    write_shard,
    write_shard_from_files,
    write_shards,
)
from sela.data.tarmembers import sample_member

IMAGE_SIZE = 8


def make_samples(count: int) -> list[Sample]:
    """``count`` noisy images of varying sizes, PNG and JPEG, keys in descending order, some without ground truth."""
    rng = np.random.default_rng(count)
    samples = []
    for position in range(count):
        side = 6 + position % 4  # some need resizing on decode, one size matches IMAGE_SIZE exactly
        pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        extension = "jpg" if position % 2 else "png"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG" if extension == "jpg" else "PNG")
        samples.append(
            Sample(
                key=f"class-{position % 3}/image_{count - position:03d}",
                image=buffer.getvalue(),
                extension=extension,
                ground_truth=None if position % 3 == 2 else f"class {position % 3}",
                source_path=f"memory/{position}",
            )
        )
    return samples


def file_hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def assert_matches(loaded: LoadedShards, samples: list[Sample]) -> None:
    assert loaded.keys == [sample.key for sample in samples]
    assert loaded.ground_truth == [sample.ground_truth for sample in samples]
    assert loaded.images.shape == (len(samples), IMAGE_SIZE, IMAGE_SIZE, 3)
    assert loaded.images.dtype == np.uint8
    for row, sample in enumerate(samples):
        assert np.array_equal(loaded.images[row], decode_image(sample.image, IMAGE_SIZE)), sample.key


def test_round_trip_keeps_keys_pixels_ground_truth_and_write_order(tmp_path: Path) -> None:
    samples = make_samples(7)

    manifest = write_shards(samples, tmp_path / "shards", samples_per_shard=3)
    loaded = read_shards(tmp_path / "shards", IMAGE_SIZE)

    assert_matches(loaded, samples)
    assert len(loaded) == 7
    assert list(manifest.columns) == [
        "index", "key", "shard", "source_path", "ground_truth", "sha256", "width", "height"
    ]
    sides = [6 + position % 4 for position in range(7)]
    assert manifest["width"].tolist() == sides
    assert manifest["height"].tolist() == sides
    assert manifest["index"].tolist() == list(range(7))
    assert manifest["key"].tolist() == [sample.key for sample in samples]
    assert manifest["source_path"].tolist() == [sample.source_path for sample in samples]
    assert manifest["sha256"].tolist() == [hashlib.sha256(sample.image).hexdigest() for sample in samples]
    assert manifest["ground_truth"].isna().tolist() == [sample.ground_truth is None for sample in samples]
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "shards"), manifest)


def test_rows_follow_the_manifest_index_whatever_order_shards_and_rows_are_read_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = make_samples(7)
    output_dir = tmp_path / "shards"
    write_shards(samples, output_dir, samples_per_shard=2)
    # Shuffle the manifest's rows on disk and read the shards last-first: rows must still follow 'index'.
    manifest_path = output_dir / "manifest.parquet"
    table = pq.read_table(manifest_path)
    pq.write_table(table.take([3, 0, 6, 1, 5, 2, 4]), manifest_path)
    in_order = shards.shard_urls
    monkeypatch.setattr(shards, "shard_urls", lambda folder: list(reversed(in_order(folder))))

    assert_matches(read_shards(output_dir, IMAGE_SIZE), samples)


def test_writing_twice_gives_byte_identical_shards_and_manifest(tmp_path: Path) -> None:
    samples = make_samples(5)
    write_shards(samples, tmp_path / "first", samples_per_shard=2)
    first = file_hashes(tmp_path / "first")

    write_shards(samples, tmp_path / "second", samples_per_shard=2)
    write_shards(iter(samples), tmp_path / "first", samples_per_shard=2)  # overwrite in place, from a generator

    shard_files = [f"shard-00000{number}.{extension}" for number in range(3) for extension in ("parquet", "tar")]
    assert list(first) == ["manifest.parquet", *shard_files]
    assert file_hashes(tmp_path / "second") == first
    assert file_hashes(tmp_path / "first") == first
    assert manifest_hash(tmp_path / "second") == first["manifest.parquet"]


@pytest.mark.parametrize(("samples_per_shard", "expected_counts"), [(1, [1] * 7), (3, [3, 3, 1]), (7, [7]), (100, [7])])
def test_samples_per_shard_sets_the_shard_split(
    tmp_path: Path, samples_per_shard: int, expected_counts: list[int]
) -> None:
    output_dir = tmp_path / "shards"
    write_shards(make_samples(7), output_dir, samples_per_shard=1)  # stale shards that must disappear

    manifest = write_shards(make_samples(7), output_dir, samples_per_shard)

    names = [f"shard-{number:06d}.tar" for number in range(len(expected_counts))]
    assert sorted(path.name for path in output_dir.glob("shard-*.tar")) == names
    assert manifest["shard"].value_counts().sort_index().tolist() == expected_counts
    assert manifest.groupby("shard")["index"].min().tolist() == list(itertools.accumulate([0, *expected_counts[:-1]]))


def test_empty_input_raises_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no samples"):
        write_shards([], tmp_path / "shards", samples_per_shard=3)
    assert not (tmp_path / "shards").exists()


def test_duplicate_keys_raise_and_leave_no_partial_output(tmp_path: Path) -> None:
    samples = make_samples(4)
    duplicated = [*samples, Sample(samples[1].key, samples[0].image, "png", None, "memory/again")]

    with pytest.raises(ValueError, match="duplicate key") as raised:
        write_shards(duplicated, tmp_path / "shards", samples_per_shard=2)
    assert "memory/1" in str(raised.value)
    assert "memory/again" in str(raised.value)
    assert list((tmp_path / "shards").iterdir()) == []


@pytest.mark.parametrize("key", ["a.b", "a b", "", "a//b", "/a", "__meta__/a"])
def test_keys_webdataset_cannot_read_back_raise(tmp_path: Path, key: str) -> None:
    sample = Sample(key, make_samples(1)[0].image, "png", None, "memory/0")

    with pytest.raises(ValueError, match="cannot be stored"):
        write_shards([sample], tmp_path / "shards", samples_per_shard=3)


def test_shard_sample_missing_from_manifest_raises(tmp_path: Path) -> None:
    output_dir = tmp_path / "shards"
    write_shards(make_samples(4), output_dir, samples_per_shard=2)
    manifest_path = output_dir / "manifest.parquet"
    pq.write_table(pq.read_table(manifest_path).slice(0, 3), manifest_path)  # drop the last sample's row

    with pytest.raises(ValueError, match="'class-0/image_001' is not in the manifest"):
        read_shards(output_dir, IMAGE_SIZE)


def test_manifest_key_missing_from_shards_raises(tmp_path: Path) -> None:
    output_dir = tmp_path / "shards"
    write_shards(make_samples(4), output_dir, samples_per_shard=4)
    manifest_path = output_dir / "manifest.parquet"
    table = pq.read_table(manifest_path)
    extra_row = table.slice(3, 1).set_column(0, "index", [[4]]).set_column(1, "key", [["class-0/never_written"]])
    pq.write_table(pa.concat_tables([table, extra_row.cast(table.schema)]), manifest_path)

    with pytest.raises(ValueError, match="1 manifest keys are missing from the shards: 'class-0/never_written'"):
        read_shards(output_dir, IMAGE_SIZE)


def test_missing_shard_file_raises(tmp_path: Path) -> None:
    output_dir = tmp_path / "shards"
    write_shards(make_samples(4), output_dir, samples_per_shard=2)
    (output_dir / "shard-000001.tar").unlink()

    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        read_shards(output_dir, IMAGE_SIZE)


def test_digits_round_trip(tmp_path: Path) -> None:
    samples = list(itertools.islice(iter_digit_samples(IMAGE_SIZE), 25))

    write_shards(samples, tmp_path / "shards", samples_per_shard=10)
    loaded = read_shards(tmp_path / "shards", IMAGE_SIZE)

    assert_matches(loaded, samples)
    assert loaded.ground_truth[:10] == [str(digit) for digit in range(10)]


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_shard_from_byte_ranges_of_files_equals_the_shard_from_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool
) -> None:
    members = [sample_member(f"k{index}", "png", bytes([index]) * (100 + 300 * index)) for index in range(4)]
    spool = tmp_path / "spool.bin"
    spool.write_bytes(b"x" * 7 + b"".join(members))
    if not kernel_copy:  # another file system: copy_file_range refuses, the bytes go through read + write
        monkeypatch.setattr(os, "copy_file_range", Mock(side_effect=OSError(errno.EXDEV, "cross-device")))
    columns = {"key": [], "shard": [], "source_path": [], "ground_truth": [], "sha256": [], "width": [], "height": []}
    sizes = [len(member) for member in members]
    ranges = [(str(spool), 7, sizes[0] + sizes[1]), (str(spool), 7 + sizes[0] + sizes[1], sizes[2] + sizes[3])]

    write_shard_from_files(ShardStore(tmp_path / "a"), "shard-000000.tar", ranges, columns)
    write_shard(ShardStore(tmp_path / "b"), "shard-000000.tar", members, columns)
    write_shard_from_files(ShardStore(f"memory://{tmp_path.name}/c"), "shard-000000.tar", ranges, columns)

    expected = (tmp_path / "b" / "shard-000000.tar").read_bytes()
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == expected
    assert ShardStore(f"memory://{tmp_path.name}/c").read_bytes("shard-000000.tar") == expected


def test_a_movable_file_holding_exactly_the_members_becomes_the_shard(tmp_path: Path) -> None:
    members = [sample_member(f"k{index}", "png", bytes([index]) * (100 + 300 * index)) for index in range(3)]
    whole, part = tmp_path / "whole.bin", tmp_path / "part.bin"
    whole.write_bytes(b"".join(members))
    part.write_bytes(b"".join(members) + b"the next shard's members")
    columns = {"key": [], "shard": [], "source_path": [], "ground_truth": [], "sha256": [], "width": [], "height": []}
    length = len(whole.read_bytes())

    write_shard_from_files(ShardStore(tmp_path / "a"), "shard-000000.tar", [(str(whole), 0, length)], columns, True)
    write_shard_from_files(ShardStore(tmp_path / "b"), "shard-000000.tar", [(str(part), 0, length)], columns, True)
    write_shard(ShardStore(tmp_path / "c"), "shard-000000.tar", members, columns)

    expected = (tmp_path / "c" / "shard-000000.tar").read_bytes()
    assert not whole.exists() and (tmp_path / "a" / "shard-000000.tar").read_bytes() == expected  # renamed
    assert part.exists() and (tmp_path / "b" / "shard-000000.tar").read_bytes() == expected  # copied
