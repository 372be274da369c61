"""Human-readable tables of quantization reports and accuracy results, and plots of sweeps and sensitivity."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from .config import LayerRule, QuantConfig
from .errors import DsqError
from .evaluate import Accuracy
from .fileio import atomic_path
from .quant_report import QuantReport

if TYPE_CHECKING:
    from .bench import BenchResult

MIB = 2**20


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1024:.1f}K" if n_bytes < MIB else f"{n_bytes / MIB:.2f}M"


def layer_table(report: QuantReport) -> str:
    """One row per conv/linear layer: precision, layout, error and size."""
    calibrated = report.calibration is not None
    header = ["layer", "kind", "shape", "groups", "bits", "block/layout", "act", "bits/w", "SQNR dB", "size"]
    if calibrated:
        header[-1:-1] = ["out SQNR before", "after"]
    rows = []
    for r in report.layers:
        q = r.quantized
        rows.append(
            [
                r.name,
                r.kind,
                "x".join(map(str, r.shape)),
                str(r.groups),
                str(r.bits) if q else "float",
                f"{r.block}/{r.layout}" if q else "-",
                r.act if q else "-",
                f"{r.bits_per_weight:.2f}",
                _db(r.sqnr_db),
                f"{_size(r.float_bytes)} -> {_size(r.packed_bytes)}",
            ]
        )
        if calibrated:
            rows[-1][-1:-1] = [_db(r.out_sqnr_before_db), _db(r.out_sqnr_after_db)]
    return _table(header, rows)


def _db(value: float | None) -> str:
    return "" if value is None else ("inf" if math.isinf(value) else f"{value:.1f}")


def summary(report: QuantReport) -> str:
    """Parameters, sizes, what stayed float and which layers have other bits, in a few lines."""
    q, f = report.quantized_layers, report.float_layers
    lines = [
        f"quantized {len(q)} layers ({sum(r.params for r in q):,} weights) at "
        f"{report.mean_bits_per_weight:.2f} bits per weight with scales, in {report.seconds:.1f} s",
        f"model size: {report.model_float_bytes / MIB:.2f} MiB float -> "
        f"{report.model_quantized_bytes / MIB:.2f} MiB packed ({report.compression:.2f}x smaller)",
    ]
    lines += [f"kept float: {r.name} ({r.note})" for r in f]
    lines += [f"{r.name}: {r.note}" for r in q if r.note]
    if report.calibration:
        lines.append(calibration_line(report.calibration))
    return "\n".join(lines)


def calibration_line(c: dict) -> str:
    """How a model was calibrated: images, stages with their seconds, the distillation's loss."""
    stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in c["stages"].items()) or "no stage"
    source = c["source"] or "a tensor"
    line = f"calibrated on {c['images']} images of {source} ({c['fit_images']} for the refit): {stages}"
    if c.get("adapt"):
        a = c["adapt"]
        line += f" ({a['steps']} steps, loss {a['first_loss']:.4f} -> {a['last_loss']:.4f})"
    return line


def accuracy_table(results: dict[str, Accuracy]) -> str:
    """Top-1/top-5 of each model, with the drop from the first (the float model)."""
    names = list(results)
    base = results[names[0]]
    rows = []
    for name in names:
        a = results[name]
        drop = "" if name == names[0] else f"{a.top1 - base.top1:+.2f}"
        rows.append([name, f"{a.top1:.2f}", f"{a.top5:.2f}", drop, str(a.images)])
    return _table(["model", "top-1 %", "top-5 %", "top-1 change", "images"], rows)


# ---- dsq bench -------------------------------------------------------------------------------


