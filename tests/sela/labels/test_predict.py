"""Prediction: shards labelled by a label set's rule and ids, streamed, with the manifest's columns."""

import numpy as np
import pandas as pd
import pytest
import torch

from sela.sinkhorn.sizes import uniform_sizes
from sela.config import load_params
from sela.data.shards import read_manifest, read_shards, write_shards
from sela.data.sources import iter_digit_samples
from sela.labels.export import final_labels, predict_labels
from sela.labels.predict import (
    LabelRule,
    predict_shards,
    prediction_table,
    quarantine_path,
    source_params,
    write_table,
)
from sela.learn.inference import compute_logits
from sela.learn.models import build_model
from tests.conftest import PROJECT_ROOT

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(params, random small network, shard folder of 300 digits in 3 shards, those images decoded)."""
    params = load_params(PROJECT_ROOT / "params.yaml", {"train.width": 8, "train.num_heads": 2})
    shard_dir = tmp_path_factory.mktemp("shards")
    samples = [sample for _, sample in zip(range(300), iter_digit_samples(params.shard.image_size), strict=False)]
    write_shards(samples, shard_dir, 128)
    torch.manual_seed(0)
    model = build_model("small_cnn", 8, params.train.head_sizes, params.train.hidden_layers)
    images = torch.from_numpy(read_shards(shard_dir, params.train.decode_size).images)
    return params, model, shard_dir, images


def renamed_rule(params, model, images, selected_head=1) -> LabelRule:
    """The rule of the label set these images would make, with head 0's ids reversed as an alignment would."""
    final = final_labels(model, images, params, CPU, [uniform_sizes(k) for k in params.train.head_sizes])
    clusters = params.train.num_clusters
    renaming = np.stack([np.arange(clusters)[::-1], np.arange(clusters)])
    return LabelRule(final.cluster_potentials, renaming, selected_head)


def test_streamed_prediction_is_the_in_memory_rule_under_the_published_ids(digits):
    params, model, shard_dir, images = digits
    rule = renamed_rule(params, model, images)
    done = []
    prediction = predict_shards(model, shard_dir, rule, params, CPU, workers=0, progress=done.append)
    expected = predict_labels(model, images, rule.cluster_potentials, params, CPU)  # network output order
    assert prediction.labels.shape == (2, 300) and sum(done) == 300
    for head in range(2):
        np.testing.assert_array_equal(prediction.labels[head], rule.output_to_label[head][expected[head]])
    logits = compute_logits(model, images, params.train, CPU, augmented=False)
    for head in range(2):
        probabilities = torch.softmax(logits[head], dim=1).numpy()
        np.testing.assert_allclose(prediction.confidence[head], probabilities[np.arange(300), expected[head]],
                                   rtol=1e-5)
        np.testing.assert_array_equal(prediction.network_labels[head],
                                      rule.output_to_label[head][probabilities.argmax(1)])
    # The label set's own images: the rule gives back the Sinkhorn labels, where plain argmax does not.
    final = final_labels(model, images, params, CPU, [uniform_sizes(k) for k in params.train.head_sizes])
    np.testing.assert_array_equal(prediction.labels[1], final.labels[1])


def test_loader_workers_give_the_same_labels_in_manifest_order(digits):
    params, model, shard_dir, images = digits
    rule = renamed_rule(params, model, images)
    inline = predict_shards(model, shard_dir, rule, params, CPU, workers=0)
    two = predict_shards(model, shard_dir, rule, params, CPU, workers=2)  # batches arrive interleaved
    np.testing.assert_array_equal(inline.labels, two.labels)
    np.testing.assert_allclose(inline.confidence, two.confidence, rtol=1e-6)


def test_table_has_the_label_set_columns_and_the_manifest_ones(digits):
    params, model, shard_dir, images = digits
    rule = renamed_rule(params, model, images, selected_head=0)
    prediction = predict_shards(model, shard_dir, rule, params, CPU, workers=0)
    table = prediction_table(shard_dir, prediction, rule.selected_head)
    manifest = read_manifest(shard_dir)
    assert list(table.columns) == ["key", "label", "confidence", "label_head_0", "confidence_head_0", "label_head_1",
                                   "confidence_head_1", "source_path", "sha256", "width", "height"]
    assert table["key"].tolist() == manifest["key"].tolist()
    assert table["sha256"].tolist() == manifest["sha256"].tolist()
    np.testing.assert_array_equal(table["label"], prediction.labels[0])
    np.testing.assert_array_equal(table["label_head_1"], prediction.labels[1])


def test_rule_comes_from_the_card_with_identity_ids_for_a_first_version():
    card = {"cluster_potentials": [[0.0, 1.0, 2.0], [0.5, 0.5, 0.5]], "metrics": {"selected_head": 1},
            "cluster_id_alignment": None}
    rule = LabelRule.from_card(card)
    assert rule.selected_head == 1 and rule.num_heads == 2
    np.testing.assert_array_equal(rule.output_to_label, [[0, 1, 2], [0, 1, 2]])
    card["cluster_id_alignment"] = [{"head": 1, "output_to_label": [1, 2, 0], "agreement_with_parent": 0.9},
                                    {"head": 0, "output_to_label": [2, 0, 1], "agreement_with_parent": 0.8}]
    np.testing.assert_array_equal(LabelRule.from_card(card).output_to_label, [[2, 0, 1], [1, 2, 0]])


def test_a_bad_rule_is_refused():
    with pytest.raises(ValueError, match="predates"):
        LabelRule.from_card({"metrics": {"selected_head": 0}})
    with pytest.raises(ValueError, match="not a permutation"):
        LabelRule(np.zeros((1, 3)), np.array([[0, 0, 1]]), 0)
    with pytest.raises(ValueError, match="out of range"):
        LabelRule(np.zeros((1, 3)), np.array([[0, 1, 2]]), 1)


def test_potentials_that_do_not_fit_the_network_are_refused(digits):
    params, model, shard_dir, _ = digits
    rule = LabelRule(np.zeros((2, 4)), np.tile(np.arange(4), (2, 1)), 0)
    with pytest.raises(ValueError, match="same label set"):
        predict_shards(model, shard_dir, rule, params, CPU, workers=0)


def test_outputs_are_parquet_or_csv_by_suffix(tmp_path):
    frame = pd.DataFrame({"key": ["a", "b"], "label": np.array([3, 1], dtype=np.int32)})
    assert write_table(frame, tmp_path / "out.parquet") == tmp_path / "out.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out.parquet"), frame)
    write_table(frame, tmp_path / "sub" / "out.CSV")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "sub" / "out.CSV"), frame, check_dtype=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.parquet", "sub"]  # no partial file left
    assert quarantine_path(tmp_path / "out.csv") == tmp_path / "out.quarantine.csv"


def test_source_params_keep_the_versions_ingest_settings():
    params = load_params(PROJECT_ROOT / "params.yaml", {"shard.max_side": 40})
    shard = source_params(params, "/data/new")
    assert shard.source == "/data/new" and shard.max_side == 40 and params.shard.source != "/data/new"
