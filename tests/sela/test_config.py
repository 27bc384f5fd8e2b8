"""params.yaml validation: the project's own file loads; unknown, missing and bad values are named."""

import operator
import re

import pytest
import yaml

from sela.config import ParamsError, load_params, parse_params
from tests.conftest import PROJECT_ROOT


def raw_params() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def test_project_params_load():
    params = load_params(PROJECT_ROOT / "params.yaml")
    assert params.train.num_clusters == 10 and params.shard.source == "digits"


def test_unknown_key_is_named():
    raw = raw_params()
    raw["train"]["num_cluster"] = 3
    with pytest.raises(ParamsError, match="train.num_cluster"):
        parse_params(raw)


def test_missing_key_is_named():
    raw = raw_params()
    del raw["train"]["sinkhorn"]["sharpness"]
    with pytest.raises(ParamsError, match="train.sinkhorn.sharpness"):
        parse_params(raw)


@pytest.mark.parametrize(
    ("key", "value"),
    [("train.num_clusters", -3), ("train.augment.flip_probability", 1.5), ("train.sinkhorn.dtype", "float8"),
     ("train.sinkhorn.cluster_sizes", "uniform"), ("train.sinkhorn.size_floor", 0.0),
     ("train.sinkhorn.size_floor", 1.0), ("train.sinkhorn.size_update", 0.0), ("train.sinkhorn.size_update", 1.5),
     ("train.sinkhorn.size_warmup", 1.0), ("train.sinkhorn.size_warmup", -0.1),
     ("train.sinkhorn.size_penalty", 0.0), ("train.initialisations", 0), ("train.initialisations", 17)],
)
def test_bad_override_is_named(key, value):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(raw_params(), {key: value})


def test_override_of_unknown_key_is_rejected():
    with pytest.raises(ParamsError, match="train.epoch: unknown key"):
        parse_params(raw_params(), {"train.epoch": 3})


def test_override_applies_without_touching_the_input():
    raw = raw_params()
    params = parse_params(raw, {"train.epochs": 7})
    assert params.train.epochs == 7
    assert raw["train"]["epochs"] == raw_params()["train"]["epochs"]


def test_label_head_must_exist():
    with pytest.raises(ParamsError, match="label_head"):
        parse_params(raw_params(), {"export.label_head": 99})
    with pytest.raises(ParamsError, match="label_head"):
        parse_params(raw_params(), {"export.label_head": "best"})
    assert parse_params(raw_params(), {"export.label_head": 1}).export.label_head == 1


@pytest.mark.parametrize("key", ["train.image_size", "train.eval_image_size"])
def test_views_larger_than_the_decoded_image_are_rejected(key):
    decode_size = raw_params()["train"]["decode_size"]
    with pytest.raises(ParamsError, match=f"train: .*decode_size={decode_size} is smaller"):
        parse_params(raw_params(), {key: decode_size + 1})
    assert parse_params(raw_params(), {key: decode_size}).train.decode_size == decode_size


@pytest.mark.parametrize("key", ["train.batch_size", "transfer.batch_size"])
def test_batch_size_of_one_is_rejected(key):
    # BatchNorm cannot train on one image: train_epoch would skip every batch, then divide by zero images seen.
    with pytest.raises(ParamsError, match=re.escape(key) + ": Input should be greater than or equal to 2"):
        parse_params(raw_params(), {key: 1})
    assert operator.attrgetter(key)(parse_params(raw_params(), {key: 2})) == 2


def test_incremental_relabels_must_fit_between_its_epochs():
    with pytest.raises(ParamsError, match=r"train.incremental: .*relabels=3 do not fit between 3 epochs"):
        parse_params(raw_params(), {"train.incremental.epochs": 3, "train.incremental.relabels": 3})
    params = parse_params(raw_params(), {"train.incremental.epochs": 3, "train.incremental.relabels": 2,
                                         "train.start_from": "parent"})
    assert params.train.incremental.relabels == 2 and params.train.start_from == "parent"
    with pytest.raises(ParamsError, match="train.start_from"):
        parse_params(raw_params(), {"train.start_from": "previous"})


def test_estimated_cluster_sizes_are_accepted_with_their_floor_and_update():
    sinkhorn = parse_params(raw_params(), {"train.sinkhorn.cluster_sizes": "estimated",
                                           "train.sinkhorn.size_floor": 0.25, "train.sinkhorn.size_update": 1.0}
                            ).train.sinkhorn
    assert (sinkhorn.cluster_sizes, sinkhorn.size_floor, sinkhorn.size_update) == ("estimated", 0.25, 1.0)


def test_the_relaxation_reaches_the_solver_only_with_relaxed_sizes():
    changes = {"train.sinkhorn.sharpness": 25, "train.sinkhorn.size_penalty": 0.36}
    relaxed = parse_params(raw_params(), {**changes, "train.sinkhorn.cluster_sizes": "relaxed"}).train.sinkhorn
    estimated = parse_params(raw_params(), {**changes, "train.sinkhorn.cluster_sizes": "estimated"}).train.sinkhorn
    assert (relaxed.relaxation(), estimated.relaxation()) == (pytest.approx(0.1), 0.0)  # 1 / (1 + 25 x 0.36)


def test_given_cluster_sizes_need_one_positive_proportion_per_cluster():
    given = [10 - c for c in range(10)]
    sinkhorn = parse_params(raw_params(), {"train.sinkhorn.cluster_sizes": "given",
                                           "train.sinkhorn.given_sizes": given}).train.sinkhorn
    assert sinkhorn.cluster_sizes == "given" and sinkhorn.given_sizes == given
    with pytest.raises(ParamsError, match="3 proportions but num_clusters is 10"):
        parse_params(raw_params(), {"train.sinkhorn.cluster_sizes": "given", "train.sinkhorn.given_sizes": [1, 2, 3]})
    with pytest.raises(ParamsError, match=r"train\.sinkhorn\.given_sizes"):
        parse_params(raw_params(), {"train.sinkhorn.cluster_sizes": "given", "train.sinkhorn.given_sizes": [0] * 10})
    with pytest.raises(ParamsError, match="given_sizes is null with cluster_sizes: given"):
        parse_params(raw_params(), {"train.sinkhorn.cluster_sizes": "given"})
    with pytest.raises(ParamsError, match="given_sizes is .* with cluster_sizes: equal"):
        parse_params(raw_params(), {"train.sinkhorn.given_sizes": given})
