"""A real two-node Ray cluster on loopback: ``ray start --head`` and ``ray start --address`` on
this machine, with separate resource labels. ``evomerge search --address`` places its workers
on both nodes by the job's resources, and the driver also runs as a Ray job (``ray job submit``).

The cluster is this module's alone: its own ``--temp-dir`` and ports, stopped by killing the
processes whose command line names that temp dir (never ``ray stop``: other Ray clusters may be
running on this machine).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from evomerge.search.ray_cluster import _descendants
from tests.pg_fixtures import free_port
from tests.test_search import job_dict

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


class TwoNodes:
    """Head (2 CPUs, resources ``head_node`` and one ``slot``) and a second node (2 CPUs, one
    declared GPU, resources ``node2`` and one ``slot``) under one temp dir."""

    def __init__(self) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="emr-", dir="/tmp"))  # short: socket paths
        self.port, self.dash = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        # token auth stays on (Ray's default); every node and client gets this cluster's token
        token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **token}
        self.node_manager_ports: dict[str, int] = {}

    def _ports(self, label: str) -> list[str]:
        self.node_manager_ports[label] = port = free_port()
        names = ("object-manager-port", "metrics-export-port",
                 "runtime-env-agent-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port")
        lo = free_port()
        return [f"--node-manager-port={port}", *(f"--{n}={free_port()}" for n in names),
                f"--min-worker-port={lo}", f"--max-worker-port={lo + 40}"]

    def _start(self, label: str, *args: str) -> None:
        cmd = [RAY, "start", "--node-ip-address=127.0.0.1", "--num-cpus=2",
               f"--temp-dir={self.temp}", "--disable-usage-stats", *self._ports(label), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=180)
        if proc.returncode:
            self.stop()
            pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")

    def start(self) -> TwoNodes:
        self._start("head_node", "--head", f"--port={self.port}", "--num-gpus=0",
                    f"--ray-client-server-port={free_port()}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dash}",
                    "--resources=" + json.dumps({"head_node": 1, "slot": 1}))
        self._start("node2", f"--address={self.address}", "--num-gpus=1",
                    "--resources=" + json.dumps({"node2": 1, "slot": 1}))
        return self

    def pids(self, needle: str | None = None) -> list[int]:
        """This cluster's processes (those naming its temp dir, or ``needle``) and their
        descendants."""
        mine = [pid for pid, cmd in cmdlines().items() if (needle or str(self.temp)) in cmd]
        return sorted({*mine, *_descendants(mine)} - {os.getpid()})

    def kill_node2(self) -> None:
        """SIGKILL the second node's raylet and all below it (its workers and agents)."""
        for pid in self.pids(f"--node_manager_port={self.node_manager_ports['node2']}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def worker_processes(self) -> list[int]:
        """Live evomerge worker actors on this cluster (``ray::MergeWorker...``)."""
        cmds = cmdlines()
        return [p for p in self.pids() if cmds.get(p, "").startswith("ray::MergeWorker")]

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 3
            while self.pids() and time.time() < deadline:
                time.sleep(0.2)
        shutil.rmtree(self.temp, ignore_errors=True)


def cmdlines() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{name}/cmdline").read_bytes()
                out[int(name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return out


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodes]:
    cluster = TwoNodes().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def node_ids(cluster: TwoNodes) -> dict[str, str]:
    """Node id -> label (``head_node`` or ``node2``) of the live nodes, read in a subprocess
    (this test process never joins the cluster)."""
    code = (
        "import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False);"
        "print(json.dumps({n['NodeID']: sorted(set(n['Resources']) & {'head_node', 'node2'})[0]"
        " for n in ray.nodes() if n['Alive']}))"
    )
    cmd = [sys.executable, "-c", code, cluster.address]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         timeout=120, check=True, env=cluster.env).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def write_job(suite: dict, tmp: Path, resources: dict, trials: int = 4) -> dict:
    data = job_dict(suite, tmp / "run", trials=trials, held_out_top_k=0)
    data["search"]["baselines"] = False
    data["resources"] = resources
    (tmp / "job.yaml").write_text(yaml.safe_dump(data))
    return data


def search(cluster: TwoNodes, job: Path, timeout: float = 300) -> str:
    """``evomerge search JOB --address`` from this machine, joining the cluster as a client."""
    cmd = [sys.executable, "-m", "evomerge", "search", str(job), "--address", cluster.address,
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=cluster.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def study_of(tmp: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp / "run" / "study.journal"))))


def workers_nodes(study: optuna.Study, labels: dict[str, str]) -> list[str]:
    return sorted(labels[w["node"]] for w in study.user_attrs["evomerge:workers"])


