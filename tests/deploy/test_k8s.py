"""The Kubernetes manifests (deploy/k8s, issue 26 item 5): what an orchestrator needs is in them, and they run.

`podman kube play` plays Pods, Deployments, PersistentVolumeClaims and ConfigMaps, and reads env values from podman
secrets; it has no Services and no StatefulSets. The test therefore plays the manifests as written with the fewest
changes that podman needs, each one named below: one pod per Deployment, the StatefulSet as a Deployment with the
claim its template names, the images under test, the Secret as a podman secret, a Service's name replaced by the pod
it selects, and a host port on loopback. Then it gets a classification through the API pod with the Secret's key.
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from testing import containers as pc
from testing.client import files
from testing.images import encode_png
from testing.server import ROOT, free_port
from tools import shapes

pytestmark = pytest.mark.server

K8S = ROOT / "deploy" / "k8s"
KEY = "k" * 48  # the test's admin key, put into the Secret in place of the example
RED = {
    "classifier_configs": [
        {"name": "red", "examples_to_include": ["red shape"]},
        {"name": "other", "examples_to_include": ["blue shape", "green shape", "yellow shape"]},
    ],
    "augment_examples": False,
}


def manifests(*names: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in names:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def kustomized() -> list[dict[str, Any]]:
    return manifests(*yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def api_container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("variant", ["api.yaml", "api-gpu.yaml"])
def test_the_api_deployments_have_probes_resources_keys_and_settings(variant: str) -> None:
    deployment = next(d for d in manifests(variant) if d["kind"] == "Deployment")
    c = api_container(deployment)
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Liveness never asks for Redis or the encoders: an outage must not restart every replica.
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert c["envFrom"] == [{"configMapRef": {"name": "zss-settings"}}]
    keys = next(e for e in c["env"] if e["name"] == "ZSS_API_KEYS")
    assert keys["valueFrom"]["secretKeyRef"] == {"name": "zss-api-keys", "key": "ZSS_API_KEYS"}
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # SIGTERM ends the service within 10 s: the grace period leaves room before the kubelet's SIGKILL.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 10
    if variant == "api-gpu.yaml":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_service_and_redis_are_wired_as_the_settings_say() -> None:
    docs = kustomized()
    settings = one(docs, "ConfigMap", "zss-settings")["data"]
    redis_sts = one(docs, "StatefulSet", "zss-redis")
    redis_svc = one(docs, "Service", "zss-redis")
    assert settings["ZSS_REDIS_URL"] == f"redis://{redis_svc['metadata']['name']}:6379/0"
    assert redis_svc["spec"]["selector"] == redis_sts["spec"]["template"]["metadata"]["labels"]
    assert [t["metadata"]["name"] for t in redis_sts["spec"]["volumeClaimTemplates"]] == ["data"]
    command = redis_sts["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    api_svc = one(docs, "Service", "zss-api")
    api = one(docs, "Deployment", "zss-api")
    assert api_svc["spec"]["selector"] == api["spec"]["template"]["metadata"]["labels"]
    assert one(docs, "Secret", "zss-api-keys")["stringData"]["ZSS_API_KEYS"]


def for_podman(
    docs: list[dict[str, Any]], image: str, port: int, redis_uid: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The manifests as podman 4.3 can play them (the module's docstring lists each change); and the Secret."""
    played: list[dict[str, Any]] = []
    secret: dict[str, Any] = {}
    pods = {}
    for doc in docs:
        if doc["kind"] == "Secret":
            secret = copy.deepcopy(doc)
            secret["stringData"]["ZSS_API_KEYS"] = f"{KEY}:ops:admin"
            # podman 4.3 keeps a secret for kube play as a JSON map of base64 values (the Secret's `data`).
            secret["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in secret["stringData"].items()}
        elif doc["kind"] == "StatefulSet":
            sts = copy.deepcopy(doc)
            claims = sts["spec"].pop("volumeClaimTemplates")
            sts["spec"].pop("serviceName")
            for claim in claims:  # Kubernetes names a claim <template>-<statefulset>-<ordinal>
                pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", **copy.deepcopy(claim)}
                pvc["metadata"]["name"] = f"{claim['metadata']['name']}-{sts['metadata']['name']}-0"
                played.append(pvc)
                sts["spec"]["template"]["spec"].setdefault("volumes", []).append(
                    {"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}
                )
            sts["kind"] = "Deployment"
            played.append(sts)
        elif doc["kind"] in ("Deployment", "ConfigMap"):
            played.append(copy.deepcopy(doc))
    for doc in played:
        if doc["kind"] != "Deployment":
            continue
        doc["spec"]["replicas"] = 1
        pods[doc["metadata"]["name"]] = f"{doc['metadata']['name']}-pod-0"  # podman 4.3's pod name
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if c["image"].startswith("zeroshot-server"):
                c["image"] = image
                c["ports"][0].update(hostPort=port, hostIP="127.0.0.1")
            else:  # Debian's redis-server (the infrastructure image) for the official redis image
                c["image"] = pc.INFRA_IMAGE
                doc["spec"]["template"]["spec"]["securityContext"] = {"runAsUser": redis_uid}
    for doc in played:
        if doc["kind"] == "ConfigMap":
            url = doc["data"]["ZSS_REDIS_URL"]
            doc["data"]["ZSS_REDIS_URL"] = url.replace("zss-redis", pods["zss-redis"])
    return played, secret


@pytest.fixture(scope="module")
def played(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pc.cleanup()
    image = pc.image_under_test()
    base = tmp_path_factory.mktemp("k8s")
    port = free_port()
    redis_uid = int(pc.podman("run", "--rm", pc.INFRA_IMAGE, "id", "-u", "redis"))
    docs, secret = for_podman(kustomized(), image, port, redis_uid)
    kube = base / "kube.yaml"
    kube.write_text(yaml.safe_dump_all(docs))
    secret_file = base / "secret.yaml"
    secret_file.write_text(json.dumps(secret["data"]))
    secret_name = secret["metadata"]["name"]
    pc.podman("secret", "rm", secret_name, check=False)
    pc.podman("secret", "create", secret_name, str(secret_file))
    with pc.network() as net:
        try:
            pc.podman("kube", "play", "--network", net, str(kube), timeout=600)
            yield f"http://127.0.0.1:{port}"
        finally:
            subprocess.run(["podman", "kube", "down", str(kube)], capture_output=True, timeout=300)
            pc.podman("secret", "rm", secret_name, check=False)
            for pvc in (d for d in docs if d["kind"] == "PersistentVolumeClaim"):
                pc.podman("volume", "rm", "-f", pvc["metadata"]["name"], check=False)


def container_of(deployment: str, container: str) -> str:
    """podman names a Deployment's pod <name>-pod-<n> (the version decides n) and its containers <pod>-<container>."""
    names = pc.podman("ps", "--format", "{{.Names}}").split()
    found = [n for n in names if n.startswith(f"{deployment}-pod") and n.endswith(f"-{container}")]
    assert len(found) == 1, names
    return found[0]


def test_played_manifests_classify_with_the_secrets_key(played: str) -> None:
    api = pc.Container(container_of("zss-api", "api"), played)
    pc.wait_ready(api, timeout=420)
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=played, timeout=60) as c:
        assert c.get("/deployments").status_code == 401  # the Secret's keys are in force
        r = c.post("/deploy_classifier", json=RED, headers=headers)
        assert r.status_code == 200, r.text
        blob = encode_png(shapes.draw("red", "circle", np.random.default_rng(5)))
        r = c.post("/classify", params={"deployed_id": r.json()["deployed_id"]}, files=files(blob), headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["pred"] == "red"
    # The deployment is in the Redis pod (the ConfigMap's ZSS_REDIS_URL), not in the API pod.
    keys = pc.podman("exec", container_of("zss-redis", "redis"), "redis-cli", "--scan", "--pattern", "zss:*")
    assert keys.strip(), "no deployment in the Redis pod"
