"""An exported ONNX file in onnxruntime against dsq on real images: top-1 of both, identical
predictions, file sizes. ResNet-20 W4 B32 A8 on all 10 000 CIFAR-10 test images and
EfficientNet-Lite0 with dsq's defaults on the 100 ImageNet images of ../shared/data; dsq runs the
int backend, which equals `dsq eval --backend exact` bit for bit. Writes onnx_agreement.json.

    python onnx_agreement.py      # from benchmarks/, with the shared data beside the project
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

import dsq
from dsq.data import get_preset, open_dataset
from dsq.evaluate import evaluate
from dsq.exporters import load_onnx
from dsq.models import load_model
from dsq.nn import set_backend

from common import print_table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = {
    "resnet20 W4 B32 A8": (str(DATA / "cifar10-resnet" / "resnet20-12fca82f.th"), DATA / "cifar10-test", None, 32),
    "efficientnet_lite0 defaults": (
        "efficientnet_lite0",
        DATA / "imagenet-samples-dev",
        DATA / "imagenet-wnids.txt",
        224,
    ),
}


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    rows, results = [], {}
    for name, (source, images, classes, side) in CASES.items():
        loaded = load_model(source)
        dataset = open_dataset(images, get_preset(loaded.preset).transform(), classes)
        qmodel, report = dsq.quantize(loaded.model, progress=False)  # W4 B32 A8, depthwise at 8 bits
        dsq.save(folder / "model.dsq", qmodel, report, arch=loaded.arch)
        for weights_only in (False, True):
            path = folder / f"model{'-weights' if weights_only else ''}.onnx"
            dsq.export(qmodel, path, torch.zeros(2, 3, side, side), weights_only=weights_only)
        set_backend(qmodel, "int")
        acc = evaluate({"dsq": qmodel, "onnx": load_onnx(folder / "model.onnx")}, dataset, batch_size=250, workers=2)
        sizes = {f: os.path.getsize(folder / f) for f in ("model.dsq", "model.onnx", "model-weights.onnx")}
        results[name] = {
            "dsq": acc["dsq"].to_dict(),
            "onnx": {**acc["onnx"].to_dict(), "same_top1_percent": acc["onnx"].agreement},
            "bytes": sizes,
        }
        rows.append(
            [
                name,
                acc["dsq"].images,
                f"{acc['dsq'].top1:.2f}",
                f"{acc['onnx'].top1:.2f}",
                f"{acc['onnx'].agreement:.2f}",
                sizes["model.dsq"],
                f"{sizes['model.onnx'] / sizes['model.dsq']:.3f}",
                f"{sizes['model-weights.onnx'] / sizes['model.dsq']:.3f}",
            ]
        )
    header = ["model", "images", "dsq top-1", "onnx top-1", "same top-1 %", ".dsq bytes", ".onnx/.dsq", "weights/.dsq"]
    print_table(header, rows)
    Path("onnx_agreement.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
