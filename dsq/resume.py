"""Runs that evaluate many models and save each result as it finishes, so an interrupted run resumes.

The run's JSON file is its checkpoint: {"kind", "settings", "results": {model name: result}, ...}.
Its settings include "inputs": digests of the model's weights and of the images evaluated
(`dsq.fingerprint`). A rerun resumes only from a file of the same kind, settings and inputs whose
every result is well-formed, skipping the models it holds; anything else is refused in one line.
While a run goes, a lock beside OUTPUT.json keeps any other run from writing the same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from torch import nn

from .distributed import is_main
from .errors import DsqError, os_reason
from .evaluate import evaluate_in_passes, spread_indices
from .fileio import check_writable, write_csv, write_json
from .fingerprint import images_digest, model_digest
from .workflow import versions

Builder = Callable[[], tuple[nn.Module, dict]]  # makes a model, with facts about it for its result

ADVICE = "pass another --output, or --no-resume to start over"
MAX_FILE_BYTES = 64 << 20  # far above any real run's file; a bigger one is not read into memory
INPUT_NAMES = {
    "inputs.model": "model weights",
    "inputs.images": "images",
    "inputs.calibration": "calibration images",
    "inputs.calibration.images": "calibration images",
}


@dataclass(frozen=True)
class Check:
    """What a field of a saved result must be: `what` for messages, `test` of the value read back."""

    what: str
    test: Callable[[object], bool]


def _real(value, low: float, high: float) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and low <= value <= high
    )


def whole(low: int, high: int = 2**53) -> Check:
    return Check(f"a whole number from {low} to {high}", lambda v: isinstance(v, int) and _real(v, low, high))


def equal(expected) -> Check:
    return Check(repr(expected), lambda v: type(v) is type(expected) and v == expected)


PERCENT = Check("a percentage", lambda v: _real(v, 0, 100))
SECONDS = Check("a number of seconds", lambda v: _real(v, 0, 1e9))
POSITIVE = Check("a positive number", lambda v: _real(v, 0, 1e12) and v > 0)
COUNT = whole(0)
TEXT = Check("text", lambda v: isinstance(v, str))


def accuracy_fields(images: int) -> dict[str, Check]:
    """The fields of every result: `dsq.evaluate.Accuracy` on `images` images."""
    return {"top1": PERCENT, "top5": PERCENT, "images": equal(images), "seconds": SECONDS}


def as_json(data):
    """`data` as it reads back from JSON (tuples become lists), so settings compare equal after a reload."""
    return json.loads(json.dumps(data, default=str))


def _flat(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one level of dotted keys ('quantization.method')."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value, width: int = 60) -> str:
    """`value`'s repr on one line, cut to about `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


def _name(key: str) -> str:
    """A key from a file as it can be shown in a one-line message."""
    return key if key.isprintable() and len(key) <= 60 else _shown(key)


def _damaged(path: Path, reason: str) -> DsqError:
    return DsqError(f"{path} is damaged ({reason}): {ADVICE}")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """An object's pairs as a dict; ValueError when a key repeats (which of them counts is ambiguous)."""
    data = dict(pairs)
    if len(data) < len(pairs):
        raise ValueError("a key repeats")
    return data


