"""The runtimes: what each of RUNTIMES runs (a torch module, an onnxruntime session), how it is
built from the float and the dsq model, and how it is saved for the memory probe."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import DsqError
from ..exporters import dequantized_state_dict
from ..models import build_model
from ..nn import fuse_int, set_backend
from .baselines import export_float_onnx, onnx_int8, torch_int8

# onnxruntime's idle threads sleep instead of spinning: spinning, they would take the cores from
# the runtime timed next.
NO_SPINNING = ("session.intra_op.allow_spinning", "0")


class TorchRuntime:
    """A torch module, run eagerly in inference mode; a child process loads it pickled."""

    kind = "pickle"

    def __init__(self, module: nn.Module):
        self.module = module

    def bind(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The call that runs the module on `x` (what is timed)."""

        def run():
            with torch.inference_mode():
                return self.module(x)

        return run

    def to_file(self, path: Path) -> Path:
        torch.save(self.module, path)
        return path


class TracedRuntime(TorchRuntime):
    """A torch module that a child process loads traced (TorchScript): torch's FX int8 modules
    do not unpickle."""

    kind = "torchscript"

    def __init__(self, module: nn.Module, example: torch.Tensor):
        super().__init__(module)
        self.example = example

    def to_file(self, path: Path) -> Path:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on constants
            torch.jit.save(torch.jit.trace(self.module, self.example), path)
        return path


class OnnxRuntime:
    """An ONNX file in an onnxruntime CPU session with `threads` threads."""

    kind = "onnx"

    def __init__(self, path: Path, threads: int):
        self.path = path
        self.session = onnx_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def bind(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        feed = {self.input_name: x.numpy()}
        return lambda: torch.from_numpy(self.session.run(None, feed)[0])

    def to_file(self, path: Path) -> Path:
        return self.path  # a child loads the file itself


Runtime = TorchRuntime | OnnxRuntime


def onnx_session(path: Path, threads: int):
    """An onnxruntime CPU session of `path` with `threads` threads that do not spin when idle."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry(*NO_SPINNING)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def backend_copy(qmodel: nn.Module, backend: str) -> nn.Module:
    """A copy of `qmodel` that computes with `backend` (dsq.nn.set_backend)."""
    model = copy.deepcopy(qmodel)
    set_backend(model, backend)
    return model


def dequantized_float(qmodel: nn.Module, arch: str, num_classes: int | None = None) -> nn.Module:
    """The float architecture `arch` with `qmodel`'s dequantized weights (the float32 runtime of a
    dsq file, whose float weights are gone)."""
    model = build_model(arch, num_classes)
    model.load_state_dict(dequantized_state_dict(qmodel))
    return model


@dataclass
class Sources:
    """What the runtimes are built from."""

    model: nn.Module  # the float model
    qmodel: nn.Module  # its dsq model
    calibration: torch.Tensor  # a few images: torch-int8 and onnxruntime-int8 calibrate on them
    threads: int
    folder: Path  # where the ONNX files go

    def float_onnx(self) -> Path:
        """The float model's ONNX file, exported on the first call."""
        path = self.folder / "float32.onnx"
        return path if path.exists() else export_float_onnx(self.model, self.calibration, path)


BUILDERS: dict[str, Callable[[Sources], Runtime]] = {
    "float32": lambda s: TorchRuntime(s.model),
    "simulate": lambda s: TorchRuntime(backend_copy(s.qmodel, "simulate")),
    "int": lambda s: TorchRuntime(backend_copy(s.qmodel, "int")),
    "int-fused": lambda s: TorchRuntime(fuse_int(s.qmodel)),
    "torch-int8": lambda s: TracedRuntime(torch_int8(s.model, s.calibration), s.calibration),
    "onnxruntime-float32": lambda s: OnnxRuntime(s.float_onnx(), s.threads),
    "onnxruntime-int8": lambda s: OnnxRuntime(
        onnx_int8(s.float_onnx(), s.calibration, s.folder / "int8.onnx"), s.threads
    ),
}


def attempt(fn: Callable, *args):
    """fn(*args), or the one line that says why it failed."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - a runtime that fails here is a row's note, not the end of the run
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[0] if isinstance(error, DsqError) else ": ".join([type(error).__name__, *lines[:1]])
        return reason if len(reason) <= 300 else reason[:297] + "..."


def build_runtimes(names, sources: Sources, progress: bool = False) -> dict[str, Runtime | str]:
    """Each named runtime (RUNTIMES), or the one line that says why it could not be built."""
    built = {}
    for name in tqdm(names, desc="building runtimes", unit="runtime", disable=not progress):
        built[name] = attempt(BUILDERS[name], sources)
    return built