def bench_table(result: BenchResult) -> str:
    """One row per runtime and batch size: images per second, the ratio to float32's at that
    batch size, the peak memory, and why a cell is empty."""
    rows = []
    for r in result.rows:
        rate, ratio = r.images_per_second, result.vs_float32(r)
        rows.append(
            [
                r.runtime,
                str(r.batch),
                "-" if rate is None else f"{rate:.1f}",
                "-" if ratio is None else f"{ratio:.2f}x",
                "-" if r.peak_bytes is None else f"{r.peak_bytes / MIB:.1f}",
                r.note,
            ]
        )
    return _table(["runtime", "batch", "images/s", "vs float32", "peak MiB", "note"], rows)


def bench_summary(result: BenchResult) -> str:
    """The machine and the settings of a benchmark, and how its peak memory was measured."""
    m, s = result.machine, result.settings
    flags = ", ".join(f"{flag} {'yes' if has else 'no'}" for flag, has in m["cpu_flags"].items())
    lines = [
        f"cpu: {m['cpu']}, {m['cores']} cores ({flags}); torch {m['torch']} ({m['torch_cpu_capability']}), "
        f"onnxruntime {m['onnxruntime'] or 'not installed'}",
        f"{s['threads']} thread{'s' * (s['threads'] != 1)}, images 3x{s['side']}x{s['side']}, median of "
        f"{s['repeats']} interleaved runs after {s['warmup']} warmup; load average "
        f"{m['load_average_before'][0]:.2f} before, {m['load_average_after'][0]:.2f} after",
    ]
    if s["memory"]:
        lines.append(
            "peak MiB: the resident memory that a fresh process gains loading the runtime alone and running "
            "one forward (docs/bench.md)"
        )
    return "\n".join(lines)


# ---- dsq files: recipe and size accounting ---------------------------------------------------


def recipe_summary(recipe: dict) -> str:
    """What a dsq file holds and how it was made, in a few lines."""
    config = QuantConfig.from_dict(recipe["settings"])
    w, a = config.weight, config.act
    preset = (recipe.get("preset") or {}).get("name")
    model = (
        f"{recipe['arch']}, {recipe['num_classes']} classes, preprocessing {preset}"
        if recipe.get("arch")
        else "no architecture named (load it with the float skeleton)"
    )
    rounds = f" with {w.rounds} refinement rounds" if w.method == "l2" else ""
    act = "float"
    if a:
        image = "" if config.quantize_image_input else ", image input float"
        act = f"{a.bits}-bit BFP mantissas in blocks of {a.block} channels{image}"
    lines = [
        f"format: dsq file format {recipe['format_version']}, written by dsq {recipe['dsq_version']}",
        f"model: {model}",
        f"weights: {w.bits}-bit VQK, block {w.block}, layout {w.layout}, method {w.method}{rounds}, "
        f"{w.scale_dtype} KDS",
        f"activations: {act}",
        f"layers: include {' '.join(config.include)}; rules: {rules_text(config)}",
    ]
    lines += [f"kept float: {r['name']} ({r['note']})" for r in recipe["report"]["layers"] if not r["quantized"]]
    return "\n".join([*lines, _accuracy_line(recipe.get("accuracy"))])


def rules_text(config: QuantConfig) -> str:
    """The config's layer rules in order, e.g. "linear float, 'fc*' float, depthwise 8 bits"."""

    def text(rule: LayerRule) -> str:
        what = repr(rule.name) if rule.name is not None else rule.kind
        return f"{what} {'float' if rule.keep_float else rule.changes or 'as configured'}"

    return ", ".join(map(text, config.rules)) or "-"


def _accuracy_line(acc: dict | None) -> str:
    if not acc:
        return "accuracy: not measured"
    f, q = acc["float"], acc["quantized"]
    return (
        f"accuracy: float {f['top1']:.2f} %, quantized {q['top1']:.2f} % top-1 "
        f"({q['top1'] - f['top1']:+.2f}) on {q['images']} images"
    )


