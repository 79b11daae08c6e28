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
from engine.tenancy import OPEN, Tenant
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
    out = deps.register(body("a"), comp(Kind.CLASSIFIER, body("a")), caller=OPEN)
    comp.calls.clear()
    first = deps.compiled(out.deployed_id, Kind.CLASSIFIER, caller=OPEN)
    assert deps.compiled(out.deployed_id, Kind.CLASSIFIER, caller=OPEN) is first and comp.calls == []
    # Another worker updates the deployment through the shared registry: the next use recompiles.
    other = Deployments(Registry(tmp_path / "r.sqlite3"), comp, max_bytes=10**9)
    other.register(body("b", deployed_id=out.deployed_id), comp(Kind.CLASSIFIER, body("b")), caller=OPEN)
    comp.calls.clear()
    assert deps.compiled(out.deployed_id, Kind.CLASSIFIER, caller=OPEN).class_names == ("b",) and comp.calls == ["b"]
    # ...and a delete made elsewhere is an unknown id here at once.
    other.delete(out.deployed_id, caller=OPEN)
    with pytest.raises(NotFound):
        deps.compiled(out.deployed_id, Kind.CLASSIFIER, caller=OPEN)


def test_kind_mismatch_is_a_400_naming_both(tmp_path: Path) -> None:
    deps, comp, _ = make(tmp_path)
    out = deps.register(body("a"), comp(Kind.CLASSIFIER, body("a")), caller=OPEN)
    with pytest.raises(ZssError, match="is a classifier, not a detector") as err:
        deps.compiled(out.deployed_id, Kind.DETECTOR, caller=OPEN)
    assert err.value.status_code == 400


def test_cache_is_an_lru_bounded_by_bytes(tmp_path: Path) -> None:
    one = 4 * 256 + 8 + 8 + 1  # examples, class and slot (int64), positive (bool) of one compiled classifier
    deps, comp, _ = make(tmp_path, max_bytes=2 * one)
    ids = [deps.register(body(n), comp(Kind.CLASSIFIER, body(n)), caller=OPEN).deployed_id for n in "abc"]
    assert deps.cache_info() == {"entries": 2, "bytes": 2 * one, "max_bytes": 2 * one}
    comp.calls.clear()
    deps.compiled(ids[1], Kind.CLASSIFIER, caller=OPEN)  # cached: b and c stay, a was dropped first
    deps.compiled(ids[2], Kind.CLASSIFIER, caller=OPEN)
    assert comp.calls == []
    deps.compiled(ids[0], Kind.CLASSIFIER, caller=OPEN)  # recompiled from the registry; b (least recently used) goes
    assert comp.calls == ["a"]
    deps.compiled(ids[2], Kind.CLASSIFIER, caller=OPEN)
    deps.compiled(ids[1], Kind.CLASSIFIER, caller=OPEN)
    assert comp.calls == ["a", "b"]


def test_a_cold_compile_does_not_block_another_id(tmp_path: Path) -> None:
    deps, comp, reg = make(tmp_path)
    slow = reg.put("slow", Kind.CLASSIFIER.value, body("slow").model_dump(exclude={"deployed_id"}))[0]
    fast = reg.put("fast", Kind.CLASSIFIER.value, body("fast").model_dump(exclude={"deployed_id"}))[0]
    comp.hold("slow")
    results: dict[str, object] = {}
    t = threading.Thread(
        target=lambda: results.setdefault("slow", deps.compiled(slow.id, Kind.CLASSIFIER, caller=OPEN))
    )
    t.start()
    assert comp.started["slow"].wait(10)
    # While "slow" is compiling (its lock held), "fast" compiles and returns.
    assert deps.compiled(fast.id, Kind.CLASSIFIER, caller=OPEN).class_names == ("fast",)
    comp.gate["slow"].set()
    t.join(10)
    assert results["slow"].class_names == ("slow",)  # type: ignore[attr-defined]


