"""Image sources for the ``shard`` stage: each yields ``Sample`` records ready to be packed into WebDataset shards.

A source is chosen by the ``shard.source`` parameter (see ``iter_source``):

- ``"digits"``: scikit-learn's embedded 8x8 digits (1797 images, 10 classes), rendered as PNG;
- a folder: every image file found recursively; a class sub-folder, if any, is kept as optional ground truth;
- a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive: the same rules applied to the archive's member names.

Folder and archive images are stored exactly as found (no re-encode), so the shards keep the original bytes.
Everything here is a pure function of its inputs: no printing, no pipeline imports.
"""

import io
import re
import tarfile
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

DIGITS_SOURCE = "digits"
# File suffix (lower case) -> extension stored in the shard; 'jpeg' is folded into 'jpg' so readers see one name.
IMAGE_EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".bmp": "bmp", ".gif": "gif", ".webp": "webp"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# WebDataset splits a member name at the first dot of its last component, so keys keep to this alphabet.
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")


@dataclass(frozen=True, slots=True)
class Sample:
    """One image as stored in a shard: encoded bytes plus the metadata kept next to it."""

    key: str
    image: bytes = field(repr=False)
    extension: str
    ground_truth: str | None
    source_path: str


@dataclass(frozen=True, slots=True)
class _Entry:
    """A file found in a folder or archive, before its bytes are read."""

    key: str
    extension: str
    ground_truth: str | None
    source_path: str
    locator: str  # file path to read (folder) or original member name (archive)


def iter_source(source: str, image_size: int) -> Iterator[Sample]:
    """Return the samples of ``source`` in a stable order.

    ``image_size`` is the side of the rendered digits; folder and archive images keep their own size.
    The source is checked (existence, key collisions, at least one image) before this returns, images are
    read lazily while iterating.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if source == DIGITS_SOURCE:
        return _iter_digits(image_size)
    path = Path(source)
    if path.is_dir():
        entries = _folder_entries(path, source)
        return _iter_folder(entries)
    if path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
        entries = _archive_entries(path, source)
        return _iter_archive(path, entries)
    expected = f"expected {DIGITS_SOURCE!r}, a folder of images, or a {'/'.join(ARCHIVE_SUFFIXES)} archive"
    if not path.exists():
        raise FileNotFoundError(f"image source {source!r} does not exist: {expected}")
    raise ValueError(f"image source {source!r} is not usable: {expected}")


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes to a uint8 RGB array of shape (size, size, 3), resized bilinearly if needed."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def sanitise_key(relative_path: str) -> str:
    """Turn a relative POSIX path into a WebDataset key: extension dropped, dots and unsafe characters -> '_'."""
    without_extension = str(PurePosixPath(relative_path).with_suffix(""))
    return _KEY_UNSAFE.sub("_", without_extension)


def _iter_digits(image_size: int) -> Iterator[Sample]:
    # Imported here: scikit-learn is only needed by this source and takes a while to import.
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16; scale to the full byte range so the PNG uses the usual 0..255 contrast.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image_8x8, label) in enumerate(zip(pixels, digits.target, strict=True)):
        image = Image.fromarray(image_8x8).resize((image_size, image_size), Image.BILINEAR).convert("RGB")
        buffer = io.BytesIO()
        # No pnginfo and no optimisation pass: the bytes depend only on the pixels (and zlib), so reruns match.
        image.save(buffer, format="PNG", optimize=False)
        yield Sample(
            key=f"digits/{index:05d}",
            image=buffer.getvalue(),
            extension="png",
            ground_truth=str(int(label)),
            source_path=f"sklearn:digits/{index}",
        )


def _make_entries(relative_paths: dict[str, str], source: str) -> list[_Entry]:
    """Build entries from {relative POSIX path: locator}, sorted by path; raise on key collisions or no image."""
    entries: list[_Entry] = []
    owner_of_key: dict[str, str] = {}
    # NFC so that the same name gives the same key and order whether the filesystem stores NFC or NFD.
    normalised_paths = {relative: unicodedata.normalize("NFC", relative) for relative in relative_paths}
    for relative in sorted(relative_paths, key=normalised_paths.__getitem__):
        normalised = normalised_paths[relative]
        pure = PurePosixPath(normalised)
        extension = IMAGE_EXTENSIONS.get(pure.suffix.lower())
        if extension is None:
            continue
        key = sanitise_key(normalised)
        if key in owner_of_key:
            raise ValueError(
                f"image source {source!r}: {owner_of_key[key]!r} and {relative!r} both map to key {key!r}; "
                "rename one of them"
            )
        owner_of_key[key] = relative
        ground_truth = pure.parent.name if len(pure.parts) > 1 else None
        source_path = f"{source.rstrip('/')}/{relative}"
        entries.append(_Entry(key, extension, ground_truth, source_path, relative_paths[relative]))
    if not entries:
        raise ValueError(f"image source {source!r} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return entries


def _folder_entries(root: Path, source: str) -> list[_Entry]:
    files = {path.relative_to(root).as_posix(): str(path) for path in root.rglob("*") if path.is_file()}
    return _make_entries(files, source)


def _archive_member_path(name: str) -> str:
    # Archives made with `tar -C folder .` name members './cat/x.png'; drop '.' and a leading '/'.
    return PurePosixPath(*[part for part in PurePosixPath(name).parts if part not in ("/", ".")]).as_posix()


def _archive_entries(archive: Path, source: str) -> list[_Entry]:
    members: dict[str, str] = {}
    with tarfile.open(archive, mode="r:*") as opened:
        for member in opened.getmembers():
            if not member.isreg():
                continue
            relative = _archive_member_path(member.name)
            if members.get(relative, member.name) != member.name:
                raise ValueError(f"image source {source!r}: members {members[relative]!r} and {member.name!r} clash")
            members[relative] = member.name
    entries = _make_entries(members, source)
    # The source path of a member names the archive, then the member: 'images.tar.gz:cat/x.png'.
    return [
        _Entry(entry.key, entry.extension, entry.ground_truth, f"{source}:{entry.locator}", entry.locator)
        for entry in entries
    ]


def _checked_sample(entry: _Entry, data: bytes) -> Sample:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as error:  # PIL raises several unrelated types for broken files
        raise ValueError(f"{entry.source_path}: not a readable image ({error})") from error
    return Sample(entry.key, data, entry.extension, entry.ground_truth, entry.source_path)


def _iter_folder(entries: list[_Entry]) -> Iterator[Sample]:
    for entry in entries:
        yield _checked_sample(entry, Path(entry.locator).read_bytes())


def _iter_archive(archive: Path, entries: list[_Entry]) -> Iterator[Sample]:
    """Yield archive members in key order while reading the archive once, front to back.

    Seeking backwards in a gzip stream re-decompresses from the start, so members are streamed in archive
    order and only those that arrive before their turn are held in memory (none when the archive is sorted).
    """
    wanted = {entry.locator: entry for entry in entries}
    pending: dict[str, bytes] = {}
    next_position = 0
    with tarfile.open(archive, mode="r|*") as stream:
        for member in stream:
            if member.name not in wanted or not member.isreg():
                continue
            extracted = stream.extractfile(member)
            assert extracted is not None  # regular files always have a payload
            pending[member.name] = extracted.read()
            while next_position < len(entries) and entries[next_position].locator in pending:
                entry = entries[next_position]
                yield _checked_sample(entry, pending.pop(entry.locator))
                next_position += 1
    if next_position < len(entries):
        raise ValueError(f"{archive}: member {entries[next_position].locator!r} vanished while reading")
