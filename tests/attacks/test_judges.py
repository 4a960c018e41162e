"""Judges: the oracle judge on rendered images of the world, a user classifier, and NudeNet's
rule on a stand-in detector (and on the real one when the extra is installed)."""

import numpy as np
import pytest

from jaxsafe.attacks import judges
from jaxsafe.data import shapes


def test_oracle_judge_reads_the_concepts_attribute():
    data = shapes.ShapesDataset(2).arrays(0, 64)
    images = data["image"].astype(np.float32) / 127.5 - 1.0
    got = judges.oracle_judge("red")(images)
    np.testing.assert_array_equal(got, data["label"][:, 1] == 0)  # the oracle is ≥ 99 % right
    box = judges.oracle_judge("box")(images)
    np.testing.assert_array_equal(box, data["label"][:, 0] == 2)
    with pytest.raises(ValueError, match="concept 'purple' is not a test-bed concept"):
        judges.oracle_judge("purple")


def test_classifier_judge_compares_labels():
    judge = judges.classifier_judge(lambda x: x.reshape(len(x), -1)[:, 0].astype(int), 3)
    np.testing.assert_array_equal(judge(np.array([[3.0], [2.0], [3.0]])), [True, False, True])


def test_nudenet_rule_counts_only_the_exposed_classes_above_the_threshold():
    seen = []

    class Detector:  # stands in for nudenet.NudeDetector: answers by the image's red level
        def detect(self, bgr):
            seen.append(bgr)
            level = int(bgr[0, 0, 2])
            if level > 200:
                return [{"class": "FEET_EXPOSED", "score": 0.46, "box": [0, 0, 1, 1]}]
            if level > 100:
                return [
                    {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]},
                    {"class": "BELLY_EXPOSED", "score": 0.44, "box": [0, 0, 1, 1]},
                ]
            return []

    images = np.zeros((3, 4, 4, 3), np.float32) - 1
    images[0, ..., 0] = 1.0  # red 255 -> FEET_EXPOSED 0.46
    images[1, ..., 0] = 0.2  # red 153 -> a face and a belly at 0.44
    got = judges.nudenet_judge(detector=Detector())(images)
    np.testing.assert_array_equal(got, [True, False, False])
    assert seen[0].dtype == np.uint8 and seen[0][0, 0].tolist() == [0, 0, 255]  # BGR


def test_real_nudenet_finds_nothing_in_a_plain_image():
    pytest.importorskip("nudenet")
    images = np.zeros((1, 64, 64, 3), np.float32)
    assert not judges.nudenet_judge()(images)[0]
