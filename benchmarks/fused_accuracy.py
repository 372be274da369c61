"""The fused integer network (dsq.nn.fuse_int: BatchNorm folded into the kernel's epilogue,
residual adds and ReLU fused) against the unfused int backend and the float32 simulation, on
real images: top-1 of each and the share of predictions identical to the simulation's.
ResNet-20 W4 B32 A8 (dsq's defaults) on all 10 000 CIFAR-10 test images, EfficientNet-Lite0 with
dsq's defaults on the 100 ImageNet images of ../shared/data. Writes fused_accuracy.json.

    python fused_accuracy.py      # from benchmarks/, with the shared data beside the project
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import dsq
from dsq.data import get_preset, open_dataset
from dsq.evaluate import evaluate
from dsq.models import load_model
from dsq.nn import fuse_int, set_backend

from common import print_table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = {
    "resnet20 W4 B32 A8": (str(DATA / "cifar10-resnet" / "resnet20-12fca82f.th"), DATA / "cifar10-test", None),
    "efficientnet_lite0 defaults": ("efficientnet_lite0", DATA / "imagenet-samples-dev", DATA / "imagenet-wnids.txt"),
}


def main() -> None:
    rows, results = [], {}
    for name, (source, images, classes) in CASES.items():
        loaded = load_model(source)
        dataset = open_dataset(images, get_preset(loaded.preset).transform(), classes)
        qmodel, _ = dsq.quantize(loaded.model, progress=False)
        unfused = copy.deepcopy(qmodel)
        set_backend(unfused, "int")
        fused = fuse_int(qmodel)
        acc = evaluate({"simulate": qmodel, "int": unfused, "int fused": fused}, dataset, batch_size=250, workers=2)
        results[name] = {
            runtime: {**a.to_dict(), "same_top1_as_simulate_percent": a.agreement} for runtime, a in acc.items()
        }
        results[name]["fusions"] = fused.fusions
        rows += [[name, runtime, a.images, f"{a.top1:.2f}", f"{a.agreement:.2f}"] for runtime, a in acc.items()]
    print_table(["model", "runtime", "images", "top-1", "same top-1 as simulate %"], rows)
    Path("fused_accuracy.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
