"""engine.deployments: the compiled cache follows the registry's versions, is bounded by bytes, and compiles one id
at a time without making other ids wait."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from cache.registry import Registry
from engine.configs import DeployClassifierRequest, DeployDetectorRequest, DeployRequest, Kind
from engine.deployments import Compiled, Deployments
from errors import NotFound, ZssError
from semantic.classify import compile_classifier


def body(name: str = "a", **extra: object) -> DeployClassifierRequest:
    return DeployClassifierRequest.model_validate(
        {"classifier_configs": [{"name": name, "examples_to_include": [name]}], **extra}
    )


class Compiler:
    """Counts compiles; each compiled classifier holds ``dim`` float32 numbers (4 * dim bytes of examples)."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim
        self.calls: list[str] = []
        self.gate: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}

    def __call__(self, kind: Kind, b: DeployRequest) -> Compiled:
        name = b.classes[0].name
        self.calls.append(name)
        if name in self.gate:
            self.started[name].set()
            assert self.gate[name].wait(10), "the test never opened the gate"
        return compile_classifier([name], [torch.ones(1, self.dim)], [torch.zeros(0, self.dim)])

    def hold(self, name: str) -> None:
        self.gate[name], self.started[name] = threading.Event(), threading.Event()


def make(tmp_path: Path, max_bytes: int = 10**9) -> tuple[Deployments, Compiler, Registry]:
    reg = Registry(tmp_path / "r.sqlite3")
    comp = Compiler()
    return Deployments(reg, comp, max_bytes=max_bytes), comp, reg


def test_recompiles_only_when_the_registry_version_moves(tmp_path: Path) -> None:
    deps, comp, reg = make(tmp_path)
    out = deps.register(body("a"), comp(Kind.CLASSIFIER, body("a")))
    comp.calls.clear()
    first = deps.compiled(out.deployed_id, Kind.CLASSIFIER)
    assert deps.compiled(out.deployed_id, Kind.CLASSIFIER) is first and comp.calls == []
    # Another worker updates the deployment through the shared registry: the next use recompiles.
    other = Deployments(Registry(tmp_path / "r.sqlite3"), comp, max_bytes=10**9)
    other.register(body("b", deployed_id=out.deployed_id), comp(Kind.CLASSIFIER, body("b")))
    comp.calls.clear()
    assert deps.compiled(out.deployed_id, Kind.CLASSIFIER).class_names == ("b",) and comp.calls == ["b"]
    # ...and a delete made elsewhere is an unknown id here at once.
    other.delete(out.deployed_id)
    with pytest.raises(NotFound):
        deps.compiled(out.deployed_id, Kind.CLASSIFIER)


def test_kind_mismatch_is_a_400_naming_both(tmp_path: Path) -> None:
    deps, comp, _ = make(tmp_path)
    out = deps.register(body("a"), comp(Kind.CLASSIFIER, body("a")))
    with pytest.raises(ZssError, match="is a classifier, not a detector") as err:
        deps.compiled(out.deployed_id, Kind.DETECTOR)
    assert err.value.status_code == 400


def test_cache_is_an_lru_bounded_by_bytes(tmp_path: Path) -> None:
    one = 4 * 256 + 8 + 8 + 1  # examples, class and slot (int64), positive (bool) of one compiled classifier
    deps, comp, _ = make(tmp_path, max_bytes=2 * one)
    ids = [deps.register(body(n), comp(Kind.CLASSIFIER, body(n))).deployed_id for n in "abc"]
    assert deps.cache_info() == {"entries": 2, "bytes": 2 * one, "max_bytes": 2 * one}
    comp.calls.clear()
    deps.compiled(ids[1], Kind.CLASSIFIER)  # cached: b and c stay, a was dropped first
    deps.compiled(ids[2], Kind.CLASSIFIER)
    assert comp.calls == []
    deps.compiled(ids[0], Kind.CLASSIFIER)  # recompiled from the registry; b (least recently used) goes
    assert comp.calls == ["a"]
    deps.compiled(ids[2], Kind.CLASSIFIER)
    deps.compiled(ids[1], Kind.CLASSIFIER)
    assert comp.calls == ["a", "b"]


def test_a_cold_compile_does_not_block_another_id(tmp_path: Path) -> None:
    deps, comp, reg = make(tmp_path)
    slow = reg.put("slow", Kind.CLASSIFIER.value, body("slow").model_dump(exclude={"deployed_id"}))[0]
    fast = reg.put("fast", Kind.CLASSIFIER.value, body("fast").model_dump(exclude={"deployed_id"}))[0]
    comp.hold("slow")
    results: dict[str, object] = {}
    t = threading.Thread(target=lambda: results.setdefault("slow", deps.compiled(slow.id, Kind.CLASSIFIER)))
    t.start()
    assert comp.started["slow"].wait(10)
    # While "slow" is compiling (its lock held), "fast" compiles and returns.
    assert deps.compiled(fast.id, Kind.CLASSIFIER).class_names == ("fast",)
    comp.gate["slow"].set()
    t.join(10)
    assert results["slow"].class_names == ("slow",)  # type: ignore[attr-defined]


def test_concurrent_cold_uses_of_one_id_compile_it_once(tmp_path: Path) -> None:
    deps, comp, reg = make(tmp_path)
    dep = reg.put("x", Kind.CLASSIFIER.value, body("x").model_dump(exclude={"deployed_id"}))[0]
    comp.hold("x")
    out: list[object] = []
    threads = [threading.Thread(target=lambda: out.append(deps.compiled(dep.id, Kind.CLASSIFIER))) for _ in range(4)]
    for th in threads:
        th.start()
    assert comp.started["x"].wait(10)
    comp.gate["x"].set()
    for th in threads:
        th.join(10)
    assert comp.calls == ["x"] and len(out) == 4 and all(o is out[0] for o in out)


def test_model_config_fills_defaults_of_a_config_stored_by_an_older_version(tmp_path: Path) -> None:
    deps, _, reg = make(tmp_path)
    # An older version stored detector configs without the NMS keys; reading back fills DirectAI's defaults.
    reg.put("old", "detector", {"detector_configs": [{"name": "a", "examples_to_include": ["a"]}]})
    assert deps.config("old") == {
        **DeployDetectorRequest.model_validate(
            {"detector_configs": [{"name": "a", "examples_to_include": ["a"]}]}
        ).model_dump(exclude={"deployed_id"}),
        "deployed_id": "old",
    }
