"""Float32 conv vs simulated DSConv vs integer DSConv vs torch's int8 conv (x86 backend), on
ResNet-50's conv layers and on the whole network.

Time: median of interleaved runs (a, b, c, d, a, b, ...), ratios to float32 from the same run.
Memory: bytes of the weights each one holds (simulate keeps the dequantized float weight too;
int keeps the int8 VQK and, for its CPU kernel, a copy laid out for it; x86 counted as int8
weights + per-channel scale and zero point, oneDNN's packed copy is not visible to torch) and the
peak that torch's CPU allocator sees during one forward, output included (int: plus the kernel's
workspace for the encoded input). The x86 layer rows quantize the float input and dequantize
the output (float in, float out like the DSConv layers); the x86 network keeps activations int8.

Writes every number to conv_backends.json and conv_backends.csv beside this script (--out).
Example, short: python benchmarks/conv_backends.py --layers 'layer3.0.*' --batches 32 --network-batches --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torch.profiler import ProfilerActivity, profile

import dsq
from dsq.bench import interleaved_times, machine, torch_int8
from dsq.fileio import write_csv, write_json
from dsq.formats import ActFormat, WeightFormat
from dsq.nn import int_kernel, set_backend, to_dsconv

from common import print_table

BACKENDS = ("float32", "simulate", "int", "x86 int8")


def resnet50_layers(size: int) -> list[tuple[str, nn.Conv2d, tuple[int, int], int]]:
    """(first name, conv, input height and width, how many convs share it) for every distinct conv
    of ResNet-50 but the stem (whose input, the image, stays float in DSConv)."""
    model = torchvision.models.resnet50().eval()
    inputs = model_inputs(model, torch.randn(1, 3, size, size))
    seen: dict[tuple, list] = {}
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and name != "conv1":
            hw = tuple(inputs[conv].shape[-2:])
            seen.setdefault(
                (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, hw), [name, conv, hw, 0]
            )[3] += 1
    return [tuple(v) for v in seen.values()]


def macs(layer: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of a conv or linear layer on input x."""
    with torch.inference_mode():
        return layer(x).numel() * layer.weight[0].numel()


def model_inputs(model: nn.Module, x: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
    """The input each conv and linear layer of `model` sees when it runs on x."""
    seen = {}

    def record(module, args):
        seen.setdefault(module, args[0])

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def tensors_in(obj, depth: int = 5):
    """Tensors held by an object: its attributes, containers and dataclasses, a few levels deep."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth and isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors_in(o, depth - 1)
    elif depth and hasattr(obj, "__dict__") and not isinstance(obj, type):
        for o in vars(obj).values():
            yield from tensors_in(o, depth - 1)


def held_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage a model holds (parameters, buffers, caches, plans),
    plus its quantized weights as int8 values with their float64 scales and int64 zero points."""
    storages = {}
    for m in model.modules():
        attributes = (v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules"))
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False), *tensors_in(list(attributes))]:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    quantized = [t for t in tensors_in(list(model.state_dict(keep_vars=True).values())) if t.is_quantized]
    per_channel = [
        t.q_per_channel_scales().numel() if t.qscheme() == torch.per_channel_affine else 1 for t in quantized
    ]
    return sum(storages.values()) + sum(t.numel() + 16 * c for t, c in zip(quantized, per_channel))


def peak_bytes(fn) -> int:
    """The most bytes torch's CPU allocator held at once during `fn()`, beyond what it held before."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def dsconv_models(model: nn.Module, bits: int, block: int, whole: bool) -> tuple[nn.Module, nn.Module]:
    """The simulated and the integer DSConv copies of a float conv (or of a whole network)."""
    if whole:
        simulated, _ = dsq.quantize(model, bits=bits, block=block)
    else:
        simulated = to_dsconv(copy.deepcopy(model), WeightFormat(bits, block), ActFormat(8, block))
    integer = copy.deepcopy(simulated)
    set_backend(integer, "int")
    return simulated, integer


def x86_layer(conv: nn.Conv2d, x: torch.Tensor):
    """torch's int8 conv for `conv`, per-channel weights: quantize x, convolve, dequantize."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in favour of torchao
        w = conv.weight.detach()
        scales = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-8).double() / 127
        qw = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
        q = torch.ao.nn.quantized.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False
        )
        q.set_weight_bias(qw, None)
        with torch.inference_mode():
            y = conv(x)
        q.scale, q.zero_point = float(y.abs().max() / 127), 128
    x_scale = float(x.max() / 255)
    return q, lambda: q(torch.quantize_per_tensor(x, x_scale, 0, torch.quint8)).dequantize()


def measure(models: dict[str, nn.Module], calls: dict, repeats: int) -> dict[str, tuple[float, int, int]]:
    """(median seconds, weight bytes held, peak bytes) of every backend, timed side by side."""
    with torch.inference_mode():
        times = interleaved_times(calls, repeats)
        return {
            k: (times[k], held_bytes(models[k]), (int_peak_bytes if k == "int" else peak_bytes)(calls[k]))
            for k in calls
        }


def int_peak_bytes(fn) -> int:
    """peak_bytes, plus the CPU kernel's workspace (the encoded input, which it keeps outside
    torch's allocator from call to call) at the size that `fn` needs."""
    if not int_kernel.cpu_kernel_available():
        return peak_bytes(fn)
    torch.ops.dsq.release_int_workspace()
    return peak_bytes(fn) + torch.ops.dsq.int_workspace_bytes()


