"""Calibration stages on real data: accuracy and time of each, under the issue's protocol.

ResNet-20 / CIFAR-10: calibrate on the first `per_class` test images of each class, evaluate on
all the others. EfficientNet-Lite0 / ImageNet: the 100 images of imagenet-samples-dev in two
folds (calibrate on one half, evaluate on the other, then swap), so that no image is judged by
a model calibrated on it. Prints one table per model and writes calibration.json / .csv.

    python calibration.py --model resnet20 --bits 2,3,4
    python calibration.py --model lite0 --bits 4 --depthwise-bits 4 --layer-bits '_conv_stem=8' \
        --layer-bits '_blocks.[0-3].*=8' --variants data-free,refit
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

import dsq
from dsq.calibration import calibrate, calibration_set, load_images
from dsq.data import get_preset, open_dataset
from dsq.evaluate import evaluate
from dsq.models import load_model

from common import print_table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# variant -> dsq.calibrate options (None: data-free)
VARIANTS = {
    "data-free": None,
    "bias": dict(refit=False, bias=True, adapt_steps=0),
    "batchnorm": dict(refit=False, batchnorm=True, adapt_steps=0),
    "refit": dict(adapt_steps=0),
    "refit+bias": dict(bias=True, adapt_steps=0),
    "refit+adapt": dict(),
}


def quantize_variants(model, images, bits, quant_options, variants, adapt_steps) -> tuple[dict, dict]:
    """{variant: quantized model} and {variant: (bits per weight, calibration seconds)}."""
    models, facts = {}, {}
    for variant in variants:
        qmodel, report = dsq.quantize(model, bits=bits, **quant_options)
        options = VARIANTS[variant]
        if options is not None:
            options = {"adapt_steps": adapt_steps, **options}
            calibrate(model, qmodel, report, images, progress=True, **options)
        models[f"{bits}b {variant}"] = qmodel
        facts[f"{bits}b {variant}"] = (report.mean_bits_per_weight, (report.calibration or {}).get("stages", {}))
    return models, facts


def resnet20(args) -> list[dict]:
    loaded = load_model(DATA / "cifar10-resnet" / "resnet20-12fca82f.th")
    transform = get_preset(loaded.preset).transform()
    images, dataset = calibration_set(
        DATA / "cifar10-test", 10 * args.per_class, transform, open_dataset(DATA / "cifar10-test", transform)
    )
    rows = []
    for bits in args.bits:
        models, facts = quantize_variants(
            loaded.model, images, bits, quant_options(args), args.variants, args.adapt_steps
        )
        acc = evaluate({"float": loaded.model, **models}, dataset, batch_size=250, workers=2, progress=True)
        rows += [
            row("resnet20", name, acc["float"].top1, acc[name].top1, acc[name].images, *facts[name]) for name in models
        ]
    return rows


def lite0(args) -> list[dict]:
    loaded = load_model("efficientnet_lite0")
    transform = get_preset(loaded.preset).transform()
    dataset = open_dataset(DATA / "imagenet-samples-dev", transform, classes=DATA / "imagenet-wnids.txt")
    images = load_images([p for p, _ in dataset.samples], transform)
    labels = torch.tensor(dataset.targets)
    folds = [torch.arange(0, len(labels), 2), torch.arange(1, len(labels), 2)]
    correct, facts, float_correct = {}, {}, 0
    for k, (calib, judged) in enumerate([(folds[0], folds[1]), (folds[1], folds[0])]):
        models, facts_k = quantize_variants(
            loaded.model, images[calib], args.bits[0], quant_options(args), args.variants, args.adapt_steps
        )
        with torch.no_grad():
            float_correct += int((loaded.model(images[judged]).argmax(1) == labels[judged]).sum())
            for name, m in models.items():
                correct[name] = correct.get(name, 0) + int((m(images[judged]).argmax(1) == labels[judged]).sum())
        for name, (bpw, stages) in facts_k.items():  # seconds: the sum of both folds
            old = facts.get(name, (bpw, {}))[1]
            facts[name] = (bpw, {s: old.get(s, 0) + t for s, t in stages.items()})
    n = len(labels)
    return [
        row("efficientnet_lite0", name, 100 * float_correct / n, 100 * c / n, n, *facts[name])
        for name, c in correct.items()
    ]


def row(model, name, float_top1, top1, images, bits_per_weight, stages) -> dict:
    return {
        "model": model,
        "variant": name,
        "bits_per_weight": round(bits_per_weight, 3),
        "float_top1": round(float_top1, 2),
        "top1": round(top1, 2),
        "drop": round(float_top1 - top1, 2),
        "images": images,
        **{f"{s}_s": round(t, 1) for s, t in stages.items()},
    }


def quant_options(args) -> dict:
    return dict(
        block=args.block,
        depthwise_bits=args.depthwise_bits,
        scale_dtype=args.scale_dtype,
        layer_bits=dict(args.layer_bits),
    )


def glob_bits(text: str) -> tuple[str, int]:
    glob, _, bits = text.rpartition("=")
    return glob, int(bits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["resnet20", "lite0"], default="resnet20")
    p.add_argument("--bits", default="2,3,4", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--depthwise-bits", type=int, default=8)
    p.add_argument("--scale-dtype", default="float16")
    p.add_argument(
        "--layer-bits",
        action="append",
        default=[],
        type=glob_bits,
        metavar="GLOB=BITS",
        help="bits for the layers whose names match GLOB (repeatable; the first match wins)",
    )
    p.add_argument("--per-class", type=int, default=100, help="CIFAR-10 calibration images per class")
    p.add_argument("--adapt-steps", type=int, default=None, help="[default: dsq's, sized to the model]")
    p.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    p.add_argument("--output", default="calibration", help="write OUTPUT.json and OUTPUT.csv")
    args = p.parse_args()
    started = time.perf_counter()
    rows = resnet20(args) if args.model == "resnet20" else lite0(args)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print_table(keys, [[str(r.get(k, "")) for k in keys] for r in rows])
    print(f"({time.perf_counter() - started:.0f} s in all)")
    Path(f"{args.output}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    with open(f"{args.output}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
