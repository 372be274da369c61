"""Runs that evaluate many models and save each result as it finishes, so an interrupted run resumes.

The run's JSON file is its checkpoint: {"kind", "settings", "results": {model name: result}, ...}.
A rerun with the same settings and output skips every model already in "results".
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping

from torch import nn

from .errors import DsqError
from .evaluate import evaluate_in_passes
from .fileio import write_csv, write_json
from .workflow import versions

Builder = Callable[[], tuple[nn.Module, dict]]  # makes a model, with facts about it for its result


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


def previous_results(path: str | os.PathLike, kind: str, settings: dict) -> dict[str, dict]:
    """The finished results in `path` when it holds a `kind` run with these settings; {} without a file.

    DsqError when the file is not such a run or its settings differ (naming the first difference).
    """
    path = Path(path)
    if not path.exists():
        return {}
    advice = "pass another --output, or --no-resume to start over"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("kind") != kind or not isinstance(data.get("results"), dict):
        raise DsqError(f"{path} exists but is not the results of a {kind}: {advice}")
    theirs, ours = _flat(data.get("settings") or {}), _flat(as_json(settings))
    differ = next((k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)), None)
    if differ is not None:
        raise DsqError(f"{path} holds a {kind} with other settings ({differ}: {theirs.get(differ)!r} there, "
                       f"{ours.get(differ)!r} now): {advice}")
    return data["results"]


class ResumableRun:
    """Many models quantized with shared options and evaluated on the same images.

    `settings` (with `quant_options` added as "quantization") say what the run is; with an
    `output` stem every finished result is saved at once to OUTPUT.json, and the table that
    `rows` makes of the results to OUTPUT.csv (and to OUTPUT.json under `rows_key`). A new run
    with the same settings and `resume` starts from the results found in OUTPUT.json.
    """

    kind = "dsq run"
    rows_key = "rows"

    def __init__(self, quant_options: dict, *, settings: dict | None = None, output: str | os.PathLike | None = None,
                 resume: bool = True):
        self.quant_options = dict(quant_options)
        self.settings = as_json({**(settings or {}), "quantization": self.quant_options})
        self.output = output
        self.results: dict[str, dict] = {}
        if output is not None:
            target = Path(self.path("json"))
            if not target.parent.is_dir():
                raise DsqError(f"cannot write {target}: folder {target.parent} does not exist")
            if resume:
                self.results = previous_results(target, self.kind, self.settings)
        self.resumed = len(self.results)
        self.seconds = 0.0

    def path(self, extension: str) -> str:
        return f"{self.output}.{extension}"

    def evaluate(self, builders: Mapping[str, Builder], dataset, *, per_pass: int = 4, progress: bool = True,
                 **eval_options) -> None:
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
        return {"kind": self.kind, "settings": self.settings, "results": self.results, self.rows_key: self.rows(),
                "versions": versions(), "wall_seconds": self.seconds}
