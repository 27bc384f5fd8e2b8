"""The ingest worker: unreadable paths, hash-only items and pre-decided reasons, and bomb-sized images."""

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from sela.images import ImageLimits, WorkBatch, inspect_batch, inspect_image

LIMITS = ImageLimits(min_side=2, max_side=64)


def test_a_file_that_vanished_after_listing_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    # The path-based read is the one chmod 000 exercises; a missing file takes it as root too.
    spool = str(tmp_path / "batch.bin")
    batch = WorkBatch([str(tmp_path / "gone.png")], [None], [False], [None], ["gone_2epng"], spool)

    result = inspect_batch(batch, LIMITS)

    assert result.reasons == ["unreadable: No such file or directory"]
    assert (result.spool, result.member_sizes) == (None, [0])
    assert not Path(spool).exists()


def test_hash_only_and_pre_decided_items_skip_the_decode(tmp_path: Path) -> None:
    spool = str(tmp_path / "batch.bin")
    batch = WorkBatch([None, None], [b"not an image", None], [True, False], [None, "x"], ["a", "b"], spool)

    result = inspect_batch(batch, LIMITS)

    assert result.reasons == [None, "x"]
    assert result.sha256 == [hashlib.sha256(b"not an image").hexdigest(), ""]
    assert (result.spool, result.member_sizes) == (None, [0, 0])
    assert not Path(spool).exists()


def test_decompression_bombs_are_quarantined(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buffer, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 pixels > 2x the limit: Pillow refuses

    result = inspect_image(buffer.getvalue(), LIMITS)

    assert result.reason is not None and result.reason.startswith("too many pixels")
