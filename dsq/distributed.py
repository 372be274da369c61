"""Running under `torchrun`: which process this is, its share of the work, sums over all of them.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is the
single-process case (rank 0 of 1) and no process group is made. The group is made on
first use: gloo for CPU tensors, NCCL as well when evaluating on a GPU.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True in the process that prints and writes files (rank 0, or the only process)."""
    return rank() == 0


def local_device(device: str | torch.device) -> torch.device:
    """`device`, with a bare 'cuda' under torchrun meaning this process's own GPU (cuda:LOCAL_RANK)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def setup(device: torch.device) -> None:
    """Join the process group of torchrun's processes (once); nothing to do in a single process."""
    if world_size() == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of `items`: every world_size-th one, from its rank on."""
    return list(items[rank() :: world_size()])


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over all processes (itself in a single process)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@contextlib.contextmanager
def main_process_speaks():
    """Silence stdout and stderr in every process but the main one; errors still show after."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
