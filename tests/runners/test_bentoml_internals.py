"""runners/bentoml_internals.py: the one module on BentoML's private parts checks the BentoML it runs on, and no
other module of the served code reaches into ``bentoml._internal`` (but the one noted there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runners.bentoml_internals import WRITTEN_FOR, check_version

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_bentoml_is_the_series_it_was_written_for() -> None:
    check_version()  # what the service does at import


@pytest.mark.parametrize("found", ["1.5.0", "2.0.1", "1.3.9", "nonsense"])
def test_another_bentoml_stops_the_start_naming_the_module_and_both_versions(found: str) -> None:
    with pytest.raises(RuntimeError) as err:
        check_version(found)
    message = str(err.value)
    assert "runners/bentoml_internals.py" in message and found in message
    assert "BentoML " + ".".join(map(str, WRITTEN_FOR)) in message


def test_no_other_served_module_uses_bentomls_internals() -> None:
    users = sorted(
        str(path.relative_to(ROOT))
        for folder in ("api", "cache", "engine", "imaging", "runners", "semantic")
        for path in (ROOT / folder).rglob("*.py")
        if "bentoml._internal" in path.read_text(encoding="utf-8")
    ) + sorted(
        name for name in ("service.py", "settings.py", "errors.py") if "bentoml._internal" in (ROOT / name).read_text()
    )
    # runners/serving.py: _record_argument (the bento arguments of a build), left there while issue 26 changes it.
    assert users == ["runners/bentoml_internals.py", "runners/serving.py"], users
