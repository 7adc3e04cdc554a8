"""`cargohold node-setup`: the files it writes for containerd and CRI-O/podman, and that uninstall
restores a node root exactly, leaving files it did not write alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cargohold.cli import main
from cargohold.nodesetup import (
    MARK,
    Mirror,
    Registry,
    SetupError,
    hosts_toml,
    registries_conf,
)
from rig.tree import snapshot

MIRROR = "http://10.96.0.50:5000"
DEAD = "http://127.0.0.1:9"  # tests' fallback: nothing leaves loopback


def node_setup(root: Path, *args: str) -> int:
    return main(["node-setup", *args, "--root", str(root)])


def install(root: Path, *registries: str, mirror: str = MIRROR, extra: tuple[str, ...] = ()) -> int:
    regs = [a for r in registries for a in ("--registry", r)]
    return main(["node-setup", "install", "--root", str(root), "--mirror", mirror, *regs, *extra])


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A node root with an operator's own containerd file and CRI-O drop-in already in place."""
    root = tmp_path / "node"
    quay = root / "etc/containerd/certs.d/quay.io"
    quay.mkdir(parents=True)
    (quay / "hosts.toml").write_text('server = "https://quay.io"\n\n[host."https://quay-cache.example"]\n')
    (quay / "ca.crt").write_text("operator's CA\n")
    dropins = root / "etc/containers/registries.conf.d"
    dropins.mkdir(parents=True)
    (dropins / "shortnames.conf").write_text('[aliases]\n  "alpine" = "docker.io/library/alpine"\n')
    return root


def test_hosts_toml_keeps_the_registry_as_fallback_and_the_mirror_first() -> None:
    text = hosts_toml(Registry.parse("ghcr.io"), Mirror(MIRROR))
    assert text.splitlines()[0] == MARK
    doc = tomllib.loads(text)
    assert doc["server"] == "https://ghcr.io"
    assert doc["host"] == {MIRROR: {"capabilities": ["pull", "resolve"]}}
    assert (
        tomllib.loads(hosts_toml(Registry.parse("docker.io"), Mirror(MIRROR)))["server"]
        == "https://registry-1.docker.io"
    )
    tls = tomllib.loads(
        hosts_toml(Registry.parse(f"ghcr.io={DEAD}"), Mirror("https://m.example/v2", "/etc/ca.pem", True))
    )
    assert tls["server"] == DEAD
    assert tls["host"]["https://m.example/v2"] == {
        "capabilities": ["pull", "resolve"],
        "override_path": True,
        "ca": "/etc/ca.pem",
        "skip_verify": True,
    }


def test_registries_conf_sends_each_registry_to_its_path_prefix_on_the_mirror() -> None:
    regs = [Registry.parse("docker.io"), Registry.parse(f"ghcr.io={DEAD}")]
    doc = tomllib.loads(registries_conf(regs, Mirror(MIRROR)))
    hub, ghcr = doc["registry"]
    assert hub == {
        "prefix": "docker.io",
        "location": "registry-1.docker.io",
        "mirror": [{"location": "10.96.0.50:5000/docker.io", "pull-from-mirror": "all", "insecure": True}],
    }
    assert ghcr["location"] == "127.0.0.1:9" and ghcr["insecure"] is True  # a plain-HTTP fallback
    assert ghcr["mirror"][0]["location"] == "10.96.0.50:5000/ghcr.io"
    https = tomllib.loads(registries_conf(regs[:1], Mirror("https://mirror.example.com")))
    assert "insecure" not in https["registry"][0] and "insecure" not in https["registry"][0]["mirror"][0]
    api_root = tomllib.loads(registries_conf(regs[:1], Mirror("https://mirror.example.com/cache/v2")))
    assert api_root["registry"][0]["mirror"][0]["location"] == "mirror.example.com/cache/docker.io"


@pytest.mark.parametrize(
    "registry", ["../../etc", "ghcr.io/x", "a..b", "", "Ghcr.io=ftp://x", 'ghcr.io=http://a"b', "x=http://h/?q=1"]
)
def test_bad_registries_are_refused(registry: str) -> None:
    with pytest.raises(SetupError):
        Registry.parse(registry)


