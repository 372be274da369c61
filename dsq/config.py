"""The recipe of a quantization run: QuantConfig (weight format, activation format, ordered
layer rules) and CalibConfig, typed and versioned, from the CLI flags to the layers, the
report and the file unchanged.

    from dsq.config import LayerRule, QuantConfig
    from dsq.formats import WeightFormat
    config = QuantConfig(WeightFormat(bits=4, block=32, scale_dtype="float16"),
                         rules=(LayerRule(kind="pointwise", bits=6), *QuantConfig().rules))
    qmodel, report = dsq.quantize(model, config)
"""

from __future__ import annotations

import fnmatch
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace

from .errors import DsqError
from .formats import DEFAULT_ROUNDS, DEFAULT_SCALE_DTYPE, DEFAULT_SUM_WEIGHT, ActFormat, WeightFormat
from .formats.spec import check_bits, check_block, check_layout

CONFIG_VERSION = 1  # the layout of QuantConfig.to_dict / CalibConfig.to_dict
# Layer kinds a rule can name: a layer has its kind (conv, depthwise, grouped, linear) and, where
# they apply, "pointwise" (a 1x1 conv with groups 1) and "image_input" (the conv that reads the image).
KINDS = ("conv", "pointwise", "depthwise", "grouped", "linear", "image_input")
# Depthwise convs hold few weights but carry much of a MobileNet/EfficientNet's error at
# 4 bits (EfficientNet-Lite0 data-free: 23/100 with them at 4 bits, 75/100 at 8; docs/calibration.md):
# they stay at 8 bits unless asked otherwise; the report shows it.
DEFAULT_DEPTHWISE_BITS = 8
# Calibration (dsq.calibrate; dsq.calibration.plan sizes each stage from the model). Distillation:
# its steps come from a budget of work, DEFAULT_ADAPT_WORK multiply-accumulate equivalents
# (dsq.calibration.cost: MACs plus ELEMENT_MACS per activation value written; a step of a batch
# costs teacher forward + student forward and backward), at most DEFAULT_STEPS, none where fewer
# than 50 fit: ResNet-20 on CIFAR-10 keeps its 200 steps of 64 (6.4 T); EfficientNet-Lite0 at
# 224x224 would get 17 of 32 (90 s on 2 cores), too few to help, so none (docs/calibration.md). The
# batch is DEFAULT_BATCH, halved until its activations fit DEFAULT_ACT_MEMORY. Biases and BatchNorm
# learn 10x faster (dsq.calibration.adapt).
DEFAULT_STEPS = 200
DEFAULT_ADAPT_WORK = 8 * 10**12
DEFAULT_BATCH = 64
DEFAULT_LR = 1e-4
# The activations a stage holds at once: bounds the distillation batch, the refit's images and
# the chunks of the other stages.
DEFAULT_ACT_MEMORY = 4 * 2**30
# Images the layer-by-layer refit runs on, all at once (memory: a few of the network's largest
# activations per image, kept under DEFAULT_ACT_MEMORY by taking fewer): each layer's input
# moments and mean come from all of their positions (512 CIFAR images: 524 288 input vectors per
# layer at 32x32). ResNet-20 / CIFAR-10 at 4 bits lost 0.27 points with 256 and 0.14 with 512 or
# 1000 (docs/calibration.md).
DEFAULT_FIT_IMAGES = 512


def _shown(value) -> str:
    return reprlib.repr(value)


