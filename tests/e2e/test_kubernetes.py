"""deploy/kubernetes/: no cluster here, so what is checked is what can be without one. Each overlay (and
with the optional components) renders with `kubectl kustomize`; every object validates against the
Kubernetes 1.32 schemas (kubernetes-validate, strict); the ConfigMap's config with each container's
environment passes `cargohold config check`; the NetworkPolicies, evaluated by their rules, admit whom
they should (no CNI here to enforce them); the scale-out Redis, run with its container's own command,
refuses a client without the password its Secret gives the mirror's URLs; and the node agent, with the
arguments and the only mounts its DaemonSet gives it, configures a temp node root through which real
containerd and podman pull via cargohold, and uninstall leaves that root as it was."""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis
import yaml

from cargohold.cli import main
from cargohold.nodesetup import STATE_FILE
from rig.clients import DEAD_SERVER, Containerd, need_binary
from rig.hub import Hub
from rig.server import REPO_ROOT, Cargohold
from rig.tree import snapshot
from rig.util import free_port, run, start_process, stop_process, wait_until

KUBERNETES = "1.32.0"  # the version the manifests are validated against (kubectl here is 1.32 too)
MANIFESTS = REPO_ROOT / "deploy" / "kubernetes"
VARIANTS = {
    "single": ["overlays/single"],
    "scaleout": ["overlays/scaleout"],
    "single+components": ["overlays/single", "components/ingress", "components/servicemonitor"],
    "scaleout+components": ["overlays/scaleout", "components/ingress", "components/servicemonitor"],
}
#: A Service named cargohold puts these in every pod of its namespace unless enableServiceLinks is false.
SERVICE_LINKS = {
    "CARGOHOLD_SERVICE_HOST": "10.96.0.50",
    "CARGOHOLD_SERVICE_PORT": "5000",
    "CARGOHOLD_SERVICE_PORT_HTTP": "5000",
    "CARGOHOLD_PORT": "tcp://10.96.0.50:5000",
    "CARGOHOLD_PORT_5000_TCP": "tcp://10.96.0.50:5000",
}


#: Stand-ins for the Secrets the operator creates (docs/kubernetes.md); made up per run, never committed.
STAND_INS = {("cargohold-redis", "password"): secrets.token_hex(16)}


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: the manifests cannot be rendered here (kubectl kustomize)")
    return found


