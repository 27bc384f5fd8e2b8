"""The JPEG check (sela.data._jpeg): size, colour space and EXIF from the header, strict verdicts, limits that skip
the decode, and one decompressor that stays usable after any failure."""

import contextlib
import io

import numpy as np
import pytest
from PIL import Image

from sela.data import _jpeg

NO_LIMIT = 0


def encoded(mode: str, size: tuple[int, int] = (40, 24), **options: object) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(), mode).save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "options", "colorspace"),
    [("RGB", {}, "YCbCr"), ("RGB", {"progressive": True}, "YCbCr"), ("L", {}, "Gray"), ("CMYK", {}, "CMYK")],
)
def test_a_valid_jpeg_gives_its_size_and_colour_space(mode: str, options: dict, colorspace: str) -> None:
    assert _jpeg.check(encoded(mode, **options), NO_LIMIT, 1) == (40, 24, colorspace, True, False)


def test_exif_is_found_in_any_app1_segment_before_the_image_data() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    plain = encoded("RGB")
    with_exif = encoded("RGB", exif=exif.tobytes())
    # An APP1 that is not EXIF (XMP), and EXIF after the quantisation tables, where Pillow still reads it.
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x/>"
    with_xmp = plain[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + plain[2:]
    segment = with_exif[with_exif.index(b"\xff\xe1") :]
    segment = segment[: 2 + int.from_bytes(segment[2:4], "big")]  # marker + length (which counts itself)
    frame = plain.index(b"\xff\xc0")  # after the quantisation tables
    late_exif = plain[:frame] + segment + plain[frame:]
    assert Image.open(io.BytesIO(late_exif)).getexif().get(0x0112) == 6

    assert [_jpeg.check(data, NO_LIMIT, 1)[4] for data in (plain, with_exif, with_xmp, late_exif)] == [
        False, True, False, True]


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "Empty input file"), (b"GIF89a....", "Not a JPEG file: starts with 0x47 0x49")],
)
def test_what_is_not_a_jpeg_raises_libjpegs_message(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _jpeg.check(data, NO_LIMIT, 1)


def test_truncated_and_damaged_data_are_errors_in_strict_mode() -> None:
    data = encoded("RGB")
    with pytest.raises(ValueError, match="Premature end of JPEG file"):  # a warning in libjpeg, an error here
        _jpeg.check(data[: len(data) - 200], NO_LIMIT, 1)
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="Corrupt JPEG data"):
        _jpeg.check(bytes(damaged), NO_LIMIT, 1)


def test_an_image_outside_the_limits_is_measured_but_not_decoded() -> None:
    truncated = encoded("RGB")[:-200]  # the header is intact; decoding it would fail

    assert _jpeg.check(truncated, 40 * 24 - 1, 1) == (40, 24, "YCbCr", False, False)  # too many pixels
    assert _jpeg.check(truncated, NO_LIMIT, 25) == (40, 24, "YCbCr", False, False)  # a side below min_side
    with pytest.raises(ValueError):
        _jpeg.check(truncated, 40 * 24, 24)  # exactly at both limits: decoded


def test_the_reused_decompressor_recovers_from_every_kind_of_stop() -> None:
    # One decompressor serves every call: after a failure in the header, in the data or a skipped decode, the next
    # image must be read from scratch (a leftover state would mis-size or reject it).
    small, large = encoded("RGB", (9, 13)), encoded("L", (64, 48), progressive=True)
    stops = [lambda: _jpeg.check(b"\xff\xd8\xff\xe0", NO_LIMIT, 1), lambda: _jpeg.check(large[:-50], NO_LIMIT, 1),
             lambda: _jpeg.check(large, 10, 1)]
    for stop in stops:
        with contextlib.suppress(ValueError):
            stop()
        assert _jpeg.check(small, NO_LIMIT, 1) == (9, 13, "YCbCr", True, False)
        assert _jpeg.check(memoryview(large), NO_LIMIT, 1) == (64, 48, "Gray", True, False)  # any bytes-like
