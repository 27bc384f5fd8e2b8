"""Image sources for the ``shard`` stage: list every input file with its stable key, then read their bytes.

A source is chosen by the ``shard.source`` parameter (see ``list_source``):

- ``"digits"``: scikit-learn's embedded 8x8 digits (1797 images, 10 classes), rendered as PNG;
- a folder, local or remote (``s3://``, ``gs://``, ``memory://``, ... through fsspec): every file, recursively
  (local links followed, a link back to a folder above it listed as an unreadable file);
- a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive (local or remote): every regular member;
- a glob (``photos/**/*.jpg``, ``s3://bucket/2026-*/*.png``): the matching files, relative to the part before the
  first wildcard;
- a list file (``.txt`` / ``.lst``): one path or URL a line (blank lines and ``#`` comments skipped), relative
  paths resolved against the list file's folder.

Every file is listed, images or not: the ingest decides per file whether it becomes a sample or a quarantine line.
A class sub-folder, if any, is kept as optional ground truth (evaluation only).

Keys come from the relative path (``escape_key``), so the same file under the same relative path gets the same
key in every run. Everything here is a pure function of its inputs: no printing, no pipeline imports.
"""

import functools
import io
import os
import re
import stat
import tarfile
import unicodedata
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from pathlib import PurePosixPath
from typing import NamedTuple

import fsspec
import numpy as np
import simplejpeg
from PIL import Image

from sela.data.remote import is_local

DIGITS_SOURCE = "digits"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_SUFFIXES = (".txt", ".lst")
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_GLOB_CHARACTERS = re.compile(r"[*?\[]")
# Characters a key keeps as they are; all others, '_' (the escape character) included, are escaped.
_KEY_PLAIN = re.compile(r"[A-Za-z0-9-]")


@dataclass(frozen=True, slots=True)
class Sample:
    """One image as stored in a shard: encoded bytes plus the metadata kept next to it."""

    key: str
    image: bytes = field(repr=False)
    extension: str
    ground_truth: str | None
    source_path: str


class SourceFile(NamedTuple):
    """One input file before its bytes are read (a NamedTuple: built per file, 3x cheaper than a frozen dataclass).

    ``locator`` is how to read it: a local path (``kind == "local"``, read by the ingest workers), an fsspec URL
    (``"remote"``), an archive member name (``"member"``) or a digit index (``"digits"``).
    """

    key: str
    source_path: str
    ground_truth: str | None
    kind: str
    locator: str


@dataclass(frozen=True, slots=True)
class SourceListing:
    """All files of a source, sorted by key; ``archive`` is set for tar sources (read front to back once)."""

    source: str
    files: list[SourceFile]
    archive: str | None = None
    digits_size: int = 0


def escape_key(relative_path: str) -> str:
    """The WebDataset key of a relative POSIX path: deterministic, collision-free and reversible.

    The path is NFC-normalised (macOS stores 'é' decomposed); in every '/'-separated part, ``A-Z a-z 0-9 -`` stay
    as they are and every other character, including '.', ' ', non-ASCII and the escape character '_' itself,
    becomes '_' plus the two lower-case hex digits of each of its UTF-8 bytes: ``'cats/a photo.jpg'`` ->
    ``'cats/a_20photo_2ejpg'``. The extension stays in the key, so 'a.png' and 'a.jpg' do not collide, and a key
    never holds a dot (WebDataset splits member names at the first dot) nor '__' (WebDataset skips '__x__').
    """
    normalized = unicodedata.normalize("NFC", relative_path)
    if not _NOT_NAMES.isdisjoint(normalized.split("/")):
        raise ValueError(f"{relative_path!r} is not a normalised relative path")
    return normalized.translate(_ESCAPES)  # '/' maps to itself: the parts are escaped in one call


def unescape_key(key: str) -> str:
    """The relative path ``escape_key`` was given (NFC-normalised)."""
    return re.sub(r"(?:_[0-9a-f]{2})+", lambda match: bytes.fromhex(match.group(0).replace("_", "")).decode(), key)


class _EscapeTable(dict[int, str]):
    """``str.translate`` table built on demand: a code point maps to itself or to its '_xx' escape."""

    def __missing__(self, code: int) -> str:
        character = chr(code)
        escaped = character if _KEY_PLAIN.fullmatch(character) else "".join(
            f"_{byte:02x}" for byte in character.encode("utf-8")
        )
        self[code] = escaped
        return escaped


# One table per process: str.translate escapes a whole name in C, 3x faster than a regex with a callback.
_ESCAPES = _EscapeTable({ord("/"): "/"})
# Path parts that are not file or folder names.
_NOT_NAMES = frozenset(("", ".", ".."))


