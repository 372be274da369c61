"""The typed, versioned recipe (dsq.config): round trips, versions, rule order, kinds, the keyword form."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import dsq
from dsq.config import CONFIG_VERSION, DEFAULT_RULES, CalibConfig, LayerRule, QuantConfig, quant_config
from dsq.formats import ActFormat, WeightFormat

# The settings dict files written before versioned configs hold (dsq.quantize's arguments).
OLD_SETTINGS = {
    "bits": 3,
    "block": 16,
    "method": "kl",
    "rounds": 2,
    "sum_weight": 0.5,
    "layout": "flat",
    "act_bits": 6,
    "act_block": None,
    "include": ["*"],
    "exclude": ["fc"],
    "layer_bits": {"c1": 8},
    "depthwise_bits": 8,
    "quantize_linear": False,
    "quantize_image_input": True,
    "scale_dtype": "float16",
}


class Net(nn.Module):
    """Image conv, depthwise, pointwise (1x1) and a 3x3 conv, then a linear classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.c3(self.pw(self.dw(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def _rows(report) -> dict:
    return {r.name: (r.bits, r.act, r.note) for r in report.layers}


def test_round_trip_through_json():
    config = QuantConfig(
        WeightFormat(bits=3, block=8, scale_dtype="float32"),
        ActFormat(6, 16),
        (
            LayerRule(name="layer1.*", keep_float=True),
            LayerRule(kind="pointwise", bits=6),
            LayerRule(name="layer2.*", bits=2, block=256, layout="flat"),
        ),
        include=("layer*",),
        quantize_image_input=True,
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["version"] == CONFIG_VERSION and QuantConfig.from_dict(data) == config
    calib = CalibConfig(act_search=True, adapt_steps=3, adapt_seconds=1.5, seed=7)
    assert CalibConfig.from_dict(json.loads(json.dumps(calib.to_dict()))) == calib


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda d: d.update(version=CONFIG_VERSION + 1), "upgrade dsq"),
        (lambda d: d.update(version="1"), "version"),
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d.pop("rules"), "rules"),
        (lambda d: d.update(include="*"), "include"),
        (lambda d: d["weight"].update(bits=9), "bits"),
        (lambda d: d["rules"].append({"name": "x", "kind": "linear"}), "kind"),
        (lambda d: d["rules"].append({"kind": "diagonal"}), "diagonal"),
        (lambda d: d["rules"].append({"name": "x", "bits": 4, "keep_float": True}), "float"),
        (lambda d: d["rules"].append({"name": "x", "block": 256, "keep_float": True}), "blocks of 256"),
        (lambda d: d["rules"].append({"name": "x", "block": -1}), "block"),
        (lambda d: d["rules"].append({"name": "x", "layout": "diagonal"}), "diagonal"),
    ],
)
def test_from_dict_refuses_what_does_not_fit(edit, named, one_line_dsq_error):
    data = QuantConfig().to_dict()
    edit(data)
    assert named in one_line_dsq_error(QuantConfig.from_dict, data)


def test_the_keyword_form_is_the_explicit_config_bit_for_bit():
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    by_keywords, r1 = dsq.quantize(model, bits=3, block=8, exclude=("c3",), layer_bits={"pw": 5})
    config = QuantConfig(
        WeightFormat(bits=3, block=8, scale_dtype="float16"),
        ActFormat(8, 8),
        (
            LayerRule(kind="linear", keep_float=True),
            LayerRule(name="c3", keep_float=True),
            LayerRule(name="pw", bits=5),
            LayerRule(kind="depthwise", bits=8),
        ),
    )
    explicit, r2 = dsq.quantize(model, config)
    assert r1.config == config == r2.config
    state1, state2 = by_keywords.state_dict(), explicit.state_dict()
    assert state1.keys() == state2.keys() and all(torch.equal(state1[k], state2[k]) for k in state1)
    with torch.no_grad():
        assert torch.equal(by_keywords(x), explicit(x))
    assert _rows(r1) == _rows(r2)


def test_defaults_are_dsqs():
    assert quant_config() == QuantConfig() and QuantConfig().rules == DEFAULT_RULES
    assert QuantConfig().weight.scale_dtype == "float16" and QuantConfig().act == ActFormat(8, 32)


