"""A sweep holds one base QuantConfig and derives each point's with dataclasses.replace: the
same config as the keyword form of `dsq.quantize` with that bits and block."""

from types import SimpleNamespace

import pytest
import torch

import dsq.sweep
from dsq.config import QuantConfig, quant_config
from dsq.errors import DsqError
from dsq.sweep import Sweep

OPTIONS = [
    {},
    {"method": "kl", "rounds": 0, "layout": "flat", "scale_dtype": "float32"},
    {"act_block": 8, "exclude": ("fc",), "layer_bits": {"layer1.*": 8}, "depthwise_bits": None},
    {"act_bits": None, "quantize_linear": True, "quantize_image_input": True, "include": ("conv*",)},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_each_point_is_the_keyword_form_at_its_bits_and_block(options):
    """As the CLI builds it: the config at the grid's first point, the act block following unless set."""
    base = quant_config(**{**options, "bits": 2, "block": 16})
    sweep = Sweep([2, 4], [16, 64], base, act_block_follows=options.get("act_block") is None)
    for bits, block in sweep.grid:
        assert sweep.point_config(bits, block) == quant_config(**{**options, "bits": bits, "block": block})


def test_the_default_config_is_dsqs():
    assert Sweep([3], [8]).point_config(3, 8) == quant_config(bits=3, block=8)


def test_quantize_gets_each_points_config(monkeypatch):
    calls = []
    report = SimpleNamespace(
        mean_bits_per_weight=4.0, model_quantized_bytes=1, compression=8.0, seconds=0.0, calibration=None
    )
    monkeypatch.setattr(dsq.sweep, "quantize", lambda model, config: calls.append(config) or (model, report))
    sweep = Sweep([3, 5], [8], quant_config(method="kl"), act_block_follows=False)
    for build in list(sweep.builders(torch.nn.Identity()).values())[1:]:
        build()
    assert calls == [sweep.point_config(3, 8), sweep.point_config(5, 8)]
    assert [(c.weight.bits, c.weight.block, c.weight.method, c.act.block) for c in calls] == [
        (3, 8, "kl", 32),
        (5, 8, "kl", 32),
    ]


def test_saved_settings_leave_out_what_the_points_set():
    """The grid's bits and block (and a following act block) are not settings: a wider grid reuses points."""
    narrow = Sweep([4], [32], quant_config(bits=4, block=32))
    wide = Sweep([2, 4], [16, 32], quant_config(bits=2, block=16))
    assert narrow.settings == wide.settings
    q = wide.settings["quantization"]
    assert q["version"] == 1 and q["method"] == "l2" and q["act_bits"] == 8 and q["act_block"] is None
    assert "bits" not in q and "block" not in q
    fixed = Sweep([4], [32], quant_config(act_block=16), act_block_follows=False).settings["quantization"]
    assert fixed["act_block"] == 16
    assert Sweep([4], [32], quant_config(act_bits=None)).settings["quantization"]["act_bits"] is None


def test_a_dict_of_options_is_refused():
    with pytest.raises(DsqError, match="QuantConfig"):
        Sweep([4], [32], {"method": "l2"})
    assert isinstance(Sweep([4], [32], None).config, QuantConfig)