def record(label: str, batch: int, gmac: float, result: dict) -> dict:
    """One row of the results: each backend's time, weight bytes and peak bytes, and their
    ratios to float32's from the same run."""
    base = result["float32"]
    return {
        "row": label,
        "batch": batch,
        "gmac": round(gmac, 3),
        "backends": {
            k: {
                "ms": round(1e3 * t, 3),
                "time_ratio": round(t / base[0], 3),
                "weight_bytes": held,
                "weight_ratio": round(held / base[1], 4),
                "peak_bytes": peak,
                "peak_ratio": round(peak / max(base[2], 1), 3),
            }
            for k, (t, held, peak) in result.items()
        },
    }


def layer_records(args) -> list[dict]:
    records = []
    for name, conv, (h, w), count in resnet50_layers(args.size):
        if not any(fnmatch.fnmatchcase(name, p) for p in args.layers):
            continue
        simulated, integer = dsconv_models(conv, args.bits, args.block, whole=False)
        for batch in args.batches:
            x = torch.randn(batch, conv.in_channels, h, w).relu_()
            q, x86_call = x86_layer(conv, x)
            models = dict(zip(BACKENDS, (conv, simulated, integer, q)))
            calls = {k: (lambda m=m: m(x)) for k, m in models.items() if k != "x86 int8"} | {"x86 int8": x86_call}
            label = (
                f"{name} x{count}: {conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x"
                f"{conv.kernel_size[1]}/{conv.stride[0]} @{h}"
            )
            records.append(record(label, batch, macs(conv, x) / 1e9, measure(models, calls, args.repeats)))
            print(" ", time_cells(records[-1]), flush=True)
    return records


def network_records(args) -> list[dict]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    simulated, integer = dsconv_models(model, args.bits, args.block, whole=True)
    records = []
    for batch in args.network_batches:
        x = torch.randn(batch, 3, args.size, args.size)
        models = dict(zip(BACKENDS, (model, simulated, integer, torch_int8(model, x))))
        calls = {k: (lambda m=m: m(x)) for k, m in models.items()}
        gmac = sum(macs(m, a) for m, a in model_inputs(model, x).items()) / 1e9
        label = f"ResNet-50 ({args.size}x{args.size})"
        records.append(record(label, batch, gmac, measure(models, calls, args.repeats)))
        print(" ", time_cells(records[-1]), flush=True)
    return records


def time_cells(r: dict) -> list[str]:
    b = r["backends"]
    return [
        r["row"],
        r["batch"],
        f"{r['gmac']:.2f}",
        f"{b['float32']['ms']:.1f}",
        *(f"{b[k]['ms']:.1f} ({b[k]['time_ratio']:.2f}x)" for k in BACKENDS[1:]),
    ]


def memory_cells(r: dict) -> list[str]:
    b = r["backends"]
    return [
        r["row"],
        r["batch"],
        *(
            f"{b[k]['weight_bytes'] / 2**20:.2f} ({b[k]['weight_ratio']:.2f}x) / "
            f"{b[k]['peak_bytes'] / 2**20:.1f} ({b[k]['peak_ratio']:.2f}x)"
            for k in BACKENDS
        ),
    ]


def write_results(path: Path, meta: dict, records: list[dict]) -> None:
    """`path`.json (settings and every number) and `path`.csv (one line per row and backend)."""
    write_json(path.with_suffix(".json"), {"meta": meta, "rows": records})
    write_csv(
        path.with_suffix(".csv"),
        [
            {"row": r["row"], "batch": r["batch"], "gmac": r["gmac"], "backend": k, **v}
            for r in records
            for k, v in r["backends"].items()
        ],
    )
    print(f"\nwrote {path.with_suffix('.json')} and {path.with_suffix('.csv')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes of the layer rows")
    parser.add_argument(
        "--layers",
        nargs="*",
        default=["*"],
        help="globs on ResNet-50 layer names, e.g. 'layer3.0.*' (none: skip the layer rows)",
    )
    parser.add_argument(
        "--network-batches",
        type=int,
        nargs="*",
        default=[1, 32],
        help="batch sizes of the whole-network rows (none: skip them)",
    )
    parser.add_argument("--size", type=int, default=224, help="image size")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).with_suffix(""),
        help="write the results to OUT.json and OUT.csv (default: beside this script)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "x86"
    torch.manual_seed(0)
    load_before = os.getloadavg()
    records = (layer_records(args) if args.layers else []) + (network_records(args) if args.network_batches else [])
    meta = {
        "bits": args.bits,
        "block": args.block,
        "act": "bfp8",
        "size": args.size,
        "repeats": args.repeats,
        "threads": args.threads,
        "cpu": machine()["cpu"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "int_kernel": int_kernel.cpu_kernel_available(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(
        f"\nResNet-50 convs, DSConv {args.bits}-bit block {args.block} with 8-bit BFP inputs, "
        f"{args.threads} threads, median of {args.repeats} interleaved runs; (Nx) = time / float32 time "
        f"from the same run; load average {load_before[0]:.2f} before, {meta['load_average_after'][0]:.2f} after\n"
    )
    print_table(
        ["layer (x count in the network)", "batch", "GMAC", "float32 ms", *(f"{k} ms" for k in BACKENDS[1:])],
        [time_cells(r) for r in records],
    )
    print("\nweights held MiB / peak MiB during one forward, (Nx) = ratio to float32\n")
    print_table(["layer", "batch", *BACKENDS], [memory_cells(r) for r in records])
    write_results(args.out, meta, records)


if __name__ == "__main__":
    main()
