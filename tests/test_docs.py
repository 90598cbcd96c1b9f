"""The documentation site (mkdocs.yml, docs/): its code runs, its API reference is complete, and it builds strictly.

The tutorials' code blocks are included from docs/snippets/*.py and examples/ with pymdownx.snippets (``--8<--``),
so running those files here runs the code the pages show.
"""

from __future__ import annotations

import doctest
import importlib
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import diffusers_unlearn as du

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SNIPPETS = sorted((DOCS / "snippets").glob("*.py"))
PUBLIC_PACKAGES = ["diffusers_unlearn", "diffusers_unlearn.evaluation", "diffusers_unlearn.evaluation.attacks",
                   "diffusers_unlearn.minicanvas", "diffusers_unlearn.objectives", "diffusers_unlearn.regularizers",
                   "diffusers_unlearn.bench", "diffusers_unlearn.testing"]


# Modules whose docstrings hold ``>>>`` examples; each runs here (pure Python or the tiny pipelines, fast). A module
# added to this list must have at least one example, and one that gains examples belongs here.
DOCTEST_MODULES = [
    "diffusers_unlearn._validation",
    "diffusers_unlearn.kv.adapters",
    "diffusers_unlearn.engine.classifier_check",
    "diffusers_unlearn.engine.defaults",
    "diffusers_unlearn.embeddings",
    "diffusers_unlearn.engine.erasure_check",
    "diffusers_unlearn.images",
    "diffusers_unlearn.engine.ledger",
    "diffusers_unlearn.kv.merging",
    "diffusers_unlearn.minicanvas.data",
    "diffusers_unlearn.mixins.attach",
    "diffusers_unlearn.pipelines",
    "diffusers_unlearn.plan",
    "diffusers_unlearn.plan_format",
    "diffusers_unlearn.regularizers.base",
    "diffusers_unlearn.regularizers.drift",
    "diffusers_unlearn.engine.request",
    "diffusers_unlearn.families.tiny",
    "diffusers_unlearn.engine.training_config",
    "diffusers_unlearn.worlds",
]


@pytest.mark.parametrize("module_name", DOCTEST_MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{module_name} has no >>> example: remove it from DOCTEST_MODULES"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module_name} failed (see above)"


def test_every_module_with_examples_is_run():
    """A ``>>>`` example in a module left out of DOCTEST_MODULES would never run; the package roots are excluded
    (``minicanvas/__init__.py`` shows a whole session on the shipped model, run by docs/snippets/minicanvas.py)."""
    package = ROOT / "diffusers_unlearn"
    with_examples = set()
    for path in package.rglob("*.py"):
        if path.name == "__init__.py" or "cli" in path.parts:
            continue
        if re.search(r"^\s*>>> ", path.read_text(encoding="utf-8"), flags=re.M):
            with_examples.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert with_examples <= set(DOCTEST_MODULES), sorted(with_examples - set(DOCTEST_MODULES))


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[p.stem for p in SNIPPETS])
def test_snippet_runs(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets write relative paths ("out/", "removals/")
    runpy.run_path(str(snippet), run_name="__main__")


NOT_RUN = "<!-- not run: "  # the line right above a ```python block that the tests do not run, with the reason


def test_every_python_block_of_the_docs_runs_or_says_why_not():
    """A page's python block is included from a file the tests run (``--8<-- "docs/snippets/x.py:section"`` or an
    example script), or the line above it says why it is not run (``<!-- not run: needs a GPU checkpoint -->``)."""
    unmarked = []
    for page in sorted(DOCS.rglob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() != "```python":
                continue
            body = next((b.strip() for b in lines[i + 1:] if b.strip()), "")
            included = body.startswith('--8<-- "')
            marked = i > 0 and lines[i - 1].strip().startswith(NOT_RUN) and lines[i - 1].strip().endswith("-->")
            if not (included or marked):
                unmarked.append(f"{page.relative_to(ROOT)}:{i + 1}")
    assert not unmarked, (f"python blocks neither included from a tested file nor marked '{NOT_RUN}REASON -->': "
                          f"{unmarked}")


def test_every_snippet_a_page_includes_exists():
    """pymdownx.snippets fails the build on a missing file (check_paths); this says which page, without mkdocs."""
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r'--8<-- "([^":]+)(?::[^"]*)?"', page.read_text(encoding="utf-8")):
            assert (ROOT / target).is_file(), f"{page.relative_to(ROOT)} includes {target}, which does not exist"


def test_example_artist_script_runs_on_the_tiny_pipeline(tmp_path):
    """The GPU tutorial shows examples/remove_artist_style.py's main(); it runs here on the tiny model."""
    module = runpy.run_path(str(ROOT / "examples" / "remove_artist_style.py"), run_name="example")
    out = tmp_path / "removed"
    assert module["main"](["--model", "tiny", "--artist", "van gogh", "--retain", "monet", "--neighbors", "0",
                           "--steps", "2", "--sampling-steps", "2", "--out", str(out)]) == 0
    assert (out / "model_index.json").is_file() and (out / "unlearning" / "ledger.json").is_file()


def test_example_plans_the_tutorial_shows_are_valid():
    for name in ("artist_stream.yaml", "minicanvas_stream.yaml"):
        plan = du.load_plan(ROOT / "examples" / name)
        assert plan.requests


def _directives() -> list[str]:
    paths = []
    for page in (DOCS / "reference" / "api").glob("*.md"):
        paths += re.findall(r"^:::\s*([\w.]+)\s*$", page.read_text(encoding="utf-8"), flags=re.M)
    return paths


def _resolve(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def test_every_public_name_has_an_api_reference_entry():
    """Each name in the package's and its subpackages' ``__all__`` is documented by a ``:::`` directive: its own, or
    one for its module (which renders the module's ``__all__``)."""
    directives = _directives()
    assert directives, "no ::: directives under docs/reference/api"
    documented = {id(_resolve(p)) for p in directives}
    modules = set(directives)
    for package in PUBLIC_PACKAGES:
        module = importlib.import_module(package)
        if package in modules and package != "diffusers_unlearn":
            continue  # the module's page renders every name of its __all__ (checked on the built site below)
        missing = [name for name in module.__all__ if id(getattr(module, name)) not in documented
                   and f"{package}.{name}" not in modules]
        assert not missing, f"{package}.__all__ names without a reference entry in docs/reference/api: {missing}"


def test_readme_links_into_the_site_and_names_the_docs_build():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "mkdocs build --strict" in readme
    assert len(readme.splitlines()) <= 110
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_docs_build_strictly_and_the_site_documents_every_public_name(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' (.ci/run does)")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         capture_output=True, text=True, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    html = " ".join(p.read_text(encoding="utf-8") for p in (site / "reference" / "api").rglob("*.html"))
    ids = set(re.findall(r'id="(diffusers_unlearn[\w.]*)"', html))
    for package in PUBLIC_PACKAGES:
        module = importlib.import_module(package)
        missing = [n for n in module.__all__ if f"{package}.{n}" not in ids]
        assert not missing, f"the built API reference has no entry for {package}: {missing}"
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    from diffusers_unlearn.cli import COMMANDS

    for command in COMMANDS:
        assert f"usage: diffusers-unlearn {command}" in cli, f"the CLI page lacks {command}'s --help"
    assert (site / "search" / "search_index.json").is_file()
