"""Validate one encoded image and turn it into the bytes a shard stores: the ingest worker's whole job.

``inspect_image`` decodes every input as a check (JPEGs through libjpeg-turbo in strict mode, ``check_jpeg``: all
their entropy-coded data, the pixels rebuilt at 1/8 scale; everything else and every conversion through Pillow,
full size), then either keeps the original bytes (an RGB JPEG/PNG, upright, within the size limit:
no re-encode, so ingest runs near disk speed) or re-encodes deterministically (PNG for lossless sources, JPEG
quality 95 for JPEG sources) after converting the mode to RGB, applying the EXIF orientation and shrinking the long
side. A file that cannot become an image gets a reason instead. This module imports only Pillow, simplejpeg, numpy
and the tar member builder: workers start fast.
"""

import gc
import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from sela.data.tarmembers import append_member

# Formats accepted (Pillow format name -> nothing); anything else Pillow can open (ICO, PSD, PPM, EPS, ...) is
# quarantined as unsupported: uncommon in photo collections, and some decode through external programs.
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
# Pillow names a camera's multi-picture JPEG (more JPEG frames after the first, indexed in an APP2 marker) "MPO";
# every decoder reads only its first frame, a plain JPEG, so it is judged and kept or re-encoded as one.
_FORMAT_ALIASES = {"MPO": "JPEG"}
# Originals kept byte for byte when nothing needs converting; the shard field is named after the real format.
_KEPT_AS_IS = {"JPEG": "jpg", "PNG": "png"}
_EXIF_ORIENTATION = 0x0112
_EXIF_HEADER = b"Exif\x00\x00"  # the start of an APP1 segment's payload that holds EXIF
# libjpeg-turbo's reading of a JPEG's colour space (simplejpeg's header) -> the output the check decodes it to.
_JPEG_DECODE_AS = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}
_JPEG_QUALITY = 95
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# Read size: a small file arrives in one call. Not 1 MiB: os.read allocates the whole request before shrinking it,
# and a buffer that large can cost an mmap, page faults and a munmap per file (26 us against 6 us per 1 KB file).
_READ_CHUNK = 1 << 16
# Tar members a worker keeps before writing them to its batch's spool file: one write for a batch of small images,
# bounded memory for a batch of large ones.
_SPOOL_BUFFER = 1 << 24


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Size rules: images with a side below ``min_side`` are quarantined, a long side above ``max_side`` shrinks."""

    min_side: int
    max_side: int


class Inspected(NamedTuple):
    """The outcome for one input file: ``reason`` is None for an accepted image, else why it was quarantined.

    ``sha256`` is of the source bytes (empty when they could not be read); ``width``/``height`` are the original
    size, ``image``/``extension`` what the shard stores (empty when quarantined).
    """

    sha256: str
    reason: str | None
    width: int = 0
    height: int = 0
    extension: str = ""
    image: bytes = b""


def inspect_image(data: bytes, limits: ImageLimits) -> Inspected:
    """Decode ``data`` fully and return what the shard stores, or the reason the file is quarantined."""
    sha256 = hashlib.sha256(data).hexdigest()
    if not data:
        return Inspected(sha256, "empty file (0 bytes)")
    if data.startswith(_JPEG_SIGNATURE):
        checked = _inspect_jpeg(data, sha256, limits)
        if checked is not None:
            return checked
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) on some damaged files: treat every warning as a broken image.
            warnings.simplefilter("error")
            return _decoded(data, sha256, limits)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return Inspected(sha256, f"too many pixels: {error}")
    except Image.UnidentifiedImageError:
        return Inspected(sha256, "not an image (unrecognised content)")
    except (OSError, ValueError, SyntaxError, EOFError, Warning, MemoryError) as error:
        # Pillow reports truncated and corrupt data with several unrelated exception types.
        return Inspected(sha256, f"corrupt image: {type(error).__name__}: {error}")


class JpegCheck(NamedTuple):
    """What ``check_jpeg`` found: the size and libjpeg-turbo's colour space ("YCbCr", "RGB", "Gray", "CMYK",
    "YCCK") from the header; ``decoded``, whether the data was decoded (False: outside the limits); ``exif``,
    whether the file may hold EXIF (an orientation to apply)."""

    width: int
    height: int
    colorspace: str
    decoded: bool
    exif: bool


def check_jpeg(data: bytes, max_pixels: int, min_side: int) -> JpegCheck:
    """The ingest's strict JPEG check, through simplejpeg (libjpeg-turbo, from its wheel: no compiler needed).

    Reads the header; unless the image is outside the limits (more than ``max_pixels`` pixels, 0: no limit, or a
    side below ``min_side``), decodes all of it in strict mode (libjpeg's corrupt-data warnings are errors) with
    the pixels rebuilt at 1/8 scale and thrown away. libjpeg finds damage only while reading markers and
    entropy-decoding, which it does for every coefficient of every block at any scale; only the inverse DCT,
    upsampling and colour conversion, which cannot fail, shrink. So the check rejects what a full-size decode
    rejects, at about 0.75x its cost (640x480 photo: 0.86 against 1.17 ms; a 32x32 CIFAR image: 9 against 10-12 us,
    where the calls themselves are most of it). Raises ValueError with libjpeg-turbo's message for damaged data.

    ``exif`` is a byte search for the EXIF header: any APP1 EXIF segment holds it, wherever it sits; a match
    elsewhere only sends a valid image through Pillow, which reads the real orientation (same stored bytes).
    """
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if (max_pixels and width * height > max_pixels) or width < min_side or height < min_side:
        return JpegCheck(width, height, colorspace, False, False)
    # 1/8 of each side (libjpeg's DCT scaling), at least one pixel; keywords spelled out, not a ** dict (0.3 us of
    # a CIFAR image's 9).
    output = _JPEG_DECODE_AS.get(colorspace, "RGB")
    simplejpeg.decode_jpeg(data, colorspace=output, strict=True, min_factor=8, min_height=1, min_width=1)
    return JpegCheck(width, height, colorspace, True, _EXIF_HEADER in data)


def _inspect_jpeg(data: bytes, sha256: str, limits: ImageLimits) -> Inspected | None:
    """JPEG fast path: ``check_jpeg``, a strict decode of all the data (pixels at 1/8 scale, thrown away).

    Every JPEG goes through this check, so a JPEG is judged the same way whether or not it then needs Pillow.
    Returns None when the image is valid but needs converting (not YCbCr, EXIF present, too large): Pillow then
    decodes it again to convert it.
    """
    try:
        width, height, colorspace, decoded, exif = check_jpeg(data, Image.MAX_IMAGE_PIXELS or 0, limits.min_side)
    except ValueError as error:
        return Inspected(sha256, f"corrupt image: {error}")
    if not decoded and width * height > (Image.MAX_IMAGE_PIXELS or width * height):
        return Inspected(sha256, f"too many pixels: {width}x{height} > {Image.MAX_IMAGE_PIXELS}", width, height)
    if not decoded:
        return Inspected(sha256, f"too small: {width}x{height} (min side {limits.min_side})", width, height)
    if colorspace == "YCbCr" and max(width, height) <= limits.max_side and not exif:
        return Inspected(sha256, None, width, height, "jpg", data)
    return None


def _decoded(data: bytes, sha256: str, limits: ImageLimits) -> Inspected:
    with Image.open(io.BytesIO(data)) as opened:
        image_format = opened.format or "unknown"
        image_format = _FORMAT_ALIASES.get(image_format, image_format)
        if image_format not in SUPPORTED_FORMATS:
            return Inspected(sha256, f"unsupported format: {image_format}")
        width, height = opened.size
        if min(width, height) < limits.min_side:
            return Inspected(sha256, f"too small: {width}x{height} (min side {limits.min_side})", width, height)
        opened.load()  # the full decode: raises on truncated or corrupt pixel data
        orientation = opened.getexif().get(_EXIF_ORIENTATION, 1)
        keep = image_format in _KEPT_AS_IS and opened.mode == "RGB" and orientation in (0, 1)
        keep = keep and max(width, height) <= limits.max_side
        if keep:
            return Inspected(sha256, None, width, height, _KEPT_AS_IS[image_format], data)
        rgb = _to_rgb(ImageOps.exif_transpose(opened) if orientation not in (0, 1) else opened)
    rgb = _shrunk(rgb, limits.max_side)
    lossy = image_format == "JPEG"
    return Inspected(sha256, None, width, height, "jpg" if lossy else "png", _encode(rgb, lossy))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with the same pixels: alpha composited on white, 16-bit scaled to 8-bit (Pillow's convert clips it)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        return Image.fromarray((values // 257).astype(np.uint8)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _shrunk(image: Image.Image, max_side: int) -> Image.Image:
    """Long side down to ``max_side`` (aspect kept, each side at least 1 pixel); smaller images unchanged."""
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.LANCZOS)


def _encode(image: Image.Image, lossy: bool) -> bytes:
    """Deterministic bytes: fixed settings, no metadata (EXIF, ICC, time) carried over."""
    buffer = io.BytesIO()
    if lossy:
        image.save(buffer, format="JPEG", quality=_JPEG_QUALITY, optimize=False, progressive=False)
    else:
        image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


class WorkBatch(NamedTuple):
    """One worker task: ``n`` files as columns (a few lists of strings pickle in C; ``n`` objects would not).

    Per file ``i``: ``paths[i]`` is the local file to read, or None when its bytes come in ``datas[i]`` (``datas``
    is None when every file is local); ``keys[i]`` names its tar member. Positions in ``hash_only`` are already in
    a shard, so they are only hashed (the changed-file check), not decoded; ``reasons`` quarantines positions
    before they are read (a key clash). ``spool`` is the local file the batch's tar members are written to.
    """

    paths: list[str | None]
    keys: list[str]
    spool: str
    datas: list[bytes | None] | None = None
    hash_only: frozenset[int] = frozenset()
    reasons: dict[int, str] | None = None


class BatchResult(NamedTuple):
    """The outcomes of a ``WorkBatch`` as columns of ``n`` entries (``spool`` aside), in input order.

    ``sha256``/``reasons``/``widths``/``heights`` as in ``Inspected``. The tar members of the accepted images
    (``sela.data.tarmembers``, named after their keys) are written, concatenated in input order, to the batch's
    ``spool`` file (None: no member, no file); ``member_sizes`` is each file's share of it (0: none). Only these
    small columns cross the process pool: the writing process copies byte ranges of the spool files into shards
    in the kernel and never holds the image bytes.
    """

    sha256: list[str]
    reasons: list[str | None]
    widths: list[int]
    heights: list[int]
    spool: str | None
    member_sizes: list[int]


def read_file(path: str) -> bytes:
    """A file's bytes through raw ``os`` calls: half the cost of ``open().read()`` (no file object, no buffer),
    which matters when reading 30 k small files a second. A read shorter than asked for is the end of a regular
    file, so a small file costs one read, not a second one that returns nothing."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        chunk = os.read(descriptor, _READ_CHUNK)
        if len(chunk) < _READ_CHUNK:
            return chunk
        chunks = [chunk]
        while chunk := os.read(descriptor, _READ_CHUNK):
            chunks.append(chunk)
    finally:
        os.close(descriptor)
    return b"".join(chunks)


def inspect_batch(batch: WorkBatch, limits: ImageLimits) -> BatchResult:
    """``inspect_image`` over the files of ``batch`` (one process-pool task); the tar members of the accepted
    images go, in one write, to ``batch.spool``."""
    result = BatchResult([], [], [], [], None, [])
    # The columns' appends, looked up once: this loop runs per file, and a file costs a few microseconds.
    add_sha256, add_reason, add_width, add_height, add_size = (
        column.append for column in (result.sha256, result.reasons, result.widths, result.heights, result.member_sizes)
    )
    members = bytearray()
    spooled = 0  # bytes of members already written to the spool file
    for index, key in enumerate(batch.keys):
        sha256, reason, width, height, extension, image = _inspect_item(batch, index, limits)
        add_sha256(sha256)
        add_reason(reason)
        add_width(width)
        add_height(height)
        add_size(append_member(members, f"{key}.{extension}", image) if image else 0)
        if len(members) >= _SPOOL_BUFFER:
            spooled += write_file(batch.spool, members, spooled)
            members.clear()
    if members:
        spooled += write_file(batch.spool, members, spooled)
    return result._replace(spool=batch.spool) if spooled else result


def write_file(path: str, data: bytes | bytearray, offset: int = 0) -> int:
    """Write ``data`` at ``offset`` of the file ``path`` (created, or emptied first for offset 0), through raw
    ``os`` calls; returns its length."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0)
    descriptor = os.open(path, flags, 0o644)
    try:
        view, written = memoryview(data), 0
        while written < len(view):
            written += os.pwrite(descriptor, view[written:], offset + written)
    finally:
        os.close(descriptor)
    return len(view)


def _inspect_item(batch: WorkBatch, index: int, limits: ImageLimits) -> Inspected:
    """File ``index`` of ``batch``; ``image`` is empty unless the file is a new accepted image."""
    reason = batch.reasons.get(index) if batch.reasons else None
    if reason is not None:
        return Inspected(sha256="", reason=reason)
    data = None if batch.datas is None else batch.datas[index]
    if data is None:
        path = batch.paths[index]
        assert path is not None  # a file comes with a path or with its bytes
        try:
            data = read_file(path)
        except OSError as error:
            return Inspected(sha256="", reason=f"unreadable: {error.strerror or error}")
    if index in batch.hash_only:
        return Inspected(sha256=hashlib.sha256(data).hexdigest(), reason=None)
    return inspect_image(data, limits)


def start_worker() -> None:
    """Process-pool initializer. The ingest pauses the cyclic garbage collector in its process, and a forked
    worker inherits that: it switches it back on for what it creates itself, with the objects inherited from the
    parent frozen out of it (a full collection would walk them all, and copy every page it touches)."""
    gc.freeze()
    gc.enable()
