"""A bit budget (--target-bits) against uniform weight bits, under the issue's protocol, with dsq's
calibration defaults (refit + distillation) and the wall time of each stage.

ResNet-20 / CIFAR-10: calibrate on the first 100 test images of each class, judge on the other
9000: uniform 3 bits and --target-bits 3, each with distillation seeds 0, 1, 2 (--seeds), and
--target-bits at uniform 3-bit's own bits per weight.
EfficientNet-Lite0 / ImageNet: the 100 images of imagenet-samples-dev in two folds (calibrate on
50, judge the other 50, swap), and all 100 (the issue's protocol), each model judged also on the
20 images the foolbox wheel ships: --target-bits 4.6 against uniform 4 bits. Writes target_bits.json beside this file.

    python target_bits.py [--model resnet20|lite0|all] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import dsq
from dsq.bit_budget import bit_budget, budget_images
from dsq.calibration import calibration_files, load_images
from dsq.config import CalibConfig, quant_config
from dsq.data import demo_dataset, get_preset, open_dataset
from dsq.evaluate import evaluate
from dsq.models import load_model

from common import print_table

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"


def point(
    loaded, calib: torch.Tensor, judged: dict, bits: int | None = None, target: float | None = None, seed: int = 0
) -> dict:
    """Quantize (uniform `bits`, or the budget of `target`), calibrate with the defaults (distillation
    seeded by `seed`), and judge on every dataset of `judged`; the wall time of each stage."""
    started, seconds = time.perf_counter(), {}
    config = quant_config(bits=bits or 4)
    if target is not None:
        budget = bit_budget(loaded.model, config, budget_images(calib), target, refit=True, progress=True)
        config, seconds["measure"] = budget.config, budget.costs.seconds
    qmodel, report = dsq.quantize(loaded.model, config)
    seconds["quantize"] = report.seconds
    result = dsq.calibrate(loaded.model, qmodel, report, calib, CalibConfig(seed=seed), progress=True)
    seconds.update(result.stages)
    seconds["total"] = time.perf_counter() - started
    accuracy = {name: evaluate({"q": qmodel}, data, progress=False)["q"].to_dict() for name, data in judged.items()}
    return {
        "bits": bits,
        "target_bits": target,
        "seed": seed,
        "bits_per_weight": report.mean_bits_per_weight,
        "layer_formats": {r.name: f"{r.bits} bits, {r.layout} {r.block}" for r in report.quantized_layers},
        "seconds": seconds,
        "accuracy": accuracy,
    }


def float_accuracy(loaded, judged: dict) -> dict:
    return {name: evaluate({"f": loaded.model}, data, progress=False)["f"].to_dict() for name, data in judged.items()}


def resnet20(seeds: list[int]) -> dict:
    loaded = load_model(str(DATA / "cifar10-resnet" / "resnet20-12fca82f.th"))
    transform = get_preset(loaded.preset).transform()
    files = calibration_files(DATA / "cifar10-test", 1000)
    calib = load_images(files, transform)
    judged = {"cifar10 9000": open_dataset(DATA / "cifar10-test", transform).without(files, "calibration images")}
    points = [point(loaded, calib, judged, bits=3, seed=seed) for seed in seeds]
    points += [point(loaded, calib, judged, target=3.0, seed=seed) for seed in seeds]
    same_size = round(points[0]["bits_per_weight"] - 5e-5, 4)
    points.append(point(loaded, calib, judged, target=same_size))
    return {"float": float_accuracy(loaded, judged), "points": points}


def lite0() -> dict:
    loaded = load_model("efficientnet_lite0")
    transform = get_preset(loaded.preset).transform()
    dev = open_dataset(DATA / "imagenet-samples-dev", transform, classes=DATA / "imagenet-wnids.txt")
    foolbox = demo_dataset(transform)
    folds = []
    for fold in (0, 1, "all"):
        files = [path for path, _ in (dev.samples if fold == "all" else dev.samples[fold::2])]
        judged = {"foolbox 20": foolbox}
        if fold != "all":
            judged["dev other half"] = dev.without(files, "calibration images")
        calib = load_images(files, transform)
        points = [point(loaded, calib, judged, bits=4), point(loaded, calib, judged, target=4.6)]
        folds.append({"fold": fold, "float": float_accuracy(loaded, judged), "points": points})
    return {"folds": folds}


def correct(accuracy: dict) -> float:
    return accuracy["top1"] * accuracy["images"] / 100


def show(name: str, result: dict) -> None:
    rows = []
    for fold in result.get("folds", [result]):
        for p in fold["points"]:
            what = f"target {p['target_bits']:g}" if p["target_bits"] is not None else f"uniform {p['bits']}"
            for data, acc in p["accuracy"].items():
                base = fold["float"][data]
                rows.append(
                    [
                        str(fold.get("fold", "-")),
                        what,
                        str(p.get("seed", 0)),
                        f"{p['bits_per_weight']:.3f}",
                        data,
                        f"{correct(base):.0f}/{base['images']}",
                        f"{correct(acc):.0f}/{acc['images']}",
                        f"{acc['top1'] - base['top1']:+.2f}",
                        f"{p['seconds']['total']:.0f}",
                    ]
                )
    print(name)
    print_table(["fold", "point", "seed", "bits/w", "judged on", "float", "quantized", "change", "wall s"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["resnet20", "lite0", "all"], default="all")
    p.add_argument("--seeds", default="0,1,2", help="ResNet-20's distillation seeds, each point run with each")
    args = p.parse_args()
    out = HERE / "target_bits.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    for name, run in (("resnet20", lambda: resnet20(seeds)), ("lite0", lite0)):
        if args.model in (name, "all"):
            load = os.getloadavg()
            results[name] = {**run(), "threads": torch.get_num_threads(), "load_average_before": load}
            results[name]["load_average_after"] = os.getloadavg()
            show(name, results[name])
            out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
