"""dsq.bench: the interleaved timing, the results' structure, runtimes that cannot run here, and
that every runtime it times computes what its name says (its outputs against the float model's,
on real CIFAR-10 images). No timing asserts: speed belongs to benchmarks/."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dsq
from dsq.bench import (
    RUNTIMES,
    BenchResult,
    Sources,
    benchmark,
    build_runtimes,
    dequantized_float,
    interleaved_seconds,
    interleaved_times,
)

from zoo import quantized

TORCH_RUNTIMES = ("float32", "simulate", "int", "int-fused", "torch-int8")
MIB = 2**20


def test_interleaved_seconds_calls_in_turn_and_times_only_after_warmup():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = interleaved_seconds(fns, repeats=3, warmup=2)
    assert calls == list("abc") * 5
    assert {name: len(s) for name, s in seconds.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for s in seconds.values() for t in s)
    assert set(interleaved_times(fns, repeats=1, warmup=0)) == set("abc")


def tiny_benchmark(**options) -> BenchResult:
    model, qmodel, _ = quantized("cifar_resnet20")
    return benchmark(model, qmodel, side=32, batch_sizes=(2, 1), repeats=2, memory=False, **options)


def test_benchmark_rows_settings_and_machine():
    result = tiny_benchmark(runtimes=TORCH_RUNTIMES, threads=1)
    assert [(r.batch, r.runtime) for r in result.rows] == [(b, n) for b in (1, 2) for n in TORCH_RUNTIMES]
    for row in result.rows:
        assert row.note == "" and len(row.seconds) == 2 and row.images_per_second > 0 and row.peak_bytes is None
    assert all(result.vs_float32(r) == 1.0 for r in result.rows if r.runtime == "float32")
    assert result.settings == {
        "side": 32,
        "batch_sizes": [1, 2],
        "repeats": 2,
        "warmup": 1,
        "threads": 1,
        "runtimes": list(TORCH_RUNTIMES),
        "memory": False,
    }
    machine = result.machine
    assert machine["cpu"] and set(machine["cpu_flags"]) == {"avx512bw", "avx512_vnni", "amx_int8"}
    assert machine["torch"] == torch.__version__
    assert len(machine["load_average_before"]) == len(machine["load_average_after"]) == 3
    as_dict = result.to_dict()
    assert as_dict["rows"][0].keys() >= {"runtime", "batch", "seconds", "images_per_second", "vs_float32", "note"}


def test_threads_are_restored():
    before = torch.get_num_threads()
    tiny_benchmark(runtimes=("float32",), threads=before + 1)
    assert torch.get_num_threads() == before


class ValueDependent(nn.Module):
    """A forward that branches on a tensor's value: torch's FX cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_a_runtime_that_cannot_be_built_is_a_note_in_its_rows():
    model = ValueDependent().eval()
    qmodel, _ = dsq.quantize(model, bits=4)
    result = benchmark(
        model, qmodel, side=8, runtimes=("float32", "torch-int8"), batch_sizes=(1,), repeats=1, memory=False
    )
    float32, int8 = result.rows
    assert float32.images_per_second > 0 and float32.note == ""
    assert int8.seconds == [] and int8.images_per_second is None and result.vs_float32(int8) is None
    assert int8.note.startswith("TraceError") and "\n" not in int8.note


def test_without_onnxruntime_its_rows_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    result = tiny_benchmark(runtimes=("float32", "onnxruntime-float32", "onnxruntime-int8"))
    notes = {r.runtime: r.note for r in result.rows if r.batch == 1}
    assert notes["float32"] == ""
    for name in ("onnxruntime-float32", "onnxruntime-int8"):
        assert "pip install 'dsq[onnx]'" in notes[name]


@pytest.mark.parametrize(
    "options, words",
    [
        ({"runtimes": ("float32", "tensorrt")}, ["unknown runtime", "tensorrt", "onnxruntime-int8"]),
        ({"runtimes": ()}, ["unknown runtime", "none given"]),
        ({"batch_sizes": (1, 0)}, ["batch size", "0"]),
        ({"batch_sizes": (1, 2.5)}, ["batch size", "2.5"]),
        ({"batch_sizes": ()}, ["no batch size"]),
        ({"repeats": 0}, ["repeats", "0"]),
        ({"warmup": 0}, ["warmup", "0"]),
    ],
)
def test_bad_settings_are_one_line_errors(options, words, one_line_dsq_error):
    model, qmodel, _ = quantized("cifar_resnet20")
    message = one_line_dsq_error(benchmark, model, qmodel, side=32, **{"memory": False, **options})
    assert all(word in message for word in words), message


def test_dequantized_float_holds_the_dsq_weights():
    model, qmodel, _ = quantized("cifar_resnet20")
    rebuilt = dequantized_float(qmodel, "cifar_resnet20", 10)
    assert isinstance(rebuilt.conv1, nn.Conv2d)
    layer = qmodel.layer1[0].conv1
    expected = dsq.formats.dequantize(layer.vqk, layer.kds, layer.layout).reshape(layer.vqk.shape)
    assert torch.equal(rebuilt.layer1[0].conv1.weight, expected)
    assert not torch.equal(rebuilt.layer1[0].conv1.weight, model.layer1[0].conv1.weight)