def test_first_matching_rule_wins_and_kinds_name_layers():
    rules = (
        LayerRule(name="pw", bits=8),
        LayerRule(kind="pointwise", bits=6),
        LayerRule(kind="image_input", bits=7),
        LayerRule(kind="conv", keep_float=True),
        *DEFAULT_RULES,
    )
    _, report = dsq.quantize(Net(), QuantConfig(WeightFormat(bits=4, block=8), rules=rules))
    rows = _rows(report)
    assert rows["pw"] == (8, "bfp8/32", "8 bits by pattern 'pw'")
    assert rows["c1"] == (7, "float (image input)", "image_input: 7 bits (image_input rule)")
    assert rows["c3"] == (None, "float", "conv layer kept float")
    assert rows["dw"][0] == 8 and rows["fc"][0] is None


def test_one_entry_puts_every_1x1_conv_at_6_bits():
    """The README's example: all 1x1 convs at 6 bits."""
    config = QuantConfig(rules=(LayerRule(kind="pointwise", bits=6), *QuantConfig().rules))
    _, report = dsq.quantize(Net(), config)
    assert {r.name: r.bits for r in report.quantized_layers} == {"c1": 4, "dw": 8, "pw": 6, "c3": 4}


def test_a_rule_sets_blocks_and_layout_and_says_so():
    """A rule's block and layout replace the config's for its layers (what a bit budget's coarse
    format is); its other fields stay the config's; rules without them write the files of before."""
    config = quant_config(bits=3, layer_bits={"c3": {"bits": 2, "block": 128, "layout": "flat"}, "pw": {"block": 8}})
    _, report = dsq.quantize(Net(), config)
    rows = {r.name: (r.bits, r.block, r.layout, r.note) for r in report.layers}
    assert rows["c3"] == (2, 128, "flat", "2 bits in flat blocks of 128 by pattern 'c3'")
    assert rows["pw"] == (3, 8, "channel", "blocks of 8 by pattern 'pw'")
    assert rows["c1"][:3] == (3, 32, "channel")
    assert "block" not in LayerRule(name="c1", bits=8).to_dict()


def test_a_rule_that_changes_nothing_stops_later_rules():
    config = replace(QuantConfig(), rules=(LayerRule(name="dw"), *DEFAULT_RULES))
    _, report = dsq.quantize(Net(), config)
    assert _rows(report)["dw"][0] == 4


def test_old_recipe_settings_map_to_the_same_config():
    old = QuantConfig.from_dict(OLD_SETTINGS)
    assert old == quant_config(**{**OLD_SETTINGS, "layer_bits": {"c1": 8}})
    assert old.act == ActFormat(6, 16) and old.weight == WeightFormat(3, 16, "kl", 2, "flat", 0.5, "float16")
    assert old.rules == (
        LayerRule(kind="linear", keep_float=True),
        LayerRule(name="fc", keep_float=True),
        LayerRule(name="c1", bits=8),
        LayerRule(kind="depthwise", bits=8),
    )
    oldest = {
        k: v for k, v in OLD_SETTINGS.items() if k not in ("sum_weight", "layer_bits", "depthwise_bits", "scale_dtype")
    }
    config = QuantConfig.from_dict(oldest)  # before those settings existed: no depthwise rule, float32 scales
    assert config.weight.scale_dtype == "float32" and LayerRule(kind="depthwise", bits=8) not in config.rules


def test_old_settings_that_lie_are_refused(one_line_dsq_error):
    assert "act_bits" in one_line_dsq_error(
        QuantConfig.from_dict, {k: v for k, v in OLD_SETTINGS.items() if k != "act_bits"}
    )
    assert "include" in one_line_dsq_error(QuantConfig.from_dict, {**OLD_SETTINGS, "include": "*"})
    assert "quantize_linear" in one_line_dsq_error(QuantConfig.from_dict, {**OLD_SETTINGS, "quantize_linear": "yes"})
    assert "act_block" in one_line_dsq_error(QuantConfig.from_dict, {**OLD_SETTINGS, "act_bits": None, "act_block": 0})


def test_quantize_takes_a_config_or_keywords_not_both(one_line_dsq_error):
    assert "not both" in one_line_dsq_error(dsq.quantize, Net(), QuantConfig(), bits=3)
    assert "QuantConfig" in one_line_dsq_error(dsq.quantize, Net(), {"bits": 3})