def size_table(sizes) -> str:
    """One row per quantized layer of a dsq file (`artifact.FileSizes`): bits per weight, bytes."""
    header = [
        "layer",
        "shape",
        "layout",
        "act",
        "bits",
        "scales",
        "bits/w",
        "float32 B",
        "file B",
        "minimum B",
        "smaller",
    ]
    rows = [
        [
            r.name,
            "x".join(map(str, r.shape)),
            r.layout,
            r.act,
            str(r.bits),
            f"{r.n_scales:,} x {r.scale_bits}b",
            f"{r.bits_per_weight:.3f}",
            f"{r.float_bytes:,}",
            f"{r.file_bytes:,}",
            f"{r.min_bytes:,.0f}",
            f"{r.float_bytes / r.file_bytes:.2f}x",
        ]
        for r in sizes.layers
    ]
    return _table(header, rows)


def size_summary(sizes) -> str:
    """Totals of a dsq file: quantized weights, float parts, header, file vs float model and minimum."""
    n = sum(r.params for r in sizes.layers)
    return "\n".join(
        [
            f"quantized weights: {len(sizes.layers)} layers, {n:,} weights, "
            f"{8 * sizes.quantized_bytes / max(n, 1):.3f} "
            f"bits each: {_size(sizes.quantized_float_bytes)} float32 -> {_size(sizes.quantized_bytes)} "
            f"({sizes.weight_ratio:.2f}x smaller)",
            f"float parts (BatchNorm, biases, layers kept float): {_size(sizes.float_bytes)}",
            f"header (tensor index and recipe): {_size(sizes.header_bytes)}",
            file_line(sizes),
            f"theoretical minimum (b + s/L bits per quantized weight, float parts as they are): "
            f"{_size(sizes.min_bytes)}; the file is {100 * sizes.above_min:.2f} % above it",
        ]
    )


def file_line(sizes) -> str:
    """The file's size and how many times smaller than the float model it is, in one line."""
    return (
        f"file: {_size(sizes.file_bytes)} ({sizes.file_bytes:,} B), {sizes.ratio:.2f}x smaller than the float "
        f"model ({_size(sizes.model_float_bytes)} of float32 tensors)"
    )


def _cells(columns: dict, items) -> list[list[str]]:
    """One row per item: each column's cell function applied to it."""
    return [[cell(item) for cell in columns.values()] for item in items]


def _bits_cell(p: dict) -> str:
    """A sweep point's weight bits, or "<=X" for a bit budget of X bits per weight."""
    return str(p["bits"]) if p["bits"] is not None else f"<={p['target_bits']:g}"


SWEEP_COLUMNS = {
    "bits": _bits_cell,
    "block": lambda p: str(p["block"]),
    "bits/w": lambda p: f"{p['bits_per_weight']:.2f}",
    "size": lambda p: _size(p["size_bytes"]),
    "top-1 %": lambda p: f"{p['top1']:.2f}",
    "top-5 %": lambda p: f"{p['top5']:.2f}",
    "drop": lambda p: f"{p['drop_top1']:+.2f}",
}

LAYER_COLUMNS = {
    "layer": lambda r: r["layer"],
    "kind": lambda r: r["kind"],
    "params": lambda r: f"{r['params']:,}",
    "bits": lambda r: str(r["bits"]),
}

SENSITIVITY_COLUMNS = {
    **LAYER_COLUMNS,
    "only it quantized": lambda r: f"{r['only_top1']:.2f} ({r['only_drop']:+.2f})",
    "all but it": lambda r: f"{r['all_but_top1']:.2f} ({r['all_but_gain']:+.2f})",
    "damage": lambda r: f"{r['damage']:.2f}",
}


BUDGET_COLUMNS = {
    **LAYER_COLUMNS,
    "block/layout": lambda r: f"{r['block']}/{r['layout']}",
    "bits/w": lambda r: f"{r['bits_per_weight']:.2f}",
    "cost": lambda r: f"{r['cost']:.2e}",
}


def budget_table(budget) -> str:
    """One row per quantized layer of a `dsq.bit_budget.BitBudget`, in network order: the format chosen and its cost."""
    return _table(list(BUDGET_COLUMNS), _cells(BUDGET_COLUMNS, budget.rows()))