def test_workers_spread_over_both_nodes_by_custom_resource(two_nodes, search_suite, tmp_path):
    labels = node_ids(two_nodes)
    assert sorted(labels.values()) == ["head_node", "node2"]
    # one `slot` per node and per worker: Ray must put one worker on each node
    res = {"workers": 2, "num_cpus": 0.5, "custom_resources": {"slot": 1}}
    data = write_job(search_suite, tmp_path, res)
    search(two_nodes, tmp_path / "job.yaml")
    study = study_of(tmp_path, data["name"])
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert workers_nodes(study, labels) == ["head_node", "node2"]


def test_fractional_gpus_pack_on_the_gpu_node(two_nodes, search_suite, tmp_path):
    labels = node_ids(two_nodes)
    # the second node declares one GPU (a resource label here: torch stays on the CPU)
    res = {"workers": 2, "num_cpus": 0.5, "num_gpus": 0.5}
    data = write_job(search_suite, tmp_path, res)
    search(two_nodes, tmp_path / "job.yaml")
    assert workers_nodes(study_of(tmp_path, data["name"]), labels) == ["node2", "node2"]


def test_driver_as_a_ray_job(two_nodes, search_suite, tmp_path):
    """``ray job submit`` runs the driver on the head; models are read there by path."""
    labels = node_ids(two_nodes)
    res = {"workers": 2, "num_cpus": 0.5, "custom_resources": {"head_node": 0.5}}
    data = write_job(search_suite, tmp_path, res)
    cmd = [RAY, "job", "submit", f"--address=http://127.0.0.1:{two_nodes.dash}", "--",
           sys.executable, "-m", "evomerge", "search", str(tmp_path / "job.yaml"),
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=two_nodes.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "succeeded" in proc.stdout + proc.stderr
    study = study_of(tmp_path, data["name"])
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert workers_nodes(study, labels) == ["head_node", "head_node"]


def test_worker_that_fits_no_node_is_refused_in_one_line(two_nodes, search_suite, tmp_path):
    write_job(search_suite, tmp_path, {"workers": 1, "custom_resources": {"node3": 1}})
    cmd = [sys.executable, "-m", "evomerge", "search", str(tmp_path / "job.yaml"), "--address",
           two_nodes.address, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=two_nodes.env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert line.startswith("evomerge search: error: no node of the Ray cluster can hold one "
                           "worker: it needs CPU=1, node3=1")
    assert "node2=1" in line and "head_node=1" in line


def start_search(cluster: TwoNodes, job: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "evomerge", "search", str(job), "--address", cluster.address,
           "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=cluster.env, start_new_session=True)


def wait_complete(proc: subprocess.Popen, tmp: Path, name: str, n: int) -> optuna.Study:
    deadline = time.time() + 180
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        with contextlib.suppress(KeyError, FileNotFoundError):
            study = study_of(tmp, name)
            if len(study.get_trials(states=(TrialState.COMPLETE,))) >= n:
                return study
        time.sleep(0.2)


def test_killed_driver_leaves_no_worker_behind(two_nodes, search_suite, tmp_path):
    """Issue 16, fault (f): a driver killed with SIGKILL; Ray ends its job and its actors."""
    res = {"workers": 2, "num_cpus": 0.5, "custom_resources": {"slot": 1}}
    data = write_job(search_suite, tmp_path, res, trials=400)
    proc = start_search(two_nodes, tmp_path / "job.yaml")
    try:
        wait_complete(proc, tmp_path, data["name"], 2)
        assert len(two_nodes.worker_processes()) == 2  # one on each node, busy
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 60
    while two_nodes.worker_processes():
        assert time.time() < deadline, f"orphan workers: {two_nodes.worker_processes()}"
        time.sleep(0.5)


def test_second_node_dies_mid_search(two_nodes, search_suite, tmp_path):
    """Issue 16, fault (e): node2 is killed; its trial fails and the search ends on the head.
    Runs last in this module: the cluster has one node afterwards."""
    labels = node_ids(two_nodes)
    res = {"workers": 2, "num_cpus": 0.5, "custom_resources": {"slot": 1}}
    budget = 40
    data = write_job(search_suite, tmp_path, res, trials=budget)
    proc = start_search(two_nodes, tmp_path / "job.yaml")
    try:
        study = wait_complete(proc, tmp_path, data["name"], 3)
        pid_node = {w["pid"]: labels[w["node"]] for w in study.user_attrs["evomerge:workers"]}
        # by time, not trial number: the journal lags the driver's in-memory study by up to a
        # second (evomerge/search/mirror.py), so its last number is not the kill's
        killed_at = datetime.datetime.now()  # optuna's timestamps are naive local time
        two_nodes.kill_node2()
        out, _ = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    study = study_of(tmp_path, data["name"])
    trials = study.trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(done) + len(failed) == budget
    assert {pid_node[t.user_attrs["timing"]["pid"]] for t in done} == {"head_node", "node2"}
    assert failed and all("worker died" in t.user_attrs["error"] for t in failed), failed
    late = [t for t in done if t.datetime_start > killed_at + datetime.timedelta(seconds=2)]
    assert {pid_node[t.user_attrs["timing"]["pid"]] for t in late} <= {"head_node"}
