"""The dashboard in Debian's headless Chromium (Playwright), against the real server of
``test_service_api.py`` and a real search submitted through the page: the job appears and
progresses, the Pareto plot has one point per completed trial, a click shows the trial's
recipe and heatmap, and the export button downloads a recipe that ``evomerge merge`` accepts.
Screenshots go to ``tests/artifacts/`` (git-ignored)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_service_api import TOKEN, Server, job_yaml, service  # noqa: F401 - the fixture

ARTIFACTS = Path(__file__).with_name("artifacts")
NAME, BUDGET = "browser-job", 10


def chromium() -> str:
    """Debian's chromium; missing is a failure, not a skip (CI installs it in .ci/run)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (see .ci/run)")
    return path


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                    args=["--no-sandbox", "--disable-background-networking"])
        ctx = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
        pg = ctx.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.errors = errors  # type: ignore[attr-defined]
        yield pg
        browser.close()


def done_of(text: str) -> int:
    m = re.match(r"(\d+)/(\d+) trials", text)
    return int(m.group(1)) if m else -1


@pytest.mark.slow
def test_dashboard_end_to_end(service: Server, page, tmp_path):  # noqa: F811 - fixture
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(f"{service.url}/#token={TOKEN}")
    page.click("#submit-box summary")
    page.fill("#job-yaml", job_yaml({"dir": service.roots[0]}, NAME, BUDGET))
    page.click("#submit")
    page.wait_for_selector(f'#jobs li[data-job="{NAME}"]')
    assert "submitted" in page.text_content("#submit-msg")

    page.wait_for_function("parseInt(document.getElementById('job-progress').textContent) >= 1",
                           timeout=180_000)
    first = done_of(page.text_content("#job-progress"))
    page.wait_for_function(
        f"parseInt(document.getElementById('job-progress').textContent) > {first}",
        timeout=60_000)
    assert "running" in page.text_content("#job-state")
    page.screenshot(path=str(ARTIFACTS / "dashboard-running.png"))

    page.wait_for_function("document.getElementById('job-state').textContent.includes"
                           "('finished')", timeout=240_000)
    rows = service.get(f"/jobs/{NAME}/trials", params={"limit": 1000})["rows"]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    page.wait_for_function(f"document.getElementById('pareto').dataset.points == "
                           f"{len(complete)}", timeout=30_000)
    page.wait_for_timeout(300)
    drawn = page.locator("#pareto .scatterlayer .point")
    assert drawn.count() == len(complete)  # dominated + front; none selected yet
    front = service.get(f"/jobs/{NAME}/pareto",
                        params={"x": "objective:entropy/a", "y": "objective:entropy/b"})["front"]
    assert page.evaluate("document.getElementById('pareto').data[1].customdata") == front

    point = page.locator("#pareto .scatterlayer .trace").nth(1).locator(".point").first
    point.hover(force=True)
    page.wait_for_selector("#pareto .hovertext")
    assert "weight=" in page.text_content("#pareto .hovertext")  # hover shows the recipe
    point.click(force=True)
    number = front[0]
    page.wait_for_function(f"document.getElementById('sel-title').textContent == "
                           f"'Trial {number}'")
    page.wait_for_selector("#heatmap .hm, #heatmap .heatmaplayer image, #heatmap .heatmaplayer")
    recipe = service.get(f"/jobs/{NAME}/trials/{number}/recipe")
    assert page.text_content("#recipe") == recipe["yaml"]
    assert page.locator("#scores th").all_text_contents()[:3] == ["metric", "split",
                                                                   f"trial {number}"]
    assert page.locator(f'#trials tr.selected[data-trial="{number}"]').count() == 1
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "dashboard-trial.png"))

    with page.expect_download() as dl:
        page.click("#export-recipe")
    saved = tmp_path / "recipe.yaml"
    dl.value.save_as(saved)
    out = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(saved),
                          str(tmp_path / "merged")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "merged" / "config.json").is_file()

    page.fill("#filter", "expert:")
    assert page.locator("#trials tbody tr").count() == 2  # the two expert baselines
    assert not page.errors  # type: ignore[attr-defined]
