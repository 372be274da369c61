import pytest

from dsq.data import LabelledImages, check_labels
from dsq.errors import DsqError

from conftest import one_line


def images(labels, classes):
    return LabelledImages([(f"{i}.jpg", label) for i, label in enumerate(labels)], classes, source="X", layout="test")


def test_fits():
    check_labels(images([0, 9, 3], [str(c) for c in range(10)]), 10)


def test_more_classes_than_outputs():
    with pytest.raises(DsqError) as error:
        check_labels(images([0, 11], [str(c) for c in range(12)]), 10)
    assert one_line(error).startswith("X has 12 classes but the model predicts 10: ")


def test_fewer_classes_than_outputs():
    with pytest.raises(DsqError) as error:
        check_labels(images([0, 1], ["cat", "dog"]), 1000)
    assert "2 classes but the model predicts 1000" in one_line(error)


def test_label_out_of_range_without_classes():
    class Plain:
        samples = [("a", 0), ("b", 12)]

    with pytest.raises(DsqError) as error:
        check_labels(Plain(), 10)
    assert "labels up to 12 but the model predicts 10" in one_line(error)
    Plain.samples = [("a", 0), ("b", 2)]  # a subset of the classes is fine without a class list
    check_labels(Plain(), 10)
