"""Wall time of each calibration stage of `dsq quantize efficientnet_lite0 --calib` on the 100
ImageNet images of imagenet-samples-dev, with dsq's defaults and --target-bits 4.6 (the issue's
setting): the command runs as the user runs it, its --json gives the stages, and the images'
loading is timed apart. Writes calibration_time.json with the load average and the CPU.

    python calibration_time.py                       # --target-bits 4.6 ('none': without)
    python calibration_time.py --target-bits 4.6 -- --adapt-steps 3   # after --: more dsq options
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsq.bench.machine import machine
from dsq.calibration import calibration_files, load_images
from dsq.data import get_preset
from dsq.models import load_model

from common import print_table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL = "efficientnet_lite0"
TARGET_BITS = 4.6  # the setting


def dsq_command() -> list[str]:
    return [sys.executable, "-m", "dsq"]


def image_loading_seconds(folder: Path, count: int) -> float:
    """Seconds to read and preprocess the calibration images as `dsq quantize` does."""
    transform = get_preset(load_model(MODEL).preset).transform()
    started = time.perf_counter()
    load_images(calibration_files(folder, count), transform)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", type=Path, default=DATA / "imagenet-samples-dev")
    p.add_argument("--images", type=int, default=100)
    p.add_argument(
        "--target-bits",
        type=lambda s: None if s == "none" else float(s),
        default=TARGET_BITS,
        help=f"passed to dsq quantize, 'none' for none [default: {TARGET_BITS}]",
    )
    p.add_argument("--output", default="calibration_time.json")
    p.add_argument("dsq_options", nargs="*", help="more `dsq quantize` options, after --")
    args = p.parse_args()
    target = args.target_bits
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "run.json"
        command = [*dsq_command(), "quantize", MODEL, "--calib", str(args.calib), "--calib-images", str(args.images)]
        command += [*(["--target-bits", str(target)] if target is not None else []), *args.dsq_options]
        command += ["--json", str(report)]
        print(" ".join(command[2:]), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - started
        run = json.loads(report.read_text())
    calibration = run["quantization"]["calibration"]
    stages = {"image loading (timed apart)": image_loading_seconds(args.calib, args.images), **calibration["stages"]}
    rows = [[name, f"{seconds:.1f}"] for name, seconds in stages.items()]
    rows += [["calibration (all stages)", f"{calibration['seconds']:.1f}"], ["whole command", f"{wall:.1f}"]]
    print_table(["stage", "seconds"], rows)
    result = {
        "command": command[2:],
        "target_bits": target,
        "stages_seconds": stages,
        "calibration_seconds": calibration["seconds"],
        "command_seconds": wall,
        "quantize_seconds": run["quantization"].get("seconds"),
        "plan": calibration["plan"],
        "adapt": calibration["adapt"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "machine": machine(),
    }
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"load average {load_before[0]:.2f} before, {result['load_average_after'][0]:.2f} after; {args.output}")


if __name__ == "__main__":
    main()
