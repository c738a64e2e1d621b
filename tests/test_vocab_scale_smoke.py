import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import vocab_scale  # noqa: E402


@pytest.mark.timeout(600)
def test_smoke_run_writes_every_row_target_and_the_plot(tmp_path: Path, one_thread: None):
    plot = tmp_path / "vocab_scale.png"
    assert vocab_scale.main(["--quick", "--out-dir", str(tmp_path), "--plot", str(plot)]) == 0
    results = json.loads((tmp_path / "vocab_scale.json").read_text())
    assert set(results) >= {"rows", "tokens_identical", "machine", "targets", "repeats_done"}
    assert "load_average_1_5_15min" in results["machine"]
    settings = vocab_scale.SMOKE
    expected = {
        (what, path, vocab)
        for vocab in settings.vocab_sizes
        for what, paths in vocab_scale.PATHS.items()
        for path in paths
    }
    got = {(r["what"], r["path"], r["vocab_size"]) for r in results["rows"]}
    assert got == expected
    for row in results["rows"]:
        assert set(row) == {"what", "vocab_size", "path", "peak_mib", "rss_mib", "cpu_s"}
        assert row["peak_mib"] > 0 and row["cpu_s"] > 0
    assert results["tokens_identical"] is True
    assert {t["status"] for t in results["targets"]} <= {"PASS", "FAIL"}
    assert all(t["status"] == ("PASS" if t["pass"] else "FAIL") for t in results["targets"])
    assert set(results["head_to_head_cpu_s"]) == {"flm_train_step/embedded", "ar_train_step/dense"}
    assert "| target |" in (tmp_path / "vocab_scale.md").read_text()
    assert plot.stat().st_size > 0


def test_live_bytes_sees_allocations_and_frees():
    tracker = vocab_scale.LiveBytes()
    with tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2
        del a
        c = b + 1  # a was freed first: two tensors alive at most
        del b, c
    assert tracker.peak == 8000
    assert tracker.live == 0


def test_one_row_in_a_fresh_process():
    row = vocab_scale.row_in_subprocess("flm_train_step", "embedded", 63, smoke=True)
    assert row["what"] == "flm_train_step" and row["path"] == "embedded"
    assert row["rss_mib"] >= 0 and row["peak_mib"] > 0


def test_bad_repeats_is_a_one_line_error():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vocab_scale.py"), "--quick", "--repeats", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: argument --repeats: must be at least 1, got 0"
    ]
