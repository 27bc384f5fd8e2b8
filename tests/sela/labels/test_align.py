"""sela.labels.align: aligning a labelling to a renamed copy of itself is exact; diffs of identical sets are empty."""

import numpy as np
import pytest

from sela.labels.align import alignment, diff_labels


def test_alignment_undoes_a_random_permutation_exactly():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 10, size=2000)
    renamed = rng.permutation(10)[original]
    permutation = alignment(renamed, original, 10)
    assert np.array_equal(permutation[renamed], original)
    assert sorted(permutation) == list(range(10))


@pytest.mark.parametrize("reference_clusters", [6, 10, 14])
def test_alignment_is_a_permutation_whatever_the_reference_has(reference_clusters):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=500)
    reference = np.where(labels < reference_clusters, labels, rng.integers(0, reference_clusters, size=500))
    permutation = alignment(labels, reference, 10)
    assert sorted(permutation) == list(range(10))
    aligned = permutation[labels]
    assert sorted(np.bincount(aligned, minlength=10)) == sorted(np.bincount(labels, minlength=10))  # renamed only
    shared = labels < reference_clusters
    assert (aligned[shared] == reference[shared]).mean() == 1.0  # ids the reference has are kept


def test_alignment_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match="0..3"):
        alignment(np.array([0, 4]), np.array([0, 1]), 4)


def test_diff_of_identical_label_sets_is_empty():
    keys = np.array([f"k{i}" for i in range(300)])
    labels = np.arange(300) % 7
    diff = diff_labels(keys, labels, keys, labels)
    assert diff.agreement == 1.0 and diff.moved == 0 and diff.new == 0 and diff.removed == 0
    assert diff.nmi == pytest.approx(1.0) and diff.ari == pytest.approx(1.0)
    assert diff.split == {} and diff.merged == {}


def test_diff_finds_renaming_moves_splits_merges_and_key_changes():
    keys_a = np.array([f"k{i}" for i in range(400)])
    labels_a = np.repeat(np.arange(4), 100)  # clusters 0..3 of 100 images
    labels_b = np.array([3, 2, 1, 0])[labels_a]  # renamed ...
    labels_b[:50] = 4  # ... cluster 0 split in half, the half going to the new cluster 4
    labels_b[300:310] = 2  # 10 images of cluster 3 moved to cluster 1's B id; not enough to count as a merge
    keys_b = np.concatenate([keys_a[5:], ["new0", "new1"]])
    diff = diff_labels(keys_a, labels_a, keys_b, np.concatenate([labels_b[5:], [0, 1]]))
    assert (diff.shared, diff.new, diff.removed) == (395, 2, 5)
    assert diff.moved == 45 + 10 and diff.agreement == pytest.approx(1 - 55 / 395)
    assert diff.agreement_as_published < 0.2  # ids were renamed: a raw join disagrees
    assert list(diff.split) == [0] and len(diff.split[0]) == 2
    assert diff.merged == {}
