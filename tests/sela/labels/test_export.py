"""Export: balanced labels of every head, the head chosen by the SeLa objective, metrics of that head."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sela.config import load_params
from sela.labels.export import align_to_parent, final_labels, label_metrics, parent_label_head, predict_labels
from sela.labels.metrics import label_quality
from sela.learn.models import MultiHeadNet
from sela.learn.inference import compute_logits
from sela.sinkhorn.sizes import uniform_sizes
from tests.conftest import PROJECT_ROOT

EQUAL = [uniform_sizes(10)] * 3  # equipartition for the three heads
SCALES = (1.0, 5.0, 0.2)  # head 1 is the most decisive about the same partition: the lowest objective


class FirstRow(nn.Module):
    """Features = the first 10 pixels of channel 0's first row: one-hot images give one-hot-like features."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, :10]


def setup(label_head):
    params = load_params(PROJECT_ROOT / "params.yaml", {"train.num_heads": 3, "train.eval_image_size": 16,
                                                         "export.label_head": label_head})  # pixels as drawn
    model = MultiHeadNet(FirstRow(), 10, [10] * 3)
    with torch.no_grad():
        for head, scale in zip(model.heads, SCALES, strict=True):
            head.weight.copy_(torch.eye(10) * scale)
            head.bias.zero_()
    classes = np.arange(300) % 10
    images = torch.zeros(300, 16, 16, 3, dtype=torch.uint8)
    images[torch.arange(300), 0, torch.from_numpy(classes), :] = 255
    return params, model, images, [str(c) for c in classes]


def test_lowest_loss_selects_the_most_decisive_head():
    params, model, images, truth = setup("lowest_loss")
    final = final_labels(model, images, params, torch.device("cpu"), EQUAL)
    assert final.labels.shape == (3, 300) and final.confidence.shape == (3, 300)
    assert final.selected_head == 1 and final.objective[1] < min(final.objective[0], final.objective[2])
    assert label_metrics(final, truth, 10)["acc"] == 1.0


def test_confidence_is_the_networks_probability_of_the_exported_label():
    params, model, images, _ = setup("lowest_loss")
    final = final_labels(model, images, params, torch.device("cpu"), EQUAL)
    logits = compute_logits(model, images, params.train, torch.device("cpu"), augmented=False)
    for head in range(3):
        expected = torch.softmax(logits[head].float(), dim=1)[torch.arange(300), final.labels[head]]
        np.testing.assert_allclose(final.confidence[head], expected.numpy(), rtol=1e-5)
        assert final.objective[head] == pytest.approx(-np.log(final.confidence[head]).mean(), rel=1e-5)
    # The sharpened plan's row maximum would be ~1.0 for every image here; the network's probability is not.
    assert final.confidence[0].max() < 0.95 and final.confidence[1].min() > final.confidence[0].max()


def test_new_images_are_labelled_by_the_label_sets_rule_not_the_networks_argmax():
    params, model, images, truth = setup("lowest_loss")
    with torch.no_grad():
        model.heads[0].bias[0] = 6.0  # head 0 prefers cluster 0 for every image (4.4 apart): balancing undoes it
    final = final_labels(model, images, params, torch.device("cpu"), EQUAL)
    np.testing.assert_array_equal(predict_labels(model, images, final.cluster_potentials, params, torch.device("cpu")),
                                  final.labels)
    new_images = images[torch.randperm(300, generator=torch.Generator().manual_seed(0))[:37]]
    new_truth = new_images[:, 0, :10, 0].argmax(1).tolist()
    predicted = predict_labels(model, new_images, final.cluster_potentials, params, torch.device("cpu"))
    logits = compute_logits(model, new_images, params.train, torch.device("cpu"), augmented=False)
    assert (logits[0].argmax(1) == 0).all()  # the network alone puts every new image in cluster 0
    assert label_metrics(final, truth, 10)["acc"] == 1.0
    for head in range(3):  # the label set's rule recovers the classes on 37 images that were never balanced
        assert label_quality(predicted[head], new_truth)["acc"] == 1.0


def test_potentials_of_another_label_set_are_refused_and_no_images_give_no_labels():
    params, model, images, _ = setup("lowest_loss")
    final = final_labels(model, images, params, torch.device("cpu"), EQUAL)
    for wrong in (final.cluster_potentials[:, :7], np.zeros((4, 10)), final.cluster_potentials[0]):
        with pytest.raises(ValueError, match="same label set"):
            predict_labels(model, images, wrong, params, torch.device("cpu"))
    assert predict_labels(model, images[:0], final.cluster_potentials, params, torch.device("cpu")).shape == (3, 0)