def list_source(source: str, image_size: int) -> SourceListing:
    """List the files of ``source`` sorted by key; ``image_size`` is the side the embedded digits are rendered at.

    Raises FileNotFoundError for a missing source and ValueError for an unusable or empty one.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if source == DIGITS_SOURCE:
        return _digits_listing(image_size)
    if _GLOB_CHARACTERS.search(source):
        return _sorted_listing(source, _glob_files(source))
    filesystem, path = fsspec.core.url_to_fs(source)
    expected = f"expected {DIGITS_SOURCE!r}, a folder, a glob, a list file ({'/'.join(LIST_SUFFIXES)}) or a " + (
        f"{'/'.join(ARCHIVE_SUFFIXES)} archive"
    )
    if filesystem.isdir(path):
        return _sorted_listing(source, _folder_files(source, filesystem, path))
    if not filesystem.isfile(path):
        raise FileNotFoundError(f"image source {source!r} does not exist: {expected}")
    if path.lower().endswith(ARCHIVE_SUFFIXES):
        return SourceListing(source, _sorted(source, _archive_files(source)), archive=source)
    if path.lower().endswith(LIST_SUFFIXES):
        return _sorted_listing(source, _list_file_files(source))
    raise ValueError(f"image source {source!r} is not usable: {expected}")


def folder_runs(source: str) -> Iterator[list[SourceFile]] | None:
    """For a local folder source, its files as ``list_source`` lists them (key order), but lazily: one run at a
    time (the files of one folder that sort between two of its sub-folders), each yielded as soon as its folder
    is listed, so an ingest decodes the first files while the rest is listed. None for any other source."""
    if source == DIGITS_SOURCE or _GLOB_CHARACTERS.search(source):
        return None
    filesystem, path = fsspec.core.url_to_fs(source)
    if not (is_local(filesystem) and filesystem.isdir(path)):
        return None
    return _local_folder_runs(source.rstrip("/"), path)


def iter_payloads(listing: SourceListing) -> Iterator[tuple[SourceFile, bytes | None]]:
    """Yield ``(file, bytes)`` in listing order; ``None`` for local files, which the ingest workers read themselves.

    A remote read error raises: a network failure is not a property of the file (the Prefect task retries).
    """
    if listing.archive is not None:
        yield from _archive_payloads(listing)
        return
    for file in listing.files:
        if file.kind == "local":
            yield file, None
        elif file.kind == "remote":
            with fsspec.open(file.locator, "rb") as handle:
                yield file, handle.read()
        else:
            yield file, render_digit(int(file.locator), listing.digits_size)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes to a uint8 RGB array of shape (size, size, 3), resized bilinearly if needed.

    YCbCr and grey JPEGs decode through libjpeg-turbo directly (simplejpeg: the same pixels as Pillow, which uses
    the same library, without Pillow's per-image Python overhead: 3x faster on small images); the rest, Pillow.
    """
    array = _decoded_jpeg(data) if data.startswith(_JPEG_SIGNATURE) else None
    if array is None:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
    elif array.shape[:2] == (size, size):
        return array
    else:
        image = Image.fromarray(array)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _decoded_jpeg(data: bytes) -> np.ndarray | None:
    """uint8 (H, W, 3) RGB of a YCbCr/RGB/grey JPEG; None for other colour spaces (CMYK) or a damaged header."""
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
    except ValueError:
        return None  # Pillow reports it
    if colorspace not in ("YCbCr", "RGB", "Gray"):
        return None
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def render_digit(index: int, image_size: int) -> bytes:
    """PNG bytes of scikit-learn digit ``index``, grey levels scaled to 0..255, rendered at ``image_size``."""
    pixels = _digit_pixels()[index]
    image = Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    # No pnginfo and no optimisation pass: the bytes depend only on the pixels (and zlib), so reruns match.
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def iter_digit_samples(image_size: int) -> Iterator[Sample]:
    """The embedded digits as samples, in listing order (for tests and benchmarks that skip the ingest)."""
    listing = _digits_listing(image_size)
    for file, data in iter_payloads(listing):
        assert data is not None  # digits are rendered here, never read by workers
        yield Sample(file.key, data, "png", file.ground_truth, file.source_path)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (1797, 8, 8), labels (1797,)); loaded once per process."""
    # Imported here: scikit-learn is only needed by this source and takes a while to import.
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16; scale to the full byte range so the PNG uses the usual 0..255 contrast.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return pixels, digits.target


def _digit_pixels() -> np.ndarray:
    return _digits()[0]


def _digits_listing(image_size: int) -> SourceListing:
    labels = _digits()[1]
    files = [
        SourceFile(f"digits/{index:05d}", f"sklearn:digits/{index}", str(int(label)), "digits", str(index))
        for index, label in enumerate(labels)
    ]
    return SourceListing(DIGITS_SOURCE, files, digits_size=image_size)


def _source_file(relative: str, source_path: str, kind: str, locator: str) -> SourceFile:
    parts = unicodedata.normalize("NFC", relative).rsplit("/", 2)
    ground_truth = parts[-2] if len(parts) > 1 else None
    return SourceFile(escape_key(relative), source_path, ground_truth, kind, locator)


def _sorted(source: str, files: list[SourceFile]) -> list[SourceFile]:
    if not files:
        raise ValueError(f"image source {source!r} holds no files")
    return _sorted_by_key(files)


def _sorted_by_key(files: list[SourceFile]) -> list[SourceFile]:
    """``sorted(files)``: by key alone (string comparisons, twice as fast as whole tuples); only where keys clash
    (names equal after NFC, a path listed twice) do the whole tuples decide, whatever the listing order."""
    by_key = sorted(files, key=_KEY)
    return by_key if len(set(map(_KEY, by_key))) == len(by_key) else sorted(files)


_KEY = itemgetter(0)


def _sorted_listing(source: str, files: list[SourceFile]) -> SourceListing:
    return SourceListing(source, _sorted(source, files))


def _url(filesystem: fsspec.AbstractFileSystem, path: str) -> str:
    return path if is_local(filesystem) else filesystem.unstrip_protocol(path)


def _folder_files(source: str, filesystem: fsspec.AbstractFileSystem, root: str) -> list[SourceFile]:
    if is_local(filesystem):
        return list(chain.from_iterable(_local_folder_runs(source.rstrip("/"), root)))
    root = root.rstrip("/")
    files = []
    for path in filesystem.find(root):
        relative = path[len(root) + 1 :]
        files.append(_source_file(relative, _url(filesystem, path), "remote", _url(filesystem, path)))
    return files


def _local_folder_runs(
    prefix: str, root: str, folder: str = "", ancestors: frozenset[tuple[int, int]] = frozenset()
) -> Iterator[list[SourceFile]]:
    """The files under ``root/folder`` in key order, as runs: the files of one folder that sort between two of its
    sub-folders, each run yielded as soon as its folder is listed (see ``folder_runs``). ``ancestors``: (device,
    inode) of the folders above ``folder`` in this listing, which a link must not lead back to.

    A sub-folder's keys all start with its key prefix ('<folder key>/<name key>/'), which no file key of this
    folder starts with: its files form one block that sorts where that prefix sorts among this folder's keys.
    Sub-folders whose names are equal after NFC share a prefix: their files are listed together and sorted whole.
    """
    folder_stat = os.stat(f"{root}/{folder}" if folder else root)
    ancestors = ancestors | {(folder_stat.st_dev, folder_stat.st_ino)}
    names, subfolders = _scan(root, folder, ancestors)
    files = _sorted_by_key(_folder_files_of(prefix, root, folder, names))
    keys = [file.key for file in files]
    blocks: dict[str, list[str]] = {}
    for subfolder in subfolders:
        blocks.setdefault(escape_key(subfolder) + "/", []).append(subfolder)
    position = 0
    for key_prefix, members in sorted(blocks.items()):
        cut = bisect_left(keys, key_prefix)
        if cut > position:
            yield files[position:cut]
            position = cut
        if len(members) == 1:
            yield from _local_folder_runs(prefix, root, members[0], ancestors)
        else:
            runs = chain.from_iterable(_local_folder_runs(prefix, root, member, ancestors) for member in members)
            if block := sorted(chain.from_iterable(runs)):
                yield block
    if position < len(files):
        yield files[position:]


def _folder_files_of(prefix: str, root: str, folder: str, names: list[str]) -> list[SourceFile]:
    """``_source_file`` of the files ``names`` of ``folder`` (relative to ``root``), built column by column.

    The folder's key part and ground truth are computed once: equal to escaping each relative path whole (NFC
    never composes across '/', and the escape is per character). Names from scandir are never '', '.' or '..',
    so the per-file part skips ``escape_key``'s check.
    """
    if folder:
        folder_key, base = escape_key(folder) + "/", folder + "/"
        ground_truth: str | None = unicodedata.normalize("NFC", folder).rpartition("/")[2]
    else:
        folder_key, base, ground_truth = "", "", None
    # C loops where possible: 50 k files a second are listed while the ingest workers wait for the first ones.
    keys = [folder_key + name.translate(_ESCAPES) for name in map(_nfc, names)]
    locators = [f"{root}/{base}{name}" for name in names]
    # The source path is usually the locator itself (a local source named by its plain path): share the str.
    source_paths = locators if prefix == root else [f"{prefix}/{base}{name}" for name in names]
    return list(map(_new_source_file, zip(keys, source_paths, repeat(ground_truth), repeat("local"), locators)))


_nfc = functools.partial(unicodedata.normalize, "NFC")
# SourceFile(*row) without the Python-level __new__ a NamedTuple has (a third of the listing's time).
_new_source_file = functools.partial(tuple.__new__, SourceFile)


def _scan(root: str, folder: str, ancestors: frozenset[tuple[int, int]]) -> tuple[list[str], list[str]]:
    """(names of the files, relative POSIX paths of the sub-folders) of ``root/folder`` (scandir: no stat per
    file, unreadable files kept); a link counts as what ``_link_kind`` says, ``ancestors`` holding this folder."""
    names, folders = [], []
    with os.scandir(f"{root}/{folder}" if folder else root) as entries:
        for entry in entries:
            # A link first: is_file raises on a link in a loop, and a link to a folder may lead back up.
            kind = _link_kind(entry, ancestors) if entry.is_symlink() else None
            if kind == "file" or kind is None and entry.is_file():
                names.append(entry.name)
            elif kind == "folder" or kind is None and entry.is_dir(follow_symlinks=False):
                folders.append(f"{folder}/{entry.name}" if folder else entry.name)
    return names, folders


def _link_kind(entry: os.DirEntry[str], ancestors: frozenset[tuple[int, int]]) -> str:
    """``"folder"`` for a link to a folder outside ``ancestors``: followed. ``"file"`` for a link to a file, and for
    a broken link, a link in a loop or one back to a folder in ``ancestors`` (followed, it would list that folder
    forever): the ingest worker cannot read those, so it quarantines them with the reason. ``"other"`` for a link
    to a pipe, socket or device, skipped like those (opening a pipe waits for a writer)."""
    try:
        target = entry.stat()
    except OSError:
        return "file"
    if stat.S_ISDIR(target.st_mode):
        return "file" if (target.st_dev, target.st_ino) in ancestors else "folder"
    return "file" if stat.S_ISREG(target.st_mode) else "other"


def _glob_files(source: str) -> list[SourceFile]:
    filesystem, pattern = fsspec.core.url_to_fs(source)
    first_wildcard = _GLOB_CHARACTERS.search(pattern)
    assert first_wildcard is not None  # list_source checked
    base = pattern[: first_wildcard.start()].rpartition("/")[0]
    kind = "local" if is_local(filesystem) else "remote"
    files = []
    for path in filesystem.glob(pattern):
        if filesystem.isfile(path):
            relative = path[len(base) + 1 :] if base else path
            files.append(_source_file(relative, _url(filesystem, path), kind, _url(filesystem, path)))
    return files


def _list_file_files(source: str) -> list[SourceFile]:
    """Lines of a list file; the key of an absolute path or URL is its path with the scheme as first part."""
    folder = source.rpartition("/")[0]
    with fsspec.open(source, "rt", encoding="utf-8") as handle:
        lines = [line.strip() for line in handle]
    files = []
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if "://" in line:
            scheme, _, rest = line.partition("://")
            relative, url = f"{scheme}/{rest.lstrip('/')}", line
        elif line.startswith("/"):
            relative, url = line.lstrip("/"), line
        else:
            relative, url = line, f"{folder}/{line}" if folder else line
        filesystem, _ = fsspec.core.url_to_fs(url)
        files.append(_source_file(relative, url, "local" if is_local(filesystem) else "remote", url))
    return files


def _archive_member_path(name: str) -> str:
    # Archives made with `tar -C folder .` name members './cat/x.png'; drop '.' and a leading '/'.
    return PurePosixPath(*[part for part in PurePosixPath(name).parts if part not in ("/", ".")]).as_posix()


def _archive_files(source: str) -> list[SourceFile]:
    with fsspec.open(source, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as stream:
        members = [member.name for member in stream if member.isreg()]
    if len(set(members)) != len(members):
        raise ValueError(f"image source {source!r}: an archive member name appears twice")
    return [_source_file(_archive_member_path(name), f"{source}:{name}", "member", name) for name in members]


def _archive_payloads(listing: SourceListing) -> Iterator[tuple[SourceFile, bytes | None]]:
    """Yield archive members in key order while reading the archive once, front to back.

    Seeking backwards in a gzip stream re-decompresses from the start, so members are streamed in archive
    order and only those that arrive before their turn are held in memory (none when the archive is sorted).
    """
    assert listing.archive is not None
    files = listing.files
    wanted = {file.locator for file in files}
    pending: dict[str, bytes] = {}
    position = 0
    with fsspec.open(listing.archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as stream:
        for member in stream:
            if member.name not in wanted or not member.isreg():
                continue
            extracted = stream.extractfile(member)
            assert extracted is not None  # regular files always have a payload
            pending[member.name] = extracted.read()
            while position < len(files) and files[position].locator in pending:
                yield files[position], pending.pop(files[position].locator)
                position += 1
    if position < len(files):
        raise ValueError(f"{listing.archive}: member {files[position].locator!r} vanished while reading")
