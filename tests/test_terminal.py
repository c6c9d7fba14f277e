"""What `evomerge search` prints: progress bars for each slow step on a terminal, one log line
per phase when stderr is not one, and the run summary; noise from Ray and transformers hidden.

The search runs for real (a local Ray started by the command, 2 workers, held-out pass on),
in a pseudo-terminal made with :func:`os.openpty`, so that ``sys.stderr.isatty()`` holds in
the child as it does for a user.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

import optuna
import pytest
import yaml

from evomerge.runs.results import open_run
from evomerge.search import progress
from evomerge.search.heldout import best_note
from evomerge.search.progress import (
    PhaseFinished,
    PhaseStarted,
    ProgressBar,
    Step,
    Tracker,
    TrialFinished,
)
from tests.test_search import job_dict
from tests.test_summary import OLD_RUNS, _trial

TIMEOUT_S = 300


def write_job(suite, tmp_path, name: str) -> tuple:
    data = job_dict(suite, tmp_path / "runs" / name, trials=5, held_out_top_k=1)
    data["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, tmp_path / "runs" / name


def run_in_pty(args: list[str]) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on a pseudo-terminal; its exit code and output."""
    leader, follower = os.openpty()
    # a terminal 120 columns wide (a new pty is 0 x 0, which tqdm draws as nothing)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                            env=env, close_fds=True)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if select.select([leader], [], [], 1.0)[0]:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return rc, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_search_on_a_terminal_shows_each_step_then_the_summary(search_suite, tmp_path):
    path, run_dir = write_job(search_suite, tmp_path, "tty")
    rc, out = run_in_pty([sys.executable, "-m", "evomerge", "search", str(path)])
    assert rc == 0, out
    screen = out.replace("\r", "\n")
    # each step's tqdm bar, at its end: "starting Ray: 100%|...| 1/1"
    for desc, total in (("starting Ray", "1"), ("workers ready", "2"), ("held-out", r"\d+"),
                        ("references", "2")):  # references: uniform TA, fitness and held-out
        assert re.search(rf"{desc}: 100%\|.*\| ({total})/\1 ", screen), (desc, out)
    # the held-out bar's last line: the best trial and its held-out score
    assert re.search(r"held-out: 100%.*, best trial \d+: held-out=[0-9.]+\]", screen), out
    assert re.search(r"tty: 100%\|.*\| 5/5 \[\d\d:\d\d, best=[0-9.]+ \(trial \d+\) "
                     r"evals/min=[0-9.]+ eta=", screen), out
    assert re.search(r"eta=\d\d:\d\d", screen), out  # the steady-state ETA, once known
    assert "done: 5 trials, 0 failed" in out and "next:" in out
    assert "Token authentication" not in out and "Loading weights" not in out
    assert "evomerge: " not in out  # the log lines are for logs, not terminals
    # the first output is the start-up line, at once, and the first bar clears it
    assert out.lstrip("\r").startswith("checking the job, the models and the data ..."), out
    assert "\x1b[K" in out.split("starting Ray")[0], out  # the line is cleared before the bar
    study, _ = open_run(run_dir)
    timing = [t.user_attrs["timing"] for t in study.trials]
    assert all(t["queue_s"] >= 0 and t["merge_s"] > 0 and t["eval_s"] > 0 for t in timing)
    assert all(50 < t["rss_mb"] <= t["peak_rss_mb"] for t in timing)  # each worker's memory
    workers = study.user_attrs["evomerge:workers"]
    assert len(workers) == 2 and all(w["peak_rss_mb"] > 50 and w["load_s"] > 0 for w in workers)

    # the exports: mergekit YAML reads config.json and safetensors headers, loads no model
    # (transformers unimported); an HF export draws no transformers bar
    code = ("import sys; from evomerge.cli import main; rc = main(sys.argv[1:]); "
            "assert 'transformers' not in sys.modules, 'transformers imported'; sys.exit(rc)")
    mk = subprocess.run([sys.executable, "-c", code, "export", str(run_dir),
                         str(tmp_path / "mk.yaml"), "--format", "mergekit"],
                        capture_output=True, text=True, timeout=120)
    assert mk.returncode == 0, mk.stderr
    assert "num_hidden_layers" not in mk.stderr and (tmp_path / "mk.yaml").is_file()
    hf = subprocess.run([sys.executable, "-m", "evomerge", "export", str(run_dir),
                         str(tmp_path / "hf"), "--format", "hf", "--trial", "0"],
                        capture_output=True, text=True, timeout=120)
    assert hf.returncode == 0, hf.stderr
    assert "Writing model shards" not in hf.stderr and "Loading weights" not in hf.stderr


