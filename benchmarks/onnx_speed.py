"""onnxruntime's images per second on an exported dsq ResNet-50 against onnxruntime's float ResNet-50,
side by side in one run (interleaved, medians): W4 B32 with BFP8 activations, and weights only. The
float model runs with onnxruntime's defaults, the dsq ones as `dsq eval` runs them (weights folded
at load, BatchNorm kept: dsq.exporters.onnx_runtime.session).
Random weights (speed does not depend on them; nothing is downloaded). Writes onnx_speed.json.

    python onnx_speed.py [--batch 1 --batch 32] [--repeats 10]   # from benchmarks/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
import torchvision

import dsq
from dsq.bench import export_float_onnx, interleaved_times
from dsq.exporters.onnx_runtime import session

from common import print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, action="append", help="batch sizes  [default: 1 and 32]")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    qmodel, _ = dsq.quantize(model, bits=4, block=32, act_bits=8, progress=False)
    x = torch.randn(2, 3, 224, 224)
    folder = tempfile.mkdtemp()
    paths = {name: os.path.join(folder, f"{name}.onnx") for name in ("float", "dsq W4 A8", "dsq W4 weights only")}
    export_float_onnx(model, x, Path(paths["float"]))
    dsq.export(qmodel, paths["dsq W4 A8"], x)
    dsq.export(qmodel, paths["dsq W4 weights only"], x, weights_only=True)
    plain = ort.SessionOptions()
    plain.intra_op_num_threads = args.threads
    sessions = {name: session(path, args.threads) for name, path in paths.items()}  # as dsq eval runs them
    sessions["float"] = ort.InferenceSession(paths["float"], plain, providers=["CPUExecutionProvider"])  # defaults
    sessions["dsq W4 weights only, BN folded"] = session(
        paths["dsq W4 weights only"], args.threads, keep_batchnorm=False
    )
    rows, results = [], []
    for batch in args.batch or [1, 32]:
        feed = torch.randn(batch, 3, 224, 224).numpy()
        calls = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for name, s in sessions.items()}
        times = interleaved_times(calls, repeats=args.repeats if batch == 1 else max(3, args.repeats // 3))
        for name, seconds in times.items():
            ratio = times["float"] / seconds
            results.append({"batch": batch, "runtime": name, "images_per_s": batch / seconds, "vs_float": ratio})
            rows.append(
                [
                    batch,
                    name,
                    f"{batch / seconds:.1f}",
                    f"{ratio:.2f}x",
                    f"{os.path.getsize(paths.get(name, paths['dsq W4 weights only'])) / 2**20:.1f}",
                ]
            )
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")
    print_table(["batch", "model", "images/s", "vs float", "MiB"], rows)
    with open("onnx_speed.json", "w") as f:
        json.dump({"threads": args.threads, "onnxruntime": ort.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
