"""Options that declare a size (block, activation block, batch, image counts, rounds): none may
allocate from the declared number before checking it against what exists. The installed `dsq`
runs under a 4 GiB address-space limit, which a normal ResNet-20 run fits in (torch is a CUDA
build: about 3.5 GiB of address space even when idle)."""

from __future__ import annotations

import resource

import pytest
import torch
import torch.nn as nn

import dsq
import dsq.models
from dsq.evaluate import evaluate

from dsq_cli_testkit import CIFAR, RESNET20, need

ADDRESS_SPACE = 4 * 2**30


def _limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_huge_block_fits_in_memory(installed_dsq, tmp_path):
    """A block longer than every layer is the whole layer: quantizing costs what block = layer costs."""
    result = installed_dsq(
        "quantize",
        need(RESNET20),
        "--block",
        "1000000",
        "-o",
        tmp_path / "m.dsq",
        "--data",
        need(CIFAR),
        "--limit",
        "200",
        preexec_fn=_limit_address_space,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and (tmp_path / "m.dsq").stat().st_size > 0


def test_huge_block_from_the_api_is_the_layer():
    model = dsq.models.build_model("cifar_resnet20")
    q, r = dsq.quantize(model, block=10**9, act_block=10**9, rounds=0)
    q_layer, r_layer = dsq.quantize(model, block=64, act_block=64, rounds=0)  # no ResNet-20 conv has more inputs
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(q(x), q_layer(x))
    assert r.model_quantized_bytes == r_layer.model_quantized_bytes


def test_huge_rounds_end():
    """Refinement stops when no slice improves any more: a billion rounds take no longer than a few."""
    model = nn.Sequential(nn.Conv2d(16, 16, 3))
    q, _ = dsq.quantize(model, rounds=10**9)
    q_few, _ = dsq.quantize(model, rounds=50)
    assert torch.equal(q[0].kds, q_few[0].kds) and torch.equal(q[0].vqk, q_few[0].vqk)


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.x, self.y = torch.randn(n, 3, 8, 8), torch.arange(n) % 4

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_evaluate_batch_that_does_not_fit_says_so(one_line_dsq_error):
    """Out of memory on a batch is a one-line error that names the cure, not a traceback."""

    class Greedy(nn.Module):
        def forward(self, x):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8000000000 bytes")

    message = one_line_dsq_error(evaluate, {"m": Greedy()}, Images(4), batch_size=4, progress=False)
    assert "batch size" in message


@pytest.mark.parametrize("batch_size", [2.5, True])
def test_evaluate_batch_size_must_be_whole(batch_size, one_line_dsq_error):
    one_line_dsq_error(evaluate, {"m": nn.Flatten()}, Images(4), batch_size=batch_size, progress=False)
