"""Which layers cost accuracy: quantize one layer at a time, and all layers but one, then rank them.

For each layer that `quantize` would quantize, two models are evaluated: only that layer
quantized (its damage in an otherwise float network) and every layer but that one quantized
(what keeping it float wins back). A layer's damage is the mean of the two, in top-1 points.
"""

from __future__ import annotations

import re
from dataclasses import replace

from torch import nn

from .config import LayerRule, QuantConfig
from .convert import quantize
from .formats.spec import MAX_BITS, MIN_BITS
from .resume import COUNT, POSITIVE, TEXT, Builder, Check, ResumableRun, equal, whole

FLOAT, ALL = "float", "all quantized"
ONLY, ALL_BUT = "only ", "all but "


def exact_glob(name: str) -> str:
    """A glob that matches exactly `name` (its *, ? and [ made literal)."""
    return re.sub(r"([*?[])", r"[\1]", name)


class Sensitivity(ResumableRun):
    """Per-layer sensitivity of a model under one quantization `config`."""

    kind = "dsq sensitivity"
    rows_key = "layers"

    def __init__(self, config: QuantConfig, **run_options):
        self.config = config
        super().__init__(config.to_dict(), **run_options)
        self.layers: list[str] = []  # the quantized layers of the model last run, in network order

    def builders(self, model: nn.Module) -> dict[str, Builder]:
        """The float model, the fully quantized one, and two models per quantized layer."""
        qmodel, report = quantize(model, self.config)
        self.layers = [layer.name for layer in report.quantized_layers]
        builders = {FLOAT: lambda: (model, {}), ALL: lambda: (qmodel, {"bits_per_weight": report.mean_bits_per_weight})}
        for layer in report.quantized_layers:
            facts = {"layer": layer.name, "kind": layer.kind, "params": layer.params, "bits": layer.bits}
            builders[ONLY + layer.name] = lambda facts=facts: (self._only(model, facts["layer"]), facts)
            builders[ALL_BUT + layer.name] = lambda facts=facts: (self._all_but(model, facts["layer"]), {})
        return builders

    def facts(self, name: str) -> dict[str, Check] | None:
        if name.startswith(ONLY):
            return {
                "layer": equal(name.removeprefix(ONLY)),
                "kind": TEXT,
                "params": COUNT,
                "bits": whole(MIN_BITS, MAX_BITS),
            }
        if name == ALL:
            return {"bits_per_weight": POSITIVE}
        return {} if name == FLOAT or name.startswith(ALL_BUT) else None

    def _only(self, model: nn.Module, layer: str) -> nn.Module:
        return quantize(model, replace(self.config, include=(exact_glob(layer),)))[0]

    def _all_but(self, model: nn.Module, layer: str) -> nn.Module:
        float_rule = LayerRule(name=exact_glob(layer), keep_float=True)
        return quantize(model, replace(self.config, rules=(float_rule, *self.config.rules)))[0]

    def rows(self, ranked: bool = True) -> list[dict]:
        """One finished row per layer of the model last run: most damaging first (ties in network order),
        or in network order."""
        base, everything = self.results.get(FLOAT), self.results.get(ALL)
        rows = []
        for layer in self.layers:
            alone, others = self.results.get(ONLY + layer), self.results.get(ALL_BUT + layer)
            if None in (base, everything, alone, others):
                continue
            drop, gain = alone["top1"] - base["top1"], others["top1"] - everything["top1"]
            rows.append(
                {
                    "layer": alone["layer"],
                    "kind": alone["kind"],
                    "params": alone["params"],
                    "bits": alone["bits"],
                    "only_top1": alone["top1"],
                    "only_drop": round(drop, 4),
                    "all_but_top1": others["top1"],
                    "all_but_gain": round(gain, 4),
                    "damage": round((gain - drop) / 2, 4),
                }
            )
        order = sorted(range(len(rows)), key=lambda i: -rows[i]["damage"])
        for rank, i in enumerate(order, 1):
            rows[i] = {"rank": rank, **rows[i]}
        return [rows[i] for i in order] if ranked else rows

    def worst(self, count: int = 3) -> list[str]:
        """The names of up to `count` layers whose quantization costs accuracy, worst first."""
        return [row["layer"] for row in self.rows()[:count] if row["damage"] > 0]
