"""Accuracy over a grid of weight bits x block sizes: the float model once, then every point;
optionally bit budgets too (each layer's bits chosen for a mean bits per weight, dsq.bit_budget).

sweep = Sweep([2, 4, 8], [16, 32], quant_config(method="l2"), output="sweep")
sweep.run(model, dataset)          # writes sweep.json and sweep.csv after every pass
sweep.rows()                       # one row per point: bits/w, size, top-1, top-5, drop
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from .bit_budget import plan
from .bit_budget_measure import Costs, measure_costs
from .calibration import calibrate
from .config import CalibConfig, QuantConfig, layer_rule
from .convert import quantize
from .errors import DsqError
from .fingerprint import tensor_digest
from .formats.spec import MAX_BITS, MIN_BITS
from .metrics import state_bytes
from .resume import COUNT, POSITIVE, SECONDS, Builder, Check, ResumableRun, equal

FLOAT = "float"


def point_name(bits: int, block: int) -> str:
    return f"{bits}b/{block}"


def point_of(name: str) -> tuple[int, int] | None:
    """(bits, block) of a `point_name`; None for any other name."""
    match = re.fullmatch(r"([1-9][0-9]?)b/([1-9][0-9]{0,8})", name)
    return (int(match[1]), int(match[2])) if match and MIN_BITS <= int(match[1]) <= MAX_BITS else None


def budget_name(target: float, block: int) -> str:
    return f"t{target:g}/{block}"


def budget_of(name: str) -> tuple[float, int] | None:
    """(target bits, block) of a `budget_name`; None for any other name."""
    match = re.fullmatch(r"t([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)/([1-9][0-9]{0,8})", name)
    return (float(match[1]), int(match[2])) if match else None


LAYER_BITS = Check(
    "a mapping of globs to bits or formats", lambda v: isinstance(v, dict) and all(map(_is_format, v.items()))
)


def _is_format(item) -> bool:
    """Whether (glob, value) is a `layer_bits` entry (dsq.config.layer_rule)."""
    try:
        layer_rule(*item)
    except DsqError:
        return False
    return True


class Sweep(ResumableRun):
    """Every combination of `bits` and `blocks`, each point `config` with that weight bits and block
    (`point_config`).

    `config`: the base dsq.config.QuantConfig (default: dsq's); its weight bits and block are
    replaced at every point. `act_block_follows`: each point's activation block is its weight block
    (as dsq.config.quant_config does with an unset act_block), rather than the config's.
    `calibration`: (images, dsq.config.CalibConfig) to calibrate every point with.
    `targets`: bit budgets (mean bits per weight, scales included), each a point at every block whose
    layers' bits dsq.bit_budget chooses, measured on the calibration images, else on `budget_images`.
    """

    kind = "dsq sweep"
    rows_key = "points"

    def __init__(
        self,
        bits: Sequence[int],
        blocks: Sequence[int],
        config: QuantConfig | None = None,
        *,
        act_block_follows: bool = True,
        calibration: tuple[torch.Tensor, CalibConfig] | None = None,
        targets: Sequence[float] = (),
        budget_images: torch.Tensor | None = None,
        **run_options,
    ):
        config = QuantConfig() if config is None else config
        if not isinstance(config, QuantConfig):
            raise DsqError(f"a sweep needs a dsq.config.QuantConfig, not a {type(config).__name__} value")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in targets):
            raise DsqError(f"bit budget targets must be numbers (bits per weight), got {list(targets)!r}")
        self.bits, self.blocks, self.targets = list(bits), list(blocks), [float(t) for t in targets]
        self.config, self.act_block_follows = config, act_block_follows
        self.calibration = calibration
        self.budget_images = calibration[0] if calibration is not None else budget_images
        if self.targets and self.budget_images is None:
            raise DsqError("bit budgets are measured on images: give calibration images or budget_images")
        self._costs: dict[int, Costs] = {}  # per block, measured once for all targets
        super().__init__(self._shared_settings(), **run_options)

    def _shared_settings(self) -> dict:
        """What every point shares, saved for resuming: the config's dict with its weight and act
        formats flattened (method, ..., act_bits, act_block), less what the points set (the weight
        bits and block, and the act block when it follows), so that a wider grid reuses points."""
        shared = self.config.to_dict()
        weight, act = shared.pop("weight"), shared.pop("act")
        del weight["bits"], weight["block"]
        act = act or {"bits": None, "block": None}
        follows = self.act_block_follows and self.config.act is not None
        return {**shared, **weight, "act_bits": act["bits"], "act_block": None if follows else act["block"]}

    @property
    def grid(self) -> list[tuple[int, int]]:
        return [(bits, block) for bits in self.bits for block in self.blocks]

    def point_config(self, bits: int, block: int) -> QuantConfig:
        """The config of the point (bits, block): the base config with that weight bits and block,
        and that act block too when it follows."""
        act = self.config.act
        if act is not None and self.act_block_follows:
            act = replace(act, block=block)
        return replace(self.config, weight=replace(self.config.weight, bits=bits, block=block), act=act)

    def builders(self, model: nn.Module) -> dict[str, Builder]:
        """The float model, then every point of the grid."""
        builders = {FLOAT: lambda: (model, {"bits_per_weight": 32.0, "size_bytes": state_bytes(model)})}
        for bits, block in self.grid:
            builders[point_name(bits, block)] = lambda bits=bits, block=block: self._quantize(model, bits, block)
        for target, block in self.budget_grid:
            builders[budget_name(target, block)] = lambda t=target, block=block: self._budget(model, t, block)
        return builders

    @property
    def budget_grid(self) -> list[tuple[float, int]]:
        return [(target, block) for target in self.targets for block in self.blocks]

    def facts(self, name: str) -> dict[str, Check] | None:
        if name == FLOAT:
            return {"bits_per_weight": equal(32.0), "size_bytes": COUNT}
        sizes = {"bits_per_weight": POSITIVE, "size_bytes": COUNT, "compression": POSITIVE, "quantize_seconds": SECONDS}
        point, budget = point_of(name), budget_of(name)
        if point is not None:
            return {"bits": equal(point[0]), "block": equal(point[1]), **sizes}
        if budget is not None:
            return {
                "target_bits": equal(budget[0]),
                "block": equal(budget[1]),
                **sizes,
                "measure_seconds": SECONDS,
                "layer_bits": LAYER_BITS,
            }
        return None

    def inputs(self, model: nn.Module, dataset, indices: Sequence[int]) -> dict:
        """The model's and images' digests, and the calibration images' and options' (None without)."""
        calibration = None
        if self.calibration is not None:
            images, options = self.calibration
            calibration = {"images": tensor_digest(images), "options": options.to_dict()}
        return {**super().inputs(model, dataset, indices), "calibration": calibration}

    def _quantize(self, model: nn.Module, bits: int, block: int) -> tuple[nn.Module, dict]:
        qmodel, facts = self._quantized(model, self.point_config(bits, block))
        return qmodel, {"bits": bits, "block": block, **facts}

    def _budget(self, model: nn.Module, target: float, block: int) -> tuple[nn.Module, dict]:
        """The point of `target` bits per weight at `block`: the layers' costs measured once per block."""
        config = self.point_config(self.config.weight.bits, block)
        if block not in self._costs:
            refit = self.calibration is not None and self.calibration[1].refit  # costs as calibration starts them
            self._costs[block] = measure_costs(model, config, self.budget_images, targets=self.targets, refit=refit)
        budget = plan(self._costs[block], config, target)
        qmodel, facts = self._quantized(model, budget.config)
        facts = {**facts, "measure_seconds": budget.costs.seconds, "layer_bits": budget.layer_bits()}
        return qmodel, {"target_bits": target, "block": block, **facts}

    def _quantized(self, model: nn.Module, config: QuantConfig) -> tuple[nn.Module, dict]:
        """`model` quantized with `config` (and calibrated, with a calibration), and its sizes."""
        qmodel, report = quantize(model, config)
        if self.calibration is not None:
            images, calib_config = self.calibration
            calibrate(model, qmodel, report, images, calib_config)
        return qmodel, {
            "bits_per_weight": report.mean_bits_per_weight,
            "size_bytes": report.model_quantized_bytes,
            "compression": report.compression,
            "quantize_seconds": report.seconds + (report.calibration or {}).get("seconds", 0.0),
        }

    @property
    def pending(self) -> int:
        """Models (float included) still to evaluate."""
        names = [FLOAT, *(point_name(*p) for p in self.grid), *(budget_name(*p) for p in self.budget_grid)]
        return sum(name not in self.results for name in names)

    def rows(self) -> list[dict]:
        """One row per finished point, in grid order, with the float baseline and the drop."""
        base = self.results.get(FLOAT)
        weight, act = self.config.weight, self.config.act
        points = [(point_name(bits, block), bits, None, block) for bits, block in self.grid]
        points += [(budget_name(target, block), None, target, block) for target, block in self.budget_grid]
        rows = []
        for name, bits, target, block in points:
            r = self.results.get(name)
            if r is None or base is None:
                continue
            rows.append(
                {
                    "model": self.settings.get("model"),
                    "bits": bits,
                    "target_bits": target,
                    "block": block,
                    "act_bits": None if act is None else act.bits,
                    "method": weight.method,
                    "layout": weight.layout,
                    "bits_per_weight": round(r["bits_per_weight"], 4),
                    "size_bytes": r["size_bytes"],
                    "compression": round(r["compression"], 3),
                    "float_top1": base["top1"],
                    "float_top5": base["top5"],
                    "top1": r["top1"],
                    "top5": r["top5"],
                    "drop_top1": round(r["top1"] - base["top1"], 4),
                    "drop_top5": round(r["top5"] - base["top5"], 4),
                    "images": r["images"],
                    "quantize_seconds": round(r["quantize_seconds"], 2),
                    "eval_seconds": round(r["seconds"], 2),
                }
            )
        return rows

    def to_dict(self) -> dict:
        grid = {"bits": self.bits, "block": self.blocks} | ({"target_bits": self.targets} if self.targets else {})
        return {**super().to_dict(), "grid": grid}
