"""The issue's accuracy bar on real data: ResNet-20 on all 10 000 CIFAR-10 test images."""

import pytest

import dsq
from dsq.data import get_preset, open_dataset
from dsq.evaluate import evaluate
from dsq.models import load_model

pytestmark = pytest.mark.realdata


def test_resnet20_4bit_block32_bfp8_loses_at_most_0_4_points_on_all_cifar10_test_images(resnet20, cifar):
    loaded = load_model(str(resnet20))
    dataset = open_dataset(cifar, get_preset(loaded.preset).transform())
    assert len(dataset) == 10_000
    qmodel, report = dsq.quantize(loaded.model, bits=4, block=32, method="l2", act_bits=8)
    acc = evaluate({"float": loaded.model, "quantized": qmodel}, dataset, batch_size=500, workers=2, progress=False)
    # The float figure published with the data (shared/data/README.md): preprocessing and labels are right.
    assert acc["float"].top1 == pytest.approx(81.03, abs=0.005)
    assert acc["float"].top1 - acc["quantized"].top1 <= 0.4
    assert all(r.quantized for r in report.layers if r.kind == "conv")