# ---- what each runtime computes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_images(cifar) -> torch.Tensor:
    """128 CIFAR-10 test images, spread over the classes, as the cifar10 preset prepares them."""
    from dsq.data import get_preset, open_dataset

    dataset = open_dataset(cifar, get_preset("cifar10").transform())
    step = len(dataset) // 128
    return torch.stack([dataset[i * step][0] for i in range(128)])


@pytest.fixture(scope="module")
def resnet20_runtimes(resnet20, cifar_images, tmp_path_factory):
    """Every runtime of ResNet-20 W4 (calibrated on the first 64 images), and the other 64 images."""
    from dsq.models import load_model

    model = load_model(str(resnet20)).model
    qmodel, _ = dsq.quantize(model, bits=4, block=32)
    calibration, images = cifar_images[:64], cifar_images[64:]
    sources = Sources(model, qmodel, calibration, threads=2, folder=tmp_path_factory.mktemp("runtimes"))
    return build_runtimes(RUNTIMES, sources), images


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def test_every_runtime_computes_the_model(resnet20_runtimes):
    runtimes, images = resnet20_runtimes
    missing = {name: runtime for name, runtime in runtimes.items() if isinstance(runtime, str)}
    assert missing == {}
    out = {name: runtime.bind(images)() for name, runtime in runtimes.items()}
    assert all(o.shape == (len(images), 10) and o.dtype == torch.float32 for o in out.values())
    reference = out["float32"]
    scale = reference.abs().max().item()
    # the same arithmetic in another runtime: equal to float rounding
    assert torch.allclose(out["onnxruntime-float32"], reference, rtol=1e-4, atol=1e-4 * scale)
    # dsq's int backend and fused network compute simulate's values, rounded otherwise (where a
    # float32 and an exact sum straddle a BFP rounding edge, a mantissa moves by one step)
    for name in ("int", "int-fused"):
        assert (out[name] - out["simulate"]).abs().max() <= 0.02 * scale, name
        assert top1_agreement(out[name], out["simulate"]) >= 63 / 64, name
    # quantized networks: the same predictions as float on most images, not the same logits
    for name in ("simulate", "int", "int-fused", "torch-int8", "onnxruntime-int8"):
        assert top1_agreement(out[name], reference) >= 0.85, name
        assert not torch.equal(out[name], reference), name


def test_torch_int8_runs_int8_convolutions(resnet20_runtimes):
    runtimes, _ = resnet20_runtimes
    convs = [m for m in runtimes["torch-int8"].module.modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)]
    assert len(convs) == 19  # every conv of ResNet-20 runs on int8


def test_onnxruntime_int8_is_a_per_channel_qdq_model(resnet20_runtimes):
    import onnx

    runtimes, _ = resnet20_runtimes
    graph = onnx.load(str(runtimes["onnxruntime-int8"].path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    conv_weight_scales = [
        init for init in graph.initializer if "scale" in init.name and len(init.dims) == 1 and init.dims[0] > 1
    ]
    assert conv_weight_scales, "no per-channel scales"


# ---- peak memory ---------------------------------------------------------------------------------


@pytest.mark.slow  # starts Python processes that import dsq
def test_peak_memory_grows_with_the_batch():
    model, qmodel, _ = quantized("cifar_resnet20")
    result = benchmark(
        model, qmodel, side=64, runtimes=("float32", "torch-int8"), batch_sizes=(1, 32), repeats=1, threads=1
    )
    peak = {(r.runtime, r.batch): r.peak_bytes for r in result.rows}
    assert all(isinstance(p, int) and p > 0 for p in peak.values()), result.rows
    # float32 at batch 32: the first conv's output alone is 32 x 16 x 64 x 64 float32 (8 MiB)
    assert peak["float32", 32] - peak["float32", 1] > 8 * MIB
    assert peak["torch-int8", 32] > peak["torch-int8", 1]


def test_the_memory_probe_failure_is_a_note(monkeypatch):
    monkeypatch.setattr("dsq.bench.memory.CHILD", "raise SystemExit('no probe here')")
    model, qmodel, _ = quantized("cifar_resnet20")
    result = benchmark(model, qmodel, side=32, runtimes=("float32",), batch_sizes=(1,), repeats=1)
    (row,) = result.rows
    assert row.images_per_second > 0 and row.peak_bytes is None
    assert row.note == "peak memory not measured: the memory probe failed: no probe here"


def test_runtime_files_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr("dsq.bench.memory.CHILD", "print(1)")
    model, qmodel, _ = quantized("cifar_resnet20")
    result = benchmark(model, qmodel, side=32, runtimes=("float32",), batch_sizes=(1,), repeats=1)
    assert result.rows[0].peak_bytes == 1
    assert list(Path(tmp_path).iterdir()) == []
