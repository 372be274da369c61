"""Time `dsq.quantize` on ResNet-50 (torchvision architecture, random weights) with L2 and KL,
against a naive reference in the same run: the paper's one-pass fit written plainly (float32,
no refinement, no checks, no report), which bounds what the fit itself costs."""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import dsq
from dsq.allocator import reuse_freed_memory
from dsq.bench import interleaved_times

from common import print_table


def naive_quantize(model: nn.Module, bits: int, block: int) -> nn.Module:
    """A copy of `model` whose convs hold alpha * q: per output channel and tap, blocks of `block`
    input channels, codes from the largest magnitude (the paper's map), the least-squares scale."""
    model = copy.deepcopy(model)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d):
            w = conv.weight.detach().permute(0, 2, 3, 1)  # (O, kh, kw, I): blocks along I
            width = min(block, w.shape[-1])
            slices = F.pad(w, (0, -w.shape[-1] % width)).reshape(-1, width)
            peak = slices.gather(1, slices.abs().argmax(1, keepdim=True))
            q = (slices * (lo / torch.where(peak == 0, 1.0, peak))).round().clamp(lo, hi)
            alpha = (slices * q).sum(1, keepdim=True) / (q * q).sum(1, keepdim=True).clamp_min(1e-30)
            fitted = (q * alpha).reshape(*w.shape[:3], -1)[..., : w.shape[-1]]
            conv.weight.data = fitted.permute(0, 3, 1, 2).contiguous()
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--reuse-freed-memory", action="store_true", help="set malloc up as the dsq command does (dsq.allocator)"
    )
    args = parser.parse_args()
    if args.reuse_freed_memory:
        reuse_freed_memory()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    fns = {m: (lambda m=m: dsq.quantize(model, bits=args.bits, block=args.block, method=m)) for m in ("l2", "kl")}
    fns["naive reference"] = lambda: naive_quantize(model, args.bits, args.block)
    times = interleaved_times(fns, args.repeats, warmup=1)
    malloc = ", malloc as the dsq command sets it" if args.reuse_freed_memory else ""
    print(
        f"ResNet-50, {args.bits}-bit, block {args.block}, {torch.get_num_threads()} threads{malloc}, "
        f"median of {args.repeats}"
    )
    print_table(["method", "seconds"], [[m, f"{t:.2f}"] for m, t in times.items()])


if __name__ == "__main__":
    main()
