"""Top-1/top-5 accuracy of several models on exactly the same images, in one process or under torchrun."""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed
from .errors import DsqError
from .prefetch import prefetched


@dataclass
class Accuracy:
    """Accuracy of one model: top-1/top-5 in percent, images seen, seconds spent in the model, and
    the percentage of images whose top-1 prediction equals the first evaluated model's."""

    top1: float
    top5: float
    images: int
    seconds: float
    agreement: float = 100.0

    def to_dict(self) -> dict:
        """What result files keep: all but `agreement`, which depends on the models evaluated with it."""
        fields = dataclasses.asdict(self)
        del fields["agreement"]
        return fields


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def spread_indices(size: int, limit: int | None) -> list[int]:
    """Indices of `limit` items spread evenly over `size` (all of them if limit is None or >= size).

    Spread, not the first N, so that a class-folder dataset keeps roughly every class.
    """
    if limit is not None and not (_whole(limit) and limit >= 1):
        raise DsqError(f"the image limit must be a whole number of at least 1, got {limit!r}")
    if limit is None or limit >= size:
        return list(range(size))
    return torch.linspace(0, size - 1, int(limit), dtype=torch.float64).round().long().unique().tolist()


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device ('cuda' under torchrun: this process's GPU); DsqError if unusable here."""
    try:
        resolved = distributed.local_device(device)
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError, TypeError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DsqError(f"device {str(device)!r} is not available here ({reason}): use --device cpu") from None
    return resolved


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says that torch (CPU or CUDA) or the system ran out of memory."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(
        phrase in str(error) for phrase in ("can't allocate memory", "Cannot allocate memory", "out of memory")
    )


def _batches(loader: DataLoader):
    """Iterate `loader`, turning loading failures (also from worker processes) into one-line
    DsqErrors. Without worker processes a thread loads the next batch while the caller works,
    unless the loader pins memory for a GPU: that thread would pin on GPU 0, whatever the caller's."""
    threaded = loader.num_workers == 0 and not loader.pin_memory
    batches = prefetched(loader) if threaded else iter(loader)
    try:
        yield from batches
        return
    except DsqError as error:  # a worker re-raises it with its traceback appended
        last = str(error).strip().splitlines()[-1]
        message = last.removeprefix(f"{DsqError.__module__}.{DsqError.__qualname__}: ")
        traceback.clear_frames(error.__traceback__)
    except RuntimeError as error:
        if "equal size" in str(error):
            message = (
                "images of different sizes cannot be batched: set --resize/--crop or a --preset "
                "so that every image comes out the same size"
            )
        elif is_out_of_memory(error):
            message = "out of memory loading a batch of images: lower the batch size (--batch-size)"
        else:
            raise
        traceback.clear_frames(error.__traceback__)
    # The cleared frames no longer hold the iterator in a reference cycle, so deleting it stops
    # the worker processes now rather than at a later garbage collection (which waits 5 s).
    del batches
    raise DsqError(message)


