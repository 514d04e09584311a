"""The architecture matrix (tests/model/matrix.py): every decoder-only causal LM of the installed
transformers trains exactly like plain PyTorch through fuyou, or is refused with the reason that
docs/models.md lists for it; the docs and the README agree with the matrix."""
import os
import re

import pytest

from tests.model import matrix

DECODERS, _OTHERS = matrix.entries()
DOCUMENTED = matrix.documented()
README = os.path.join(os.path.dirname(matrix.DOCS), "..", "README.md")


def _same_version() -> bool:
    import transformers

    return matrix.documented_version() == transformers.__version__


@pytest.fixture(autouse=True)
def _quiet():
    matrix.quiet()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [mt for mt, _cls in DECODERS])
def test_entry_passes_exactly_or_is_refused_as_documented(tmp_path, model_type):
    outcome = matrix.run_entry(model_type, str(tmp_path))  # AssertionError when fuyou is not exact
    if _same_version():
        assert model_type in DOCUMENTED, f"{model_type} is missing from docs/models.md: run python -m tests.model.matrix --write-docs"
        assert (outcome.status, outcome.reason) == DOCUMENTED[model_type], "docs/models.md is stale: run python -m tests.model.matrix --write-docs"
    else:  # docs/models.md describes another transformers' models; this one must still be exact or refused
        assert outcome.status == "pass" or outcome.reason.strip()


def test_docs_cover_the_mapping_and_95_percent_pass():
    statuses = [status for status, _reason in DOCUMENTED.values()]
    assert statuses, "docs/models.md lists no entries"
    assert statuses.count("pass") >= 0.95 * len(statuses), f"{statuses.count('pass')} of {len(statuses)} pass"
    assert all(reason for status, reason in DOCUMENTED.values() if status == "refused")
    if _same_version():
        assert set(DOCUMENTED) == {mt for mt, _cls in DECODERS}


def test_readme_states_the_matrix():
    text = open(README).read()
    models = text[text.index("Models:"):].split("\n\n", 1)[0]
    passed = sum(1 for status, _r in DOCUMENTED.values() if status == "pass")
    assert re.search(rf"\b{passed} of {len(DOCUMENTED)}\b", models), "the README's Models: paragraph does not state docs/models.md's counts"
    assert f"transformers {matrix.documented_version()}" in models
    for model_type, (status, _reason) in DOCUMENTED.items():
        if status == "refused":
            assert f"`{model_type}`" in models, f"the README does not name refused {model_type}"
