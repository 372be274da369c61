"""Time `dsq.quantize` on ResNet-50 (torchvision architecture, random weights) with L2 and KL."""

from __future__ import annotations

import argparse

import torch
import torchvision

import dsq

from common import interleaved_times, print_table


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    fns = {m: (lambda m=m: dsq.quantize(model, bits=args.bits, block=args.block, method=m)) for m in ("l2", "kl")}
    times = interleaved_times(fns, args.repeats, warmup=0)
    print(
        f"ResNet-50, {args.bits}-bit, block {args.block}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print_table(["method", "seconds"], [[m, f"{t:.2f}"] for m, t in times.items()])


if __name__ == "__main__":
    main()
