"""The ingest worker: unreadable paths, hash-only items and pre-decided reasons, spooled members, bomb-sized
images."""

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

import sela.data.images
from sela.data.images import ImageLimits, WorkBatch, inspect_batch, inspect_image
from sela.data.tarmembers import sample_member

LIMITS = ImageLimits(min_side=2, max_side=64)


def test_a_file_that_vanished_after_listing_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    # The path-based read is the one chmod 000 exercises; a missing file takes it as root too.
    batch = WorkBatch([str(tmp_path / "gone.png")], ["gone_2epng"], str(tmp_path / "batch.bin"))

    result = inspect_batch(batch, LIMITS)

    assert result.reasons == ["unreadable: No such file or directory"]
    assert (result.spool, result.member_sizes) == (None, [0])
    assert list(tmp_path.iterdir()) == []  # no spool file without a member


def test_hash_only_and_pre_decided_items_skip_the_decode(tmp_path: Path) -> None:
    spool = str(tmp_path / "batch.bin")
    batch = WorkBatch([None, None], ["a", "b"], spool, [b"not an image", None], frozenset({0}), {1: "x"})

    result = inspect_batch(batch, LIMITS)

    assert result.reasons == [None, "x"]
    assert result.sha256 == [hashlib.sha256(b"not an image").hexdigest(), ""]
    assert (result.spool, result.member_sizes) == (None, [0, 0])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("buffer", [1 << 24, 1])
def test_members_of_a_batch_are_spooled_back_to_back_in_input_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buffer: int
) -> None:
    monkeypatch.setattr(sela.data.images, "_SPOOL_BUFFER", buffer)  # 1: a write per member (large images)
    images = [encoded_png((8, 8)), encoded_png((9, 9))]
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, data in zip(paths, images, strict=True):
        path.write_bytes(data)
    batch = WorkBatch([*map(str, paths)], ["a", "b"], str(tmp_path / "batch.bin"))

    result = inspect_batch(batch, LIMITS)

    assert result.reasons == [None, None] and (result.widths, result.heights) == ([8, 9], [8, 9])
    assert result.spool == batch.spool
    spooled = Path(batch.spool).read_bytes()
    assert spooled == sample_member("a", "png", images[0]) + sample_member("b", "png", images[1])
    assert result.member_sizes == [len(sample_member("a", "png", images[0])), len(spooled) - result.member_sizes[0]]


def encoded_png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decompression_bombs_are_quarantined(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buffer, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 pixels > 2x the limit: Pillow refuses

    result = inspect_image(buffer.getvalue(), LIMITS)

    assert result.reason is not None and result.reason.startswith("too many pixels")


def test_the_scaled_jpeg_check_rejects_what_a_full_size_decode_rejects() -> None:
    # libjpeg finds damage only while entropy-decoding, which it does in full at any scale: randomly damaged copies
    # of a progressive and a baseline JPEG get the same verdict from the 1/8-scale check as from a strict full-size
    # decode (the scale is the check's only shortcut; tests/sela/data/test_jpeg.py holds its verdicts on damage
    # known to be damage).
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    checked = 0
    for options in ({"progressive": True}, {"subsampling": 2}):
        original = io.BytesIO()
        Image.fromarray(pixels).save(original, "JPEG", **options)
        for _ in range(60):
            damaged = bytearray(original.getvalue())
            position = int(rng.integers(len(damaged) // 4, len(damaged)))
            damaged[position] ^= 1 << int(rng.integers(8))
            data = bytes(damaged[: int(rng.integers(position, len(damaged) + 1))])
            try:
                simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
                rejected = False
            except ValueError:
                rejected = True
            reason = inspect_image(data, LIMITS).reason
            assert (reason is not None and reason.startswith("corrupt image: ")) == rejected, (options, reason)
            checked += rejected
    assert checked > 30  # most copies are damaged: the comparison covered rejections, not only clean files


@pytest.mark.parametrize("orientation", [1, 6])  # 1: kept as it is; 6: turned upright, so re-encoded
def test_a_multi_picture_jpeg_is_accepted_as_its_first_frame_like_the_same_jpeg(orientation: int) -> None:
    # Cameras write MPO files (JPEG frames one after another, indexed in an APP2 marker) with EXIF, which sends
    # them past the JPEG fast path to Pillow.
    rng = np.random.default_rng(orientation)
    first, second = (Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)) for _ in range(2))
    exif = Image.Exif()
    exif[0x0112] = orientation
    multi_picture, single = io.BytesIO(), io.BytesIO()
    first.save(multi_picture, format="MPO", save_all=True, append_images=[second], exif=exif)
    first.save(single, format="JPEG", exif=exif)
    assert Image.open(multi_picture).format == "MPO"

    result, as_jpeg = inspect_image(multi_picture.getvalue(), LIMITS), inspect_image(single.getvalue(), LIMITS)

    assert (result.reason, result.width, result.height, result.extension) == (None, 16, 12, "jpg")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(result.image))),
                          np.asarray(Image.open(io.BytesIO(as_jpeg.image))))
