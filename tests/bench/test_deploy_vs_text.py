"""bench.deploy_vs_text deploys through a real `bentoml serve` of the tests' tiny CLIP and times the bare text tower
beside it, so the script that BENCHMARKS.md quotes for issue 29's text goal is known to work."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bench.deploy_vs_text import texts_for
from testing.models import ClipFiles
from testing.server import ROOT

# It starts its own server (up to the suite's usual start-up wait) before the rounds.
pytestmark = pytest.mark.timeout(900)


def test_texts_are_new_in_every_round_and_distinct_within_one() -> None:
    one, two = texts_for(0, 5, 3), texts_for(1, 5, 3)
    flat_one = [t for g in one for t in g]
    assert len(one) == 5 and all(len(g) == 3 for g in one)
    assert len(set(flat_one)) == 15
    assert not set(flat_one) & {t for g in two for t in g}


def test_rounds_deploy_and_report_both_sides(tiny_clip: ClipFiles) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.deploy_vs_text",
            "--model",
            str(tiny_clip.config),
            "--pretrained",
            str(tiny_clip.checkpoint),
            "--classes",
            "6",
            "--examples",
            "2",
            "--rounds",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rounds = re.findall(r"^round (\d): bare (\d+), served (\d+) prompts/s$", run.stdout, flags=re.M)
    assert [r[0] for r in rounds] == ["1", "2"], run.stdout[-3000:]
    # The tiny tower encodes a round in milliseconds while the deploy takes a poll or more: only the bare side's rate
    # is sure to round to a positive number; the table must still give every round and the two medians.
    assert all(int(bare) > 0 for _, bare, _ in rounds), rounds
    assert (
        len(re.findall(r"^\| [12] \| [0-9.?]+ \| \d+ \| \d+ \| [0-9.]+ \| \d+ \| \d+ \| [0-9.]+ \|$", run.stdout, re.M))
        == 2
    )
    assert re.search(
        r"^\| \*\*median\*\* \|  \|  \|  \| \*\*[0-9.]+\*\* \|  \|  \| \*\*[0-9.]+\*\* \|$", run.stdout, re.M
    )
    assert "6 classes x 2 examples per round, no templates, cold" in run.stdout
