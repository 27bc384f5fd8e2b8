"""benchmarks/incremental.py end to end on the embedded digits with short schedules: it calls the pipeline's
training, export and incremental start, so a change of their signatures must show here, not in the next run."""

import json
import re
import subprocess
import sys

import pytest

from benchmarks.incremental import digit_shards
from sela.config import load_params
from sela.data.shards import read_manifest
from tests.conftest import PROJECT_ROOT

SHORT = {"train.num_heads": 2, "train.epochs": 3, "train.num_relabels": 2,
         "train.incremental.epochs": 2, "train.incremental.relabels": 1}


@pytest.mark.slow
def test_the_incremental_benchmark_prints_time_kept_and_acc_for_each_seed_and_their_means():
    result = subprocess.run(
        [sys.executable, "benchmarks/incremental.py", "--seeds", "0", "1", "--overrides", json.dumps(SHORT)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    ratios = [float(value) for value in re.findall(r"^time incremental / scratch: ([0-9.]+)", output, re.MULTILINE)]
    kept = [float(value) for value in re.findall(r"^old images' labels kept: ([0-9.]+)%", output, re.MULTILINE)]
    assert len(ratios) == len(kept) == 2 and all(ratio > 0 for ratio in ratios)  # short runs: no goal
    assert all(0 <= share <= 100 for share in kept)
    assert len(re.findall(r"^ACC incremental - scratch: [+-][0-9.]+ points", output, re.MULTILINE)) == 2
    assert "means over seeds [0, 1]" in output
    assert re.search(r"^version 2 .*\nscratch +1797 +3 .*\nincremental +1797 +2 ", output, re.MULTILINE)


def test_the_choice_of_new_images_follows_its_seed(tmp_path):
    params = load_params(PROJECT_ROOT / "params.yaml")

    def old_keys(name: str, choice_seed: int) -> set[str]:
        old, everything = digit_shards(tmp_path / name, params, 0.1, choice_seed)
        keys, all_keys = set(read_manifest(old)["key"]), read_manifest(everything)["key"].tolist()
        assert keys < set(all_keys) and len(all_keys) == 1797
        return keys

    first, again, other = old_keys("a", 0), old_keys("b", 0), old_keys("c", 1)
    assert len(first) == len(other) == 1617
    assert first == again and first != other