def test_concurrent_cold_uses_of_one_id_compile_it_once(tmp_path: Path) -> None:
    deps, comp, reg = make(tmp_path)
    dep = reg.put("x", Kind.CLASSIFIER.value, body("x").model_dump(exclude={"deployed_id"}))[0]
    comp.hold("x")
    out: list[object] = []
    threads = [
        threading.Thread(target=lambda: out.append(deps.compiled(dep.id, Kind.CLASSIFIER, caller=OPEN)))
        for _ in range(4)
    ]
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
    assert deps.config("old", caller=OPEN) == {
        **DeployDetectorRequest.model_validate(
            {"detector_configs": [{"name": "a", "examples_to_include": ["a"]}]}
        ).model_dump(exclude={"deployed_id"}),
        "deployed_id": "old",
    }


# -- tenants ----------------------------------------------------------------------------------------------------------
A, B, ADMIN = Tenant("a"), Tenant("b"), Tenant("ops", admin=True)


def test_another_tenants_id_is_an_unknown_id_everywhere(tmp_path: Path) -> None:
    deps, comp, reg = make(tmp_path)
    mine = deps.register(body("a"), comp(Kind.CLASSIFIER, body("a")), caller=A).deployed_id
    assert reg.get(mine).tenant == "a"  # type: ignore[union-attr]
    comp.calls.clear()
    with pytest.raises(NotFound):
        deps.compiled(mine, Kind.CLASSIFIER, caller=B)  # even though it is in this worker's compiled cache
    with pytest.raises(NotFound):
        deps.compiled(mine, Kind.DETECTOR, caller=B)  # not "is a classifier": that would say the id exists
    with pytest.raises(NotFound):
        deps.config(mine, caller=B)
    with pytest.raises(NotFound):
        deps.delete(mine, caller=B)
    assert deps.list(caller=B) == []
    # B deploying "with A's id" gets a new id of its own, as for an unknown id; A's deployment is untouched.
    out = deps.register(body("b", deployed_id=mine), comp(Kind.CLASSIFIER, body("b")), caller=B)
    assert out.deployed_id != mine and out.message == f"{mine} model not found. Generated new model."
    assert deps.compiled(mine, Kind.CLASSIFIER, caller=A).class_names == ("a",)
    assert comp.calls == ["b"]  # b's own deployment; b's probes did not drop a's compiled entry
    assert reg.get(mine).version == 1 and reg.get(out.deployed_id).tenant == "b"  # type: ignore[union-attr]
    assert [d.deployed_id for d in deps.list(caller=A)] == [mine]
    assert [d.deployed_id for d in deps.list(caller=B)] == [out.deployed_id]


def test_an_admin_sees_every_tenant_and_an_update_keeps_the_owner(tmp_path: Path) -> None:
    deps, comp, reg = make(tmp_path)
    a_id = deps.register(body("a"), comp(Kind.CLASSIFIER, body("a")), caller=A).deployed_id
    b_id = deps.register(body("b"), comp(Kind.CLASSIFIER, body("b")), caller=B).deployed_id
    assert {d.deployed_id for d in deps.list(caller=ADMIN)} == {a_id, b_id}
    out = deps.register(body("a2", deployed_id=a_id), comp(Kind.CLASSIFIER, body("a2")), caller=ADMIN)
    assert out.message == "Model updated." and reg.get(a_id).tenant == "a"  # type: ignore[union-attr]
    assert deps.compiled(a_id, Kind.CLASSIFIER, caller=A).class_names == ("a2",)
    own = deps.register(body("o"), comp(Kind.CLASSIFIER, body("o")), caller=ADMIN).deployed_id
    assert reg.get(own).tenant == "ops"  # type: ignore[union-attr]
    deps.delete(b_id, caller=ADMIN)
    assert [d.deployed_id for d in deps.list(caller=B)] == []