def render(parts: list[str], work: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of an overlay, with components added through a kustomization in `work`."""
    overlay, *components = parts
    if components:
        work.mkdir(parents=True, exist_ok=True)
        rel = [os.path.relpath(MANIFESTS / p, work) for p in parts]  # kustomize refuses absolute paths
        spec: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
        spec |= {"resources": rel[:1], "components": rel[1:]}
        (work / "kustomization.yaml").write_text(yaml.safe_dump(spec))
        target = work
    else:
        target = MANIFESTS / overlay
    out = run([_kubectl(), "kustomize", str(target)], timeout=120)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    work = tmp_path_factory.mktemp("kustomize")
    return {name: render(parts, work / name) for name, parts in VARIANTS.items()}


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] in ("Deployment", "DaemonSet")
    }


def mirror_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec = one(objects, "Deployment", "cargohold")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == "cargohold")


def config_check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cargohold", "config", "check", str(path)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def kubelet_expand(args: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet's `$(NAME)` expansion of a container's args (unknown names stay as they are)."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def container_env(container: dict[str, Any], stand_ins: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: `stand_ins` ((Secret, key) -> value) stand in for
    the Secrets the operator creates, and each value may name the variables defined before it."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = kubelet_expand([e["value"]], env)[0]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            if (ref["name"], ref["key"]) in stand_ins:
                env[e["name"]] = stand_ins[ref["name"], ref["key"]]
            else:
                assert ref.get("optional"), f"the Secret {ref['name']} has no stand-in here"
    return env


# -- the manifests ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    objects = rendered[variant]
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":  # a CRD: kubernetes-validate has no schema; checked below
            continue
        assert kubernetes_validate.validate(obj, KUBERNETES, strict=True) == KUBERNETES.rsplit(".", 1)[0]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "DaemonSet", "NetworkPolicy"} <= kinds
    assert ("PersistentVolumeClaim" in kinds) == variant.startswith("single")
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds or variant.startswith("single")
    assert ({"Ingress", "ServiceMonitor"} <= kinds) == variant.endswith("components")
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"cargohold"}


def test_the_validator_is_strict(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A misspelt field fails: the validation above is not a formality."""
    bad = copy.deepcopy(one(rendered["single"], "Deployment", "cargohold"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_config_with_each_containers_environment_passes_config_check(
    rendered: dict[str, list[dict[str, Any]]], variant: str, tmp_path: Path
) -> None:
    objects = rendered[variant]
    container = mirror_container(objects)
    config_map = one(objects, "ConfigMap")
    assert any(
        v.get("configMap", {}).get("name") == config_map["metadata"]["name"]
        for v in pod_specs(objects)["cargohold"]["volumes"]
    )
    path = tmp_path / "cargohold.yaml"
    path.write_text(config_map["data"]["cargohold.yaml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARGOHOLD_")}
    env |= container_env(container, STAND_INS)
    assert not [v for v in env.values() if "$(" in v]  # every variable named is defined before it
    check = config_check(path, env)
    assert check.returncode == 0, check.stderr
    assert container["args"][-1] == "/etc/cargohold/config/cargohold.yaml"
    # the Kubernetes service links of a Service named cargohold would be read as config keys:
    # this is why the mirror's pods have enableServiceLinks: false
    linked = config_check(path, env | SERVICE_LINKS)
    assert linked.returncode == 2 and "port" in linked.stderr
    assert pod_specs(objects)["cargohold"]["enableServiceLinks"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_mirror_runs_restricted_with_probes_and_measured_resources(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    objects = rendered[variant]
    spec = pod_specs(objects)["cargohold"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert "memory" in c["resources"]["requests"] and "memory" in c["resources"]["limits"]
    mirror = mirror_container(objects)
    assert mirror["livenessProbe"]["httpGet"]["path"] == "/health"
    assert mirror["readinessProbe"]["httpGet"]["path"] == "/ready"
    mib = int(mirror["resources"]["limits"]["memory"].removesuffix("Mi"))
    assert mib >= 2 * 123  # twice the highest peak RSS measured (S3, docs/scaleout.md)
    service = one(objects, "Service", "cargohold")
    assert {p["name"] for p in service["spec"]["ports"]} == {"http", "metrics"}
    labels = one(objects, "Deployment", "cargohold")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    agent_labels = one(objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= agent_labels.items()
    if variant.startswith("scaleout"):
        assert one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == "cargohold"
        assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    if variant.endswith("components"):
        monitor = one(objects, "ServiceMonitor")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        backend = one(objects, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend == {"name": "cargohold", "port": {"name": "http"}}


# -- network policies: no CNI here, so the rendered objects are evaluated by NetworkPolicy's rules ----------


@dataclass(frozen=True)
class Peer:
    """Where a connection comes from: a pod (its namespace, that namespace's labels, its own labels) or a
    node (`pod` None: kube-proxy, the kubelet, host-network pods), which only an ipBlock or no `from` admits."""

    namespace: str
    namespace_labels: dict[str, str]
    pod: dict[str, str] | None


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # what the shipped policies use, evaluated exactly
    return selector.get("matchLabels", {}).items() <= labels.items()


def _from(peer_rule: dict[str, Any], namespace: str, peer: Peer) -> bool:
    assert set(peer_rule) <= {"podSelector", "namespaceSelector"}, peer_rule  # no ipBlock shipped
    if peer.pod is None:
        return False
    if "namespaceSelector" in peer_rule:
        in_namespace = selects(peer_rule["namespaceSelector"], peer.namespace_labels)
    else:  # a podSelector alone: pods of the policy's own namespace
        in_namespace = peer.namespace == namespace
    return in_namespace and selects(peer_rule.get("podSelector", {}), peer.pod)


def admitted(objects: list[dict[str, Any]], workload: str, port: str, peer: Peer) -> bool:
    """Whether the NetworkPolicies let `peer` connect to `port` (a container port's name) of the pods of the
    Deployment `workload`: every policy selecting them that has Ingress is a union of allow rules."""
    pod = one(objects, "Deployment", workload)
    namespace, labels = pod["metadata"]["namespace"], pod["spec"]["template"]["metadata"]["labels"]
    number = {p["name"]: p["containerPort"] for c in pod["spec"]["template"]["spec"]["containers"] for p in c["ports"]}[
        port
    ]
    policies = [
        o["spec"]
        for o in objects
        if o["kind"] == "NetworkPolicy"
        and o["metadata"]["namespace"] == namespace
        and "Ingress" in o["spec"]["policyTypes"]
        and selects(o["spec"]["podSelector"], labels)
    ]
    if not policies:
        return True
    to_port = [{"port": port, "protocol": "TCP"}, {"port": number, "protocol": "TCP"}]
    return any(
        (not rule.get("ports") or any({"protocol": "TCP"} | p in to_port for p in rule["ports"]))
        and (not rule.get("from") or any(_from(f, namespace, peer) for f in rule["from"]))
        for spec in policies
        for rule in spec.get("ingress", [])
    )


NAMESPACE_LABELS = {"kubernetes.io/metadata.name": "cargohold", "app.kubernetes.io/part-of": "cargohold"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
MIRROR = Peer(
    "cargohold", NAMESPACE_LABELS, {"app.kubernetes.io/name": "cargohold", "app.kubernetes.io/component": "mirror"}
)
AGENT = Peer(
    "cargohold", NAMESPACE_LABELS, {"app.kubernetes.io/name": "cargohold", "app.kubernetes.io/component": "node-agent"}
)
NEIGHBOUR = Peer("cargohold", NAMESPACE_LABELS, {"app": "debug"})  # any other pod in the namespace
ELSEWHERE = Peer("default", {"kubernetes.io/metadata.name": "default"}, {"app": "web"})
MONITORING = Peer(
    "monitoring", {"kubernetes.io/metadata.name": "monitoring", "cargohold/scrape-metrics": "true"}, PROMETHEUS
)
UNLABELLED_MONITORING = Peer("monitoring", {"kubernetes.io/metadata.name": "monitoring"}, PROMETHEUS)
NODE = Peer("", {}, None)
EVERYONE = [MIRROR, AGENT, NEIGHBOUR, ELSEWHERE, MONITORING, UNLABELLED_MONITORING, NODE]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_mirror_takes_pulls_from_everyone_and_metrics_only_from_labelled_namespaces(
    rendered: dict[str, list[dict[str, Any]]], variant: str
) -> None:
    objects = rendered[variant]
    assert [p for p in EVERYONE if not admitted(objects, "cargohold", "http", p)] == []  # pulls work as before
    assert [p for p in EVERYONE if admitted(objects, "cargohold", "metrics", p)] == [MONITORING]
    # every pod of the namespace is under a policy (a default deny), the agent's included: it listens on nothing
    for o in objects:
        if o["kind"] in ("Deployment", "DaemonSet"):
            labels = o["spec"]["template"]["metadata"]["labels"]
            assert any(selects(p["spec"]["podSelector"], labels) for p in objects if p["kind"] == "NetworkPolicy")
    # the evaluation is not vacuous: without the policies, metrics would be open to every pod (and node)
    unguarded = [o for o in objects if o["kind"] != "NetworkPolicy"]
    assert all(admitted(unguarded, "cargohold", "metrics", p) for p in EVERYONE)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("scaleout")])
def test_redis_admits_the_mirror_pods_only(rendered: dict[str, list[dict[str, Any]]], variant: str) -> None:
    """Whoever writes to Redis repoints tags (library/nginx:latest -> an image of theirs) for every node."""
    objects = rendered[variant]
    assert [p for p in EVERYONE if admitted(objects, "redis", "redis", p)] == [MIRROR]
    policy = one(objects, "NetworkPolicy", "redis")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= one(objects, "Service", "redis")["spec"]["selector"].items()
    # the Redis policy alone (no default deny) admits exactly the same
    alone = [o for o in objects if o["kind"] != "NetworkPolicy" or o["metadata"]["name"] == "redis"]
    assert [p for p in EVERYONE if admitted(alone, "redis", "redis", p)] == [MIRROR]
    assert all(admitted([o for o in objects if o["kind"] != "NetworkPolicy"], "redis", "redis", p) for p in EVERYONE)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("scaleout")])
def test_redis_asks_for_the_password_the_mirror_urls_carry(
    rendered: dict[str, list[dict[str, Any]]], variant: str, tmp_path: Path
) -> None:
    """The Redis container's own command, run here (redis-server moved to a free loopback port), refuses a
    client without the password, and the mirror's URLs (the kubelet's expansion) and the probe get in."""
    objects = rendered[variant]
    pod = pod_specs(objects)["redis"]
    container = next(c for c in pod["containers"] if c["name"] == "redis")
    env = container_env(container, STAND_INS)
    password = STAND_INS["cargohold-redis", "password"]
    port = free_port()
    wrapper = tmp_path / "bin" / "redis-server"  # the image's redis-server, on loopback and a free port
    wrapper.parent.mkdir()
    wrapper.write_text(
        f'#!/bin/sh\nexec {need_binary("redis-server", "/usr/bin/redis-server")} "$@"'
        f" --bind 127.0.0.1 --port {port} --dir {tmp_path}\n"
    )
    wrapper.chmod(0o755)
    path = f"{wrapper.parent}:{os.environ['PATH']}"
    proc = start_process([*container["command"], *container["args"]], tmp_path / "redis.log", env=env | {"PATH": path})
    try:
        anonymous = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        wait_until(lambda: _refused(anonymous), timeout=30, what="redis-server to refuse a client without password")
        mirror = container_env(mirror_container(objects), STAND_INS)
        for name in ("CARGOHOLD_INDEX__URL", "CARGOHOLD_RATE_LIMIT__STORAGE"):
            url = mirror[name].replace("@redis:6379/", f"@127.0.0.1:{port}/")
            assert url.startswith(f"redis://:{password}@"), name
            assert redis.Redis.from_url(url, socket_timeout=5).ping() is True
        probe = container["readinessProbe"]["exec"]["command"]
        cli = [probe[0], "-p", str(port), *probe[1:]]
        assert run(cli, env=os.environ | env).stdout.strip() == "PONG"
        assert run(cli, env={"PATH": os.environ["PATH"]}).stdout.strip().startswith("NOAUTH")
        assert password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # exec'd: this is redis
        assert Path(f"/proc/{proc.pid}/exe").resolve().name.startswith("redis")
    finally:
        stop_process(proc)
    assert proc.returncode == 0  # SIGTERM reached redis-server itself (exec), which shut down cleanly


def _refused(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.AuthenticationError:
        return True
    return False


def node_agent_args(objects: list[dict[str, Any]], root: Path, host: str, port: int) -> list[str]:
    """The DaemonSet's command line as the kubelet would run it, with the node's / at `root`
    and every registry's fallback on a dead loopback port (DESIGN.md: nothing leaves loopback)."""
    container = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    links = {"CARGOHOLD_SERVICE_HOST": host, "CARGOHOLD_SERVICE_PORT_HTTP": str(port)}
    args = kubelet_expand(container["args"], links)
    assert "--root=/host" in args and "--wait" in args
    args = [f"--root={root}" if a == "--root=/host" else a for a in args if a != "--wait"]
    return [f"{a}={DEAD_SERVER}" if a.startswith("--registry=") else a for a in args]


def test_the_node_agent_serves_every_upstream_and_mounts_what_it_writes(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    objects = rendered["single"]
    upstreams = {u["name"] for u in yaml.safe_load(one(objects, "ConfigMap")["data"]["cargohold.yaml"])["upstreams"]}
    args = node_agent_args(objects, tmp_path, "10.96.0.50", 5000)
    assert {a.split("=")[1] for a in args if a.startswith("--registry=")} == upstreams
    assert main(args) == 0
    hosts = tomllib.loads((tmp_path / "etc/containerd/certs.d/ghcr.io/hosts.toml").read_text())
    assert hosts["host"] == {"http://10.96.0.50:5000": {"capabilities": ["pull", "resolve"]}}
    spec = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert not spec.get("hostNetwork") and not spec["containers"][0]["securityContext"].get("privileged")


def test_the_node_agent_mounts_only_the_two_directories_it_writes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Not all of the node's /etc/containerd and /etc/containers (config.toml, registries.conf, policy.json,
    auth.json): the agent reads and writes nothing there but its two directories, named by its arguments."""
    spec = one(rendered["single"], "DaemonSet")["spec"]["template"]["spec"]
    args = dict(a.removeprefix("--").split("=", 1) for a in spec["containers"][0]["args"] if "=" in a)
    wanted = {args["containerd-dir"], args["containers-dir"]}
    assert wanted == {"/etc/containerd/certs.d", "/etc/containers/registries.conf.d"}
    volumes = {v["name"]: v["hostPath"] for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert set(mounts) == {args["root"] + d for d in wanted}
    for path, mount in mounts.items():  # each at the node path it mounts, written to, made where missing
        assert volumes[mount["name"]] == {"path": path.removeprefix(args["root"]), "type": "DirectoryOrCreate"}
        assert not mount.get("readOnly") and not mount.get("subPath")
    assert len(volumes) == len(mounts)


def narrow_root(objects: list[dict[str, Any]], root: Path) -> Path:
    """A node root as the DaemonSet's mounts present it to the agent: its mount points, nothing else."""
    container = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    for mount in container["volumeMounts"]:
        (root / mount["mountPath"].removeprefix("/host/")).mkdir(parents=True)
    return root


def written(root: Path) -> dict[str, str]:
    """What the agent wrote under root (its state file aside, which also names the directories it made)."""
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.read_text().startswith("# Written by cargohold")
    }


def test_through_the_narrow_mounts_the_node_agent_writes_what_it_wrote_through_the_whole_directories(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The same files for both runtimes as on a node root with all of /etc/containerd and /etc/containers
    (the mounts before), and an uninstall leaves the narrow root as the kubelet made it."""
    objects = rendered["single"]
    whole = tmp_path / "whole"
    for d, f in (("etc/containerd", "config.toml"), ("etc/containers", "registries.conf")):
        (whole / d).mkdir(parents=True)
        (whole / d / f).write_text("# the node's own\n")
    narrow = narrow_root(objects, tmp_path / "narrow")
    before = snapshot(narrow)
    assert {str(p.relative_to(narrow)) for p in narrow.rglob("*") if not any(p.iterdir())} == {
        "etc/containerd/certs.d",
        "etc/containers/registries.conf.d",
    }
    before_args = ("--containerd-dir=", "--containers-dir=")  # the command line before: their defaults
    old = [a for a in node_agent_args(objects, whole, "10.96.0.50", 5000) if not a.startswith(before_args)]
    assert main(old) == 0
    assert main(node_agent_args(objects, narrow, "10.96.0.50", 5000)) == 0
    assert written(narrow) == written(whole)
    registries = {"docker.io", "ghcr.io", "quay.io", "registry.k8s.io"}
    assert {Path(f).parent.name for f in written(narrow)} == registries | {"registries.conf.d"}
    for config_dir in ("etc/containerd/certs.d", "etc/containers/registries.conf.d"):
        whole_state, narrow_state = (json.loads((r / config_dir / STATE_FILE).read_text()) for r in (whole, narrow))
        assert narrow_state["files"] == whole_state["files"]
    assert main(["node-setup", "uninstall", f"--root={narrow}"]) == 0
    assert snapshot(narrow) == before


# -- the node agent against real container runtimes ---------------------------------------------


@pytest.fixture
def node_root(tmp_path: Path) -> Path:
    """A node with its own quay.io hosts.toml and containers config, which the agent must not touch."""
    root = tmp_path / "node"
    quay = root / "etc/containerd/certs.d/quay.io"
    quay.mkdir(parents=True)
    (quay / "hosts.toml").write_text(f'server = "{DEAD_SERVER}"\n')
    (root / "etc/containers").mkdir()
    (root / "etc/containers/registries.conf").write_text("unqualified-search-registries = []\n")
    return root


@pytest.fixture
def mirror(cargohold: Callable[..., Cargohold], hub: Hub, hub2: Hub) -> Iterator[Cargohold]:
    """cargohold with docker.io (the rig's hub) and ghcr.io (the second hub under that name)."""
    server = cargohold(upstreams=[{"name": "docker.io", "url": hub.url}, {"name": "ghcr.io", "url": hub2.url}])
    yield server
    assert "Traceback" not in server.log_text()


@pytest.fixture
def installed(rendered: dict[str, list[dict[str, Any]]], node_root: Path, mirror: Cargohold) -> Iterator[Path]:
    """The DaemonSet's agent run on node_root; yields it; afterwards uninstall restored it exactly."""
    before = snapshot(node_root)
    assert main(node_agent_args(rendered["single"], node_root, "127.0.0.1", mirror.port)) == 0
    yield node_root
    assert main(["node-setup", "uninstall", f"--root={node_root}"]) == 0
    assert snapshot(node_root) == before


def test_containerd_pulls_through_the_mirror_with_the_written_hosts_toml(
    installed: Path, mirror: Cargohold, containerd: Containerd, hub: Hub, hub2: Hub
) -> None:
    certs = installed / "etc/containerd/certs.d"
    tool, app = hub.images["oci"], hub2.images["app"]
    assert containerd.pull(f"docker.io/{tool.ref}", hosts_dir=certs).digest == tool.digest
    assert containerd.pull(f"ghcr.io/{app.ref}", hosts_dir=certs).digest == app.digest
    log = mirror.log_text()
    assert "ns=docker.io" in log and "ns=ghcr.io" in log
    assert hub2.manifest_count(repo=app.repo) >= 1 and hub.manifest_count(repo=app.repo) == 0


@pytest.fixture
def podman_dir() -> Iterator[Path]:
    """Storage for a private rootful podman, under a short path (podman refuses a runroot over 50 characters)."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    if os.geteuid() != 0:
        pytest.skip("rootful podman needs root")
    work = Path(tempfile.mkdtemp(prefix="ch-podman-", dir="/tmp"))
    yield work
    shutil.rmtree(work, ignore_errors=True)


def _podman(node: Path, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Rootful podman with its own storage, reading the node's containers config: as root it takes
    registries.conf(.d) from $HOME/.config/containers, which here is the node's /etc/containers."""
    home = work / "home"
    if not home.exists():
        (home / ".config").mkdir(parents=True)
        (home / ".config/containers").symlink_to(node / "etc/containers")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERS_")} | {"HOME": str(home)}
    storage = ["--root", str(work / "storage"), "--runroot", str(work / "run"), "--storage-driver", "vfs"]
    return run([shutil.which("podman") or "podman", *storage, "--events-backend", "file", *args], env=env, timeout=300)


def test_podman_pulls_through_the_mirror_with_the_written_drop_in(
    installed: Path, mirror: Cargohold, hub: Hub, hub2: Hub, podman_dir: Path
) -> None:
    """podman reads the registries.conf.d format CRI-O reads, through the same library."""
    registries = _podman(installed, podman_dir, "info", "--format", "{{json .Registries}}").stdout
    assert f"127.0.0.1:{mirror.port}/ghcr.io" in registries
    tool, app = hub.images["oci"], hub2.images["app"]
    for ref, image in ((f"docker.io/{tool.ref}", tool), (f"ghcr.io/{app.ref}", app)):
        _podman(installed, podman_dir, "pull", "--quiet", ref)
        assert (
            _podman(installed, podman_dir, "image", "inspect", "--format", "{{.Digest}}", ref).stdout.strip()
            == image.digest
        )
    paths = {r.path for r in hub2.requests}
    assert f"/v2/{app.repo}/manifests/{app.tag}" in paths
    assert f"/v2/ghcr.io/{app.repo}/manifests/{app.tag}" in mirror.log_text()
    assert hub.manifest_count(repo=app.repo) == 0


def test_with_the_mirror_down_containerd_and_podman_fall_back_to_the_registry(
    rendered: dict[str, list[dict[str, Any]]],
    node_root: Path,
    mirror: Cargohold,
    containerd: Containerd,
    hub: Hub,
    podman_dir: Path,
) -> None:
    """The fallback is the registry itself: here the rig's hub, on loopback, in place of registry-1.docker.io."""
    args = node_agent_args(rendered["single"], node_root, "127.0.0.1", mirror.port)
    args = [f"--registry=docker.io={hub.url}" if a.startswith("--registry=docker.io=") else a for a in args]
    assert main(args) == 0
    mirror.stop()
    tool = hub.images["oci"]
    assert (
        containerd.pull(f"docker.io/{tool.ref}", hosts_dir=node_root / "etc/containerd/certs.d").digest == tool.digest
    )
    _podman(node_root, podman_dir, "pull", "--quiet", f"docker.io/{tool.ref}")
    assert hub.manifest_count(repo=tool.repo) >= 2  # both asked the hub directly
    assert main(["node-setup", "uninstall", f"--root={node_root}"]) == 0
