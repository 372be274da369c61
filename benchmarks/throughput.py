"""Images per second of float ResNet-50 vs the simulated DSConv ResNet-50, side by side."""

from __future__ import annotations

import argparse

import torch
import torchvision

import dsq
from dsq.bench import interleaved_times

from common import print_table


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    qmodel, _ = dsq.quantize(model, bits=4, block=32)
    x = torch.randn(args.batch, 3, args.size, args.size)

    def run(m):
        with torch.inference_mode():
            m(x)

    times = interleaved_times({"float32": lambda: run(model), "dsconv (simulated)": lambda: run(qmodel)}, args.repeats)
    rate = {k: args.batch / t for k, t in times.items()}
    print(
        f"ResNet-50, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} interleaved runs"
    )
    print_table(
        ["model", "images/s", "ratio to float"],
        [[k, f"{r:.2f}", f"{r / rate['float32']:.2f}"] for k, r in rate.items()],
    )


if __name__ == "__main__":
    main()
