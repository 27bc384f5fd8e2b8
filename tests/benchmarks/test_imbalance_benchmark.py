"""benchmarks/imbalance.py end to end on a tiny CIFAR-shaped collection: the benchmark calls the pipeline's code,
so a change of that code's signatures must not leave it broken until the next 30-minute run."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PROJECT_ROOT

METHODS = ("equal", "relaxed", "estimated", "given")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_classes(folder, per_class: int, seed: int) -> None:
    """32 px JPEGs in CIFAR-10's class folders, each class its own colour with noise."""
    rng = np.random.default_rng(seed)
    for number, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        colour = np.array([number * 25, 255 - number * 25, (number * 70) % 256])
        for index in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{index:04d}.jpg", quality=90)


@pytest.mark.slow
def test_the_imbalance_benchmark_runs_and_prints_every_method(tmp_path):
    write_classes(tmp_path / "cifar" / "train", 30, 0)
    write_classes(tmp_path / "cifar" / "test", 10, 1)
    result = subprocess.run(
        [sys.executable, "benchmarks/imbalance.py", "--extracted", str(tmp_path / "cifar"), "--sets", "heavy",
         "--epochs", "2", "--workers", "1", "--overrides", json.dumps({"train.batch_size": 32}),
         "--methods", "equal,relaxed,estimated,given", "--figure", str(tmp_path / "sizes.png")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split(": ", 1)[0]: json.loads(line.split(": ", 1)[1]) for line in result.stdout.splitlines()
            if line.startswith(tuple(f"heavy/{method}: {{" for method in METHODS))}
    assert set(rows) == {f"heavy/{method}" for method in METHODS}
    for row in rows.values():
        assert 0 <= row["acc"] <= 1 and len(row["sizes"]) == 10 and abs(sum(row["sizes"]) - 1) < 1e-3
    assert "heavy: 165 train / 55 test images" in result.stdout
    # Size error: the exported labels' sizes against the train subset's classes (30 down to 3 images a class).
    classes = np.arange(30, 0, -3) / 165
    for row in rows.values():
        assert row["size_error"] == pytest.approx(np.abs(np.array(row["sizes"]) - classes).sum() / 2, abs=1e-3)
    assert all(f"{method} - equal: ACC" in result.stdout for method in METHODS[1:])
    assert (tmp_path / "sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_digits_sets_hold_out_a_quarter_and_remove_the_papers_fractions(tmp_path):
    # Digits: 178-183 images a class, a quarter held out, then 0%, 10%, ..., 90% of each part removed.
    result = subprocess.run(
        [sys.executable, "benchmarks/imbalance.py", "--collection", "digits", "--sets", "full,heavy", "--epochs", "4",
         "--methods", "equal,given"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "full: 1347 train / 450 test images" in result.stdout
    assert "heavy: 741 train / 247 test images" in result.stdout
    rows = {line.split(": ", 1)[0]: json.loads(line.split(": ", 1)[1]) for line in result.stdout.splitlines()
            if line.startswith(tuple(f"{name}/{method}: {{" for name in ("full", "heavy") for method in METHODS))}
    # Told the heavy set's class proportions, the labels take them (135 down to 14 of 741 images a class).
    assert rows["heavy/given"]["size_error"] < 0.05 < 0.15 < rows["heavy/equal"]["size_error"]
    assert rows["heavy/given"]["sizes"][0] > 0.15 > 0.12 > rows["heavy/equal"]["sizes"][0]
    assert rows["full/given"]["size_error"] < 0.05  # balanced classes: given sizes are equal sizes
    assert "digits, 4 epochs a run" in result.stdout
    scale = subprocess.run([sys.executable, "benchmarks/imbalance.py", "--collection", "digits", "--scale", "0.5"],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert scale.returncode == 2 and "--scale thins CIFAR-10's sets" in scale.stderr
