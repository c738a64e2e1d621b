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
    section = results["self_conditioning"]
    rows = {(r["what"], r["path"]) for r in section["rows"]}
    assert rows == set(vocab_scale.SELF_CONDITIONING_ROWS)
    assert all(r["peak_mib"] > 0 and r["peak_units"] > 0 for r in section["rows"])
    assert section["tokens_identical"] is True
    assert all(t["status"] == ("PASS" if t["pass"] else "FAIL") for t in section["targets"])
    assert "Self-conditioning at V = 300" in (tmp_path / "vocab_scale.md").read_text()


def test_the_self_conditioning_section_updates_existing_results(tmp_path: Path, one_thread: None):
    before = json.loads((ROOT / "results" / "vocab_scale.json").read_text())
    before.pop("self_conditioning", None)
    (tmp_path / "vocab_scale.json").write_text(json.dumps(before))
    assert vocab_scale.main(["--quick", "--self-conditioning", "--out-dir", str(tmp_path)]) == 0
    after = json.loads((tmp_path / "vocab_scale.json").read_text())
    assert {key: after[key] for key in before} == before  # the other rows are kept as measured
    assert after["self_conditioning"]["vocab_size"] == vocab_scale.SMOKE.vocab_sizes[-1]
    table = (tmp_path / "vocab_scale.md").read_text()
    assert "| flm_train_step | 50258 | embedded |" in table and "sc_rollout_8" in table


def test_the_self_conditioning_section_needs_existing_results(tmp_path: Path, capsys):
    assert vocab_scale.main(["--quick", "--self-conditioning", "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --self-conditioning updates")


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