@pytest.mark.slow
def test_search_without_a_terminal_logs_one_line_per_phase(search_suite, tmp_path):
    path, _ = write_job(search_suite, tmp_path, "log")
    proc = subprocess.run([sys.executable, "-m", "evomerge", "search", str(path)],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    patterns = [
        r"evomerge: Ray started \(\d+\.\d s\)",
        r"evomerge: workers 2/2 ready \(\d+\.\d s\)",
        r"evomerge: search 5/5 trials done \(\d+\.\d s\): best=[0-9.]+ \(trial \d+\) "
        r"evals/min=[0-9.]+ failed=0",
        r"evomerge: held-out (\d+)/\1 done \(\d+\.\d s\): best trial \d+: held-out=[0-9.]+",
        r"evomerge: references 2/2 done \(\d+\.\d s\)",
    ]
    assert len(lines) == len(patterns), proc.stderr  # nothing else: no bar, no Ray notice
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    assert "\r" not in proc.stderr
    assert "done: 5 trials, 0 failed" in proc.stdout



def test_the_eta_uses_the_rate_after_each_workers_first_trial(monkeypatch):
    """Two workers; their first trials (start-up: caches, compiling) take 60 s, then a trial
    every 2 s each: the ETA counts the steady 1 trial/s, not the start-up."""
    import optuna

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    tracker = Tracker(optuna.create_study(), budget=20, done=0)
    done = 0

    def tell(at: float, worker: int) -> float | None:
        nonlocal done
        clock[0], done = at, done + 1
        return tracker.finished(done, optuna.trial.TrialState.COMPLETE, [1.0], None,
                                done=done, worker=worker).eta_s

    assert tell(60.0, 1) is None and tell(60.0, 2) is None  # start-up only: not known yet
    assert tell(62.0, 1) == pytest.approx(17 / (1 / 2))
    assert tell(62.0, 2) == pytest.approx(16 / (2 / 2))  # 2 steady trials in 2 s: 16 s left
    assert tell(64.0, 1) == pytest.approx(15 / (3 / 4))


def test_without_a_terminal_each_step_is_one_line(capsys):
    bar = ProgressBar("demo", bars=False)
    step = Step("workers", 3, bar)
    step.advance()
    step.advance()
    assert capsys.readouterr().err == ""  # nothing until the step ends
    step.advance()
    bar(PhaseStarted("search", 0, 4))
    bar(PhaseFinished("search", 4, 4))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and re.fullmatch(r"evomerge: workers 3/3 ready \(\d+\.\d s\)", err[0])
    assert re.fullmatch(r"evomerge: search 4/4 trials done \(\d+\.\d s\)", err[1])


@pytest.fixture
def resumed(tmp_path):
    """A stored run (the old cmaes run; objective: minimise the mean of two entropies) whose
    trials 12 and 13 tie on the best fitness, 13 with the better held-out score (3.5)."""
    run = tmp_path / "run"
    run.mkdir()
    for file in ("job.yaml", "study.journal"):
        text = (OLD_RUNS / "cmaes" / file).read_text().replace("/tmp/OLDSUITE/run", str(run))
        (run / file).write_text(text.replace("/tmp/OLDSUITE", str(tmp_path / "suite")))
    study, job = open_run(run)
    study.add_trial(_trial(1.5, 30))  # trial 12
    study.add_trial(_trial(1.5, 40))  # trial 13
    study.set_user_attr("held_out:12", {"metrics": {"entropy/a": 3.6, "entropy/b": 3.8}})
    study.set_user_attr("held_out:13", {"metrics": {"entropy/a": 3.4, "entropy/b": 3.6}})
    study.set_user_attr("held_out:0", {"error": "RuntimeError: boom"})
    return open_run(run)  # read back, as a resumed driver does


def test_a_resumed_search_shows_the_stored_held_out_of_its_best(resumed, capsys):
    study, job = resumed
    tracker = Tracker(study, budget=20, done=len(study.trials))
    worse = tracker.finished(14, optuna.trial.TrialState.COMPLETE, [2.0], None, done=15)
    assert (worse.best, worse.best_trial) == (1.5, 13)  # the tie goes to the better held-out
    assert worse.best_held_out == pytest.approx(3.5)
    bar = ProgressBar("demo", bars=False)
    bar(PhaseStarted("search", 14, 20))
    bar(worse)
    bar(PhaseFinished("search", 15, 20))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"evomerge: search 15/20 trials done \(\d+\.\d s\): best=1\.5 \(trial 13, "
        r"held-out 3\.5\) evals/min=[0-9.]+ failed=0", lines[0]), lines
    assert re.fullmatch(r"best=1\.5 \(trial 13, held-out 3\.5\) evals/min=[0-9.]+ eta=\?",
                        progress._trial_text(worse, 0))  # the bar: failed=N once one failed
    assert " failed=2 eta=" in progress._trial_text(worse, 2)
    better = tracker.finished(15, optuna.trial.TrialState.COMPLETE, [1.0], None, done=16)
    assert (better.best_trial, better.best_held_out) == (15, None)  # not scored yet
    assert "best=1 (trial 15) evals/min" in progress._trial_text(better, 0)


