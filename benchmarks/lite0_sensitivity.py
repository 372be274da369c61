"""Which EfficientNet-Lite0 layers a 4-bit quantization hurts, measured without labels.

For each calibration fold of the issue's protocol (the even or the odd images of
imagenet-samples-dev: only images a fold calibrates on), every quantizable layer in turn gets
4-bit weights while all others keep 8 bits (block 32, float16 scales, BFP8 inputs), and the
damage is the KL divergence of the network's output from the float network's, averaged over
the images. KL rather than top-1: on 50 images one image is 2 points. Prints the layers by
damage and writes lite0_sensitivity.json. This ranking chose the Lite0 policy of
docs/calibration.md (blocks 0-3 and the stem at 8 bits: their layers lead it in both folds).

    python lite0_sensitivity.py [--top 20]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import dsq
from dsq.calibration import load_images
from dsq.data import get_preset, open_dataset
from dsq.models import load_model
from dsq.sensitivity import exact_glob

from common import print_table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BASE = dict(bits=8, block=32, depthwise_bits=8)


def kl_damage(model, reference: torch.Tensor, images: torch.Tensor, **options) -> float:
    """Mean KL(float || quantized) of `model` quantized with `options`."""
    qmodel, _ = dsq.quantize(model, **options)
    with torch.no_grad():
        log_q = torch.log_softmax(qmodel(images), 1)
    return float((reference.exp() * (reference - log_q)).sum(1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--top", type=int, default=20, help="rows to print per fold")
    args = p.parse_args()
    loaded = load_model("efficientnet_lite0")
    transform = get_preset(loaded.preset).transform()
    dataset = open_dataset(DATA / "imagenet-samples-dev", transform, classes=DATA / "imagenet-wnids.txt")
    images = load_images([path for path, _ in dataset.samples], transform)
    model = loaded.model.eval()
    _, report = dsq.quantize(model, **BASE)
    layers = [(row.name, row.kind, row.params) for row in report.quantized_layers]
    folds = {}
    for fold in (0, 1):
        calib = images[fold::2]
        with torch.no_grad():
            reference = torch.log_softmax(model(calib), 1)
        rows = [
            {
                "layer": name,
                "kind": kind,
                "params": params,
                "kl": kl_damage(model, reference, calib, **BASE, layer_bits={exact_glob(name): 4}),
            }
            for name, kind, params in layers
        ]
        folds[fold] = sorted(rows, key=lambda r: -r["kl"])
        print(f"fold {fold} (calibration images {fold}, {fold + 2}, ...)")
        print_table(
            ["layer", "kind", "params", "KL"],
            [[r["layer"], r["kind"], str(r["params"]), f"{r['kl']:.4f}"] for r in folds[fold][: args.top]],
        )
    Path("lite0_sensitivity.json").write_text(json.dumps({"settings": BASE, "folds": folds}, indent=2))


if __name__ == "__main__":
    main()
