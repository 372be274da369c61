"""What a benchmark returns: a Measurement per runtime and batch size, with the settings and the machine."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class Measurement:
    """One runtime at one batch size."""

    runtime: str
    batch: int
    seconds: list[float] = field(default_factory=list)  # each timed run; empty where it did not run
    peak_bytes: int | None = None  # `peak_bytes`; None where not measured
    note: str = ""  # why it has no time or no peak memory

    @property
    def images_per_second(self) -> float | None:
        return self.batch / statistics.median(self.seconds) if self.seconds else None


@dataclass
class BenchResult:
    rows: list[Measurement]  # by batch size, then runtime
    settings: dict  # side, batch sizes, repeats, warmup, threads, runtimes, memory
    machine: dict  # `machine()` and the load average before and after

    def vs_float32(self, row: Measurement) -> float | None:
        """`row`'s images per second over float32's at its batch size (None where either is missing)."""
        base = next((r for r in self.rows if r.runtime == "float32" and r.batch == row.batch), None)
        if base is None or base.images_per_second is None or row.images_per_second is None:
            return None
        return row.images_per_second / base.images_per_second

    def to_dict(self) -> dict:
        rows = [
            {**asdict(r), "images_per_second": r.images_per_second, "vs_float32": self.vs_float32(r)} for r in self.rows
        ]
        return {"settings": self.settings, "machine": self.machine, "rows": rows}