def budget_summary(budget) -> str:
    """What a bit budget asked, chose and measured, in one line."""
    counts = sorted(Counter(budget.policy.values()).items(), key=lambda item: item[0].key)
    widths = ", ".join(f"{count} at {choice}" for choice, count in counts)
    c = budget.costs
    return (
        f"bit budget: at most {budget.target:g} bits per weight, {budget.mean_bits:.3f} chosen (scales included); "
        f"layers {widths}; cost {budget.cost:.3g} nats{' after a refit' if c.refit else ''}, measured on "
        f"{c.images} images ({c.samples} label draws each) in {c.seconds:.1f} s"
    )


def sweep_table(sweep) -> str:
    """The float baseline, then one row per point of a `dsq.sweep.Sweep`: bits/w, size, accuracy, drop."""
    base = sweep.results["float"]
    float_row = ["float", "-", "32.00", _size(base["size_bytes"]), f"{base['top1']:.2f}", f"{base['top5']:.2f}", ""]
    return _table(list(SWEEP_COLUMNS), [float_row, *_cells(SWEEP_COLUMNS, sweep.rows())])


def sensitivity_table(sensitivity) -> str:
    """One row per layer of a `dsq.sensitivity.Sensitivity`, most damaging first."""
    return _table(list(SENSITIVITY_COLUMNS), _cells(SENSITIVITY_COLUMNS, sensitivity.rows()))


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg backend, without pyplot's global state."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DsqError("plots need matplotlib: pip install 'dsq[plot]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def _save_png(figure, path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=150)


def plot_sweep(sweep, path) -> None:
    """Top-1 against bits per weight (scales included), one line per block size (and a dashed one per
    block for bit budgets), and the float baseline."""
    figure = _figure(7.5, 4.8)
    ax = figure.add_subplot()
    points = sweep.rows()
    for block in sweep.blocks:
        color = None
        for budget, style, label in ((False, "-o", f"block {block}"), (True, "--s", f"block {block}, bit budget")):
            line = sorted(
                (p["bits_per_weight"], p["top1"], _bits_cell(p))
                for p in points
                if p["block"] == block and (p["bits"] is None) == budget
            )
            if not line:
                continue
            x, y, _ = zip(*line)
            color = ax.plot(x, y, style, color=color, label=label)[0].get_color()
            for xi, yi, b in line:
                text = b if budget else f"{b}b"
                ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(3, 4), fontsize=7, color=color)
    base = sweep.results["float"]
    ax.axhline(base["top1"], color="black", linestyle="--", linewidth=1, label=f"float {base['top1']:.2f} %")
    method = sweep.settings["quantization"].get("method", "l2")
    ax.set(
        xlabel="bits per weight (scales included)",
        ylabel="top-1 %",
        title=f"{Path(str(sweep.settings.get('model', 'model'))).name}, {method} fit, {base['images']} images",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save_png(figure, path)


def plot_sensitivity(sensitivity, path) -> None:
    """Per layer, in network order: top-1 lost with only it quantized, and won back keeping only it float."""
    rows = sensitivity.rows(ranked=False)
    figure = _figure(7.5, 1.5 + 0.28 * len(rows))
    ax = figure.add_subplot()
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], [-r["only_drop"] for r in rows], height=0.4, label="lost with only it quantized")
    ax.barh([i + 0.2 for i in y], [r["all_but_gain"] for r in rows], height=0.4, label="won back keeping only it float")
    ax.set_yticks(list(y), [f"{r['layer']} ({r['bits']}b)" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    f, q = sensitivity.results["float"], sensitivity.results["all quantized"]
    ax.set(
        xlabel="top-1 points", title=f"float {f['top1']:.2f} %, all quantized {q['top1']:.2f} %, {f['images']} images"
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save_png(figure, path)
