"""benchmarks/imbalance.py end to end on a tiny CIFAR-shaped collection: the benchmark calls the pipeline's code,
so a change of that code's signatures must not leave it broken until the next 30-minute run."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PROJECT_ROOT

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
         "--methods", "equal,estimated,given"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split(": ", 1)[0]: json.loads(line.split(": ", 1)[1]) for line in result.stdout.splitlines()
            if line.startswith(("heavy/equal: {", "heavy/estimated: {", "heavy/given: {"))}
    assert set(rows) == {"heavy/equal", "heavy/estimated", "heavy/given"}
    for row in rows.values():
        assert 0 <= row["acc"] <= 1 and len(row["sizes"]) == 10 and abs(sum(row["sizes"]) - 1) < 1e-3
    assert "heavy: 165 train / 55 test images" in result.stdout
    # The given run ends on the train subset's class proportions (30 down to 3 images a class).
    assert rows["heavy/given"]["size_error"] < 1e-3 and rows["heavy/equal"]["size_error"] > 0.2
    assert "given - equal: ACC" in result.stdout and "estimated - equal: ACC" in result.stdout
