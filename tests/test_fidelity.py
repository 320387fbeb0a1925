"""Every paper preset against the fidelity table (analysis/fidelity.py), and the README's copy of it."""
import pytest

from analysis.fidelity import FACTS, MARKERS, render_markdown
from nds.config import REPO_ROOT


@pytest.mark.parametrize("fact", [f for f in FACTS if f.key], ids=lambda f: f"{f.preset}:{f.key}")
def test_each_preset_holds_what_the_table_says(fact):
    held = fact.held()
    if isinstance(fact.value, float):
        assert held == pytest.approx(fact.value), fact
    else:
        assert held == fact.value, fact


def test_every_difference_says_why_and_the_readme_shows_the_table():
    assert all(f.why for f in FACTS if not f.same)
    readme = (REPO_ROOT / "README.md").read_text()
    start, end = readme.index(MARKERS[0]), readme.index(MARKERS[1]) + len(MARKERS[1])
    assert readme[start:end] == render_markdown(), "README is stale: run python analysis/fidelity.py --write"
