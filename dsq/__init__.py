"""dsq: DSConv post-training quantization for CNNs.

    import dsq
    qmodel, report = dsq.quantize(model, bits=4, block=32)
    dsq.calibrate(model, qmodel, report, images)     # optional: unlabelled images (N, 3, H, W)
    dsq.save("model.dsq", qmodel, report, arch="resnet50")
    qmodel, recipe = dsq.load("model.dsq")
"""
__version__ = "0.1.0"  # before the imports: the artifact module writes it into files

from .artifact import load, save  # noqa: E402
from .calibration import calibrate  # noqa: E402
from .convert import QuantReport, quantize  # noqa: E402
from .errors import DsqError  # noqa: E402

__all__ = ["quantize", "calibrate", "QuantReport", "DsqError", "load", "save", "__version__"]
