"""The runnable examples in the public functions' docstrings: each has one, and every one passes."""

from __future__ import annotations

import doctest
import importlib

import pytest

# The public functions, by the name users call them with.
PUBLIC = [
    "dsq.quantize",
    "dsq.calibrate",
    "dsq.save",
    "dsq.load",
    "dsq.nn.set_backend",
    "dsq.nn.make_trainable",
    "dsq.nn.freeze",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_docstring_example_runs(name):
    module, attr = name.rsplit(".", 1)
    function = getattr(importlib.import_module(module), attr)
    assert "Args:" in function.__doc__ and "Returns:" in function.__doc__, f"{name} documents no Args/Returns"
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(function, name) if t.examples]
    assert tests, f"{name} has no runnable example (>>> lines) in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
