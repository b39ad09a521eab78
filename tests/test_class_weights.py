"""ENet class weights (graphs/losses/class_weights.py): pixel counts, 1 / ln(1.02 + p), and the
checks on a weights file. The VOC script that computes them is tested with the VOC fixture in
tests/test_erfnet.py."""
import math

import numpy as np
import pytest

from graphs.losses.class_weights import count_pixels, enet_weights, load_class_weights
from utils.errors import ConfigError


def test_enet_weights_and_their_file_checks(tmp_path):
    counts = count_pixels([np.array([[0, 0, 0, 1], [255, 255, 0, 2]], dtype=np.uint8)], 4)
    assert counts.tolist() == [4, 1, 1, 0]
    weights = enet_weights(counts)
    expected = 1 / np.log(1.02 + np.array([4, 1, 1, 0]) / 6)
    assert weights == pytest.approx(expected, rel=1e-6) and weights[3] == pytest.approx(1 / math.log(1.02))
    np.save(tmp_path / "short.npy", np.ones(20))
    with pytest.raises(ConfigError, match="shape \\(20,\\); expected 21 numbers"):
        load_class_weights(tmp_path / "short.npy", 21)