def read_json_object(path: Path) -> dict:
    """The JSON object in the file `path`; DsqError when it is not a regular file of at most
    MAX_FILE_BYTES of UTF-8 JSON holding an object (NaN, Infinity and repeated keys refused)."""
    if not path.is_file():
        raise _damaged(path, "not a regular file")
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise DsqError(f"cannot read {path}: {os_reason(error)}: {ADVICE}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise _damaged(path, f"larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise _damaged(path, "not UTF-8 text") from None
    except (ValueError, RecursionError):
        raise _damaged(path, "not valid JSON") from None
    if not isinstance(data, dict):
        raise _damaged(path, "not a JSON object")
    return data


def _first_difference(theirs: dict, ours: dict) -> str | None:
    """The first dotted key whose value differs (JSON types compared too: 1, 1.0 and true differ);
    'settings' when only their nesting differs; None when they are the same."""

    def canonical(value) -> str:
        return json.dumps(value, sort_keys=True)

    if canonical(theirs) == canonical(ours):
        return None
    theirs, ours = _flat(theirs), _flat(ours)

    def differs(key: str) -> bool:
        return key not in theirs or key not in ours or canonical(theirs[key]) != canonical(ours[key])

    return next(filter(differs, sorted(set(theirs) | set(ours))), "settings")


def _layout_version(settings: dict):
    """The version of the layout of the settings' quantization (None where it has none)."""
    quantization = settings.get("quantization")
    return quantization.get("version") if isinstance(quantization, dict) else None


def _check_settings(path: Path, kind: str, theirs, ours: dict) -> None:
    """DsqError naming the first setting or input that differs between the file's and this run's."""
    if not isinstance(theirs, dict):
        raise _damaged(path, "its settings are not an object")
    if "inputs" in ours and "inputs" not in theirs:
        raise DsqError(f"{path} holds a {kind} of an older dsq, which did not record what it ran on: {ADVICE}")
    if _layout_version(ours) is not None and _layout_version(theirs) is None:
        raise DsqError(f"{path} holds a {kind} of an older dsq, which saved its settings otherwise: {ADVICE}")
    key = _first_difference(theirs, ours)
    if key in INPUT_NAMES:
        raise DsqError(f"{path} holds a {kind} computed from other {INPUT_NAMES[key]} than now: {ADVICE}")
    if key is not None:
        there, now = (_shown(flat[key]) if key in flat else "nothing" for flat in (_flat(theirs), _flat(ours)))
        raise DsqError(f"{path} holds a {kind} with other settings ({_name(key)}: {there} there, {now} now): {ADVICE}")


def _result_problem(result, fields: dict[str, Check] | None) -> str | None:
    """What is wrong with one saved result, given the `fields` it must have (None: a name never made)."""
    if fields is None:
        return "is not one this run makes"
    if not isinstance(result, dict):
        return "is not an object"
    missing, extra = set(fields) - set(result), set(result) - set(fields)
    if missing or extra:
        return f"lacks {_shown(min(missing))}" if missing else f"has an unknown field {_shown(min(extra))}"
    return next(
        (
            f"has {key} {_shown(result[key])}, not {check.what}"
            for key, check in fields.items()
            if not check.test(result[key])
        ),
        None,
    )


def previous_results(
    path: str | os.PathLike, kind: str, settings: dict, fields: Callable[[str], dict[str, Check] | None]
) -> dict[str, dict]:
    """The results in `path` when it holds a `kind` run with these `settings`; {} without a file.

    `fields(name)` is what the result called `name` must hold (None for a name such a run never
    makes). DsqError naming what is wrong when the file is not such a run, its settings or inputs
    differ, or anything in it is damaged: a file is used whole or not at all.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return {}
    data = read_json_object(path)
    if data.get("kind") != kind:
        raise DsqError(f"{path} exists but is not the results of a {kind}: {ADVICE}")
    _check_settings(path, kind, data.get("settings"), settings)
    results = data.get("results")
    if not isinstance(results, dict):
        raise _damaged(path, "its results are not an object")
    for name, result in results.items():
        problem = _result_problem(result, fields(name))
        if problem is not None:
            raise _damaged(path, f"result {_shown(name)} {problem}")
    return results


def _open_lock(lock: Path) -> int:
    """A descriptor of the lock file `lock`, made if missing; DsqError for anything but a plain file
    of its own (a link to another file would be written through)."""
    try:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise DsqError(f"cannot use the lock file {lock}: {os_reason(error)}; remove it") from None
    facts = os.fstat(descriptor)
    if not stat.S_ISREG(facts.st_mode) or facts.st_nlink != 1:
        os.close(descriptor)
        raise DsqError(f"{lock} is not a lock file dsq made (a link or a special file): remove it")
    return descriptor


def _lock_holder(descriptor: int) -> str:
    text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    return f"process {text}" if text.isdigit() else "another process"


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold the lock beside `path` (.NAME.lock, holding this process's id) for the block, removing it
    after; DsqError naming the process that holds it already. Only the main process of a torchrun
    job locks (the others never write)."""
    if not is_main():
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    while True:
        descriptor = _open_lock(lock)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise DsqError(
                f"{path} is being written by another run ({holder}): wait until it ends, or pass another --output"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(descriptor).st_ino:
                break  # not a lock file that its last holder removed while we waited for it
        os.close(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(descriptor)


class ResumableRun:
    """Many models quantized with shared options and evaluated on the same images.

    `settings` (with `quantization` added: what every model's quantization shares, with the
    "version" of its layout) say what the run is; with an `output` stem every finished result
    is saved at once to OUTPUT.json, and the table that `rows` makes of the results to OUTPUT.csv
    (and to OUTPUT.json under `rows_key`). With `resume`, `run` starts from the results found in
    OUTPUT.json when they come from a run of the same settings on the same model weights and
    images, and calls `on_resume(run)` then.
    Subclasses say which models to evaluate (`builders`) and what each result holds (`facts`).
    """

    kind = "dsq run"
    rows_key = "rows"

    def __init__(
        self,
        quantization: dict,
        *,
        settings: dict | None = None,
        output: str | os.PathLike | None = None,
        resume: bool = True,
        on_resume: Callable[[ResumableRun], None] | None = None,
    ):
        self.settings = as_json({**(settings or {}), "quantization": dict(quantization)})
        self.output = output
        self.resume = resume
        self.on_resume = on_resume
        self.results: dict[str, dict] = {}
        self.resumed = 0
        self.seconds = 0.0
        if output is not None:
            for extension in ("json", "csv"):
                check_writable(self.path(extension))

    def path(self, extension: str) -> str:
        return f"{self.output}.{extension}"

    def builders(self, model: nn.Module) -> dict[str, Builder]:
        """The models of the run, by result name."""
        raise NotImplementedError

    def facts(self, name: str) -> dict[str, Check] | None:
        """The fields, besides the accuracy, of the result called `name` (None: a name never made)."""
        raise NotImplementedError

    def inputs(self, model: nn.Module, dataset, indices: Sequence[int]) -> dict:
        """Digests of what the results are computed from: `model`'s weights and the images at `indices`."""
        return {"model": model_digest(model), "images": images_digest(dataset, indices)}

    def run(self, model: nn.Module, dataset, **options) -> ResumableRun:
        """Evaluate every model of `builders(model)` not in `results` yet (`options` go to `evaluate`);
        with an output, OUTPUT.json is locked from the resume to the last result saved."""
        with exclusive(Path(self.path("json"))) if self.output is not None else contextlib.nullcontext():
            self._start(model, dataset, options.get("limit"))
            self.evaluate(self.builders(model), dataset, **options)
        return self

    def _start(self, model: nn.Module, dataset, limit: int | None) -> None:
        """Add the inputs to the settings and take the results OUTPUT.json holds for them (with `resume`)."""
        self.results = {}
        if self.output is not None:
            indices = spread_indices(len(dataset), limit)
            self.settings = {**self.settings, "inputs": as_json(self.inputs(model, dataset, indices))}
            if self.resume:
                accuracy = accuracy_fields(len(indices))

                def fields(name: str) -> dict | None:
                    return None if self.facts(name) is None else {**self.facts(name), **accuracy}

                self.results = previous_results(self.path("json"), self.kind, self.settings, fields)
        self.resumed = len(self.results)
        if self.resumed and self.on_resume is not None:
            self.on_resume(self)

    def evaluate(
        self, builders: Mapping[str, Builder], dataset, *, per_pass: int = 4, progress: bool = True, **eval_options
    ) -> None:
        """Evaluate every model of `builders` not in `results` yet, `per_pass` per pass over the images;
        each result is the builder's facts plus the model's accuracy."""
        started = time.perf_counter()
        facts = {}

        def build(name: str) -> Callable[[], nn.Module]:
            def make() -> nn.Module:
                model, facts[name] = builders[name]()
                return model

            return make

        def record(accuracies) -> None:
            for name, accuracy in accuracies.items():
                self.results[name] = {**facts.pop(name), **accuracy.to_dict()}
            self.seconds = time.perf_counter() - started
            self.save()

        todo = {name: build(name) for name in builders if name not in self.results}
        if todo:
            evaluate_in_passes(todo, dataset, per_pass=per_pass, on_pass=record, progress=progress, **eval_options)

    def rows(self) -> list[dict]:
        """The results as a table, one dict per row."""
        return []

    def save(self) -> None:
        """Write OUTPUT.json and OUTPUT.csv (nothing without an output)."""
        if self.output is not None:
            write_json(self.path("json"), self.to_dict())
            write_csv(self.path("csv"), self.rows())

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "settings": self.settings,
            "results": self.results,
            self.rows_key: self.rows(),
            "versions": versions(),
            "wall_seconds": self.seconds,
        }
