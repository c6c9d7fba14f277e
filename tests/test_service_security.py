"""The service's security model, in process (FastAPI's TestClient over the real app and a real
journal storage): 401 without the token on every write, traversal names and paths outside the
allowed roots refused, unsafe loading refused, oversized bodies refused, names that would
collide with another run refused. Also: optuna-dashboard lists our study with named metrics."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from fastapi.testclient import TestClient

from evomerge.cli import _parser
from evomerge.config import parse_job
from evomerge.service.app import create_app
from evomerge.service.security import Policy, Refused, check_export_name, check_job
from evomerge.service.serve import start_optuna_dashboard

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def job_data(root: Path, name: str = "sec-job", **extra) -> dict:
    return {
        "name": name,
        "models": {"base": {"path": str(root / "models/base")},
                   "experts": {"a": {"path": str(root / "models/a")},
                               "b": {"path": str(root / "models/b")}}},
        "search": {"space": {"name": "parameter", "method": "ties"},
                   "sampler": {"name": "nsga2", "population_size": 4}, "trials": 4},
        "evaluators": [{"name": "entropy", "data": str(root / "data/a")}],
        "objectives": [{"metric": "entropy/a", "direction": "minimize"}],
        **extra,
    }


@pytest.fixture()
def server(tmp_path):
    """An app over tmp_path/runs with one finished run of the CLI, ``r1`` (a real journal)."""
    runs = tmp_path / "runs"
    job = parse_job(job_data(tmp_path, "r1", run_dir=str(runs / "r1")))
    (runs / "r1").mkdir(parents=True)
    (runs / "r1" / "job.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json")))
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(runs / "r1" / "study.journal")))
    study = optuna.create_study(study_name="r1", storage=storage, direction="minimize")
    recipe = {"method": "ties", "sources": {"base": "b", "a": "x"}, "base_model": "base",
              "models": {"a": {"weight": 0.5}}}
    study.add_trial(optuna.trial.create_trial(
        value=1.0, user_attrs={"recipe": recipe, "metrics": {"entropy/a": 1.0}}))
    policy = Policy(token=TOKEN, runs=runs, roots=(tmp_path,))
    return TestClient(create_app(policy)), tmp_path


def write_paths(client: TestClient) -> list[str]:
    spec = client.get("/openapi.json").json()
    return [p for p, ops in spec["paths"].items() if set(ops) & {"post", "put", "delete"}]


def test_every_write_endpoint_needs_the_token(server):
    client, _ = server
    paths = write_paths(client)
    assert {"/jobs", "/jobs/{name}/cancel", "/jobs/{name}/resume",
            "/jobs/{name}/trials/{number}/export"} <= set(paths)
    for path in paths:
        url = path.replace("{name}", "r1").replace("{number}", "0")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = client.post(url, content=b"{not json", headers=headers)
            assert r.status_code == 401, (url, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert client.post("/jobs/r1/trials/0/export", json={"format": "recipe"},
                       headers=AUTH).status_code == 200


def test_reads_are_open_unless_the_token_is_required_for_them(server, tmp_path):
    client, _ = server
    assert client.get("/jobs").status_code == 200
    strict = TestClient(create_app(Policy(token=TOKEN, runs=tmp_path / "runs",
                                          token_for_reads=True)))
    assert strict.get("/jobs").status_code == 401
    assert strict.get("/jobs", headers=AUTH).status_code == 200
    assert strict.get(f"/jobs?token={TOKEN}").status_code == 200  # EventSource's way
    assert strict.get("/").status_code == 200  # the page itself asks for the token
    assert strict.post(f"/jobs/r1/cancel?token={TOKEN}").status_code == 401  # never for writes


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "a/../../b", ".hidden", "..", "a/b"])
def test_export_names_cannot_leave_the_runs_folder(server, name):
    client, root = server
    r = client.post("/jobs/r1/trials/0/export", json={"format": "hf", "name": name},
                    headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["key"] == "name" and "plain name" in r.json()["detail"]["error"]
    with pytest.raises(Refused):
        check_export_name(name)
    assert not list(root.glob("**/x")) and not Path("/tmp/x").exists()


def submit(client: TestClient, data: dict) -> tuple[int, dict]:
    r = client.post("/jobs", content=yaml.safe_dump(data), headers=AUTH)
    return r.status_code, r.json()


@pytest.mark.parametrize("change, key", [
    ({"load": {"trust_remote_code": True}}, "load.trust_remote_code"),
    ({"load": {"allow_pickle": True}}, "load.allow_pickle"),
    ({"run_dir": "/tmp/elsewhere"}, "run_dir"),
    ({"storage": "sqlite:////tmp/x.db"}, "storage"),
    ({"resources": {"address": "ray://evil:10001"}}, "resources.address"),
])
def test_jobs_that_reach_outside_are_refused(server, change, key):
    client, root = server
    status, body = submit(client, {**job_data(root), **change})
    assert status == 422, body
    assert body["detail"]["key"] == key and "server" in body["detail"]["error"]
    assert not (root / "runs" / "sec-job").exists()


@pytest.mark.parametrize("where, key", [
    ("models", "models.experts.a.path"), ("data", "evaluators.0.data"),
    ("dotdot", "models.base.path"),
])
def test_paths_outside_the_allowed_roots_are_refused(server, where, key):
    client, root = server
    data = job_data(root)
    if where == "models":
        data["models"]["experts"]["a"]["path"] = "/etc"
    elif where == "data":
        data["evaluators"][0]["data"] = "/root/data"
    else:
        data["models"]["base"]["path"] = str(root / ".." / ".." / "base")
    status, body = submit(client, data)
    assert status == 422, body
    assert body["detail"]["key"] == key and "outside the folders" in body["detail"]["error"]


def test_unsafe_loading_and_hub_ids_pass_when_the_server_allows_them(tmp_path):
    job = parse_job(job_data(tmp_path, load={"trust_remote_code": True}))
    with pytest.raises(Refused, match="allow-unsafe-loading"):
        check_job(job, Policy(token=TOKEN, runs=tmp_path / "runs", roots=(tmp_path,)))
    check_job(job, Policy(token=TOKEN, runs=tmp_path / "runs", roots=(tmp_path,),
                          allow_unsafe_loading=True))
    hub = job_data(tmp_path)
    hub["models"]["experts"]["a"]["path"] = "Qwen/Qwen2.5-0.5B"
    check_job(parse_job(hub), Policy(token=TOKEN, runs=tmp_path / "runs", roots=(tmp_path,)))


def test_bad_configs_are_422_with_the_dotted_key(server):
    client, root = server
    bad = job_data(root)
    bad["search"]["sampler"] = {"name": "nsga3"}
    status, body = submit(client, bad)
    assert status == 422 and body["detail"]["key"] == "search.sampler.name", body
    assert "nsga2" in body["detail"]["error"]  # the closest name
    r = client.post("/jobs", content="name: [unclosed", headers=AUTH)
    assert r.status_code == 422 and "job.yaml:1" in r.json()["detail"]["error"]


def test_a_name_taken_by_another_run_is_refused(server):
    client, root = server
    status, body = submit(client, job_data(root, "r1"))
    assert status == 409 and "r1" in body["detail"], body
    assert client.get("/jobs/r1").json()["done"] == 1  # the other run is untouched


def test_oversized_bodies_are_refused(server):
    client, _ = server
    big = b"name: x\n" + b"#" * (2 << 20)
    assert client.post("/jobs", content=big, headers=AUTH).status_code == 413

    def chunks():  # no content-length: the cap counts what arrives
        for _ in range(40):
            yield b"#" * 65536

    r = client.post("/jobs", content=chunks(), headers=AUTH)
    assert r.status_code == 413, r.text


def test_serve_binds_loopback_by_default():
    args = _parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000 and not args.allow_unsafe_loading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_optuna_dashboard_lists_our_study_with_named_metrics(tmp_path):
    from evomerge.search.study import close_study, open_study

    data = job_data(tmp_path, "dash", run_dir=str(tmp_path / "runs/dash"))
    data["objectives"] = [{"metric": "entropy/a", "direction": "minimize"},
                          {"metric": "entropy/b", "direction": "minimize"}]
    data["evaluators"] = [{"name": "entropy", "data": str(tmp_path / f"data/{t}")}
                          for t in "ab"]
    job = parse_job(data)
    url = f"sqlite:///{tmp_path / 'all.db'}"
    close_study(open_study(job, sampler=optuna.samplers.RandomSampler(), resume=False,
                           storage_url=url))
    port = free_port()
    start_optuna_dashboard(url, "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}/api/studies"
    for _ in range(50):
        try:
            studies = json.load(urllib.request.urlopen(base, timeout=5))["study_summaries"]
            break
        except OSError:
            time.sleep(0.1)
    ours = [s for s in studies if s["study_name"] == "dash"]
    assert len(ours) == 1
    detail = json.load(urllib.request.urlopen(f"{base}/{ours[0]['study_id']}", timeout=5))
    assert detail["objective_names"] == ["entropy/a", "entropy/b"]
    assert "evomerge job `dash`" in detail["note"]["body"]
    assert "entropy/b" in detail["note"]["body"]  # the whole job, not cut at 1024 characters


def test_a_job_whose_models_are_missing_is_refused_before_it_starts(server):
    """The driver's preflight runs on submit: a missing model folder is a 422 naming the key,
    and nothing is created."""
    client, root = server
    status, body = submit(client, job_data(root, "missing-models"))
    assert status == 422, body
    assert body["detail"]["key"].startswith("models."), body
    assert not (root / "runs" / "missing-models").exists()
    assert not (root / "runs" / ".evomerge-service" / "missing-models").exists()


def test_a_dfs_space_recipe_outside_the_roots_is_refused(tmp_path):
    inline = {"method": "linear", "sources": {"p": "/etc/model"}, "models": {"p": {"weight": 1}}}
    data = job_data(tmp_path)
    data["search"] = {"space": {"name": "dfs", "models": ["x", "a", "b"],
                                "recipes": {"x": inline}},
                      "sampler": {"name": "random"}, "trials": 4}
    policy = Policy(token=TOKEN, runs=tmp_path / "runs", roots=(tmp_path,))
    with pytest.raises(Refused) as err:
        check_job(parse_job(data), policy)
    assert err.value.key == "search.space.recipes.x.sources.p"
    data["search"]["space"]["recipes"] = {"x": "/etc/recipe.yaml"}
    with pytest.raises(Refused) as err:
        check_job(parse_job(data), policy)
    assert err.value.key == "search.space.recipes.x"


def test_a_phased_job_is_refused_with_the_way_to_run_it(tmp_path):
    data = job_data(tmp_path)
    data["search"] = {"space": {"name": "parameter", "method": "ties"},
                      "sampler": {"name": "random"}, "trials": 4,
                      "then": {"space": {"name": "dfs", "models": ["ps", "a", "b"]},
                               "sampler": {"name": "random"}, "trials": 4}}
    with pytest.raises(Refused) as err:
        check_job(parse_job(data), Policy(token=TOKEN, runs=tmp_path / "runs",
                                          roots=(tmp_path,)))
    assert err.value.key == "search.then" and "evomerge search" in str(err.value)
