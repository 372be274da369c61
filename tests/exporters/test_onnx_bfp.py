"""The dsq.BFP ONNX function, run by onnxruntime, against dsq's own BFP rounding: bit for bit on
the tensors where a floor(log2) off by one would show (exact powers of two and their
neighbours), zeros, denormals, blocks of one sign, ragged and oversized blocks."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from dsq.exporters.onnx_bfp import DOMAIN, DOMAIN_VERSION, function_name, function_protos
from dsq.formats import ActFormat, bfp_quantize


def run_bfp(x: torch.Tensor, bits: int, block: int, function: str | None = None) -> np.ndarray:
    """The BFP function the exporter calls for x's channels (or `function`), run by onnxruntime."""
    function = function or function_name(x.shape[1], block)
    node = helper.make_node(function, ["x"], ["y"], domain=DOMAIN, bits=bits, block=block)
    graph = helper.make_graph(
        [node],
        "bfp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
    model = helper.make_model(graph, opset_imports=opsets, functions=function_protos())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def powers_of_two(shape, generator) -> torch.Tensor:
    """Exact powers of two over the whole float32 range, subnormals included, random signs."""
    exponents = torch.randint(-149, 128, shape, generator=generator)
    signs = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return torch.ldexp(torch.ones(shape), exponents) * signs


def adversarial(channels: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, channels, 3, 4)
    p = powers_of_two(shape, g).abs()
    scaled = torch.randn(shape, generator=g) * torch.ldexp(
        torch.ones(1, channels, 1, 1), torch.randint(-40, 40, (1, channels, 1, 1), generator=g)
    )
    return {
        "powers of two": p,
        "just below powers of two": torch.nextafter(p, torch.zeros(())),
        "just above powers of two": torch.nextafter(p, torch.full((), float("inf"))).clamp_max(torch.finfo().max),
        "negative powers of two": -p,
        "zeros": torch.zeros(shape),
        "denormals": torch.randn(shape, generator=g) * 1e-41,
        "one sign": torch.rand(shape, generator=g) + 1,
        "wide range": scaled,
        "largest floats": torch.full(shape, torch.finfo().max) * torch.sign(torch.randn(shape, generator=g)),
    }


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("block,channels", [(1, 5), (8, 24), (16, 40), (32, 32), (32, 7), (100, 12)])
def test_bfp_function_equals_dsq(bits, block, channels):
    for what, x in adversarial(channels, seed=bits * 1000 + block * 10 + channels).items():
        expected = bfp_quantize(x, ActFormat(bits, block), 1).numpy()
        for function in {function_name(channels, block), "BFPRagged"}:  # the padded one takes any channels
            got = run_bfp(x, bits, block, function)
            assert np.array_equal(got, expected), f"{function}, {what}: {int((got != expected).sum())} values differ"


@pytest.mark.parametrize("shape", [(4, 24), (1, 3, 5), (2, 40, 1, 1)])
def test_bfp_function_any_rank(shape):
    """Linear inputs (N, F) and other ranks: the blocks still run along axis 1."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    assert np.array_equal(run_bfp(x, 6, 16), bfp_quantize(x, ActFormat(6, 16), 1).numpy())


def test_bfp_function_rounds_half_to_even():
    """Ties between two mantissas go to the even one, in ONNX as in torch.round."""
    step = 2.0 ** (3 - (4 - 2))  # peak 8 (e = 3) at 4 bits: step 2
    x = torch.tensor([[8.0, 1.0, 3.0, -5.0]])  # 1, 3 and -5 are halfway: 0.5, 1.5, -2.5 steps
    got = run_bfp(x, 4, 4)
    assert got.tolist() == [[8.0, 0.0, 2 * step, -2 * step]]