def _check_logits(name: str, logits, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(labels):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise DsqError(
            f"model {name!r} returned {got} for a batch of {len(labels)}: expected logits of shape (batch, classes)"
        )
    top = int(labels.max())
    if top >= logits.shape[1]:
        raise DsqError(
            f"the images have label {top} but model {name!r} predicts {logits.shape[1]} classes: "
            "use images labelled for this model, or --classes FILE in the model's output order"
        )


@contextlib.contextmanager
def _side_by_side(n_models: int, device: torch.device):
    """A `map` that runs the models of a batch side by side on the CPU: with T threads and M
    models, min(M, T) at once with T // min(M, T) threads each, since small convs use one core
    better than two. In turn on a GPU or with one thread (under torchrun, for example)."""
    threads = torch.get_num_threads()
    lanes = min(n_models, threads) if device.type == "cpu" else 1
    if lanes <= 1:
        yield map
        return
    with ThreadPoolExecutor(lanes, initializer=torch.set_num_threads, initargs=(threads // lanes,)) as pool:
        yield pool.map


def evaluate(
    models: dict[str, nn.Module],
    dataset,
    *,
    batch_size: int = 64,
    workers: int = 0,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "evaluate",
) -> dict[str, Accuracy]:
    """Top-1/top-5 accuracy of every model in `models` on `dataset` ((image tensor, label) items).

    Each batch is decoded once and run through every model, so all models see the same images
    in the same order; on the CPU several models run side by side (`seconds` is each one's own
    time). `limit` evaluates that many images spread evenly over the dataset. The
    models are moved to `device` (they stay there) and run in eval mode under inference_mode;
    their train/eval mode is restored afterwards. Under torchrun each process evaluates every
    N-th batch (the same batches as one process would) and the counts are summed, so the
    results equal a single process's; `seconds` is then the sum over the processes.
    """
    if not models:
        raise DsqError("no model to evaluate")
    if not (_whole(batch_size) and batch_size >= 1 and _whole(workers) and workers >= 0):
        raise DsqError(f"batch size must be >= 1 and workers >= 0, got {batch_size} and {workers}")
    size = len(dataset)
    if size == 0:
        raise DsqError("the dataset is empty, nothing to evaluate: check the image folder")
    indices = spread_indices(size, limit)
    resolved = resolve_device(device)
    distributed.setup(resolved)
    batches = distributed.shard([indices[i : i + batch_size] for i in range(0, len(indices), batch_size)])
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=resolved.type == "cuda")
    top1 = dict.fromkeys(models, 0)
    top5 = dict.fromkeys(models, 0)
    agree = dict.fromkeys(models, 0)
    seconds = dict.fromkeys(models, 0.0)
    seen = 0
    training = {name: model.training for name, model in models.items()}
    try:
        for model in models.values():
            model.to(resolved).eval()
        with (
            torch.inference_mode(),
            _side_by_side(len(models), resolved) as run_all,
            tqdm(
                total=sum(map(len, batches)), unit="img", desc=desc, disable=not (progress and distributed.is_main())
            ) as bar,
        ):
            for images, labels in _batches(loader):
                images = images.to(resolved, non_blocking=True)
                labels = labels.to(resolved)

                def forward(name: str, images=images) -> tuple[torch.Tensor, float]:
                    with torch.inference_mode():
                        start = time.perf_counter()
                        try:
                            logits = models[name](images)
                        except (RuntimeError, MemoryError) as error:
                            if not is_out_of_memory(error):
                                raise
                            raise DsqError(
                                f"out of memory running model {name!r} on a batch of {len(images)} "
                                "images: lower the batch size (--batch-size)"
                            ) from None
                        if resolved.type == "cuda":
                            torch.cuda.synchronize(resolved)
                        return logits, time.perf_counter() - start

                reference = None
                for name, (logits, spent) in zip(models, run_all(forward, models)):
                    seconds[name] += spent
                    _check_logits(name, logits, labels)
                    best = logits.topk(min(5, logits.shape[1]), dim=1).indices
                    reference = best[:, 0] if reference is None else reference
                    agree[name] += int((best[:, 0] == reference).sum())
                    hits = best == labels[:, None]
                    top1[name] += int(hits[:, 0].sum())
                    top5[name] += int(hits.any(dim=1).sum())
                seen += len(labels)
                bar.set_postfix({name: f"{100 * top1[name] / seen:.2f}%" for name in models}, refresh=False)
                bar.update(len(labels))
    finally:
        for name, model in models.items():
            model.train(training[name])
    counts = torch.tensor([[top1[n], top5[n], seen, seconds[n], agree[n]] for n in models], dtype=torch.float64)
    totals = distributed.sum_over_processes(counts.to(resolved)).cpu().tolist()
    return {
        name: Accuracy(100 * hits1 / total, 100 * hits5 / total, int(total), secs, 100 * same / total)
        for name, (hits1, hits5, total, secs, same) in zip(models, totals)
    }


def evaluate_in_passes(
    builders: Mapping[str, Callable[[], nn.Module]],
    dataset,
    *,
    per_pass: int,
    on_pass: Callable[[dict[str, Accuracy]], None] = lambda results: None,
    progress: bool = True,
    **options,
) -> dict[str, Accuracy]:
    """Evaluate many models, building `per_pass` of them at a time and running each group on
    one pass over the images (decoded once for the group); `on_pass` gets each pass's results
    as soon as it ends. `options` go to `evaluate`."""
    names = list(builders)
    groups = [names[i : i + per_pass] for i in range(0, len(names), per_pass)]
    results = {}
    for number, group in enumerate(groups, 1):
        models = {name: builders[name]() for name in group}
        done = evaluate(models, dataset, progress=progress, desc=f"pass {number}/{len(groups)}", **options)
        del models
        on_pass(done)
        results.update(done)
    return results
