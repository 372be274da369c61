"""dsq: DSConv post-training quantization for CNNs.

    import dsq
    qmodel, report = dsq.quantize(model, bits=4, block=32)  # or dsq.quantize(model, dsq.QuantConfig(...))
    dsq.calibrate(model, qmodel, report, images)     # optional: unlabelled images (N, 3, H, W)
    dsq.save("model.dsq", qmodel, report, arch="resnet50")
    dsq.export(qmodel, "model.onnx", images[:1])     # or "model.pth": a plain torch state_dict
    qmodel, recipe = dsq.load("model.dsq")

`import dsq` is light: torch and the rest load on first use of these names (PEP 562), so the
`dsq` command starts at once and answers Ctrl-C during its imports.
"""

from importlib import import_module
from importlib.util import find_spec

from ._version import __version__

_LAZY = {
    "quantize": ".convert",
    "QuantReport": ".quant_report",
    "QuantConfig": ".config",
    "CalibConfig": ".config",
    "LayerRule": ".config",
    "calibrate": ".calibration",
    "load": ".artifact",
    "save": ".artifact",
    "export": ".exporters",
    "DsqError": ".errors",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    """The public names and the submodules (`dsq.models`, ...), imported on first use."""
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
    elif not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_LAZY})
