"""Ingest: every file accounted for (sample or quarantine line), byte-identical reruns, incremental, resumable."""

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

import sela.data.ingest
import sela.data.shards
from sela.config import ShardParams
from sela.data.sources import escape_key
from sela.data.ingest import ingest
from sela.data.shards import iter_shard_samples, read_shards, shard_records, shard_urls
from tests.conftest import PROJECT_ROOT, write_folder

MAX_SIDE = 256


def params(source: Path | str, samples_per_shard: int = 4) -> ShardParams:
    return ShardParams(
        source=str(source), image_size=16, samples_per_shard=samples_per_shard, min_side=4, max_side=MAX_SIDE
    )


def encoded(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def noise(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels)


def rotated_jpeg() -> bytes:
    """A 40x20 JPEG, left half black, with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", exif=exif.tobytes())


def sixteen_bit_png() -> bytes:
    values = np.full((8, 8), 257 * 100, dtype=np.uint16)
    values[0, 0] = 65535
    return encoded(Image.fromarray(values), "PNG")


def palette_png() -> bytes:
    return encoded(Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")


GOOD_JPEG = encoded(noise((40, 30), 0), "JPEG", quality=90)
GOOD_PNG = encoded(noise((12, 9), 1), "PNG")
TRUNCATED = encoded(noise((64, 64), 2), "JPEG")
# Relative path -> (bytes, None for a sample or the substring its quarantine reason must hold).
BAD_FOLDER: dict[str, tuple[bytes, str | None]] = {
    "good/photo.jpg": (GOOD_JPEG, "duplicate of"),  # same bytes as 'dup/a original.jpg', which sorts first
    "good/plain.png": (GOOD_PNG, None),
    "broken/truncated.jpg": (TRUNCATED[: len(TRUNCATED) // 2], "corrupt image"),
    "broken/empty.jpg": (b"", "empty file"),
    "broken/text.jpg": (b"just some words, not a JPEG\n", "not an image"),
    "broken/notes.txt": (b"a stray file in the collection\n", "not an image"),
    "broken/image.ppm": (encoded(noise((8, 8), 3), "PPM"), "unsupported format: PPM"),
    "broken/pixel.png": (encoded(Image.new("RGB", (1, 1)), "PNG"), "too small: 1x1"),
    "large/wide.jpg": (encoded(noise((5000, 300), 4), "JPEG"), None),
    "modes/palette.png": (palette_png(), None),
    "modes/rgba.png": (encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"), None),
    "modes/gray.jpg": (encoded(Image.new("L", (8, 8), 77), "JPEG"), None),
    "modes/cmyk.jpg": (encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), None),
    "modes/deep.png": (sixteen_bit_png(), None),
    "modes/rotated.jpg": (rotated_jpeg(), None),
    "formats/x.gif": (encoded(noise((8, 8), 5), "GIF"), None),
    "formats/x.webp": (encoded(noise((8, 8), 6), "WEBP", lossless=True), None),
    "formats/x.tif": (encoded(noise((8, 8), 7), "TIFF"), None),
    "formats/x.bmp": (encoded(noise((8, 8), 8), "BMP"), None),
    "dup/a original.jpg": (GOOD_JPEG, None),
    "names/v1.2.final photo.png": (encoded(noise((8, 8), 9), "PNG"), None),
    "names/café ünï ☃.png": (encoded(noise((8, 8), 10), "PNG"), None),
    "names/.hidden.png": (encoded(noise((8, 8), 11), "PNG"), None),
}


def folder_hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def stored_samples(output: Path) -> dict[str, Image.Image]:
    """Decoded stored image per source path."""
    return {sample.source_path: Image.open(io.BytesIO(sample.image)) for sample in iter_shard_samples(output)}


def test_every_bad_input_is_a_sample_or_a_quarantine_line_with_its_reason(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "images", {relative: data for relative, (data, _) in BAD_FOLDER.items()})

    report = ingest(params(source), str(tmp_path / "shards"), workers=2)

    paths = {f"{source}/{relative}" for relative in BAD_FOLDER}
    sampled = set(report.manifest["source_path"])
    quarantined = dict(zip(report.quarantine["path"], report.quarantine["reason"], strict=True))
    assert len(sampled) + len(quarantined) == len(BAD_FOLDER) == report.inputs
    assert sampled | set(quarantined) == paths
    for relative, (_, reason) in BAD_FOLDER.items():
        path = f"{source}/{relative}"
        if reason is None:
            assert path in sampled, relative
        else:
            assert reason in quarantined[path], (relative, quarantined.get(path))
    assert quarantined[f"{source}/good/photo.jpg"] == f"duplicate of {source}/dup/a original.jpg"
    on_disk = pq.read_table(tmp_path / "shards" / "quarantine.parquet").to_pandas()
    assert on_disk.to_dict("list") == report.quarantine.to_dict("list")
    assert report.manifest["key"].tolist() == sorted(escape_key(relative) for relative in BAD_FOLDER if
                                                     BAD_FOLDER[relative][1] is None)


def test_stored_images_are_rgb_upright_shrunk_and_originals_are_kept_byte_for_byte(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "images", {relative: data for relative, (data, _) in BAD_FOLDER.items()})
    report = ingest(params(source), str(tmp_path / "shards"), workers=1)
    stored = stored_samples(tmp_path / "shards")
    samples = {sample.source_path: sample for sample in iter_shard_samples(tmp_path / "shards")}

    assert all(image.mode == "RGB" for image in stored.values())
    # Valid RGB JPEG/PNG within the size limit: the original bytes, no re-encode.
    assert samples[f"{source}/dup/a original.jpg"].image == GOOD_JPEG
    assert samples[f"{source}/good/plain.png"].image == GOOD_PNG
    # Long side shrunk to max_side, aspect kept; the manifest keeps the original size.
    assert stored[f"{source}/large/wide.jpg"].size == (MAX_SIDE, round(300 * MAX_SIDE / 5000))
    row = report.manifest.set_index("source_path").loc[f"{source}/large/wide.jpg"]
    assert (row["width"], row["height"]) == (5000, 300)
    # EXIF orientation 6 applied: 40x20 becomes 20x40 with the black half on top.
    upright = np.asarray(stored[f"{source}/modes/rotated.jpg"])
    assert upright.shape == (40, 20, 3)
    assert upright[:15].mean() < 40 and upright[25:].mean() > 215
    # Transparent red on white is white; 16-bit 100*257 is 100 and 65535 is 255; palette keeps its colour.
    assert np.all(np.asarray(stored[f"{source}/modes/rgba.png"]) == 255)
    deep = np.asarray(stored[f"{source}/modes/deep.png"])
    assert deep[0, 0].tolist() == [255, 255, 255] and deep[1, 1].tolist() == [100, 100, 100]
    assert np.asarray(stored[f"{source}/modes/palette.png"])[0, 0].tolist() == [10, 200, 30]
    cmyk = np.asarray(stored[f"{source}/modes/cmyk.jpg"]).astype(int)
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 50  # C=0, M=Y=255: red
    # The sha256 column is of the source bytes, even when the stored bytes were re-encoded.
    source_bytes = (source / "modes/rotated.jpg").read_bytes()
    assert report.manifest.set_index("source_path").loc[f"{source}/modes/rotated.jpg", "sha256"] == (
        hashlib.sha256(source_bytes).hexdigest()
    )
    loaded = read_shards(tmp_path / "shards", 16)
    assert loaded.images.shape == (len(report.manifest), 16, 16, 3)


@pytest.mark.parametrize("workers", [1, 2])
def test_names_equal_after_normalisation_keep_the_first_and_quarantine_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # Batches of two: the clashing names fall in different batches, and a duplicate follows in a third one.
    monkeypatch.setattr(sela.data.ingest, "_BATCH", 2)
    assert sela.data.ingest._batch_size(2, local=True) == 2
    composed, decomposed = "caf\u00e9.png", "cafe\u0301.png"  # the decomposed path sorts first ('e' < 'é')
    files = {"a.png": GOOD_PNG, composed: encoded(noise((8, 8), 20), "PNG"), decomposed: encoded(noise((8, 8), 21),
             "PNG"), "z.png": encoded(noise((8, 8), 22), "PNG"), "zz.png": GOOD_PNG}
    source = write_folder(tmp_path / "images", files)

    report = ingest(params(source, samples_per_shard=2), str(tmp_path / "shards"), workers=workers)

    assert report.inputs == 5
    assert report.manifest["source_path"].tolist() == [f"{source}/{name}" for name in ("a.png", decomposed, "z.png")]
    assert report.quarantine.to_dict("records") == [
        {"path": f"{source}/{composed}", "key": "caf_c3_a9_2epng",
         "reason": f"same key as {source}/{decomposed} (names equal after normalisation)"},
        {"path": f"{source}/zz.png", "key": "zz_2epng", "reason": f"duplicate of {source}/a.png"},
    ]


def test_unreadable_file_is_quarantined(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "images", {"a.png": GOOD_PNG, "locked.png": encoded(noise((8, 8), 12), "PNG")})
    locked = source / "locked.png"
    locked.chmod(0)
    try:
        try:
            locked.read_bytes()
        except PermissionError:
            pass
        else:
            pytest.skip("running as root: a chmod 000 file is still readable, nothing to quarantine")
        report = ingest(params(source), str(tmp_path / "shards"), workers=1)
    finally:
        locked.chmod(0o644)

    assert report.manifest["source_path"].tolist() == [f"{source}/a.png"]
    assert report.quarantine.to_dict("records") == [
        {"path": str(locked), "key": "locked_2epng", "reason": "unreadable: Permission denied"}
    ]


def test_ingest_twice_and_with_any_worker_count_gives_identical_files(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "images", {relative: data for relative, (data, _) in BAD_FOLDER.items()})

    ingest(params(source), str(tmp_path / "one"), workers=1)
    ingest(params(source), str(tmp_path / "two"), workers=2)
    first = folder_hashes(tmp_path / "one")
    ingest(params(source), str(tmp_path / "one"), workers=2)  # a rerun in place keeps every byte

    assert first == folder_hashes(tmp_path / "two") == folder_hashes(tmp_path / "one")
    assert len([name for name in first if name.endswith(".tar")]) == 4  # 15 samples, 4 per shard


def many_images(count: int, start: int = 0, side: int = 16) -> dict[str, bytes]:
    return {f"class-{index % 3}/img {index:04d}.png": encoded(noise((side, side), index), "PNG")
            for index in range(start, start + count)}


def test_webdatasets_own_reader_reads_the_shards_with_the_manifests_keys_and_the_stored_bytes(tmp_path: Path) -> None:
    # Kept originals (RGB PNG and JPEG within max_side), so every stored image is its source file's bytes; one name
    # long enough that its key (over 100 bytes) needs a pax header, and dots, spaces and non-ASCII escaped.
    files = many_images(9)
    files["deep/" + "a very long folder name " * 3 + "/v1.2 photo é.jpg"] = GOOD_JPEG
    files["names/café ünï ☃.png"] = GOOD_PNG
    source = write_folder(tmp_path / "images", files)
    report = ingest(params(source), str(tmp_path / "shards"), workers=2)
    assert report.quarantine.empty and max(len(key) for key in report.manifest["key"]) > 100

    urls = shard_urls(tmp_path / "shards")
    dataset = webdataset.WebDataset(urls, shardshuffle=False)
    records = [(record["__key__"], record) for record in dataset]
    # The hand-written reader (docs/shards.md) gives webdataset's records exactly.
    by_webdataset = list(webdataset.tarfile_to_samples()([{"url": url} for url in urls]))
    assert list(shard_records({"url": url} for url in urls)) == by_webdataset
    assert [record["__key__"] for record in by_webdataset] == [key for key, _ in records]

    manifest = report.manifest
    assert [key for key, _ in records] == manifest["key"].tolist()
    for (key, record), source_path, sha256 in zip(records, manifest["source_path"], manifest["sha256"], strict=True):
        (extension,) = [name for name in record if not name.startswith("__")]
        assert extension == Path(source_path).suffix[1:]
        assert record[extension] == Path(source_path).read_bytes(), key
        assert hashlib.sha256(record[extension]).hexdigest() == sha256


def test_a_batch_per_shard_renames_spool_files_into_shards_with_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = many_images(14)
    files["class-1/img 0004 again.png"] = files["class-1/img 0004.png"]  # a duplicate: later shards are copied
    source = write_folder(tmp_path / "images", files)
    ingest(params(source), str(tmp_path / "copied"), workers=2)  # batches of 1024 files: every shard copied
    moved: list[bool] = []
    move = sela.data.shards._moved_whole
    monkeypatch.setattr(sela.data.shards, "_moved_whole", lambda *args: moved.append(move(*args)) or moved[-1])
    monkeypatch.setattr(sela.data.ingest, "_BATCH", 4)  # batches of 4 files, a shard's worth

    ingest(params(source), str(tmp_path / "moved"), workers=2)

    assert moved[0] and False in moved  # the first shard renamed; after the duplicate, copied
    assert folder_hashes(tmp_path / "moved") == folder_hashes(tmp_path / "copied")


def test_adding_ten_images_adds_one_shard_and_keeps_the_old_ones(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "images", many_images(40))
    first = ingest(params(source, samples_per_shard=16), str(tmp_path / "shards"), workers=1)
    before = folder_hashes(tmp_path / "shards")

    write_folder(source, many_images(10, start=40))
    second = ingest(params(source, samples_per_shard=16), str(tmp_path / "shards"), workers=1)
    after = folder_hashes(tmp_path / "shards")

    assert first.written_shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert second.written_shards == ["shard-000003.tar"] and second.kept_shards == first.written_shards
    old_shard_files = {name: digest for name, digest in before.items() if name.startswith("shard-")}
    assert {name: after[name] for name in old_shard_files} == old_shard_files
    assert second.manifest.iloc[:40].drop(columns="index").equals(first.manifest.drop(columns="index"))
    new_rows = second.manifest.iloc[40:]
    assert new_rows["shard"].unique().tolist() == ["shard-000003.tar"]
    assert new_rows["source_path"].tolist() == [f"{source}/{relative}" for relative in sorted(
        many_images(10, start=40), key=escape_key)]
    assert len(read_shards(tmp_path / "shards", 16)) == 50


def test_removed_and_changed_files_are_reported_never_silent(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "images", many_images(6))
    first = ingest(params(source), str(tmp_path / "shards"), workers=1)
    (source / "class-0/img 0003.png").unlink()
    (source / "class-1/img 0004.png").write_bytes(encoded(noise((16, 16), 99), "PNG"))

    second = ingest(params(source), str(tmp_path / "shards"), workers=1)

    # Policy: the removed file's sample stays (label sets keep joining) and is listed in removed.parquet.
    assert second.manifest.equals(first.manifest) and second.written_shards == []
    assert second.removed.to_dict("records") == [
        {"key": "class-0/img_200003_2epng", "source_path": f"{source}/class-0/img 0003.png",
         "shard": "shard-000000.tar"}
    ]
    assert pq.read_table(tmp_path / "shards" / "removed.parquet").to_pylist() == second.removed.to_dict("records")
    (changed,) = second.quarantine.to_dict("records")
    assert changed["path"] == f"{source}/class-1/img 0004.png" and changed["reason"].startswith("changed since")


def test_changed_parameters_rebuild_from_scratch(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "images", many_images(6))
    ingest(params(source, samples_per_shard=4), str(tmp_path / "shards"), workers=1)

    report = ingest(params(source, samples_per_shard=6), str(tmp_path / "shards"), workers=1)

    assert report.restarted and report.kept_shards == [] and report.written_shards == ["shard-000000.tar"]
    assert sorted(path.name for path in (tmp_path / "shards").glob("shard-*")) == [
        "shard-000000.parquet", "shard-000000.tar"
    ]


KILLABLE_RUN = """
import sys
sys.path.insert(0, {root!r})
import sela.data.ingest
import sela.data.shards
from sela.config import ShardParams
from sela.data.ingest import ingest
ingest(ShardParams(source={source!r}, image_size=16, samples_per_shard=20, min_side=4, max_side={max_side}),
       {output!r}, workers=1)
"""


@pytest.mark.slow
def test_killed_ingest_resumes_to_the_same_bytes_as_an_uninterrupted_run(tmp_path: Path) -> None:
    # RGBA images need converting and re-encoding: slow enough (~ms each) to be killed half way.
    files = {f"{index:04d}.png": encoded(noise((96, 96), index, mode="RGBA"), "PNG") for index in range(400)}
    source = write_folder(tmp_path / "images", files)
    killed = tmp_path / "killed"
    script = KILLABLE_RUN.format(root=str(PROJECT_ROOT), source=str(source), output=str(killed), max_side=MAX_SIDE)
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not (killed / "shard-000002.tar").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert process.returncode == -signal.SIGKILL
    assert not (killed / "manifest.parquet").exists(), "the run finished before it was killed: nothing tested"
    resumed = ingest(params(source, samples_per_shard=20), str(killed), workers=2)
    ingest(params(source, samples_per_shard=20), str(tmp_path / "whole"), workers=2)

    assert resumed.kept_shards[:3] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert len(resumed.kept_shards) + len(resumed.written_shards) == 20
    assert folder_hashes(killed) == folder_hashes(tmp_path / "whole")


def test_spool_files_are_deleted_and_a_killed_runs_leftovers_removed(tmp_path: Path) -> None:
    source = write_folder(tmp_path / "images", many_images(6))
    output = tmp_path / "shards"
    ingest(params(source), str(output), workers=2)
    before = folder_hashes(output)
    assert not (output / ".spool").exists()
    stale = output / ".spool" / "batch-00000000.bin"  # what a killed run leaves behind
    stale.parent.mkdir()
    stale.write_bytes(b"members spooled by a worker")

    ingest(params(source), str(output), workers=1)

    assert not (output / ".spool").exists()
    assert folder_hashes(output) == before
