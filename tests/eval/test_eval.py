"""The judge: the shipped classifier's accuracy and the metrics' behaviour on real digits vs noise."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from difftune.eval import evaluate, frechet_distance
from difftune.eval.classifier import accuracy, load_classifier
from difftune.zoo.mnist import bold, from_rgb32, split, to_rgb32


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


def test_classifier_accuracy_on_heldout_real_digits(clf):
    x, y = split("heldout")
    assert len(y) == 1000
    assert accuracy(clf, x, y) >= 0.97


def test_splits_are_disjoint_and_balanced():
    xt, yt = split("train")
    xh, yh = split("heldout")
    assert np.bincount(yt).tolist() == [400] * 10 and np.bincount(yh).tolist() == [100] * 10
    train_rows = {r.tobytes() for r in xt.reshape(len(xt), -1)}
    assert not any(r.tobytes() in train_rows for r in xh.reshape(len(xh), -1))


def test_metrics_real_vs_noise(clf):
    x, y = split("heldout", (0, 1, 2, 3, 4, 5, 6, 7, 8))
    pick = np.random.default_rng(3).choice(len(y), 180, replace=False)
    real = evaluate([to_rgb32(d) for d in x[pick]], y[pick], clf)
    rng = np.random.default_rng(0)
    noise = evaluate([Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in pick], y[pick], clf)
    assert real["accuracy"] >= 0.95 and noise["accuracy"] <= 0.3
    assert real["fd"] < 2 * real["fd_floor"] and noise["fd"] > 10 * real["fd"]
    assert abs(real["ink"] - real["ink_real"]) < 0.03 and noise["ink"] > 3 * real["ink"]
    assert noise["diversity"] < 0.5 * real["diversity"]


def test_ink_sees_the_bold_style(clf):
    x, y = split("heldout", (0, 1, 2, 3, 4))
    plain = evaluate([to_rgb32(d) for d in x[:100]], y[:100], clf)
    thick = evaluate([to_rgb32(bold(d)) for d in x[:100]], y[:100], clf)
    assert thick["ink"] > 1.5 * plain["ink"]


def test_frechet_distance_basics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + 3) == pytest.approx(9 * 8, rel=1e-6)
    assert frechet_distance(a[:1], a) is None


def test_floor_matches_the_per_class_sample_counts(clf):
    x, y = split("heldout", (3, 9))
    labels = np.array([3] * 5 + [9] * 150)
    images = [to_rgb32(x[0])] * len(labels)
    m = evaluate(images, labels, clf)
    assert m["n_floor"] == 5 + 100  # 5 threes, and the 100 nines held out (not 150)


def test_rgb_round_trip():
    x, _ = split("heldout", (7,))
    back = from_rgb32(to_rgb32(x[0]))
    np.testing.assert_allclose(back, x[0] / 255.0, atol=1e-6)
