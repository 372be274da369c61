"""What the test folders share: the real data, a symlink helper, the devices, the test tiers, common fixtures.

This is the only conftest.py of the suite, so test modules import its helpers by name
(`from conftest import CIFAR, need`); tests/ is on sys.path for the plain helper modules too
(`zoo`, `dsq_cli_testkit`). It imports no dsq module at load time: `--fast` must be seen first.

Tiers: `pytest` (`make test`: in TEST_WORKERS processes of pytest-xdist) runs everything.
`pytest --fast` (`make test-fast`) leaves out the tests marked `realdata`, `kernel` or `slow`,
skips any other test that asks `need()` for real data, and runs the integer backend without its
compiled kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import Result

TESTS = Path(os.path.abspath(__file__)).parent  # not resolved: a symlinked checkout looks beside itself
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# The real models and images (../shared/data beside the repository, read in place, never copied),
# resolved so that a symlinked ../shared gives the paths dsq itself reports.
SHARED = (TESTS.parent.parent / "shared" / "data").resolve()
RESNET20 = SHARED / "cifar10-resnet" / "resnet20-12fca82f.th"
CIFAR = SHARED / "cifar10-test"
IMAGENET_DEV = SHARED / "imagenet-samples-dev"
WNIDS = SHARED / "imagenet-wnids.txt"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INSTALLED_DSQ = Path(sys.executable).parent / "dsq"

# ---- tiers --------------------------------------------------------------------------------------

FAST_LEAVES_OUT = ("realdata", "kernel", "slow")
# Fixtures whose users read the real data, or start the installed `dsq` in subprocesses.
REALDATA_FIXTURES = {"shared_data", "resnet20", "cifar", "resnet20_run", "sweep_args"}
SLOW_FIXTURES = {"installed_dsq"}
# Modules whose every test starts dsq in subprocesses (paths under tests/).
MARKED_MODULES = {
    "cli/test_cli_installed.py": "slow",
    "robustness/test_process.py": "slow",
    "test_distributed.py": "slow",
}
_fast = False


def pytest_addoption(parser):
    parser.addoption(
        "--fast", action="store_true", help="the fast tier: no real data, no kernel compile, no dsq subprocesses"
    )


def pytest_configure(config):
    global _fast
    _fast = config.getoption("--fast")
    if _fast:
        os.environ["DSQ_INT_KERNEL"] = "0"  # the integer backend's own switch: the eager path, no compile
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # a pytest-xdist worker: the cores shared out, here and in the dsq processes it starts
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker in _tier_markers(item):
            item.add_marker(marker)
    if _fast:
        left_out = {item for item in items if any(item.get_closest_marker(m) for m in FAST_LEAVES_OUT)}
        config.hook.pytest_deselected(items=[item for item in items if item in left_out])
        items[:] = [item for item in items if item not in left_out]


def _tier_markers(item) -> set[str]:
    """The tier markers a test earns by its fixtures, its module, or its name or a parameter naming the kernel."""
    markers = set()
    fixtures = set(getattr(item, "fixturenames", ()))
    if fixtures & REALDATA_FIXTURES:
        markers.add("realdata")
    if fixtures & SLOW_FIXTURES:
        markers.add("slow")
    module = item.path.relative_to(TESTS).as_posix() if item.path.is_relative_to(TESTS) else ""
    if module in MARKED_MODULES:
        markers.add(MARKED_MODULES[module])
    params = item.callspec.params.values() if hasattr(item, "callspec") else ()
    named = "kernel" in getattr(item, "originalname", item.name)
    if named or any(isinstance(p, str) and p == "kernel" for p in params):
        markers.add("kernel")
    return markers


# ---- real data ----------------------------------------------------------------------------------


def need(path: Path) -> Path:
    """`path` of the shared data, or skip the test (data missing, or the fast tier)."""
    if _fast:
        pytest.skip("--fast: no real data")
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    return path


@pytest.fixture
def shared_data() -> Path:
    """The folder of real models and images."""
    return need(SHARED)


@pytest.fixture(scope="session")
def resnet20() -> Path:
    """The CIFAR-10 ResNet-20 checkpoint."""
    return need(RESNET20)


@pytest.fixture(scope="session")
def cifar() -> Path:
    """The CIFAR-10 test images, in class folders."""
    return need(CIFAR)


def link(src: Path, dst: Path) -> Path:
    """Symlink `dst` to `src`, making its folder (a copy where symlinks are not allowed); returns `dst`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src)
    except OSError:
        dst.write_bytes(src.read_bytes())
    return dst


# ---- devices and errors -------------------------------------------------------------------------


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device to run on: "cpu", and "cuda" where torch sees one."""
    return request.param


def one_line(caught: pytest.ExceptionInfo) -> str:
    """The message of a caught error, checked to be one non-empty line."""
    message = str(caught.value)
    assert message.strip() and "\n" not in message, repr(message)
    return message


@pytest.fixture
def one_line_dsq_error():
    """Run a call that must fail with a DsqError whose message is one non-empty line; return it."""
    from dsq.errors import DsqError

    def run(call, *args, **kwargs) -> str:
        with pytest.raises(DsqError) as caught:
            call(*args, **kwargs)
        return one_line(caught)

    return run


# ---- the dsq command ----------------------------------------------------------------------------


@dataclass
class QuantizeRun:
    result: Result
    json: dict
    model_file: Path
    folder: Path

    @property
    def stdout(self) -> str:
        return self.result.stdout


@pytest.fixture(scope="session")
def resnet20_run(resnet20, cifar, tmp_path_factory) -> QuantizeRun:
    """`dsq quantize resnet20-....th --data cifar10-test --limit 200 --json run.json -o model.dsq`, once.

    The heaviest CLI call; several tests read its output, its JSON and its model file.
    """
    from dsq_cli_testkit import LIMIT, run_dsq

    folder = tmp_path_factory.mktemp("resnet20_run")
    result = run_dsq(
        "quantize",
        resnet20,
        "--data",
        cifar,
        "--limit",
        LIMIT,
        "-j",
        0,
        "--json",
        folder / "run.json",
        "-o",
        folder / "model.dsq",
    )
    assert result.exit_code == 0, result.output
    return QuantizeRun(result, json.loads((folder / "run.json").read_text()), folder / "model.dsq", folder)


@pytest.fixture
def installed_dsq():
    """Run the installed `dsq` with arguments; returns the CompletedProcess (text, both streams)."""
    if not INSTALLED_DSQ.exists():
        pytest.skip(f"no installed dsq command at {INSTALLED_DSQ}")

    def run(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(INSTALLED_DSQ), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **kwargs,
        )

    return run


SWEEP_LIMIT = 100  # images per sweep evaluation: enough to check the bookkeeping, small enough for 2 cores


def sweep_command(resnet20: Path, cifar: Path, output: Path, per_pass: int = 2) -> list[str]:
    """`dsq sweep` arguments for a 2 x 2 grid of ResNet-20 on SWEEP_LIMIT CIFAR-10 images, writing OUTPUT.*."""
    grid = ["--bits", "2,4", "--block", "16,32", "--per-pass", str(per_pass)]
    images = ["--limit", str(SWEEP_LIMIT), "--batch-size", str(SWEEP_LIMIT), "-j", "0"]
    return ["sweep", str(resnet20), "--data", str(cifar), *grid, *images, "-q", "-o", str(output)]


@pytest.fixture
def sweep_args(resnet20, cifar, tmp_path):
    """`sweep_command` writing tmp_path/sw.*."""
    return sweep_command(resnet20, cifar, tmp_path / "sw")
