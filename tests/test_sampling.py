import jax
import numpy as np
import pytest

from maskrcnn_jax.ops.sampling import sample_balanced


def _labels(rng, size, num_positive, num_negative):
    labels = np.full(size, -1, np.int32)
    chosen = rng.permutation(size)[: num_positive + num_negative]
    labels[chosen[:num_positive]] = 1
    labels[chosen[num_positive:]] = 0
    return labels


@pytest.mark.parametrize(
    "num_positive,num_negative,want_positive,want_negative",
    [
        (300, 5000, 64, 192),  # plenty of both
        (10, 5000, 10, 246),  # few positives: negatives fill
        (10, 100, 10, 100),  # few of both: padding
        (0, 0, 0, 0),  # nothing eligible
        (0, 400, 0, 256),  # no positives
        (500, 3, 64, 3),  # positives capped even when negatives run short
    ],
)
def test_counts_follow_detectron2(rng, num_positive, num_negative, want_positive, want_negative):
    labels = _labels(rng, 6000, num_positive, num_negative)
    key = jax.random.key(int(rng.integers(1 << 30)))
    indices, valid, is_positive = jax.jit(sample_balanced, static_argnums=(2, 3))(key, labels, 256, 0.25)
    indices, valid, is_positive = map(np.asarray, (indices, valid, is_positive))
    assert indices.shape == valid.shape == is_positive.shape == (256,)
    assert indices.dtype == np.int32
    assert is_positive.sum() == want_positive
    assert valid.sum() == want_positive + want_negative
    # Layout: positives, then negatives, then padding.
    np.testing.assert_array_equal(is_positive, np.arange(256) < want_positive)
    np.testing.assert_array_equal(valid, np.arange(256) < want_positive + want_negative)
    assert (labels[indices[is_positive]] == 1).all()
    assert (labels[indices[valid & ~is_positive]] == 0).all()  # ignore (-1) is never chosen
    assert len(np.unique(indices[valid])) == valid.sum()  # no candidate twice
    assert ((indices >= 0) & (indices < 6000)).all()


def test_fewer_candidates_than_samples(rng):
    labels = np.array([1, 0, -1, 0, 1], np.int32)
    indices, valid, is_positive = sample_balanced(jax.random.key(int(rng.integers(1 << 30))), labels, 8, 0.5)
    assert np.asarray(valid).sum() == 4 and np.asarray(is_positive).sum() == 2
    assert sorted(np.asarray(indices)[np.asarray(valid)]) == [0, 1, 3, 4]


def test_randomness_comes_from_the_key(rng):
    labels = _labels(rng, 2000, 200, 1500)
    key = jax.random.key(int(rng.integers(1 << 30)))
    first = np.asarray(sample_balanced(key, labels, 128, 0.25)[0])
    again = np.asarray(sample_balanced(key, labels, 128, 0.25)[0])
    other = np.asarray(sample_balanced(jax.random.fold_in(key, 1), labels, 128, 0.25)[0])
    np.testing.assert_array_equal(first, again)
    assert set(first[:32]) != set(other[:32]) and set(first[32:]) != set(other[32:])


def test_selection_is_uniform(rng):
    """Chi-square check: choosing 4 of 12 positives (and 12 of 30 negatives) over 3000 keys.

    Each positive is expected 1000 times, each negative 1200 times. The chi-square statistic with 11 (29) degrees
    of freedom has mean 11 (29); the bounds are its 99.99% quantiles, so a correct sampler fails this with
    probability ~1e-4 for a given seed, while an order bias of a few percent fails it reliably.
    """
    labels = _labels(rng, 60, 12, 30)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3000)
    indices, valid, is_positive = jax.jit(jax.vmap(lambda k: sample_balanced(k, labels, 16, 0.25)))(keys)
    indices, valid, is_positive = map(np.asarray, (indices, valid, is_positive))
    assert valid.all() and (is_positive.sum(axis=1) == 4).all()
    counts = np.bincount(indices.reshape(-1), minlength=60)
    positive_counts = counts[labels == 1]
    negative_counts = counts[labels == 0]
    assert (counts[labels == -1] == 0).all()
    chi2_positive = ((positive_counts - 1000.0) ** 2 / 1000.0).sum()
    chi2_negative = ((negative_counts - 1200.0) ** 2 / 1200.0).sum()
    assert chi2_positive < 37.4, chi2_positive  # chi2(11) 99.99% quantile
    assert chi2_negative < 66.6, chi2_negative  # chi2(29) 99.99% quantile


def test_vmap_over_images_matches_single(rng):
    labels = np.stack([_labels(rng, 500, n, 300) for n in (5, 40, 0)])
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
    batched = jax.jit(jax.vmap(lambda k, l: sample_balanced(k, l, 64, 0.25)))(keys, labels)
    for i in range(3):
        single = sample_balanced(keys[i], labels[i], 64, 0.25)
        for b, s in zip(batched, single):
            np.testing.assert_array_equal(np.asarray(b[i]), np.asarray(s))
