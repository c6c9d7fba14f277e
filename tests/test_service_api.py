"""The service against a real server process on a loopback port, with a real search job
(two objectives, NSGA-II, tiny models on a local Ray): submit, progress, server-sent events,
cancel, resume, the Pareto endpoint against a brute-force filter, a restart of the service.

The server fixture (:func:`service`) is shared with ``test_dashboard_browser.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from evomerge.recipe import Recipe

TOKEN = "api-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
_SERVERS: dict[str, Server] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``evomerge serve`` in its own process group; :meth:`restart` replaces the process."""

    def __init__(self, runs: Path, roots: list[Path], log: Path) -> None:
        self.runs, self.roots, self.log = runs, roots, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "evomerge", "serve", "--port", str(self.port),
               "--runs", str(self.runs)]
        for r in self.roots:
            cmd += ["--allow-root", str(r)]
        env = {**os.environ, "EVOMERGE_TOKEN": TOKEN}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/api/config", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def get(self, path: str, **kw: Any) -> Any:
        r = httpx.get(self.url + path, timeout=30, **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, headers=AUTH, timeout=120, **kw)

    def wait(self, name: str, until: Any, timeout: float = 240) -> dict[str, Any]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.get(f"/jobs/{name}")
            if until(job):
                return job
            if job["state"] == "failed":
                raise AssertionError(f"job failed: {job['error']}")
            time.sleep(0.5)
        log = (self.runs / ".evomerge-service" / name / "driver.log")
        raise AssertionError(f"timeout; last {job}; log: {log.read_text()[-3000:]}")


def job_yaml(suite: dict, name: str, trials: int) -> str:
    """Two tasks as two objectives (entropy on each), NSGA-II, one worker; 600 examples in
    batches of 8 make a trial slow enough (~1 s) to watch it progress and to cancel it."""
    d = suite["dir"]
    return yaml.safe_dump({
        "name": name,
        "models": {"base": {"path": str(d / "base")},
                   "experts": {t: {"path": str(d / "experts" / t)} for t in ("a", "b")}},
        "search": {"space": {"name": "parameter", "method": "ties", "layer_groups": 2},
                   "sampler": {"name": "nsga2", "population_size": 6, "seed": 0},
                   "trials": trials, "held_out_top_k": 2},
        "evaluators": [{"name": "entropy", "data": str(d / "data" / t), "limit": 600,
                        "batch_size": 8, "held_out_limit": 32} for t in ("a", "b")],
        "objectives": [{"metric": f"entropy/{t}", "direction": "minimize"} for t in ("a", "b")],
        "resources": {"workers": 1, "num_cpus": 1},
    })


@pytest.fixture(scope="session")
def service(search_suite, tmp_path_factory):
    """One server for the API and the browser tests (registered in both modules: the second
    registration gets the same server)."""
    if "server" in _SERVERS:
        yield _SERVERS["server"]
        return
    root = tmp_path_factory.mktemp("service")
    server = Server(root / "runs", [search_suite["dir"], root], root / "serve.log")
    server.start()
    _SERVERS["server"] = server
    yield server
    server.stop()
    for status in (root / "runs" / ".evomerge-service").glob("*/status.json"):
        pid = json.loads(status.read_text()).get("pid")
        if pid and json.loads(status.read_text()).get("state") in ("starting", "running"):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


BUDGET = 30
NAME = "api-job"


class Events:
    """The server-sent events of a job, collected in a thread."""

    def __init__(self, server: Server, name: str) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self._stop = False
        self.thread = threading.Thread(target=self._read, args=(server, name), daemon=True)
        self.thread.start()

    def _read(self, server: Server, name: str) -> None:
        try:
            self._lines(server, name)
        except httpx.HTTPError:
            pass  # the server went away (the restart)

    def _lines(self, server: Server, name: str) -> None:
        with httpx.stream("GET", f"{server.url}/jobs/{name}/events", timeout=None) as r:
            event = None
            for line in r.iter_lines():
                if self._stop:
                    return
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event:
                    self.items.append((event, json.loads(line.removeprefix("data: "))))

    def trials(self) -> list[dict[str, Any]]:
        return [d for e, d in self.items if e == "trial"]


