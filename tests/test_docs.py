"""The user docs: the README is short, and every project file it and the docs name exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def named_files(text: str) -> set[str]:
    paths = re.findall(r"`((?:docs|benchmarks|fxmerge|tests)/[\w./-]+)`", text)
    return {p.rstrip(".") for p in paths if "<" not in p and "*" not in p}


def test_the_readme_is_for_users_and_names_only_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    quickstart = readme.split("## Quickstart")[1].split("```bash")[1].split("```")[0]
    assert len(quickstart.strip().splitlines()) == 2
    for doc in ("README.md", "docs/architecture.md", "docs/experiments.md",
                "benchmarks/README.md"):
        missing = [p for p in named_files((ROOT / doc).read_text()) if not (ROOT / p).exists()]
        assert not missing, (doc, missing)


@pytest.mark.slow
def test_the_readmes_signals_example_runs(capsys):
    """The README's 1-D example, as written: compress a Conv1d network, merge it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Signals and volumes")[1]
    code = section.split("```python")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (the project's README)
    result, merged, x = namespace["result"], namespace["merged"], namespace["x"]
    assert result.plan.measured["ratio"] <= 0.6
    with __import__("torch").no_grad():
        assert (merged(x) - result.pruned(x)).abs().max() < 1e-4
    assert "layermerge at budget 60%" in capsys.readouterr().out
