"""Image sources: embedded digits, folders and tar archives give stable keys, ground truth and original bytes."""

import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sela.data import Sample, decode_image, iter_source, sanitise_key


def encode(color: tuple[int, int, int], image_format: str, size: tuple[int, int] = (6, 5)) -> bytes:
    """A small solid-colour image (width, height) encoded in ``image_format``."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=image_format)
    return buffer.getvalue()


# Relative path -> bytes. Odd names on purpose: spaces, dots, non-ASCII, upper-case suffix, a dotted folder,
# a nested class folder, a loose file (no ground truth) and a non-image file that must be ignored.
FILES = {
    "cats/a photo.png": encode((255, 0, 0), "PNG"),
    "cats/v1.2.final.JPEG": encode((0, 255, 0), "JPEG"),
    "dogs/café.png": encode((0, 0, 255), "PNG"),
    "dogs/puppies/small dog.jpg": encode((9, 9, 9), "JPEG", (4, 4)),
    "loose.png": encode((1, 2, 3), "PNG"),
    "notes.txt": b"not an image",
    "v2.0/x.gif": encode((7, 8, 9), "GIF"),
}
# (relative path, key, extension, ground truth) in the order the source must yield them.
EXPECTED = [
    ("cats/a photo.png", "cats/a_photo", "png", "cats"),
    ("cats/v1.2.final.JPEG", "cats/v1_2_final", "jpg", "cats"),
    ("dogs/café.png", "dogs/caf_", "png", "dogs"),
    ("dogs/puppies/small dog.jpg", "dogs/puppies/small_dog", "jpg", "puppies"),
    ("loose.png", "loose", "png", None),
    ("v2.0/x.gif", "v2_0/x", "gif", "v2.0"),
]


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def make_archive(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    """Write ``files`` as archive members named ``prefix + relative path``, in the given order."""
    with tarfile.open(path, mode="w:gz" if path.name.endswith(("gz", "tgz")) else "w") as archive:
        for relative, data in files.items():
            info = tarfile.TarInfo(prefix + relative)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def describe(samples: list[Sample]) -> list[tuple[str, str, str | None, bytes]]:
    return [(sample.key, sample.extension, sample.ground_truth, sample.image) for sample in samples]


def test_digits_source_gives_all_samples_with_ten_classes() -> None:
    samples = list(iter_source("digits", 16))

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
    first_run = [sample.image for sample in itertools.islice(iter_source("digits", 12), 5)]
    second_run = [sample.image for sample in itertools.islice(iter_source("digits", 12), 5)]

    assert first_run == second_run
    assert Image.open(io.BytesIO(first_run[0])).size == (12, 12)


def test_folder_source_gives_sanitised_keys_ground_truth_and_original_bytes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images", FILES)

    samples = list(iter_source(str(root), 32))

    assert describe(samples) == [(key, ext, truth, FILES[relative]) for relative, key, ext, truth in EXPECTED]
    assert [sample.source_path for sample in samples] == [f"{root}/{relative}" for relative, *_ in EXPECTED]


@pytest.mark.parametrize(
    ("name", "prefix", "reverse"),
    [("images.tar.gz", "./", False), ("images.tgz", "", True), ("images.tar", "", True)],
)
def test_archive_source_matches_folder_source(tmp_path: Path, name: str, prefix: str, reverse: bool) -> None:
    folder_samples = list(iter_source(str(make_folder(tmp_path / "images", FILES)), 32))
    # A reversed member order checks that samples still come out sorted by name.
    members = dict(reversed(FILES.items())) if reverse else FILES
    archive = make_archive(tmp_path / name, members, prefix)

    archive_samples = list(iter_source(str(archive), 32))

    assert describe(archive_samples) == describe(folder_samples)
    assert archive_samples[0].source_path == f"{archive}:{prefix}cats/a photo.png"


def test_archive_with_directory_members_and_top_level_files(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images", FILES)
    archive = tmp_path / "added.tar.gz"
    with tarfile.open(archive, mode="w:gz") as opened:
        opened.add(root, arcname=".")  # adds directory members too: only regular files count

    assert describe(list(iter_source(str(archive), 32))) == describe(list(iter_source(str(root), 32)))


@pytest.mark.parametrize("names", [("a.png", "a.jpg"), ("a b.png", "a_b.png"), ("x/v1.0.png", "x/v1_0.png")])
def test_key_collisions_raise_naming_both_files(tmp_path: Path, names: tuple[str, str]) -> None:
    files = {name: encode((0, 0, 0), "PNG") for name in names}
    root = make_folder(tmp_path / "images", files)
    archive = make_archive(tmp_path / "images.tar", files)

    for source in (root, archive):
        with pytest.raises(ValueError, match="both map to key") as raised:
            iter_source(str(source), 32)
        assert all(name in str(raised.value) for name in names)


def test_missing_source_raises_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "no such folder"

    with pytest.raises(FileNotFoundError, match="does not exist") as raised:
        iter_source(str(missing), 32)
    assert str(missing) in str(raised.value)


def test_unusable_sources_raise_with_their_path(tmp_path: Path) -> None:
    other_file = tmp_path / "images.zip"
    other_file.write_bytes(b"PK")
    empty_folder = tmp_path / "empty"
    make_folder(empty_folder, {"readme.txt": b"no images here"})

    with pytest.raises(ValueError, match="images.zip"):
        iter_source(str(other_file), 32)
    with pytest.raises(ValueError, match="holds no image files"):
        iter_source(str(empty_folder), 32)


def test_unreadable_image_raises_naming_the_file(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "images", {"good.png": encode((0, 0, 0), "PNG"), "broken.png": b"not a png"})

    with pytest.raises(ValueError, match="broken.png"):
        list(iter_source(str(root), 32))


def test_sanitise_key_keeps_only_webdataset_safe_characters() -> None:
    assert sanitise_key("a b/c.d-e_f.tar.png") == "a_b/c_d-e_f_tar"
    assert sanitise_key("ünï/çødé.jpg") == "_n_/__d_"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_decode_image_gives_rgb_uint8_of_requested_size(mode: str) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (7, 3)).save(buffer, format="PNG")

    image = decode_image(buffer.getvalue(), 10)

    assert image.shape == (10, 10, 3)
    assert image.dtype == np.uint8


def test_decode_image_keeps_pixels_when_size_already_matches() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")

    assert np.array_equal(decode_image(buffer.getvalue(), 5), pixels)


def test_decomposed_unicode_names_give_the_same_key_as_composed_ones(tmp_path: Path) -> None:
    # macOS stores 'é' as 'e' + combining accent; keys must not depend on that.
    decomposed = "dogs/cafe\u0301.png"
    root = make_folder(tmp_path / "images", {decomposed: encode((0, 0, 255), "PNG")})

    (sample,) = iter_source(str(root), 32)

    assert (sample.key, sample.ground_truth) == ("dogs/caf_", "dogs")
    assert sample.source_path == f"{root}/{decomposed}"
