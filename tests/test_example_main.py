"""The README's main job, examples/main.py, in its smoke setting."""

import importlib
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_main_job_smoke_trains_distils_and_compares(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    for name in ("main", "flm", "fmlm", "common"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    threads = torch.get_num_threads()
    try:
        rows = importlib.import_module("main").main(["--smoke", "--runs", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert [metrics["nfe"] for metrics in rows.values()] == [1, 1, 8]
    assert all(metrics["entropy"] > 0 for metrics in rows.values())
    assert (tmp_path / "flm.pt").exists() and (tmp_path / "fmlm.pt").exists()
    assert (tmp_path / "flm.json").exists() and (tmp_path / "fmlm.json").exists()