@pytest.mark.slow
def test_submit_progress_events_restart_cancel_resume(service):
    r = service.post("/jobs", content=job_yaml_for(service))
    assert r.status_code == 201, r.text
    assert service.post("/jobs", content=job_yaml_for(service)).status_code == 409  # taken
    events = Events(service, NAME)
    first = service.wait(NAME, lambda j: j["done"] >= 2, timeout=180)
    later = service.wait(NAME, lambda j: j["done"] > first["done"] + 1, timeout=60)
    assert later["state"] == "running" and later["evals_per_min"] > 0
    listed = {j["name"]: j for j in service.get("/jobs")}
    assert listed[NAME]["budget"] == BUDGET and listed[NAME]["done"] >= later["done"]
    deadline = time.time() + 30
    while len(events.trials()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    seen = events.trials()
    assert len(seen) >= 2 and all(e["state"] in ("COMPLETE", "FAIL") for e in seen)
    assert all(set(e["values"]) == {"entropy/a", "entropy/b"} for e in seen
               if e["state"] == "COMPLETE")

    service.stop()  # the job outlives the service; a new one finds it running
    service.start()
    again = service.get(f"/jobs/{NAME}")
    assert again["state"] == "running" and again["done"] >= later["done"], again
    assert service.post(f"/jobs/{NAME}/cancel").status_code == 200  # by pid, after restart
    stopped = service.wait(NAME, lambda j: j["state"] == "cancelled", timeout=60)
    assert stopped["done"] < BUDGET
    time.sleep(3)
    rows = service.get(f"/jobs/{NAME}/trials", params={"limit": 1000})["rows"]
    assert service.get(f"/jobs/{NAME}")["done"] == stopped["done"]  # it really stopped
    assert not [r for r in rows if r["state"] == "RUNNING"]
    numbers = {r["trial"] for r in rows}
    assert {e["trial"] for e in seen} <= numbers  # the events are the stored trials

    assert service.post(f"/jobs/{NAME}/resume").status_code == 200
    done = service.wait(NAME, lambda j: j["state"] == "finished", timeout=240)
    assert done["done"] == BUDGET
    assert done["held_out_best"] is None and done["best"] is not None  # two objectives


def job_yaml_for(service: Server) -> str:
    return job_yaml({"dir": service.roots[0]}, NAME, BUDGET)


def brute_front(rows: list[dict[str, Any]], x: str, y: str, sx: int, sy: int) -> set[int]:
    pts = [(r["trial"], sx * r[x], sy * r[y]) for r in rows if r["state"] == "COMPLETE"
           and r.get(x) is not None and r.get(y) is not None]
    return {n for n, a, b in pts
            if not any(a2 >= a and b2 >= b and (a2 > a or b2 > b) for _, a2, b2 in pts)}


@pytest.mark.slow
def test_pareto_equals_a_brute_force_filter(service):
    service.wait(NAME, lambda j: j["state"] == "finished", timeout=240)
    rows = service.get(f"/jobs/{NAME}/trials", params={"limit": 1000})["rows"]
    for x, y, dx, dy in (("entropy/a", "entropy/b", "minimize", "minimize"),
                         ("objective:entropy/a", "duration_s", "minimize", "minimize"),
                         ("entropy/b", "held_out:entropy/a", "maximize", "minimize")):
        p = service.get(f"/jobs/{NAME}/pareto", params={"x": x, "y": y, "dx": dx, "dy": dy})
        sx, sy = (1 if d == "maximize" else -1 for d in (dx, dy))
        want = brute_front(rows, x, y, sx, sy)
        assert set(p["front"]) == want and want
        assert {q["trial"] for q in p["points"] if not q["dominated"]} == want
        assert all(q["recipe"] for q in p["points"])
    default = service.get(f"/jobs/{NAME}/pareto", params={"x": "entropy/a", "y": "entropy/b"})
    assert default["directions"] == ["minimize", "minimize"]  # the objectives' directions


@pytest.mark.slow
def test_trials_recipe_scores_export(service):
    service.wait(NAME, lambda j: j["state"] == "finished", timeout=240)
    page = service.get(f"/jobs/{NAME}/trials", params={"sort": "entropy/a", "order": "desc",
                                                       "limit": 5, "offset": 2})
    values = [r["entropy/a"] for r in page["rows"]]
    assert len(values) == 5 and values == sorted(values, reverse=True)
    assert page["total"] > BUDGET  # the trials and the reference merge
    best = service.get(f"/jobs/{NAME}/pareto", params={"x": "entropy/a", "y": "entropy/b"})
    n = best["front"][0]
    rec = service.get(f"/jobs/{NAME}/trials/{n}/recipe")
    assert Recipe.from_yaml(rec["yaml"]).to_dict() == rec["recipe"]
    assert rec["heatmap"]["params"]["weight"]["rows"] == ["a", "b"]
    assert len(rec["heatmap"]["params"]["weight"]["z"][0]) == 4  # the tiny models' 4 layers
    sc = service.get(f"/jobs/{NAME}/trials/{n}/scores")
    assert {"uniform", "expert:a", "expert:b"} <= set(sc["columns"])
    r = service.post(f"/jobs/{NAME}/trials/{n}/export", json={"format": "recipe"})
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    assert Recipe.from_yaml(r.text) == Recipe.from_yaml(rec["yaml"])
    r = service.post(f"/jobs/{NAME}/trials/{n}/export", json={"format": "mergekit"})
    assert yaml.safe_load(r.text)["merge_method"] == "ties"


@pytest.mark.slow
def test_the_study_reads_well_in_optuna_dashboard(service):
    import optuna
    from optuna_dashboard import get_note

    service.wait(NAME, lambda j: j["state"] == "finished", timeout=240)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(service.runs / NAME / "study.journal")))
    study = optuna.load_study(study_name=NAME, storage=storage)
    assert study.metric_names == ["entropy/a", "entropy/b"]
    note = get_note(study)
    assert f"evomerge job `{NAME}`" in note and "limit: 600" in note  # the job, whole
    assert "## Held-out scores" in note and "## Reference merges" in note
    held = [int(k.split(":")[1]) for k in study.user_attrs if k.startswith("held_out:")]
    trial = optuna.trial.Trial(study, study.trials[held[0]]._trial_id)
    assert "held_out" not in get_note(trial) and "entropy/a" in get_note(trial)