def test_the_held_out_steps_last_line_names_the_summarys_best(resumed, capsys):
    study, job = resumed
    assert best_note(job, study) == "best trial 13: held-out=3.5"
    for bars in (False, True):
        bar = ProgressBar("demo", bars=bars)
        step = Step("held_out", 2, bar)
        step.advance()
        step.advance(note=best_note(job, study))
        bar.close()
        err = capsys.readouterr().err
        last = err.replace("\r", "\n").strip().splitlines()[-1]
        if bars:
            assert re.fullmatch(r"held-out: 100%\|.*\| 2/2 \[00:00, best trial 13: "
                                r"held-out=3\.5\]", last), err
        else:
            assert re.fullmatch(r"evomerge: held-out 2/2 done \(\d\.\d s\): best trial 13: "
                                r"held-out=3\.5", last), err


def test_without_held_out_scores_the_bar_shows_none(resumed):
    study, _ = resumed
    for key in ("held_out:12", "held_out:13"):
        study.set_user_attr(key, {"error": "interrupted"})
    e: TrialFinished = Tracker(study, budget=20, done=14).finished(
        14, optuna.trial.TrialState.COMPLETE, [2.0], None, done=15)
    assert (e.best_trial, e.best_held_out) == (12, None)  # no held-out: the lower number
    assert "held-out" not in progress._trial_text(e, 0)


def test_an_open_bar_keeps_its_clock_running_without_events(monkeypatch, capsys):
    """Starting Ray sends 0/1, then nothing for ~30 s: the bar's clock still counts."""
    monkeypatch.setattr(progress, "TICK_S", 0.2)
    bar = ProgressBar("demo", bars=True)
    step = Step("ray", 1, bar)
    time.sleep(1.5)
    assert "0/1 [00:01]" in capsys.readouterr().err  # redrawn with no event since 0/1
    step.advance()
    bar.close()
    time.sleep(0.5)
    assert bar.ticker is None  # no bar open: the redrawing thread ended
    assert capsys.readouterr().err.replace("\r", "\n").strip().endswith("1/1 [00:01]")


def test_a_stored_job_this_version_cannot_read_shows_no_held_out(resumed):
    from evomerge.search.storage import JOB_ATTR

    study, _ = resumed
    job = dict(study.user_attrs[JOB_ATTR])
    study.set_user_attr(JOB_ATTR, {**job, "objectives": [{"metric": "a", "goal": "up"}]})
    e = Tracker(study, budget=20, done=14).finished(
        14, optuna.trial.TrialState.COMPLETE, [2.0], None, done=15)
    assert (e.best, e.best_trial, e.best_held_out) == (1.5, 12, None)  # the search goes on
