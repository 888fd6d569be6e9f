"""Per-study aggregation of image predictions (the baselines of the fusion comparison)."""

import numpy as np
import pytest

from chx.pipeline.aggregate import aggregate_by_study

PROBS = np.array([[0.2, 0.9], [0.6, 0.1], [0.4, 0.5], [0.8, 0.3]])
STUDIES = ["s1", "s1", "s2", "s2"]
VIEWS = ["PA", "LATERAL", "AP", "OTHER"]


@pytest.mark.parametrize("method, expected_ids, expected", [
    ("mean", ["s1", "s2"], [[0.4, 0.5], [0.6, 0.4]]),
    ("max", ["s1", "s2"], [[0.6, 0.9], [0.8, 0.5]]),
    ("weighted", ["s1", "s2"], [[(7 * .2 + 3 * .6) / 10, (7 * .9 + 3 * .1) / 10],
                                [(7 * .4 + 5 * .8) / 12, (7 * .5 + 5 * .3) / 12]]),
    ("frontal", ["s1", "s2"], [[0.2, 0.9], [0.4, 0.5]]),
    ("lateral", ["s1"], [[0.6, 0.1]]),
])
def test_aggregations(method, expected_ids, expected):
    ids, scores = aggregate_by_study(PROBS, STUDIES, VIEWS, method)
    assert ids == expected_ids
    np.testing.assert_allclose(scores, expected)
