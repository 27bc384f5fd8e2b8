"""The ingest's JPEG check (sela.data.images.check_jpeg, simplejpeg's libjpeg-turbo): size, colour space and EXIF from
the header, strict verdicts on damaged baseline and progressive JPEGs, limits that skip the decode."""

import io

import numpy as np
import pytest
from PIL import Image

from sela.data.images import ImageLimits, JpegCheck, check_jpeg, inspect_image

NO_LIMIT = 0
LIMITS_NONE = ImageLimits(min_side=1, max_side=1024)
SHAPES = [pytest.param({}, id="baseline"), pytest.param({"progressive": True}, id="progressive")]


def encoded(mode: str, size: tuple[int, int] = (40, 24), **options: object) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(), mode).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def scan_data_start(data: bytes) -> int:
    """Offset of the first byte of entropy-coded data: after the first SOS marker and its header."""
    marker = data.index(b"\xff\xda")
    return marker + 2 + int.from_bytes(data[marker + 2 : marker + 4], "big")


@pytest.mark.parametrize(
    ("mode", "options", "colorspace"),
    [("RGB", {}, "YCbCr"), ("RGB", {"progressive": True}, "YCbCr"), ("L", {}, "Gray"), ("CMYK", {}, "CMYK")],
)
def test_a_valid_jpeg_gives_its_size_and_colour_space(mode: str, options: dict, colorspace: str) -> None:
    assert check_jpeg(encoded(mode, **options), NO_LIMIT, 1) == JpegCheck(40, 24, colorspace, True, False)


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

    assert [check_jpeg(data, NO_LIMIT, 1).exif for data in (plain, with_exif, with_xmp, late_exif)] == [
        False, True, False, True]
    # What the flag is for: the late EXIF's orientation is applied (40x24 stored upright as 24x40).
    stored = inspect_image(late_exif, LIMITS_NONE)
    assert stored.reason is None and Image.open(io.BytesIO(stored.image)).size == (24, 40)


@pytest.mark.parametrize("data", [b"", b"GIF89a....", b"\xff\xd8\xff\xe0"])
def test_what_is_not_a_jpeg_raises(data: bytes) -> None:
    with pytest.raises(ValueError):
        check_jpeg(data, NO_LIMIT, 1)


@pytest.mark.parametrize("options", SHAPES)
def test_a_jpeg_cut_anywhere_in_its_image_data_is_rejected(options: dict) -> None:
    # libjpeg only warns at a premature end (it pads the data and shows grey): strict mode makes it an error.
    data = encoded("RGB", (64, 48), **options)
    cuts = range(scan_data_start(data), len(data))  # every cut: in a scan, between scans, before the end marker

    verdicts = {}
    for cut in cuts:
        with pytest.raises(ValueError) as raised:
            check_jpeg(data[:cut], NO_LIMIT, 1)
        verdicts[cut] = str(raised.value)

    assert verdicts[len(data) - 1] == verdicts[len(data) - 200] == "Premature end of JPEG file"


@pytest.mark.parametrize("options", SHAPES)
@pytest.mark.parametrize(
    ("damage", "message"),
    [(b"\xff\xd3", "Corrupt JPEG data: premature end of data segment"),  # a restart marker none was declared for
     (b"\xff\x47", "Unsupported marker type 0x47")],  # not a marker at all: stuffing (0xff 0x00) is gone
)
def test_a_marker_inside_the_entropy_coded_data_is_rejected(options: dict, damage: bytes, message: str) -> None:
    data = encoded("RGB", (64, 48), **options)
    position = scan_data_start(data) + 16
    damaged = data[:position] + damage + data[position + len(damage) :]

    with pytest.raises(ValueError, match=message):
        check_jpeg(damaged, NO_LIMIT, 1)
    assert inspect_image(damaged, LIMITS_NONE).reason == f"corrupt image: {message}"


def test_flipped_bits_in_a_baseline_scan_are_corrupt_data() -> None:
    data = encoded("RGB")
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF

    with pytest.raises(ValueError, match="Corrupt JPEG data"):
        check_jpeg(bytes(damaged), NO_LIMIT, 1)


def test_an_image_outside_the_limits_is_measured_but_not_decoded() -> None:
    truncated = encoded("RGB")[:-200]  # the header is intact; decoding it would fail

    assert check_jpeg(truncated, 40 * 24 - 1, 1) == (40, 24, "YCbCr", False, False)  # too many pixels
    assert check_jpeg(truncated, NO_LIMIT, 25) == (40, 24, "YCbCr", False, False)  # a side below min_side
    with pytest.raises(ValueError, match="Premature end of JPEG file"):
        check_jpeg(truncated, 40 * 24, 24)  # exactly at both limits: decoded
    assert check_jpeg(memoryview(encoded("L")), NO_LIMIT, 1) == (40, 24, "Gray", True, False)  # any bytes-like
