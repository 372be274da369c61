"""What the int kernel's tiles reach, in MACs per cycle on one core, against the peak of the unit
they use, and what the per-block epilogue costs: one 3x3 conv (256 -> 256 channels, 28x28,
batch 4, 1.85 GMAC), 4-bit weights, BFP8 inputs, channels-last, one thread, interleaved medians.
Each instruction set's tiles (AMX-INT8, VNNI, AVX-512BW: those this CPU has) run with the others
forced off (set_backend's `kernel`), at block 32 (dsq's default: one float64 epilogue per 32
MACs) and block 256 (one per 256). Beside them: torch's x86 int8 conv (oneDNN, per-channel) and
float32 conv on the same shape. Cycles are seconds times the clock that /proc/cpuinfo states.
Writes int_kernel_peak.json beside this file.

    python int_kernel_peak.py      # from benchmarks/
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

import dsq
from dsq.bench import interleaved_times
from dsq.nn import int_kernel, set_backend

from common import print_table

SHAPE = dict(batch=4, channels=256, side=28, kernel=3)
# MACs per cycle and core of the unit each run uses: one 512-bit integer multiply (or float FMA)
# per cycle for the vector units (its MACs per instruction); AMX-INT8: one tile multiply (tdpbssd) of 16 x 16
# outputs over 64 channels (16 384 MACs) per 16 cycles, which units of 32 channels fill only half.
PEAK = {"amx": 1024, "vnni": 64, "avx512bw": 32, "float32 FMA": 16}


def clock_hz() -> float:
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if "cpu MHz" in line]
    return mhz[0] * 1e6


def main() -> None:
    torch.set_num_threads(1)
    n, c, s, k = SHAPE.values()
    macs = n * s * s * c * c * k * k
    x = torch.randn(n, c, s, s).contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(c, c, k, padding=1, bias=False).eval()
    runs = {"float32": lambda: conv(x)}
    for block in (32, 256):
        for isa in int_kernel.kernel_isas():
            model, _ = dsq.quantize(conv, bits=4, block=block, quantize_image_input=True)
            set_backend(model, "int", kernel=isa)
            runs[f"dsq {isa} block {block}"] = lambda m=model: m(x)
    qconv = nnq.Conv2d(c, c, k, padding=1, bias=False)
    scale = conv.weight.detach().abs().amax((1, 2, 3)).double() / 127
    zero = torch.zeros(c, dtype=torch.long)
    qconv.set_weight_bias(torch.quantize_per_channel(conv.weight.detach(), scale, zero, 0, torch.qint8), None)
    qconv.scale, qconv.zero_point = 0.05, 64
    qx = torch.quantize_per_tensor(x, 0.05, 64, torch.quint8)
    runs["torch x86 int8"] = lambda: qconv(qx)
    with torch.inference_mode():
        times = interleaved_times(runs, repeats=7)
    hz = clock_hz()
    rows, results = [], {}
    for name, t in times.items():
        per_cycle = macs / (t * hz)
        unit = next((u for u in ("amx", "vnni", "avx512bw") if u in name), "float32 FMA" if name == "float32" else None)
        share = f"{100 * per_cycle / PEAK[unit]:.0f} %" if unit else ""
        rows.append([name, f"{t * 1e3:.1f}", f"{macs / t / 1e9:.1f}", f"{per_cycle:.1f}", PEAK.get(unit, ""), share])
        results[name] = dict(seconds=t, gmac_per_s=macs / t / 1e9, macs_per_cycle=per_cycle, peak=PEAK.get(unit))
    print(f"{platform.processor() or platform.machine()}, clock {hz / 1e9:.2f} GHz, 1 thread, {macs / 1e9:.2f} GMAC")
    print_table(["run", "ms", "GMAC/s", "MACs/cycle", "peak MACs/cycle", "of peak"], rows)
    Path(__file__).with_name("int_kernel_peak.json").write_text(
        json.dumps({"clock_hz": hz, "macs": macs, "runs": results}, indent=2)
    )


if __name__ == "__main__":
    main()
