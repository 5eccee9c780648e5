"""Shipped and cached kernel configs: lookup order, atomic locked writes, bad files never fatal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from slmcompress.kernels import config_store as cs
from slmcompress.kernels.routes import Choice, Key

KEY = Key(4, 128, 8192, 8192, 1)
GEMV = Choice.make(
    "gemv", block_m=1, block_n=256, block_kb=1, steps=2, num_warps=2, num_stages=1, convert=3,
    acc32=1,
)  # fmt: skip
TINY = Choice.make("tinygemm", inner_k_tiles=8)


def _write(path: Path, gpu: str, entries: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cs.document(gpu, entries)))
    return path


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(cs.OVERRIDE_ENV, raising=False)


def test_slug_and_shipped_file_prefix(tmp_path):
    assert cs.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    _write(tmp_path / "nvidia-h100.json", "NVIDIA H100", {KEY: GEMV.to_json()})
    _write(tmp_path / "nvidia-h200.json", "NVIDIA H200", {})
    assert cs.shipped_file("nvidia-h100-80gb-hbm3", tmp_path).name == "nvidia-h100.json"
    assert cs.shipped_file("nvidia-h200", tmp_path).name == "nvidia-h200.json"
    assert cs.shipped_file("nvidia-a100-sxm4-80gb", tmp_path) is None


def test_lookup_order_override_shipped_cache(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    _write(shipped / "nvidia-h200.json", "NVIDIA H200", {KEY: GEMV.to_json()})
    store = cs.ConfigStore("NVIDIA H200", shipped, tmp_path / "cache")
    assert store.lookup(KEY) == (GEMV, "shipped")
    assert store.lookup(Key(4, 128, 8192, 8192, 16)) is None  # a miss
    override = _write(tmp_path / "fresh.json", "NVIDIA H200", {KEY: TINY.to_json()})
    monkeypatch.setenv(cs.OVERRIDE_ENV, str(override))
    assert cs.ConfigStore("NVIDIA H200", shipped, tmp_path / "cache").lookup(KEY) == (
        TINY,
        "override",
    )


def test_record_is_cached_and_read_back(tmp_path):
    store = cs.ConfigStore("NVIDIA H200", tmp_path / "none", tmp_path / "cache")
    store.record(KEY, GEMV, {"us": 9.5})
    store.record(Key(3, 128, 8192, 8192, 1), TINY)
    assert store.lookup(KEY) == (GEMV, "cache")
    data = json.loads((tmp_path / "cache" / "nvidia-h200.json").read_text())
    assert data["entries"][str(KEY)]["us"] == 9.5 and data["gpu"] == "NVIDIA H200"
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # atomic: no temp file left
    again = cs.ConfigStore("NVIDIA H200", tmp_path / "none", tmp_path / "cache")
    assert again.lookup(KEY) == (GEMV, "cache")  # a new process never re-tunes it


def test_bad_files_and_entries_are_skipped_with_a_warning(tmp_path, caplog):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "nvidia-h200.json").write_text(
        json.dumps({"entries": {str(KEY): {"route": "warp-drive"}, "nonsense": {}}})
    )
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "nvidia-h200.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="slmcompress.kernels.config_store"):
        store = cs.ConfigStore("NVIDIA H200", shipped, tmp_path / "cache")
    assert store.lookup(KEY) is None
    text = caplog.text
    assert "unknown route 'warp-drive'" in text and "not a kernel key" in text
    assert "unreadable kernel config" in text
    store.record(KEY, GEMV)  # a corrupt cache file is replaced, not fatal
    assert cs.read_file(tmp_path / "cache" / "nvidia-h200.json") == {KEY: GEMV}