def test_an_unset_service_variable_in_the_mirror_is_an_error(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(node)
    assert install(node, "docker.io", mirror="http://$(CARGOHOLD_SERVICE_HOST):$(CARGOHOLD_SERVICE_PORT_HTTP)") == 2
    assert "names a variable the pod does not have" in capsys.readouterr().err
    assert snapshot(node) == before


def test_install_then_uninstall_restores_the_node_and_leaves_the_operators_files(
    node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(node)
    assert install(node, f"docker.io={DEAD}", "ghcr.io", "quay.io", "reg.example.com:5000") == 0
    out = capsys.readouterr().out
    certs = node / "etc/containerd/certs.d"
    assert tomllib.loads((certs / "docker.io/hosts.toml").read_text())["server"] == DEAD
    assert (certs / "ghcr.io/hosts.toml").read_text().startswith(MARK)
    assert "left alone (not written by cargohold): /etc/containerd/certs.d/quay.io/hosts.toml" in out
    assert (certs / "quay.io/hosts.toml").read_bytes() == before["etc/containerd/certs.d/quay.io/hosts.toml"][2]
    dropin = tomllib.loads((node / "etc/containers/registries.conf.d/50-cargohold.conf").read_text())
    assert [r["prefix"] for r in dropin["registry"]] == ["docker.io", "ghcr.io", "quay.io"]
    assert "skipped for CRI-O/podman" in out and "reg.example.com:5000" in out
    assert oct((certs / "ghcr.io/hosts.toml").stat().st_mode & 0o777) == "0o644"

    assert install(node, f"docker.io={DEAD}", "ghcr.io", "quay.io", "reg.example.com:5000") == 0  # a restarted pod
    assert node_setup(node, "uninstall") == 0
    assert snapshot(node) == before


def test_uninstall_removes_the_directories_it_created_on_a_bare_node(tmp_path: Path) -> None:
    node = tmp_path / "bare"
    (node / "etc").mkdir(parents=True)
    before = snapshot(node)
    assert install(node, "docker.io") == 0
    assert (node / "etc/containerd/certs.d/docker.io/hosts.toml").is_file()
    assert node_setup(node, "uninstall") == 0
    assert snapshot(node) == before
    assert node_setup(node, "uninstall") == 0  # twice is harmless


def test_a_registry_dropped_from_the_list_loses_its_file_and_edited_files_stay(node: Path) -> None:
    before = snapshot(node)
    assert install(node, "docker.io", "ghcr.io") == 0
    certs = node / "etc/containerd/certs.d"
    assert install(node, "docker.io") == 0
    assert not (certs / "ghcr.io").exists()
    assert (
        tomllib.loads((node / "etc/containers/registries.conf.d/50-cargohold.conf").read_text())["registry"][0][
            "prefix"
        ]
        == "docker.io"
    )
    # an operator took the file over (removed the mark): uninstall keeps it and its directory
    own = certs / "docker.io/hosts.toml"
    own.write_text('server = "https://registry-1.docker.io"  # mine now\n')
    assert node_setup(node, "uninstall") == 0
    assert own.read_text().endswith("# mine now\n")
    own.unlink()
    (certs / "docker.io").rmdir()
    assert snapshot(node) == before


def test_a_symlink_in_place_of_a_file_is_not_followed(node: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(MARK + "\nsomeone else's\n")
    (node / "etc/containerd/certs.d/ghcr.io").mkdir()
    (node / "etc/containerd/certs.d/ghcr.io/hosts.toml").symlink_to(elsewhere)
    before = snapshot(node)
    assert install(node, "ghcr.io", extra=("--containers-dir", "")) == 0
    assert node_setup(node, "uninstall") == 0
    assert snapshot(node) == before and elsewhere.read_text() == MARK + "\nsomeone else's\n"


def test_the_daemonset_container_installs_then_uninstalls_on_sigterm(node: Path) -> None:
    """`install --wait` as a pod runs it: files while it runs, the node as it was after SIGTERM."""
    before = snapshot(node)
    cmd = [sys.executable, "-m", "cargohold", "node-setup", "install", "--wait", "--root", str(node)]
    proc = subprocess.Popen([*cmd, "--mirror", MIRROR, "--registry", "docker.io"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("wrote /etc/containerd/certs.d/docker.io/hosts.toml")
        assert proc.stdout.readline().startswith("wrote /etc/containers/registries.conf.d/50-cargohold.conf")
        assert (node / "etc/containerd/certs.d/docker.io/hosts.toml").is_file()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert "removed /etc/containerd/certs.d/docker.io/hosts.toml" in out
    assert snapshot(node) == before


def test_a_state_file_cannot_lead_outside_the_config_directory(node: Path) -> None:
    (node / "srv/empty").mkdir(parents=True)
    assert install(node, "docker.io", extra=("--containers-dir", "")) == 0
    state = node / "etc/containerd/certs.d/.cargohold-node-setup.json"
    state.write_text(state.read_text().replace('"created_dirs": [', '"created_dirs": ["/srv/empty", "/srv", '))
    assert node_setup(node, "uninstall") == 0
    assert (node / "srv/empty").is_dir()
    state.write_text("[1, 2]")  # not the shape it writes: ignored, nothing removed
    assert node_setup(node, "uninstall") == 0


def test_the_ca_is_a_path_on_the_node(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(node, "docker.io", extra=("--ca", "ca.pem")) == 2
    assert "absolute path" in capsys.readouterr().err
    assert install(node, "docker.io", mirror="https://m.example", extra=("--ca", "/etc/m.pem")) == 0
    hosts = tomllib.loads((node / "etc/containerd/certs.d/docker.io/hosts.toml").read_text())
    assert hosts["host"]["https://m.example"]["ca"] == "/etc/m.pem"


# What was found on a second look (docs/security.md, "Node agent findings"): a node's config directories
# may already hold links and a state file the agent did not write. Each test failed before the fix.


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the node root: nothing the agent does may ever change it."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "victim.conf").write_text("the operator's own content\n")
    return out


def uninstall_containerd(root: Path) -> int:
    return node_setup(root, "uninstall", "--containers-dir", "")


@pytest.mark.parametrize("link", ["etc/containerd/certs.d/ghcr.io", "etc/containerd/certs.d"])
def test_a_directory_that_is_a_link_is_left_alone_not_followed(
    node: Path, outside: Path, link: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Case A: certs.d/ghcr.io (or certs.d itself) a link to a directory outside the node root."""
    if link == "etc/containerd/certs.d":
        (node / link / "quay.io/hosts.toml").unlink()
        (node / link / "quay.io/ca.crt").unlink()
        (node / link / "quay.io").rmdir()
        (node / link).rmdir()
    (node / link).symlink_to(outside, target_is_directory=True)
    before, elsewhere = snapshot(node), snapshot(outside)
    assert install(node, "docker.io", "ghcr.io", extra=("--containers-dir", "")) == 0
    assert snapshot(outside) == elsewhere
    assert f"left alone (a symlink or not a directory; not followed): /{link}" in capsys.readouterr().out
    assert uninstall_containerd(node) == 0
    assert snapshot(node) == before and snapshot(outside) == elsewhere


@pytest.mark.parametrize(
    "old_tmp",
    [
        "etc/containerd/certs.d/docker.io/.hosts.toml.cargohold-tmp",  # case B
        "etc/containerd/certs.d/..cargohold-node-setup.json.cargohold-tmp",  # case B2: the state file's
    ],
)
def test_a_link_at_a_temporary_name_is_never_written_through(node: Path, outside: Path, old_tmp: str) -> None:
    """Cases B and B2: temporary files are new files of random names, never an existing path."""
    (node / old_tmp).parent.mkdir(exist_ok=True)
    (node / old_tmp).symlink_to(outside / "victim.conf")
    elsewhere = snapshot(outside)
    assert install(node, "docker.io", extra=("--containers-dir", "")) == 0
    hosts = node / "etc/containerd/certs.d/docker.io/hosts.toml"
    assert not hosts.is_symlink() and hosts.read_text().startswith(MARK)
    assert (node / old_tmp).is_symlink()  # someone else's: left as it was
    assert snapshot(outside) == elsewhere
    assert uninstall_containerd(node) == 0
    assert snapshot(outside) == elsewhere and not hosts.exists()


UP = "/etc/containerd/certs.d/../../../../outside"  # from the node root's certs.d to `outside` beside it


@pytest.mark.parametrize(
    ("dirs", "files"),
    [([f"{UP}/empty"], [f"{UP}/marked.toml"]), (["/etc/contain"], [])],
    ids=["dot-dot", "a-prefix-but-no-ancestor"],
)
def test_a_tampered_state_file_never_leads_outside_the_node_root(
    node: Path, outside: Path, dirs: list[str], files: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Case C: `..` in the listed paths, or a directory that is a string prefix of an ancestor (`/etc/contain`)."""
    (outside / "marked.toml").write_text(MARK + "\nsomeone else's\n")
    (outside / "empty").mkdir()
    (node / "etc/contain").mkdir()
    state = node / "etc/containerd/certs.d/.cargohold-node-setup.json"
    state.write_text(json.dumps({"created_dirs": dirs, "files": files}))
    before, elsewhere = snapshot(node), snapshot(outside)
    assert uninstall_containerd(node) == 0
    assert snapshot(outside) == elsewhere
    assert snapshot(node) == before
    assert capsys.readouterr().out.count("ignored, as if empty") == 1


@pytest.mark.parametrize(
    "content",
    [
        "[" * 100_000 + "]" * 100_000,  # case D: RecursionError
        '{"created_dirs": 5, "files": []}',  # case D2: TypeError
        "{not json",
    ],
    ids=["nested", "dirs-a-number", "not-json"],
)
def test_a_state_file_that_is_not_ours_is_one_warning_not_a_crash_loop(
    node: Path, content: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cases D and D2: a traceback and exit 1 on every start made the DaemonSet pod crash-loop."""
    state = node / "etc/containerd/certs.d/.cargohold-node-setup.json"
    state.write_text(content)
    for _ in range(2):  # a restarted pod: the second run reads the state the first one wrote
        assert install(node, "docker.io", extra=("--containers-dir", "")) == 0
    out = capsys.readouterr().out
    assert out.count("ignored, as if empty") == 1 and "wrote /etc/containerd/certs.d/docker.io/hosts.toml" in out
    assert json.loads(state.read_text())["files"] == ["/etc/containerd/certs.d/docker.io/hosts.toml"]
    assert uninstall_containerd(node) == 0
    assert not (node / "etc/containerd/certs.d/docker.io").exists() and not state.exists()


def test_a_config_directory_with_dot_dot_is_refused(node: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--containerd-dir /etc/../../x` named a directory beside the node root, not on it."""
    before, beside = snapshot(node), snapshot(node.parent)
    assert install(node, "docker.io", extra=("--containerd-dir", "/etc/../../x")) == 2
    assert "without '..'" in capsys.readouterr().err
    assert snapshot(node) == before and snapshot(node.parent) == beside


def test_a_fifo_in_place_of_a_file_is_left_alone_and_never_blocks(
    node: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pins what passed before too: opening a FIFO for reading would wait for a writer forever."""
    certs = node / "etc/containerd/certs.d"
    (certs / "docker.io").mkdir()
    os.mkfifo(certs / "docker.io/hosts.toml")
    os.mkfifo(certs / ".cargohold-node-setup.json")
    assert install(node, "docker.io", "ghcr.io", extra=("--containers-dir", "")) == 0
    out = capsys.readouterr().out
    assert "ignored, as if empty (not a regular file)" in out
    assert "left alone (not written by cargohold): /etc/containerd/certs.d/docker.io/hosts.toml" in out
    (certs / ".cargohold-node-setup.json").unlink()  # install replaced it with its own; a FIFO again
    os.mkfifo(certs / ".cargohold-node-setup.json")
    assert uninstall_containerd(node) == 0
    assert (certs / "docker.io/hosts.toml").is_fifo() and (certs / ".cargohold-node-setup.json").is_fifo()
