"""README's "Layout" table names every module of the served code, the test helpers and the tools, one line each."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("api", "engine", "cache", "imaging", "runners", "semantic", "testing", "tools")


def test_every_module_has_its_line_in_the_layout_table() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 1)] if "\n## " in layout[1:] else layout
    listed = re.findall(r"^\| `([^`]+)` \|", layout, flags=re.M)
    modules = sorted(
        str(p.relative_to(ROOT)) for folder in FOLDERS for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"
    ) + ["errors.py", "service.py", "settings.py"]
    missing = [m for m in modules if m not in listed]
    assert not missing, f"README's Layout table has no line for {missing}"
    assert len(listed) == len(set(listed)), "a path listed twice"