@dataclass(frozen=True)
class LayerRule:
    """Which layers (`name`: a glob on layer names, or `kind`: one of KINDS) get what: `bits`-bit
    weights, blocks of `block` or the `layout` instead of the config's (each left None keeps the
    config's), or float weights (`keep_float`); a rule with none of them keeps the config's format
    for them (and stops later rules)."""

    name: str | None = None
    kind: str | None = None
    bits: int | None = None
    keep_float: bool = False
    block: int | None = None
    layout: str | None = None

    def __post_init__(self):
        if (self.name is None) == (self.kind is None):
            raise DsqError(
                f"a layer rule names layers by a glob (name=...) or by a kind (kind=...), one of them: "
                f"got name={self.name!r}, kind={self.kind!r}"
            )
        if self.name is not None and not isinstance(self.name, str):
            raise DsqError(f"a layer rule's name must be a glob (a string), got {_shown(self.name)}")
        if self.kind is not None and self.kind not in KINDS:
            raise DsqError(f"unknown layer kind {_shown(self.kind)}: use one of {', '.join(KINDS)}")
        if not isinstance(self.keep_float, bool):
            raise DsqError(f"a layer rule's keep_float must be true or false, got {_shown(self.keep_float)}")
        if self.bits is not None:
            check_bits(self.bits, f"bits of layer rule {self.label}")
        if self.block is not None:
            check_block(self.block, f"block of layer rule {self.label}")
        if self.layout is not None:
            check_layout(self.layout)
        if self.keep_float and self.changes:
            raise DsqError(f"layer rule {self.label} both keeps layers float and gives them {self.changes}")

    @property
    def label(self) -> str:
        return f"name={self.name!r}" if self.name is not None else f"kind={self.kind!r}"

    @property
    def changes(self) -> str:
        """What the rule changes of the config's weight format, in words ("" when nothing)."""
        bits = f"{self.bits} bits" if self.bits is not None else ""
        if self.block is None and self.layout is None:
            return bits
        blocks = " ".join(filter(None, [self.layout, "blocks", self.block and f"of {self.block}"]))
        return f"{bits} in {blocks}" if bits else blocks

    def to_dict(self) -> dict:
        """Its fields, less a block and layout it leaves to the config (as files before them held)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("block", "layout")}

    def weight_format(self, base: WeightFormat) -> WeightFormat:
        """`base` with what this rule sets (bits, block, layout)."""
        given = {"bits": self.bits, "block": self.block, "layout": self.layout}
        return replace(base, **{key: value for key, value in given.items() if value is not None})

    def matches(self, name: str, kinds: Iterable[str]) -> bool:
        """Whether the layer `name`, of `kinds`, is one this rule is about."""
        return fnmatch.fnmatchcase(name, self.name) if self.name is not None else self.kind in kinds

    def note(self, base_bits: int) -> str:
        """What the report says of a layer this rule decided ("" when it changed nothing to say)."""
        if self.keep_float:
            return f"excluded by pattern {self.name!r}" if self.name is not None else f"{self.kind} layer kept float"
        if not self.changes:
            return ""
        if self.name is not None:
            return f"{self.changes} by pattern {self.name!r}"
        same = self.bits in (None, base_bits) and self.block is None and self.layout is None
        return "" if same else f"{self.kind}: {self.changes} ({self.kind} rule)"


DEFAULT_RULES = (LayerRule(kind="linear", keep_float=True), LayerRule(kind="depthwise", bits=DEFAULT_DEPTHWISE_BITS))


@dataclass(frozen=True)
class QuantConfig:
    """How `dsq.quantize` treats a model.

    weight: the format of every quantized layer's weights, unless a rule changes its bits.
    act: BFP for conv inputs (None: float inputs); the conv that reads the image keeps a float
    input unless `quantize_image_input`. rules: checked in order for each Conv2d/Linear layer,
    the first that matches decides (float, other bits, or the config's format); layers no rule
    matches get `weight`. include: globs on layer names; a layer matching none stays float.
    """

    weight: WeightFormat = WeightFormat(scale_dtype=DEFAULT_SCALE_DTYPE)
    act: ActFormat | None = ActFormat()
    rules: tuple[LayerRule, ...] = DEFAULT_RULES
    include: tuple[str, ...] = ("*",)
    quantize_image_input: bool = False

    def __post_init__(self):
        if not isinstance(self.weight, WeightFormat):
            raise DsqError(f"QuantConfig.weight must be a WeightFormat, got {_shown(self.weight)}")
        if self.act is not None and not isinstance(self.act, ActFormat):
            raise DsqError(f"QuantConfig.act must be an ActFormat or None, got {_shown(self.act)}")
        object.__setattr__(self, "rules", tuple(self.rules))
        if not all(isinstance(rule, LayerRule) for rule in self.rules):
            raise DsqError(f"QuantConfig.rules must be LayerRules, got {_shown(self.rules)}")
        object.__setattr__(self, "include", globs(self.include, "include"))
        if not isinstance(self.quantize_image_input, bool):
            raise DsqError(f"quantize_image_input must be true or false, got {_shown(self.quantize_image_input)}")

    def rule_for(self, name: str, kinds: Iterable[str]) -> LayerRule | None:
        """The first rule that matches the layer, or None."""
        kinds = set(kinds)
        return next((rule for rule in self.rules if rule.matches(name, kinds)), None)

    def to_dict(self) -> dict:
        """Plain JSON values, with the layout's `version`."""
        return {
            "version": CONFIG_VERSION,
            "weight": asdict(self.weight),
            "act": asdict(self.act) if self.act else None,
            "rules": [rule.to_dict() for rule in self.rules],
            "include": list(self.include),
            "quantize_image_input": self.quantize_image_input,
        }

    @classmethod
    def from_dict(cls, data) -> QuantConfig:
        """The config of `to_dict`'s output, or of the `settings` (dsq.quantize's arguments) that files
        written before configs had versions hold; DsqError naming what does not fit."""
        data = _mapping(data, "quantization config")
        if "version" not in data:
            return _from_settings(data)
        _check_version(data, "quantization config")
        data = _exact_keys(
            data, ("version", "weight", "act", "rules", "include", "quantize_image_input"), "quantization config"
        )
        rules = data["rules"]
        for key in ("rules", "include"):
            if not isinstance(data[key], list):
                raise DsqError(f"quantization config {key} must be a list, got {_shown(data[key])}")
        return cls(
            weight=made(WeightFormat, data["weight"], "quantization config weight"),
            act=None if data["act"] is None else made(ActFormat, data["act"], "quantization config act"),
            rules=tuple(made(LayerRule, rule, f"quantization config rules[{i}]") for i, rule in enumerate(rules)),
            include=data["include"],
            quantize_image_input=data["quantize_image_input"],
        )


def quant_config(
    bits: int = 4,
    block: int = 32,
    method: str = "l2",
    *,
    rounds: int = DEFAULT_ROUNDS,
    sum_weight: float = DEFAULT_SUM_WEIGHT,
    layout: str = "auto",
    act_bits: int | None = 8,
    act_block: int | None = None,
    include=("*",),
    exclude=(),
    layer_bits: Mapping[str, int | Mapping] | None = None,
    depthwise_bits: int | None = DEFAULT_DEPTHWISE_BITS,
    quantize_linear: bool = False,
    quantize_image_input: bool = False,
    scale_dtype: str = DEFAULT_SCALE_DTYPE,
) -> QuantConfig:
    """The QuantConfig of `dsq.quantize`'s keyword form: `bits`-bit weights in blocks of `block`
    (the `method` fit, `rounds` refinements, `sum_weight`, `layout`, scales in `scale_dtype`);
    inputs rounded to `act_bits`-bit BFP over `act_block` channels (default: `block`; act_bits
    None: float inputs); rules, in this order: linear layers float unless `quantize_linear`, the
    `exclude` globs float, the `layer_bits` globs at theirs (glob -> bits, or glob -> {"bits", "block",
    "layout"}: any of them, `layer_rule`), depthwise convs at
    `depthwise_bits` (None: `bits`); only layers matching an `include` glob are quantized."""
    weight = WeightFormat(bits, block, method, rounds, layout, sum_weight, scale_dtype)
    act = ActFormat(act_bits, block if act_block is None else act_block) if act_bits is not None else None
    rules = [] if quantize_linear else [LayerRule(kind="linear", keep_float=True)]
    rules += [LayerRule(name=glob, keep_float=True) for glob in globs(exclude, "exclude")]
    rules += _layer_rules(layer_bits)
    if depthwise_bits is not None:
        rules.append(LayerRule(kind="depthwise", bits=check_bits(depthwise_bits, "depthwise bits")))
    return QuantConfig(weight, act, tuple(rules), globs(include, "include"), quantize_image_input)


def globs(patterns, what: str) -> tuple[str, ...]:
    """`patterns` (one glob or an iterable of globs) as a tuple; DsqError for anything else."""
    if isinstance(patterns, str):
        return (patterns,)
    found = tuple(patterns) if isinstance(patterns, Iterable) and not isinstance(patterns, Mapping) else None
    if found is None or not all(isinstance(g, str) for g in found):
        raise DsqError(f"{what} must be a glob or a list of globs (strings), got {_shown(patterns)}")
    return found


def _layer_rules(layer_bits) -> list[LayerRule]:
    """The rules of `layer_bits` (None, or a mapping glob -> bits or format: `layer_rule`)."""
    if layer_bits is None:
        return []
    if not isinstance(layer_bits, Mapping) or not all(isinstance(g, str) for g in layer_bits):
        raise DsqError(f"layer_bits must map globs (strings) to bits, e.g. {{'layer1.*': 8}}, got {_shown(layer_bits)}")
    return [layer_rule(glob, value) for glob, value in layer_bits.items()]


FORMAT_KEYS = ("bits", "block", "layout")


def layer_rule(glob: str, value) -> LayerRule:
    """The rule of one `layer_bits` entry: glob -> bits, or glob -> a format {"bits": 3, "block":
    256, "layout": "flat"} (any of the three; what a bit budget's policy holds)."""
    if not isinstance(value, Mapping):
        return LayerRule(name=glob, bits=check_bits(value, f"bits of layer glob {glob!r}"))
    if not value or not set(value) <= set(FORMAT_KEYS) or not all(isinstance(k, str) for k in value):
        raise DsqError(
            f"layer glob {glob!r} has the format {_shown(value)}: give bits, or an object of "
            f"{', '.join(FORMAT_KEYS)} (any of them), e.g. {{'bits': 3, 'block': 256, 'layout': 'flat'}}"
        )
    return LayerRule(name=glob, **value)


# Settings of files written before configs had versions: required keys, and the defaults of keys
# that older files lack (no sum-aware fit, per-layer bits, depthwise bits or scale dtype yet).
SETTINGS_KEYS = (
    "bits",
    "block",
    "method",
    "rounds",
    "layout",
    "act_bits",
    "act_block",
    "include",
    "exclude",
    "quantize_linear",
    "quantize_image_input",
)
SETTINGS_DEFAULTS = {
    "sum_weight": DEFAULT_SUM_WEIGHT,
    "layer_bits": None,
    "depthwise_bits": None,
    "scale_dtype": "float32",
}


def _from_settings(settings: dict) -> QuantConfig:
    missing = [key for key in SETTINGS_KEYS if key not in settings]
    if missing:
        raise DsqError(f"settings lack {missing[0]!r}")
    unknown = sorted(set(settings) - set(SETTINGS_KEYS) - set(SETTINGS_DEFAULTS))
    if unknown:
        raise DsqError(f"settings have an unknown field {unknown[0]!r}")
    for key in ("include", "exclude"):
        if not isinstance(settings[key], list):
            raise DsqError(f"settings {key} must be a list of globs, got {_shown(settings[key])}")
    if not isinstance(settings["quantize_linear"], bool):
        raise DsqError(f"settings quantize_linear must be true or false, got {_shown(settings['quantize_linear'])}")
    try:
        if settings["act_block"] is not None:
            check_block(settings["act_block"], "act_block")
        return quant_config(**{**SETTINGS_DEFAULTS, **settings})
    except DsqError as e:
        raise DsqError(f"settings: {e}") from None


@dataclass(frozen=True)
class CalibConfig:
    """The settings of `dsq.calibrate` (see there for what each stage does)."""

    act_search: bool = False
    refit: bool = True
    bias: bool = False
    batchnorm: bool = False
    adapt_steps: int | None = None  # None: from the work budget (adapt_seconds alone: DEFAULT_STEPS)
    adapt_seconds: float | None = None
    adapt_weights: str = "fixed"
    adapt_lr: float = DEFAULT_LR
    batch_size: int | None = None  # None: DEFAULT_BATCH, fewer for large activations
    fit_images: int | None = None  # None: DEFAULT_FIT_IMAGES, fewer for large activations
    seed: int = 0

    def __post_init__(self):
        for flag in ("act_search", "refit", "bias", "batchnorm"):
            if not isinstance(getattr(self, flag), bool):
                raise DsqError(f"calibration {flag} must be true or false, got {_shown(getattr(self, flag))}")
        for count, least in (("adapt_steps", 0), ("batch_size", 1), ("fit_images", 1)):
            value = getattr(self, count)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise DsqError(f"{count} must be a whole number of at least {least}, got {value!r}")

    def to_dict(self) -> dict:
        return {"version": CONFIG_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data) -> CalibConfig:
        data = _mapping(data, "calibration config")
        _check_version(data, "calibration config")
        return made(cls, {k: v for k, v in data.items() if k != "version"}, "calibration config")


def _mapping(data, what: str) -> dict:
    if not isinstance(data, dict):
        raise DsqError(f"the {what} must be an object, got {_shown(data)}")
    return data


def _check_version(data: dict, what: str) -> None:
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DsqError(f"the {what} has an unknown version {_shown(version)}")
    if version > CONFIG_VERSION:
        raise DsqError(
            f"the {what} has version {version}, newer than this dsq reads (up to {CONFIG_VERSION}): upgrade dsq"
        )


def _exact_keys(data: dict, keys: tuple[str, ...], what: str) -> dict:
    missing = [key for key in keys if key not in data]
    unknown = sorted(set(data) - set(keys))
    if missing:
        raise DsqError(f"the {what} lacks {missing[0]!r}")
    if unknown:
        raise DsqError(f"the {what} has an unknown field {unknown[0]!r}")
    return data


def made(cls, values, what: str):
    """`cls(**values)`, with its own checks; DsqError naming `what` when the values do not fit."""
    if not isinstance(values, dict):
        raise DsqError(f"{what} must be an object, got {_shown(values)}")
    try:
        return cls(**values)
    except TypeError:
        raise DsqError(f"{what} has unknown or missing fields: {_shown(sorted(values))}") from None
    except DsqError as e:
        raise DsqError(f"{what}: {e}") from None
