"""Screenshots of the dashboard for the README: a real multi-objective toy search (accuracy on
two toy skills, NSGA-II) run through ``evomerge serve``, photographed in headless Chromium.

    python scripts/screenshots.py [--suite toy_suite] [--trials 48] [--out docs]

Builds the small toy suite into ``--suite`` if it is missing (a few minutes), starts a server
on a free loopback port over a temporary runs folder, submits the job, waits for it to finish
and writes ``OUT/dashboard.png`` (the job, its front, hypervolume and fitness) and
``OUT/dashboard_trial.png`` (a selected trial: heatmap, scores, recipe, table).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

TOKEN = "screenshots"


def job(suite: Path, trials: int) -> str:
    tasks = ("shift", "rot13")
    return yaml.safe_dump({
        "name": "toy-pareto",
        "toy_suite": {"dir": str(suite), "size": "small"},
        "models": {"base": {"path": str(suite / "base")},
                   "experts": {t: {"path": str(suite / "experts" / t)} for t in tasks}},
        "search": {"space": {"name": "parameter", "method": "ties", "layer_groups": 4},
                   "sampler": {"name": "nsga2", "population_size": 12, "seed": 0},
                   "trials": trials, "held_out_top_k": 4},
        "evaluators": [{"name": "accuracy", "data": str(suite / "data" / t), "limit": 64,
                        "batch_size": 64} for t in tasks],
        "objectives": [{"metric": f"accuracy/{t}", "direction": "maximize"} for t in tasks],
        "resources": {"workers": 2, "num_cpus": 1},
    }, sort_keys=False)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--suite", type=Path, default=Path("toy_suite"))
    p.add_argument("--trials", type=int, default=48)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    suite = args.suite.resolve()
    if not (suite / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "evomerge", "toy", "build", str(suite),
                        "--size", "small"], check=True)
    runs = Path(tempfile.mkdtemp(prefix="evomerge-shots-")) / "runs"
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "evomerge", "serve", "--port", str(args.port), "--runs",
         str(runs), "--allow-root", str(suite)],
        env={**os.environ, "EVOMERGE_TOKEN": TOKEN}, start_new_session=True)
    try:
        wait_up(url)
        r = httpx.post(f"{url}/jobs", content=job(suite, args.trials),
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        r.raise_for_status()
        name = r.json()["name"]
        while (state := httpx.get(f"{url}/jobs/{name}").json())["state"] not in (
                "finished", "failed", "cancelled"):
            print(f"{state['done']}/{state['budget']} trials", flush=True)
            time.sleep(5)
        if state["state"] != "finished":
            raise SystemExit(f"the job ended {state['state']}: {state['error']}")
        shoot(url, name, args.out)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    return 0


def wait_up(url: str) -> None:
    for _ in range(200):
        try:
            httpx.get(f"{url}/api/config", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def shoot(url: str, name: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                    args=["--no-sandbox", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{url}/#token={TOKEN}")
        page.click(f'#jobs li[data-job="{name}"]')
        page.wait_for_function("document.getElementById('pareto').dataset.points > 0")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(out / "dashboard.png"))
        front = page.evaluate("document.getElementById('pareto').data[1].customdata")
        pick = front[len(front) // 2]
        index = front.index(pick)
        point = page.locator("#pareto .scatterlayer .trace").nth(1).locator(".point").nth(index)
        point.click(force=True)
        page.wait_for_function(f"document.getElementById('sel-title').textContent == "
                               f"'Trial {pick}'")
        page.mouse.move(640, 790)  # off the plot: the hover label would hide the front
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "dashboard_trial.png"))
        browser.close()
    print(f"wrote {out / 'dashboard.png'} and {out / 'dashboard_trial.png'}")


if __name__ == "__main__":
    sys.exit(main())
