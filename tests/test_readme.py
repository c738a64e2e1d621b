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
