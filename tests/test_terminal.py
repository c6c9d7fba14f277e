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

import pytest
import yaml

from evomerge.runs.results import open_run
from evomerge.search import progress
from evomerge.search.progress import PhaseFinished, PhaseStarted, ProgressBar, Step, Tracker
from tests.test_search import job_dict

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
    assert re.search(r"tty: 100%\|.*\| 5/5 \[\d\d:\d\d, best=[0-9.]+ \(trial \d+\) "
                     r"evals/min=[0-9.]+ failed=0 eta=", screen), out
    assert re.search(r"eta=\d\d:\d\d", screen), out  # the steady-state ETA, once known
    assert "done: 5 trials, 0 failed" in out and "next:" in out
    assert "Token authentication" not in out and "Loading weights" not in out
    assert "evomerge: " not in out  # the log lines are for logs, not terminals
    study, _ = open_run(run_dir)
    timing = [t.user_attrs["timing"] for t in study.trials]
    assert all(t["queue_s"] >= 0 and t["merge_s"] > 0 and t["eval_s"] > 0 for t in timing)
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
        r"evomerge: held-out (\d+)/\1 done \(\d+\.\d s\)",
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
