"""The hand-written tar members (kept for speed, docs/shards.md): webdataset.TarWriter's bytes, and a reader that
gives what tarfile gives."""

import io
import tarfile

import pytest
import webdataset

from sela.data.tarmembers import append_member, read_members, sample_member, tar_end

SAMPLES = [
    ("a", "jpg", b"\xff\xd8" * 3),
    ("cats/b", "png", bytes(range(256)) * 2),  # exactly one block: no padding
    ("long/" + "x_2e" * 40, "png", b"a key over 100 bytes: a pax header carries it"),
    ("empty", "jpg", b""),
]


def tar_writer_bytes(samples: list[tuple[str, str, bytes]]) -> bytes:
    """A shard as webdataset writes it, with the settings the ingest's bytes match (no time, owner or group)."""
    stream = io.BytesIO()
    writer = webdataset.TarWriter(stream, user="", group="", mode=0o444, mtime=0, encoder=False)
    for key, extension, data in samples:
        writer.write({"__key__": key, extension: data})
    writer.close()
    return stream.getvalue()


def test_members_and_end_are_the_bytes_webdatasets_tar_writer_writes() -> None:
    members = [sample_member(key, extension, data) for key, extension, data in SAMPLES]
    spooled = bytearray()
    sizes = [append_member(spooled, f"{key}.{extension}", data) for key, extension, data in SAMPLES]

    shard = b"".join(members) + tar_end(sum(map(len, members)))

    assert shard == tar_writer_bytes(SAMPLES)
    assert bytes(spooled) == b"".join(members) and sizes == [len(member) for member in members]


def test_read_members_gives_what_tarfile_gives_for_pax_gnu_and_ustar_archives() -> None:
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as archive:  # shards before 2026-12-04
        for key, extension, data in SAMPLES:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    expected = [(f"{key}.{extension}", data) for key, extension, data in SAMPLES]

    for archive_bytes in (tar_writer_bytes(SAMPLES), gnu.getvalue()):
        with tarfile.open(fileobj=io.BytesIO(archive_bytes)) as opened:
            by_tarfile = [(member.name, opened.extractfile(member).read()) for member in opened.getmembers()]
        assert list(read_members(io.BytesIO(archive_bytes))) == by_tarfile == expected


def test_damaged_and_truncated_archives_raise() -> None:
    shard = tar_writer_bytes(SAMPLES)
    damaged = bytearray(shard)
    damaged[100] ^= 1  # the first header's mode field: its checksum no longer matches

    with pytest.raises(ValueError, match="damaged tar header at byte 0"):
        list(read_members(io.BytesIO(bytes(damaged))))
    with pytest.raises(ValueError, match="truncated"):
        list(read_members(io.BytesIO(shard[:700])))
    with pytest.raises(ValueError, match="without its end-of-archive blocks"):
        list(read_members(io.BytesIO(shard[:512 + 512])))
