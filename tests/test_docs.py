"""The docs site builds with warnings as errors (a broken link, a missing page, a reference that
no longer resolves fails it); its generated Results page, plots and the README's numbers are
current with benchmarks/results/; every `ticketserve` command line of the README and the docs
names a real command and real flags. tests/test_readme.py runs their code blocks."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import typer

from tests.test_readme import ROOT, all_lines

sys.path[:0] = [str(ROOT / "docs" / "_ext")]  # the docs' Sphinx extensions, as Sphinx loads them


def test_the_docs_build_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs",
                             str(tmp_path / "html")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    built = tmp_path / "html"
    for page in ("index", "reference/cli", "reference/http", "reference/grpc", "reference/metrics", "reference/kinds",
                 "reference/modules", "results", "concepts/methods", "guides/training"):
        assert (built / f"{page}.html").exists(), page
    cli = (built / "reference" / "cli.html").read_text()
    assert "--max-batch-size" in cli and "--init-sparsity" in cli  # a serve flag, a method's flag
    assert "ticketserve_queue_depth" in (built / "reference" / "metrics.html").read_text()
    assert "ModelInfer" in (built / "reference" / "grpc.html").read_text()
    assert "/v1/predict" in (built / "reference" / "http.html").read_text()


def test_the_architecture_pages_match_the_tree():
    """Every package is placed on the architecture page, and every module or package either
    page names exists (the generated module map lists them all, from the tree itself)."""
    import re

    architecture = (ROOT / "docs" / "concepts" / "architecture.md").read_text()
    development = (ROOT / "docs" / "development.md").read_text()
    package = ROOT / "ticketserve"
    packages = {p.relative_to(package).as_posix() for p in package.rglob("__init__.py")} - {"__init__.py"}
    for init in sorted(packages):
        name = init.removesuffix("/__init__.py")
        assert f"{name.rsplit('/', 1)[-1]}/" in architecture, f"the architecture page does not place {name}/"
    modules = {p.name for p in package.rglob("*.py")} | {p.name + "/" for p in package.rglob("*") if p.is_dir()}
    for page, text in (("architecture", architecture), ("development", development)):
        for named in set(re.findall(r"\b([a-z_]+\.py)\b", text)) - {"setup.py", "conf.py"}:
            assert named in modules or (ROOT / "tests" / named).exists() or any((ROOT / "benchmarks").rglob(named)) \
                or (ROOT / "docs" / "_ext" / named).exists(), f"docs/{page} names {named}, which is not in the tree"


def test_results_page_plots_and_readme_numbers_are_current():
    from benchmarks import results

    assert (ROOT / "docs" / "results.md").read_text() == results.render(), "run `make results`"
    readme = (ROOT / "README.md").read_text()
    assert results.replaced(readme, results.headline()) == readme, "run `make results`"
    for plot in ("method-choice", "mixed-tasks", "supermask-curve"):
        assert (ROOT / "docs" / "_static" / f"{plot}.png").stat().st_size > 10_000, plot


def command_lines() -> list[str]:
    """Each `ticketserve …` command of the bash blocks (after any VAR=value assignments)."""
    lines = []
    for line in all_lines():
        if line.startswith("python - <<"):
            continue
        for part in line.split("  #")[0].replace("&&", ";").split(";"):
            words = shlex.split(part.strip().rstrip("&").strip())
            while words and "=" in words[0] and not words[0].startswith("-"):
                words.pop(0)
            if words and words[0] == "ticketserve":
                lines.append(shlex.join(words))
    return lines


@pytest.mark.parametrize("line", command_lines())
def test_every_command_line_in_the_docs_names_real_flags(line):
    from cli_command import command

    words = shlex.split(line)[1:]
    current, ctx = command, typer.Context(command, info_name="ticketserve")
    while hasattr(current, "get_command") and words and not words[0].startswith("-"):  # a group: its subcommand
        name = words.pop(0)
        current = current.get_command(ctx, name)
        assert current is not None, f"no command {name!r} in {line!r}"
        ctx = typer.Context(current, info_name=name, parent=ctx)
    flags = {opt for param in current.get_params(ctx) for opt in [*param.opts, *param.secondary_opts]}
    used = {word.split("=", 1)[0] for word in words if word.startswith("--")}
    assert used <= flags, f"{line!r}: no such flag {sorted(used - flags)}"
