"""The README's main job, examples/main.py, in its smoke setting."""

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    for name in ("main", "flm", "fmlm"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    threads = torch.get_num_threads()
    try:
        yield importlib.import_module("main")
    finally:
        torch.set_num_threads(threads)


def test_main_job_smoke_trains_distils_and_compares(main: ModuleType, tmp_path: Path) -> None:
    rows = main.main(["--smoke", "--runs", str(tmp_path)])
    assert [metrics["nfe"] for metrics in rows.values()] == [1, 1, 8]
    assert all(metrics["entropy"] > 0 for metrics in rows.values())
    smoke = tmp_path / "smoke"
    for name in ("flm.pt", "fmlm.pt", "flm.json", "fmlm.json"):
        assert (smoke / name).exists()
        assert not (tmp_path / name).exists()  # the real job's files stay untouched


def test_the_real_job_does_not_resume_a_smoke_checkpoint(
    main: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even when a smoke checkpoint sits where the real job looks, it is refused, not resumed."""
    main.main(["--smoke", "--runs", str(tmp_path)])
    for name in ("flm.pt", "fmlm.pt"):
        (tmp_path / name).write_bytes((tmp_path / "smoke" / name).read_bytes())
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main.main(["--runs", str(tmp_path)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert (
        error
        == f"error: {tmp_path / 'flm.pt'} holds a --smoke run: it is not resumed by this one (another --out)"
    )