def test_fixed_head_is_respected_and_scored():
    params, model, images, truth = setup(2)
    final = final_labels(model, images, params, torch.device("cpu"), EQUAL)
    metrics = label_metrics(final, truth, params.train.num_clusters)
    assert final.selected_head == 2 and metrics["selected_head"] == 2
    assert metrics["acc"] == 1.0 and metrics["cluster_sizes"][2] == [30] * 10
    assert "nmi" not in label_metrics(final, [None] * 300, params.train.num_clusters)


def test_alignment_to_a_renamed_parent_restores_its_ids():
    params, model, images, _ = setup("lowest_loss")
    final = final_labels(model, images, params, torch.device("cpu"), EQUAL)
    keys = [f"img{i}" for i in range(300)]
    rng = np.random.default_rng(0)
    parent = [rng.permutation(10)[head_labels] for head_labels in final.labels[:2]]  # parent had 2 heads
    order = rng.permutation(300)[:250]  # the parent knew only 250 of the images, in another order
    parent_keys, parent_heads = [keys[i] for i in order], [p[order] for p in parent]
    aligned, report = align_to_parent(final, keys, parent_keys, parent_heads, parent_heads[1], 10)
    assert final.selected_head == 1  # aligned to the parent's `label` column, here the parent's head 1 as well
    for head in range(2):
        assert np.array_equal(aligned.labels[head], parent[head])  # the 50 new images get the aligned ids too
        assert report[head]["agreement_with_parent"] == 1.0
        assert np.array_equal(np.asarray(report[head]["output_to_label"])[final.labels[head]], parent[head])
    assert np.array_equal(aligned.labels[2], final.labels[2]) and report[2]["agreement_with_parent"] is None
    assert np.array_equal(aligned.confidence, final.confidence)


def test_selected_head_follows_the_parents_label_column_not_its_head_number():
    params, model, images, _ = setup(0)
    final = final_labels(model, images, params, torch.device("cpu"), EQUAL)
    keys = [f"img{i}" for i in range(300)]
    renamed = np.random.default_rng(1).permutation(10)[final.labels[0]]
    other_head = np.zeros(300, dtype=np.int64)  # the parent's head 0 says nothing: its `label` came from head 2
    aligned, report = align_to_parent(final, keys, keys, [other_head, other_head, renamed], renamed, 10)
    assert np.array_equal(aligned.labels[0], renamed) and report[0]["agreement_with_parent"] == 1.0


def test_parent_label_head_is_the_head_the_label_column_holds():
    parent = pd.DataFrame({"key": ["a", "b", "c"], "label": [1, 0, 1], "label_head_0": [0, 1, 1],
                           "label_head_1": [1, 0, 1]})
    assert parent_label_head(parent) == 1
    assert parent_label_head(parent.assign(label=[2, 2, 2])) is None
    assert parent_label_head(None) is None


def test_final_labels_are_balanced_to_the_sizes_training_ended_with_and_the_metrics_record_them():
    params, model, images, _ = setup(0)
    classes = np.arange(300) % 10
    keep = (classes >= 5) | (np.arange(300) % 20 < 10)  # classes 5-9 twice as often as classes 0-4
    images, classes = images[torch.from_numpy(keep)], classes[keep]
    sizes = np.bincount(classes, minlength=10) / len(classes)
    logits = compute_logits(model, images, params.train, torch.device("cpu"), augmented=False)

    def plan_columns(final):  # column sums of each head's plan: softmax_k(lambda z_ik + g_k), rows summing to 1/N
        return [torch.softmax(params.train.sinkhorn.sharpness * logits[head].double()
                              + torch.from_numpy(final.cluster_potentials[head]), dim=1).mean(0).numpy()
                for head in range(3)]

    final = final_labels(model, images, params, torch.device("cpu"), [sizes] * 3)
    np.testing.assert_array_equal(final.target_sizes, np.stack([sizes] * 3))
    for head, columns in enumerate(plan_columns(final)):
        np.testing.assert_allclose(columns, sizes, rtol=0.011)  # the stopping rule's 1%, relative to each size
        np.testing.assert_array_equal(final.labels[head], classes)
    metrics = label_metrics(final, [str(c) for c in classes], 10)
    assert metrics["acc"] == 1.0 and metrics["target_sizes"][0] == pytest.approx(sizes.tolist())
    equal = final_labels(model, images, params, torch.device("cpu"), EQUAL)
    assert all(np.abs(columns - 0.1).max() < 0.0011 for columns in plan_columns(equal))
    with pytest.raises(ValueError, match="target sizes for 1 heads"):
        final_labels(model, images, params, torch.device("cpu"), [sizes])