@pytest.mark.slow
def test_a_restarted_service_finds_the_job(service):
    before = service.wait(NAME, lambda j: j["state"] == "finished", timeout=240)
    rows = service.get(f"/jobs/{NAME}/trials", params={"limit": 1000})["total"]
    service.stop()
    with pytest.raises(httpx.HTTPError):
        httpx.get(service.url + "/jobs", timeout=2)
    service.start()
    after = {j["name"]: j for j in service.get("/jobs")}[NAME]
    assert (after["state"], after["done"], after["best"]) == ("finished", BUDGET, before["best"])
    assert service.get(f"/jobs/{NAME}/trials", params={"limit": 1000})["total"] == rows


def test_heatmap_rows_columns_for_ps_kinds_and_dfs(tmp_path):
    """The heatmap data of a recipe: models (x module kind) x layers, from the groups of a
    per-group value and the layer count in the source's config.json; a DFS path as slots."""
    from evomerge.recipe import DFSRecipe
    from evomerge.service.views import heatmap

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"num_hidden_layers": 6}))
    r = Recipe(method="ties", sources={"base": str(tmp_path / "base"), "x": "m1", "y": "m2"},
               base_model="base", models={
                   "x": {"weight": (0.1, 0.2, 0.3), "density": 0.5},
                   "y": {"weight": {"self_attn": (0.4, 0.5, 0.6), "mlp": 0.7, "default": 1.0}}})
    h = heatmap(r)
    w = h["params"]["weight"]
    assert h["num_layers"] == 6 and w["columns"] == list(range(6))
    assert w["rows"] == ["x", "y · self_attn", "y · mlp", "y · default"]
    assert w["z"][0] == [0.1, 0.1, 0.2, 0.2, 0.3, 0.3] and w["z"][2] == [0.7] * 6
    assert h["params"]["density"] == {"rows": ["x"], "z": [[0.5] * 6],
                                      "columns": list(range(6)), "axis": "layer"}
    d = DFSRecipe(sources={"a": "m1", "b": "m2"}, layers=(("a", 0), ("b", 3), ("a", 1)),
                  scales=(1.0, 0.8, 1.2), embed_from="a")
    assert heatmap(d) == {"kind": "dfs", "slots": [0, 1, 2], "sources": ["a", "b", "a"],
                          "layers": [0, 3, 1], "scales": [1.0, 0.8, 1.2], "embed_from": "a"}
