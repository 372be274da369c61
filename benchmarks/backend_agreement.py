"""How far the int backend is from the exact and the simulated ones, on whole networks.

The zoo's random-weight models (tests/zoo.py), free-running on the tests' 3 example inputs, and
the real ResNet-20 on all 10 000 CIFAR-10 test images: the largest relative logit difference
per image (max |a - b| / max |b|), how many images differ by more than 1e-5, how many
predictions differ, top-1, and seconds. Writes backend_agreement.json.

    python backend_agreement.py            # from benchmarks/, with the shared data beside the project
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import dsq
from dsq.data import get_preset, open_dataset
from dsq.models import load_model
from dsq.nn import set_backend

from common import print_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))
import zoo  # noqa: E402

OTHERS = ("exact", "simulate")


def logits(model, x: torch.Tensor, backend: str) -> torch.Tensor:
    set_backend(model, backend)
    with torch.inference_mode():
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: max |a - b| / max |b|."""
    a, b = a.flatten(1), b.flatten(1)
    return (a - b).abs().amax(1) / b.abs().amax(1)


def zoo_rows() -> list[dict]:
    rows = []
    for name in zoo.ZOO:
        qmodel, _ = dsq.quantize(zoo.build(name))
        x = torch.cat([zoo.example_input(name, seed=s) for s in range(3)])
        out = {b: logits(qmodel, x, b) for b in ("int", *OTHERS)}
        row = {"model": name, "images": len(x)}
        for b in OTHERS:
            d = rel_diff(out["int"], out[b])
            row[f"max_rel_diff_vs_{b}"] = float(d.max())
            row[f"images_over_1e-5_vs_{b}"] = int((d > 1e-5).sum())
        rows.append(row)
    return rows


def cifar_rows(batch_size: int = 250) -> list[dict]:
    loaded = load_model(str(DATA / "cifar10-resnet" / "resnet20-12fca82f.th"))
    images = open_dataset(DATA / "cifar10-test", get_preset(loaded.preset).transform())
    qmodel, _ = dsq.quantize(loaded.model)
    stats = {
        b: {"correct": 0, "seconds": 0.0, "pred_differ": 0, "over_1e-5": 0, "bit_identical": 0}
        for b in ("int", *OTHERS)
    }
    for x, y in DataLoader(images, batch_size=batch_size):
        out = {}
        for b, s in stats.items():
            start = time.perf_counter()
            out[b] = logits(qmodel, x, b)
            s["seconds"] += time.perf_counter() - start
            s["correct"] += int((out[b].argmax(1) == y).sum())
        for b in OTHERS:
            d = rel_diff(out["int"], out[b])
            stats[b]["pred_differ"] += int((out["int"].argmax(1) != out[b].argmax(1)).sum())
            stats[b]["over_1e-5"] += int((d > 1e-5).sum())
            stats[b]["bit_identical"] += int((out["int"] == out[b]).all(1).sum())
    return [{"backend": b, "top1": 100 * s["correct"] / len(images), **s} for b, s in stats.items()]


def main() -> None:
    zoo_table, cifar_table = zoo_rows(), cifar_rows()
    for table in (zoo_table, cifar_table):
        keys = list(table[0])
        print_table(keys, [[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in table])
        print()
    Path("backend_agreement.json").write_text(
        json.dumps({"threads": torch.get_num_threads(), "zoo": zoo_table, "cifar10_resnet20": cifar_table}, indent=2)
    )


if __name__ == "__main__":
    main()
