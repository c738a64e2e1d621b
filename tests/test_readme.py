"""The README's promises: CI runs its exact commands, and its code runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(language):
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_set_up_and_test_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    set_up, main_job, test = (block.strip() for block in code_blocks("bash"))
    assert set_up in ci
    assert test in ci
    assert main_job.startswith("python examples/")


def test_readme_python_example_runs(capsys):
    (example,) = code_blocks("python")
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([4, 16]) 8"


def test_readme_points_cpu_only_machines_to_the_cpu_wheel_index():
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text


def test_readme_says_how_long_pytest_takes():
    assert re.search(r"The suite .* takes about\s+\d+ min", (ROOT / "README.md").read_text())


def test_one_figure_for_the_main_jobs_time():
    """The README's main-job paragraph gives one wall time, the one examples/main.py gives."""
    readme = (ROOT / "README.md").read_text()
    paragraph = readme[readme.index("The main job trains") : readme.index("The end of its output")]
    figures = re.findall(r"(\d+(?:\.\d+)?) min\b", paragraph)
    main_job = (ROOT / "examples" / "main.py").read_text()
    assert figures == re.findall(r"(\d+(?:\.\d+)?) min\b", main_job) == ["9.3"]
