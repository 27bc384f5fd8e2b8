"""Image sources: digits, folders, archives, globs and list files give every file a stable, escaped key."""

import io
import itertools
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from sela.data.sources import (
    SourceListing,
    decode_image,
    escape_key,
    folder_runs,
    iter_digit_samples,
    iter_payloads,
    list_source,
    unescape_key,
)
from sela.data.images import ImageLimits, WorkBatch, inspect_batch
from tests.conftest import write_folder


def encode(color: tuple[int, int, int], image_format: str, size: tuple[int, int] = (6, 5)) -> bytes:
    """A small solid-colour image (width, height) encoded in ``image_format``."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=image_format)
    return buffer.getvalue()


# Relative path -> bytes. Odd names on purpose: spaces, dots, non-ASCII, upper-case suffix, a dotted folder,
# a nested class folder, a loose file (no ground truth) and a non-image file (listed too: the ingest decides).
FILES = {
    "cats/a photo.png": encode((255, 0, 0), "PNG"),
    "cats/v1.2.final.JPEG": encode((0, 255, 0), "JPEG"),
    "dogs/café.png": encode((0, 0, 255), "PNG"),
    "dogs/puppies/small dog.jpg": encode((9, 9, 9), "JPEG", (4, 4)),
    "loose.png": encode((1, 2, 3), "PNG"),
    "notes.txt": b"not an image",
    "v2.0/x.gif": encode((7, 8, 9), "GIF"),
}
# (relative path, key, ground truth) in the order the source must list them (sorted by key).
EXPECTED = [
    ("cats/a photo.png", "cats/a_20photo_2epng", "cats"),
    ("cats/v1.2.final.JPEG", "cats/v1_2e2_2efinal_2eJPEG", "cats"),
    ("dogs/café.png", "dogs/caf_c3_a9_2epng", "dogs"),
    ("dogs/puppies/small dog.jpg", "dogs/puppies/small_20dog_2ejpg", "puppies"),
    ("loose.png", "loose_2epng", None),
    ("notes.txt", "notes_2etxt", None),
    ("v2.0/x.gif", "v2_2e0/x_2egif", "v2.0"),
]


def make_archive(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    """Write ``files`` as archive members named ``prefix + relative path``, in the given order."""
    with tarfile.open(path, mode="w:gz" if path.name.endswith(("gz", "tgz")) else "w") as archive:
        for relative, data in files.items():
            info = tarfile.TarInfo(prefix + relative)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def payloads(listing: SourceListing) -> list[tuple[str, str | None, bytes]]:
    """(key, ground truth, bytes) per file; local files are read here as the ingest workers would."""
    return [
        (file.key, file.ground_truth, data if data is not None else Path(file.locator).read_bytes())
        for file, data in iter_payloads(listing)
    ]


EXPECTED_PAYLOADS = [(key, truth, FILES[relative]) for relative, key, truth in EXPECTED]


def test_digits_source_gives_all_samples_with_ten_classes() -> None:
    samples = list(iter_digit_samples(16))

    assert len(samples) == 1797
    assert {sample.ground_truth for sample in samples} == {str(digit) for digit in range(10)}
    assert len({sample.key for sample in samples}) == 1797
    first = samples[0]
    assert (first.key, first.extension, first.ground_truth, first.source_path) == (
        "digits/00000",
        "png",
        "0",
        "sklearn:digits/0",
    )
    assert samples[-1].key == "digits/01796"
    image = decode_image(first.image, 16)
    assert image.shape == (16, 16, 3)
    assert image.dtype == np.uint8
    # Grey digits: all three channels equal, and the scaling reaches well into the upper byte range.
    assert np.array_equal(image[..., 0], image[..., 2])
    assert image.max() > 200


def test_digits_are_rendered_deterministically_at_the_requested_size() -> None:
    first_run = [sample.image for sample in itertools.islice(iter_digit_samples(12), 5)]
    second_run = [sample.image for sample in itertools.islice(iter_digit_samples(12), 5)]

    assert first_run == second_run
    assert Image.open(io.BytesIO(first_run[0])).size == (12, 12)


def test_folder_source_lists_every_file_with_escaped_keys_and_ground_truth(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "images", FILES)

    listing = list_source(str(root), 32)

    assert payloads(listing) == EXPECTED_PAYLOADS
    assert [file.source_path for file in listing.files] == [f"{root}/{relative}" for relative, *_ in EXPECTED]
    assert {file.kind for file in listing.files} == {"local"}


@pytest.mark.parametrize(
    ("name", "prefix", "reverse"),
    [("images.tar.gz", "./", False), ("images.tgz", "", True), ("images.tar", "", True)],
)
def test_archive_source_matches_folder_source(tmp_path: Path, name: str, prefix: str, reverse: bool) -> None:
    # A reversed member order checks that files still come out sorted by key.
    members = dict(reversed(FILES.items())) if reverse else FILES
    archive = make_archive(tmp_path / name, members, prefix)

    listing = list_source(str(archive), 32)

    assert payloads(listing) == EXPECTED_PAYLOADS
    assert listing.files[0].source_path == f"{archive}:{prefix}cats/a photo.png"


def test_archive_with_directory_members_matches_the_folder(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "images", FILES)
    archive = tmp_path / "added.tar.gz"
    with tarfile.open(archive, mode="w:gz") as opened:
        opened.add(root, arcname=".")  # adds directory members too: only regular files count

    assert payloads(list_source(str(archive), 32)) == EXPECTED_PAYLOADS


def test_glob_source_keys_are_relative_to_the_part_before_the_wildcard(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "images", FILES)

    listing = list_source(f"{root}/**/*.png", 32)

    assert [file.key for file in listing.files] == ["cats/a_20photo_2epng", "dogs/caf_c3_a9_2epng", "loose_2epng"]
    assert payloads(listing)[0][2] == FILES["cats/a photo.png"]


def test_list_file_resolves_relative_lines_and_keys_urls_by_scheme(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "images", FILES)
    with fsspec.open(f"memory://{tmp_path.name}/extra/dog.png", "wb") as handle:
        handle.write(FILES["dogs/café.png"])
    listed = root / "list.txt"
    listed.write_text(f"# chosen files\ncats/a photo.png\n\nmemory://{tmp_path.name}/extra/dog.png\n")

    listing = list_source(str(listed), 32)

    assert [(file.key, file.kind) for file in listing.files] == [
        ("cats/a_20photo_2epng", "local"),
        (f"memory/{escape_key(tmp_path.name)}/extra/dog_2epng", "remote"),
    ]
    assert [data for _, _, data in payloads(listing)] == [FILES["cats/a photo.png"], FILES["dogs/café.png"]]


def test_remote_folder_source_reads_through_fsspec(tmp_path: Path) -> None:
    for relative, data in FILES.items():
        with fsspec.open(f"memory://{tmp_path.name}/{relative}", "wb") as handle:
            handle.write(data)

    listing = list_source(f"memory://{tmp_path.name}", 32)

    assert payloads(listing) == EXPECTED_PAYLOADS
    # fsspec's canonical memory URLs carry the root '/'.
    assert listing.files[0].source_path == f"memory:///{tmp_path.name}/cats/a photo.png"


def test_missing_source_raises_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "no such folder"

    with pytest.raises(FileNotFoundError, match="does not exist") as raised:
        list_source(str(missing), 32)
    assert str(missing) in str(raised.value)


def test_unusable_sources_raise_with_their_path(tmp_path: Path) -> None:
    other_file = tmp_path / "images.zip"
    other_file.write_bytes(b"PK")
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()

    with pytest.raises(ValueError, match="images.zip"):
        list_source(str(other_file), 32)
    with pytest.raises(ValueError, match="holds no files"):
        list_source(str(empty_folder), 32)


@pytest.mark.parametrize(
    ("relative", "key"),
    [
        ("a b/c.d-e_f.tar.png", "a_20b/c_2ed-e_5ff_2etar_2epng"),
        ("ünï/çødé.jpg", "_c3_bcn_c3_af/_c3_a7_c3_b8d_c3_a9_2ejpg"),
        ("__meta__.png", "_5f_5fmeta_5f_5f_2epng"),
    ],
)
def test_escape_key_is_webdataset_safe_and_reversible(relative: str, key: str) -> None:
    assert escape_key(relative) == key
    assert unescape_key(key) == relative
    assert "." not in key and "__" not in key


def test_escape_key_never_collides_where_the_old_sanitiser_did() -> None:
    # Each pair mapped to one key when unsafe characters all became '_'.
    pairs = [("a.png", "a.jpg"), ("a b.png", "a_b.png"), ("x/v1.0.png", "x/v1_0.png"), ("é.png", "ø.png")]
    for first, second in pairs:
        assert escape_key(first) != escape_key(second)


def test_decomposed_unicode_names_give_the_same_key_as_composed_ones(tmp_path: Path) -> None:
    # macOS stores 'é' as 'e' + combining accent; keys must not depend on that.
    decomposed = "dogs/cafe\u0301.png"
    root = write_folder(tmp_path / "images", {decomposed: encode((0, 0, 255), "PNG")})

    (file,) = list_source(str(root), 32).files

    assert (file.key, file.ground_truth) == (escape_key("dogs/café.png"), "dogs")
    assert file.source_path == f"{root}/{decomposed}"


def test_folder_runs_stream_the_listing_in_key_order_where_files_and_folders_interleave(tmp_path: Path) -> None:
    # Root files sort between folders ('a-' < 'a-b/' < 'a/' < 'a_2ejpg' < 'b/'), a folder's own files between its
    # sub-folders, and two folders whose names are equal after NFC share their keys: one sorted block.
    names = ["a-", "a.jpg", "a-b/x.png", "a/x.png", "a/m.png", "a/k/z.png", "a/l", "a/k.png", "b/c/d/e.png", "z z",
             "caf\u00e9/2.png", "cafe\u0301/1.png", "cafe\u0301/3.png", "_/x", "-/x", "A/x", "a/k-/y.png"]
    root = write_folder(tmp_path / "images", {name: b"x" for name in names})

    runs = folder_runs(str(root))
    listing = list_source(str(root), 32)

    assert runs is not None
    assert list(itertools.chain.from_iterable(runs)) == listing.files == sorted(listing.files)
    assert sorted(file.source_path for file in listing.files) == sorted(f"{root}/{name}" for name in names)
    assert folder_runs(str(root / "a" / "x.png")) is None and folder_runs("digits") is None


def test_every_link_in_a_folder_ends_as_a_sample_or_a_quarantine_line(tmp_path: Path) -> None:
    # A link to a folder is followed, its files keyed under the link's name. A broken link, a link to itself and
    # a link back to a folder being listed (followed, it would list that folder forever) are listed as files that
    # the ingest worker cannot read, so it quarantines them with the reason.
    root = write_folder(tmp_path / "images", {"cats/a.png": encode((1, 2, 3), "PNG")})
    elsewhere = write_folder(tmp_path / "elsewhere", {"b.png": encode((4, 5, 6), "PNG")})
    (root / "dogs").symlink_to(elsewhere)
    (root / "broken.png").symlink_to(tmp_path / "gone.png")
    (root / "itself").symlink_to(root / "itself")
    (root / "cats" / "up").symlink_to(root)

    listing = list_source(str(root), 32)
    keys = [file.key for file in listing.files]
    batch = WorkBatch([file.locator for file in listing.files], keys, str(tmp_path / "batch.bin"))
    reasons = inspect_batch(batch, ImageLimits(min_side=2, max_side=64)).reasons

    assert list(zip(keys, reasons, strict=True)) == [
        ("broken_2epng", "unreadable: No such file or directory"),
        ("cats/a_2epng", None),
        ("cats/up", "unreadable: Is a directory"),
        ("dogs/b_2epng", None),
        ("itself", "unreadable: Too many levels of symbolic links"),
    ]
    assert listing.files[3].source_path == f"{root}/dogs/b.png" and listing.files[3].ground_truth == "dogs"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_decode_image_gives_rgb_uint8_of_requested_size(mode: str) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (7, 3)).save(buffer, format="PNG")

    image = decode_image(buffer.getvalue(), 10)

    assert image.shape == (10, 10, 3)
    assert image.dtype == np.uint8


@pytest.mark.parametrize(("mode", "size"), [("RGB", (32, 32)), ("RGB", (45, 20)), ("L", (32, 32)), ("CMYK", (9, 9))])
def test_decode_image_gives_pillows_pixels_for_jpegs(mode: str, size: tuple[int, int]) -> None:
    # YCbCr and grey JPEGs take the libjpeg-turbo path, CMYK Pillow's: both must match Pillow's own decode.
    channels = len(mode)
    pixels = np.random.default_rng(1).integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.frombytes(mode, size, pixels.tobytes()).save(buffer, format="JPEG")
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        expected = np.asarray(opened.convert("RGB").resize((32, 32), Image.BILINEAR))

    assert np.array_equal(decode_image(buffer.getvalue(), 32), expected)


def test_decode_image_keeps_pixels_when_size_already_matches() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")

    assert np.array_equal(decode_image(buffer.getvalue(), 5), pixels)
