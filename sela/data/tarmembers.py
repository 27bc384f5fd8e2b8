"""Tar members as bytes, built without ``tarfile``: the bytes ``webdataset.TarWriter`` writes, at a tenth of the cost.

Kept because ``benchmarks/shard.py`` measures webdataset's writer and reader (``tarfile`` underneath) at 0.4-0.6x the
speed on the real workload, end to end; see docs/shards.md. Equal bytes are tested: a shard written here is the
shard ``webdataset.TarWriter(stream, user="", group="", mode=0o444, mtime=0, encoder=False)`` writes for the same
samples (POSIX ustar headers, a pax header for a name over 100 bytes), and webdataset's own reader reads it.

A shard is the concatenation of members (512-byte header, payload, zero padding to 512) and an end marker.
Ingest workers build the members of their samples in parallel (``append_member``) and spool them to files; the
writing process copies byte ranges of those files into shards.
Owner, group, mode and mtime are fixed, so the bytes depend only on names and payloads. ``read_members`` parses
shards written this way (and any plain ustar/GNU/pax tar of regular files) at a fifth of ``tarfile``'s cost.
"""

import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_RECORD = 20 * BLOCK  # tarfile pads the archive to whole records of 20 blocks
_MODE = 0o444
_POSIX_MAGIC = b"ustar\x0000"  # magic and version, as tarfile writes them in its default (pax) format
_REGULAR_TYPES = (b"0", b"\x00")
_LONG_NAME_TYPE = b"L"  # GNU long name (shards written before 2026-12-04)
_PAX_TYPE = b"x"  # pax extended header of the next member: its 'path' record is the long name
_EMPTY_BLOCK = bytes(BLOCK)
_ZEROS = memoryview(_EMPTY_BLOCK)  # padding sliced without a copy


def tar_member(name: str, data: bytes) -> bytes:
    """Header + ``data`` + padding for a regular file ``name``: equal to what ``webdataset.TarWriter`` (``tarfile``'s
    pax format) writes for it."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or not name.isascii():
        # A pax header carries the name; rare for keys (ASCII, mostly short), so tarfile builds it.
        info = _tar_info(name, len(data))
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + _padding(len(data))
    return _header(encoded, len(data)) + data + _padding(len(data))


def sample_member(key: str, extension: str, image: bytes) -> bytes:
    """The one member of a sample, ``<key>.<extension>``: its metadata lives in the manifest, not in the shard."""
    return tar_member(f"{key}.{extension}", image)


def append_member(buffer: bytearray, name: str, data: bytes) -> int:
    """Append ``tar_member(name, data)`` to ``buffer`` and return its length: an ingest worker builds all the
    members of a batch in one buffer, without an intermediate bytes object per member."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or not name.isascii():
        member = tar_member(name, data)
        buffer += member
        return len(member)
    padding = -len(data) % BLOCK
    buffer += _header(encoded, len(data))
    buffer += data
    buffer += _ZEROS[:padding]
    return BLOCK + len(data) + padding


def tar_end(length: int) -> bytes:
    """The end-of-archive blocks after ``length`` bytes of members, padded to a whole record like ``tarfile``."""
    end = length + 2 * BLOCK
    return bytes(2 * BLOCK + (-end % _RECORD))


def read_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of every regular file of the tar ``stream``, in order; other entry types are skipped.

    Long names come from a pax header's 'path' record or a GNU long-name entry. Reads member by member (memory:
    one member). Raises ValueError on a damaged header (bad checksum) or a truncated archive.
    """
    long_name: str | None = None
    offset = 0
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            raise ValueError(f"tar archive ends at byte {offset + len(header)} without its end-of-archive blocks")
        if header == _EMPTY_BLOCK:
            return
        if _checksum(header) != int(header[148:156].strip(b"\x00 ") or b"0", 8):
            raise ValueError(f"damaged tar header at byte {offset}")
        size = int(header[124:136].strip(b"\x00 ") or b"0", 8)
        padded = size + (-size % BLOCK)
        body = stream.read(padded)
        if len(body) < padded:
            raise ValueError(f"tar member at byte {offset} is truncated")
        offset += BLOCK + padded
        kind = header[156:157]
        if kind == _LONG_NAME_TYPE:
            long_name = body[:size].rstrip(b"\x00").decode("utf-8")
            continue
        if kind == _PAX_TYPE:
            long_name = _pax_path(body[:size], offset)
            continue
        name = long_name if long_name is not None else _name(header)
        long_name = None
        if kind in _REGULAR_TYPES:
            yield name, body[:size]


def _pax_path(records: bytes, offset: int) -> str | None:
    """The 'path' of a pax extended header's records (``b"<length> <keyword>=<value>\\n"`` each), None without one."""
    path = None
    position = 0
    while position < len(records):
        space = records.find(b" ", position)
        length = int(records[position:space]) if space > position else 0
        if length <= space - position or records[position + length - 1 : position + length] != b"\n":
            raise ValueError(f"damaged pax header before byte {offset}")
        keyword, _, value = records[space + 1 : position + length - 1].partition(b"=")
        if keyword == b"path":
            path = value.decode("utf-8")
        position += length
    return path


def _name(header: bytes) -> str:
    name = header[0:100].split(b"\x00", 1)[0]
    prefix = header[345:500].split(b"\x00", 1)[0] if header[257:263] == b"ustar\x00" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8")


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = _MODE
    info.uname = info.gname = ""
    return info


def _checksum(header: bytes | bytearray) -> int:
    """Sum of the header bytes with the checksum field counted as eight spaces."""
    # The trailing NULs (most of a ustar header) add nothing: not summing them saves a third of the time, which is
    # a microsecond of every training image's few dozen.
    return sum(header[:148]) + 8 * 32 + sum(bytes(header[156:]).rstrip(b"\x00"))


def _template() -> tuple[bytes, int]:
    """A ustar header with tarfile's field encodings (octal, NUL-terminated), no name, size or checksum."""
    header = bytearray(BLOCK)
    header[100:108] = b"%07o\x00" % _MODE
    header[108:116] = b"0000000\x00"  # uid
    header[116:124] = b"0000000\x00"  # gid
    header[136:148] = b"00000000000\x00"  # mtime
    header[156:157] = b"0"  # regular file
    header[257:265] = _POSIX_MAGIC
    return bytes(header), _checksum(header)


_TEMPLATE, _TEMPLATE_SUM = _template()
# The fixed runs of the template between name, size and checksum, sliced once (a header is built per sample).
_MODE_TO_SIZE, _SIZE_TO_CHECKSUM, _AFTER_CHECKSUM = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]


def _header(name: bytes, size: int) -> bytes:
    """The template with ``name`` and ``size`` filled in; the checksum adds their bytes to the template's sum."""
    size_field = b"%011o\x00" % size
    checksum = _TEMPLATE_SUM + sum(name) + sum(size_field)
    return b"".join(
        (name.ljust(100, b"\x00"), _MODE_TO_SIZE, size_field, _SIZE_TO_CHECKSUM, b"%06o\x00 " % checksum,
         _AFTER_CHECKSUM)
    )


def _padding(size: int) -> bytes:
    return bytes(-size % BLOCK)
