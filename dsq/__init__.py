"""dsq: DSConv post-training quantization for CNNs.

    import dsq
    qmodel, report = dsq.quantize(model, bits=4, block=32)
"""
from .convert import QuantReport, quantize
from .errors import DsqError

__version__ = "0.1.0"
__all__ = ["quantize", "QuantReport", "DsqError", "__version__"]
