"""The fused integer network: a quantized model whose DSConv layers end in their consumers.

`fuse_int` traces the model with torch.fx (DSConv layers as leaves) and, for every DSConv layer,
folds what follows it into the conv's output epilogue (dsq.nn.epilogue) where the graph allows:

    conv -> [BatchNorm (eval, running statistics)] -> [+ residual] -> [ReLU | ReLU6 | Hardtanh]

Each step is taken only when the value before it has no other user, so nothing else sees a
partial result. Without a BatchNorm the fused layer computes what the unfused layers compute,
bit for bit (the conv's float32 output plus the residual, then the clamp); a folded BatchNorm
is applied to the float64 sums before the rounding, so it rounds once instead of twice: the
exact backend runs the same fused arithmetic (`backend="exact"`), the reference that int equals.
Where torch.fx cannot trace a module, its children are traced and fused one by one.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import DsqError, DsqWarning
from .dsconv import is_dsconv, set_backend
from .epilogue import Epilogue, batchnorm_epilogue, output_epilogue

_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {F.relu, torch.relu, torch.relu_}


class FusedConv(nn.Module):
    """A DSConv layer with its output epilogue: folded BatchNorm (float64 `scale`, `shift`), an
    optional residual (forward's second argument) and the clamp [lo, hi] of an activation."""

    def __init__(self, conv: nn.Module, epilogue: Epilogue, fused: str):
        super().__init__()
        self.conv, self.lo, self.hi, self.fused = conv, epilogue.lo, epilogue.hi, fused
        self.register_buffer("scale", epilogue.scale)
        self.register_buffer("shift", epilogue.shift)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        with output_epilogue(self.conv, Epilogue(self.scale, self.shift, self.lo, self.hi), residual):
            return self.conv(x)

    def extra_repr(self) -> str:
        return f"fused={self.fused!r}"


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with every DSConv layer as a leaf (a call_module node)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_dsconv(m) or super().is_leaf_module(m, qualname)


def fuse_int(qmodel: nn.Module, kernel: str = "auto", backend: str = "int", channels_last: bool = True) -> nn.Module:
    """A copy of `qmodel` on `backend` ("int", or "exact": the same fused arithmetic in float64)
    with BatchNorm, residual adds and ReLU/ReLU6 fused into the DSConv layers before them.

    Args:
        qmodel: a quantized model (dsq.quantize, dsq.load); not changed.
        kernel: the int backend's kernel choice (dsq.nn.INT_KERNELS).
        backend: "int" or "exact".
        channels_last: feed the network channels-last inputs, the layout the CPU kernel reads and
            writes without a transpose (pooling then sums in another order, as float32 allows).

    Returns:
        The fused network. Its `fusions` maps each fused layer's name to what it took in (e.g.
        "batchnorm+add+relu"). Where torch.fx cannot trace a module's forward, that module's
        children are fused one by one instead (with a DsqWarning naming it).
    """
    if backend not in ("int", "exact"):
        raise DsqError(f"fused networks run on the int or exact backend, not {backend!r}")
    model = copy.deepcopy(qmodel).eval()
    set_backend(model, backend, kernel=kernel)
    fusions, untraced = {}, {}
    model = _fuse_module(model, "", fusions, untraced)
    if untraced:
        name, reason = next(iter(untraced.items()))
        warnings.warn(
            f"torch.fx cannot trace {len(untraced)} module(s) (e.g. {name or 'the model'}: {reason}); "
            "their children are fused one by one",
            DsqWarning,
            stacklevel=2,
        )
    model.fusions = fusions
    if channels_last:
        model.register_forward_pre_hook(_inputs_channels_last)
    return model


def _fuse_module(module: nn.Module, prefix: str, fusions: dict, untraced: dict) -> nn.Module:
    """`module` traced and fused as one graph, or, where it cannot be traced, its children each."""
    if is_dsconv(module) or not any(is_dsconv(m) for m in module.modules()):
        return module
    try:
        graph = _LeafTracer().trace(module)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: go one level down
        untraced[prefix.rstrip(".")] = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        for name, child in module.named_children():
            setattr(module, name, _fuse_module(child, f"{prefix}{name}.", fusions, untraced))
        return module
    fused = fx.GraphModule(module, graph, type(module).__name__)
    fusions.update({prefix + name: what for name, what in _fuse(fused).items()})
    fused.graph.lint()
    fused.delete_all_unused_submodules()
    fused.recompile()
    return fused


def _fuse(gm: fx.GraphModule) -> dict[str, str]:
    """Rewrite the graph: each DSConv call with what follows it folded in. Returns what was fused."""
    modules = dict(gm.named_modules())
    fusions = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_dsconv(modules[node.target]):
            continue
        chain, batchnorm, residual, clamp, taken = [node], None, None, (-math.inf, math.inf), []
        nxt = _only_user(node)
        if nxt is not None and _is_batchnorm(nxt, modules):
            batchnorm, nxt = modules[nxt.target], _only_user(_take(chain, taken, nxt, "batchnorm"))
        if nxt is not None and (found := _residual_of(nxt, chain[-1])) is not None:
            residual = found
            nxt = _only_user(_take(chain, taken, nxt, "add"))
        if nxt is not None and (found := _clamp_of(nxt, modules)) is not None:
            clamp = found
            _take(chain, taken, nxt, "relu" if clamp == (0.0, math.inf) else "clamp")
        if not taken:
            continue
        epilogue = batchnorm_epilogue(batchnorm, *clamp) if batchnorm is not None else Epilogue(None, None, *clamp)
        gm.add_submodule(node.target, FusedConv(modules[node.target], epilogue, "+".join(taken)))
        with gm.graph.inserting_before(chain[-1]):
            call = gm.graph.call_module(node.target, (node.args[0],) + ((residual,) if residual is not None else ()))
        chain[-1].replace_all_uses_with(call)
        for done in reversed(chain):  # each one's only user is erased before it
            gm.graph.erase_node(done)
        fusions[node.target] = "+".join(taken)
    return fusions


def _take(chain: list[fx.Node], taken: list[str], node: fx.Node, what: str) -> fx.Node:
    chain.append(node)
    taken.append(what)
    return node


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_batchnorm(node: fx.Node, modules: dict) -> bool:
    """An eval-mode BatchNorm2d call with running statistics."""
    if node.op != "call_module":
        return False
    bn = modules[node.target]
    return type(bn) is nn.BatchNorm2d and not bn.training and bn.running_var is not None


def _residual_of(node: fx.Node, value: fx.Node) -> fx.Node | None:
    """The other operand if `node` adds a tensor node to `value` (no scaling), else None."""
    is_add = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is value else a if b is value else None
    return other if isinstance(other, fx.Node) and other is not value else None


def _clamp_of(node: fx.Node, modules: dict) -> tuple[float, float] | None:
    """(lo, hi) if `node` is a ReLU, ReLU6 or Hardtanh of its one input, else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.ReLU:
            return 0.0, math.inf
        if type(m) in (nn.ReLU6, nn.Hardtanh):
            return float(m.min_val), float(m.max_val)
    if len(node.args) != 1:
        return None
    if (node.op == "call_function" and node.target in _RELUS) or (
        node.op == "call_method" and node.target in ("relu", "relu_")
    ):
        return 0.0, math.inf
    if node.op == "call_function" and node.target is F.relu6:
        return 0.0, 6.0
    return None


def _inputs_channels_last(module: nn.Module, args: tuple) -> tuple:
    """The forward's 4-D tensor arguments, channels-last."""
    return tuple(
        a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a
        for a in args
    )
