"""The Docker image, the compose file and the KubeRay manifest cannot be built or run here: lint
them (hadolint, yamllint) and check that every command they run parses with the real CLI
(``evomerge``'s argparse, ``ray start``'s click command), that every path they copy or read is in
the repository, and that the ports and hosts they wire together agree."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from evomerge.cli import _parser
from evomerge.config import parse_job

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
YAMLLINT = ("{extends: default, rules: {line-length: {max: 99}, document-start: disable, "
            "truthy: {check-keys: false}}}")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # a test dependency (pyproject `test` extra): fail, do not skip
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return path


def run_ok(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_dockerfile():
    run_ok(tool("hadolint"), "docker/Dockerfile")


def test_yamllint():
    run_ok(tool("yamllint"), "-s", "-d", YAMLLINT, "docker/compose.yaml", "docker/rayjob.yaml",
           "configs/cluster.yaml")


def evomerge_args(command: str) -> object:
    """Parse ``evomerge ...`` with the real parser (argparse exits on an unknown option)."""
    argv = shlex.split(re.sub(r"\$\{(\w+):-[^}]*\}|\$\((\w+)\)", "PASS", command))
    assert argv[0] == "evomerge", command
    return _parser().parse_args(argv[1:])


def ray_start_params(command: str) -> dict:
    from ray.scripts.scripts import start

    argv = shlex.split(command)
    assert argv[:2] == ["ray", "start"], command
    return dict(start.make_context("start", argv[2:]).params)


def header_searches(path: Path) -> list[str]:
    """The ``evomerge search ...`` commands shown in the comments at the top of ``path``
    (continuation lines joined)."""
    commands, cur = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        cur += " " + text.removesuffix("\\").strip()
        if not text.endswith("\\"):
            commands.append(cur.strip())
            cur = ""
    return [c[c.index("evomerge search"):] for c in commands if "evomerge search" in c]


def dockerfile() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0], ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_copies_what_exists_and_installs_known_extras():
    steps = dockerfile()
    assert re.fullmatch(r"\S+:\d[\w.-]*", dict(steps)["FROM"]), "pin the base image's version"
    for op, arg in steps:
        if op == "COPY":
            *sources, _ = [a for a in arg.split() if not a.startswith("--")]
            assert all((ROOT / s).exists() for s in sources), arg
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    extras = set(re.findall(r"^(\w+) = \[", section.split("\n[")[0], re.M))
    runs = " ".join(a for o, a in steps if o == "RUN")
    installs = re.findall(r'pip install -e "\.\[([\w,]+)\]"', runs)
    assert installs and set(installs[0].split(",")) <= extras
    user = [a for o, a in steps if o == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root"), "the image must not run as root"
    cmd = yaml.safe_load(dict(steps)["CMD"])
    assert ray_start_params(shlex.join(cmd))["head"]
    exposed = {int(p) for o, a in steps if o == "EXPOSE" for p in a.split()}
    assert {6379, 8265, 10001, 8000} <= exposed


def test_compose_services_agree():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "head", "worker", "serve"}
    assert services["head"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / services["head"]["build"]["context"] / "docker/Dockerfile").is_file()
    head = ray_start_params(services["head"]["command"])
    worker = ray_start_params(services["worker"]["command"])
    assert head["head"] and worker["address"] == f"head:{head['port']}"
    assert services["head"]["ports"] == [f"127.0.0.1:{head['dashboard_port']}:8265"]
    serve = evomerge_args(services["serve"]["command"])
    assert serve.command == "serve" and serve.ray_address == f"http://head:{head['dashboard_port']}"
    assert services["serve"]["ports"] == [f"127.0.0.1:{serve.port}:{serve.port}"]
    pg = services["postgres"]["environment"]
    url = f"postgresql://{pg['POSTGRES_USER']}:PASS@postgres:5432/{pg['POSTGRES_DB']}"
    assert serve.storage == url
    for name in ("head", "worker", "serve"):  # one image, the runs and models on every node
        assert services[name]["image"] == "evomerge:latest"
        assert {"models:/models", "runs:/shared/runs"} <= set(services[name]["volumes"])
    [search] = header_searches(DOCKER / "compose.yaml")
    args = evomerge_args(search)
    assert args.storage == url and args.address == "auto"
    assert (ROOT / args.job).is_file()


def test_rayjob_runs_the_cluster_config():
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    args = evomerge_args(job["spec"]["entrypoint"])
    assert args.command == "search" and args.storage.startswith("postgresql://")
    assert (ROOT / args.job).is_file() and str(args.job) == "configs/cluster.yaml"
    cluster = parse_job(yaml.safe_load((ROOT / args.job).read_text()))
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    [container] = head["containers"]
    assert container["workingDir"] == "/opt/evomerge"  # WORKDIR of the image: configs/ is there
    assert "PGPASSWORD" in {e["name"] for e in container["env"]}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(cluster.run_dir.startswith(m + "/") for m in mounts)  # type: ignore[union-attr]
    [group] = spec["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    res = cluster.resources
    assert group["replicas"] * gpus >= res.workers * res.num_gpus  # room for every worker


def test_cluster_config_header_commands_parse():
    [search] = header_searches(ROOT / "configs/cluster.yaml")
    args = evomerge_args(search)
    assert args.command == "search" and args.storage.startswith("postgresql://")
    assert (ROOT / args.job).is_file()
