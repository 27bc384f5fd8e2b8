"""flows.common: run overrides written into params.yaml keep its comments and are validated first."""

import pytest

from flows.common import write_overrides
from sela.config import ParamsError, load_params
from tests.conftest import PROJECT_ROOT


def test_overrides_are_written_with_comments_kept(tmp_path):
    (tmp_path / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    write_overrides(str(tmp_path), {"train": {"num_clusters": 12, "sinkhorn": {"sharpness": 20}}})
    params = load_params(tmp_path / "params.yaml")
    assert params.train.num_clusters == 12 and params.train.sinkhorn.sharpness == 20
    text = (tmp_path / "params.yaml").read_text()
    assert "# lambda of the paper" in text and "# every cluster within 1% of N/K" in text


def test_an_invalid_override_leaves_the_file_untouched(tmp_path):
    original = (PROJECT_ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(original)
    with pytest.raises(ParamsError, match="train.epochs"):
        write_overrides(str(tmp_path), {"train": {"epochs": 0}})
    assert (tmp_path / "params.yaml").read_text() == original
