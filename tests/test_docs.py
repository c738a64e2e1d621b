"""The documentation site: its code runs, it builds strictly, and it documents every public name.

Every file in ``docs/snippets`` is included verbatim in a page, so running it here tests the
code readers copy. Snippets run in-process (under the suite's jaxtyping checks) in a fresh
working directory, on one thread, with the global RNG and the jaxtyping switch restored after.
"""

import functools
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jaxtyping
import pytest
import torch

import flowlm
import flowlm.backbones
import flowlm.data
import flowlm.metrics

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SNIPPETS = sorted((DOCS / "snippets").glob("*.py"))
OPTIONAL_DEPENDENCY = {"hf_backbone.py": "transformers"}
OWN_PROCESS = {"debugging.py"}
"""Snippets that must import flowlm themselves (the import hook acts on the first import)."""


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "JAXTYPING_DISABLE"}
    return env | {"NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh working directory, one thread, and the global state restored afterwards."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    checks_disabled = jaxtyping.config.jaxtyping_disable
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            yield tmp_path
    finally:
        torch.set_num_threads(threads)
        jaxtyping.config.update("jaxtyping_disable", checks_disabled)
        torch._dynamo.reset()


def test_there_are_snippets() -> None:
    assert len(SNIPPETS) >= 8


@pytest.mark.parametrize(
    "path", [p for p in SNIPPETS if p.name not in OWN_PROCESS], ids=lambda p: p.name
)
def test_snippet_runs(path: Path, sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if path.name in OPTIONAL_DEPENDENCY:
        pytest.importorskip(OPTIONAL_DEPENDENCY[path.name])
    if path.name == "compile.py":
        # Inductor needs minutes on a small CPU; dynamo still traces the whole network.
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    runpy.run_path(str(path), run_name="__main__")


def test_debugging_snippet_shows_a_shape_error(tmp_path: Path) -> None:
    path = DOCS / "snippets" / "debugging.py"
    result = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith("Type-check error whilst checking the parameters of flowlm.")
    assert "batch=1" in result.stdout
    # The page shows this output: keep it in step with what the snippet prints.
    assert first_line in (DOCS / "guides" / "debugging.md").read_text()


@pytest.mark.slow
def test_ddp_snippet_matches_one_process(tmp_path: Path) -> None:
    path = str(DOCS / "snippets" / "ddp.py")
    launches = {
        "one": [sys.executable, path],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", path],
    }
    losses = {}
    for name, command in launches.items():
        result = subprocess.run(
            command,
            cwd=tmp_path,
            env=_environment(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        losses[name] = re.search(r"loss (\S+),", result.stdout).group(1)
    assert losses["one"] == losses["two"]


def test_every_snippet_is_on_a_page() -> None:
    pages = "\n".join(page.read_text() for page in DOCS.rglob("*.md"))
    included = set(re.findall(r'--8<-- "docs/snippets/([\w.]+)"', pages))
    assert included == {path.name for path in SNIPPETS}


def test_plot_clock_script(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    out = sandbox / "clock.png"
    monkeypatch.setattr(sys, "argv", ["plot_clock.py", "--out", str(out)])
    runpy.run_path(str(DOCS / "scripts" / "plot_clock.py"), run_name="__main__")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_ablation_script_smoke(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = sandbox / "ablations.md"
    monkeypatch.setattr(sys, "argv", ["ablation_table.py", "--smoke", "--out", str(out)])
    runpy.run_path(str(DOCS / "scripts" / "ablation_table.py"), run_name="__main__")
    table = out.read_text()
    assert "semigroup_kl_loss" in table
    assert "Heun" in table


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built with ``mkdocs build --strict`` into a temporary directory."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    return out


def test_docs_build_strictly(site: Path) -> None:
    for page in ("index.html", "concepts/index.html", "guides/ablations/index.html"):
        assert (site / page).is_file()


def test_api_index_links_every_top_level_name() -> None:
    index = (DOCS / "api" / "index.md").read_text()
    missing = [name for name in flowlm.__all__ if f"[{name}][flowlm.{name}]" not in index]
    assert not missing, f"add these names to the table of docs/api/index.md: {missing}"


def _api_anchors(site: Path) -> set[str]:
    html = "\n".join(page.read_text() for page in (site / "api").rglob("*.html"))
    return set(re.findall(r'id="(flowlm[\w.]*)"', html))


@pytest.mark.parametrize(
    ("package", "names"),
    [
        ("flowlm", flowlm.__all__),
        ("flowlm.metrics", flowlm.metrics.__all__),
        ("flowlm.backbones", flowlm.backbones.__all__),
        ("flowlm.data", flowlm.data.__all__),
    ],
)
def test_every_public_name_is_documented(site: Path, package: str, names: list[str]) -> None:
    anchors = _api_anchors(site)
    missing = [
        name
        for name in names
        if not any(a.startswith(package + ".") and a.endswith("." + name) for a in anchors)
    ]
    assert not missing, f"public names with no entry in the API reference: {missing}"


MATHJAX = DOCS / "javascripts" / "mathjax" / "tex-chtml-full.js"
CHROMIUM = Path("/usr/bin/chromium")


def test_the_site_runs_no_script_from_the_network(site: Path) -> None:
    pages = list(site.rglob("*.html"))
    assert pages
    for page in pages:
        html = page.read_text()
        sources = re.findall(r'<script[^>]*src="([^"]+)"', html)
        assert not [s for s in sources if re.match(r"(https?:)?//", s)], page
        if 'class="arithmatex"' in html:
            assert any(s.endswith("javascripts/mathjax/tex-chtml-full.js") for s in sources), page


def test_every_font_mathjax_loads_is_vendored() -> None:
    fonts = set(re.findall(r"%%URL%%/(MathJax_[\w-]+\.woff)", MATHJAX.read_text()))
    assert len(fonts) >= 18
    folder = MATHJAX.parent / "output" / "chtml" / "fonts" / "woff-v2"
    assert fonts <= {path.name for path in folder.glob("*.woff")}


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_math_renders_offline_without_javascript_errors(site: Path) -> None:
    for page in ("concepts/index.html", "api/solvers/index.html"):
        result = subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--host-resolver-rules=MAP * ~NOTFOUND",  # no network
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=20000",
                "--dump-dom",
                (site / page).as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
        assert not console, console
        formulas = result.stdout.count('class="arithmatex"')
        assert formulas > 10
        assert result.stdout.count("<mjx-container") == formulas  # every formula typeset
        assert "<mjx-merror" not in result.stdout  # and none is a TeX error


def test_api_signatures_show_their_annotations(site: Path) -> None:
    html = (site / "api" / "solvers" / "index.html").read_text()
    signatures = [
        " ".join(re.sub(r"<[^>]+>", "", match).split())
        for match in re.findall(r'<div class="doc-signature highlight">(.*?)</div>', html, re.S)
    ]
    rollout = next(text for text in signatures if text.startswith("rollout("))
    assert "flow_map: FlowMap" in rollout and ") -&gt; Trajectory" in rollout
    assert any(
        text.startswith("__call__(x: State, t: Time, s: Time) -&gt; State") for text in signatures
    )


def test_the_build_is_strict() -> None:
    assert re.search(r"^strict: true$", (ROOT / "mkdocs.yml").read_text(), re.M)
