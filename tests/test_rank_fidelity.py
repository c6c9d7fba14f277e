"""Rank fidelity: Kendall tau-b against hand-computed cases and scipy, tau from stored rungs,
and the ``fidelity: auto`` policy on synthetic score tables."""

from __future__ import annotations

import math
import random

import pytest
from optuna.trial import TrialState, create_trial

from evomerge.search.rank_fidelity import (
    AutoFidelity,
    Plan,
    fraction_taus,
    kendall_tau,
    rung_scores,
    study_taus,
    tau_b,
)


def test_tau_b_by_hand() -> None:
    # pairs of (1,2,3,4) vs (1,3,2,4): 5 concordant, 1 discordant -> (5 - 1) / 6
    assert tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # ties: x ties pair (1,2), y ties pair (1,3); 4 concordant -> 4 / sqrt(5 * 5)
    assert tau_b([1, 2, 2, 3], [1, 3, 2, 3]) == pytest.approx(0.8)
    assert tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(tau_b([1, 1, 1], [1, 2, 3]))  # one side constant: undefined
    with pytest.raises(ValueError, match="same length"):
        tau_b([1, 2], [1])


def test_tau_b_equals_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for n in (2, 5, 12, 40):
        x = [rng.choice([0.1, 0.2, 0.3, 0.5]) for _ in range(n)]  # many ties
        y = [xi + rng.choice([-0.1, 0.0, 0.1]) for xi in x]
        want = stats.kendalltau(x, y).statistic
        assert tau_b(x, y) == pytest.approx(want, nan_ok=True)
        assert kendall_tau(x, y) == pytest.approx(want, nan_ok=True)


def test_fraction_taus_pair_each_cheap_score_with_the_full_one() -> None:
    cands = [
        {0.25: (0.1,), 1.0: (0.2,)},
        {0.25: (0.3,), 1.0: (0.4,)},
        {0.25: (0.2,), 1.0: (0.5,)},
        {0.5: (0.7,), 1.0: (0.9,)},  # only a 0.5 score: not in the 0.25 pairs
        {0.25: (0.9,)},  # pruned: no full score, not counted
    ]
    out = fraction_taus(cands)
    assert [(t.fraction, t.n) for t in out] == [(0.25, 3)]  # 0.5 has 1 pair: no tau
    assert out[0].taus == (pytest.approx(tau_b([0.1, 0.3, 0.2], [0.2, 0.4, 0.5])),)


def test_study_taus_read_the_stored_rungs() -> None:
    trials = []
    for cheap, full in [(0.1, 0.2), (0.4, 0.3), (0.3, 0.5), (0.6, 0.7)]:
        rungs = [
            {"fraction": 0.25, "values": [cheap], "metrics": {}},
            {"fraction": 1.0, "values": [full], "metrics": {}},
        ]
        trials.append(create_trial(value=full, user_attrs={"rungs": rungs}))
    pruned = [{"fraction": 0.25, "values": [0.0], "metrics": {}}]
    trials.append(
        create_trial(
            value=None,
            state=TrialState.PRUNED,
            user_attrs={"rungs": pruned},
        )
    )
    trials.append(create_trial(value=1.0))  # one evaluation, no rungs
    assert rung_scores(trials[0].user_attrs["rungs"]) == {0.25: (0.1,), 1.0: (0.2,)}
    [t] = study_taus(trials)
    assert (t.fraction, t.n) == (0.25, 4)
    assert t.taus[0] == pytest.approx(tau_b([0.1, 0.4, 0.3, 0.6], [0.2, 0.3, 0.5, 0.7]))


FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def table(n: int, *, swaps: dict[float, int], seed: int = 0) -> list[dict[float, float]]:
    """``n`` candidates with distinct full scores; at each cheap fraction the full order with
    ``swaps[f]`` adjacent pairs swapped (-1: reversed), so its tau is known."""
    rng = random.Random(seed)
    full = sorted(rng.sample(range(1000), n))
    out: list[dict[float, float]] = [{1.0: float(s)} for s in full]
    for f in FRACTIONS[:-1]:
        order = list(range(n))
        if swaps[f] < 0:
            order.reverse()
        for k in range(max(swaps[f], 0)):
            i = (3 * k) % (n - 1)
            order[i], order[i + 1] = order[i + 1], order[i]
        for rank, i in enumerate(order):
            out[i][f] = float(rank)
    return out


def test_auto_fidelity_picks_the_smallest_fraction_over_the_threshold() -> None:
    probes = table(8, swaps={0.1: -1, 0.25: 1, 0.5: 0})  # tau: -1, 1 - 2/28, 1
    auto = AutoFidelity(FRACTIONS, threshold=0.8, warmup=8)
    for p in probes:
        assert auto.plan() == Plan(FRACTIONS, probe=True)  # warm-up: every fraction
        auto.observe({f: [v] for f, v in p.items()})
    assert auto.fraction == 0.25
    assert auto.plan() == Plan((0.25, 1.0), probe=False)
    taus = auto.history[-1]["taus"]
    assert taus["0.1"]["tau"] == [pytest.approx(-1.0)]
    assert taus["0.25"]["tau"] == [pytest.approx(1 - 2 / 28)] and taus["0.25"]["n"] == 8
    strict = AutoFidelity.replay(
        [{f: [v] for f, v in p.items()} for p in probes],
        fractions=FRACTIONS,
        threshold=0.95,
        warmup=8,
    )
    assert strict.fraction == 0.5  # 0.25's tau (0.93) is under 0.95
    none = AutoFidelity.replay(
        [{1.0: [v[1.0]], 0.5: [-v[1.0]]} for v in probes], fractions=FRACTIONS, warmup=8
    )
    assert none.fraction == 1.0 and none.plan() == Plan((1.0,), probe=False)


def test_auto_fidelity_rechecks_and_moves_up_when_ranking_gets_harder() -> None:
    auto = AutoFidelity(FRACTIONS, threshold=0.8, warmup=4, recheck_every=3)
    for p in table(4, swaps={0.1: -1, 0.25: 0, 0.5: 0}):
        auto.observe(p)
    assert auto.fraction == 0.25
    hard = table(4, swaps={0.1: -1, 0.25: -1, 0.5: 0}, seed=1)  # 0.25 now ranks backwards
    plans = []
    for p in hard:
        plans += [auto.plan() for _ in range(4)]  # 3 candidates at 0.25, then a probe
        assert plans[-1].probe and not any(x.probe for x in plans[-4:-1])
        auto.observe(p)
    assert all(x.rungs in {(0.25, 1.0), (0.5, 1.0), FRACTIONS} for x in plans)
    assert auto.fraction == 0.5  # the window (last 4 probes) are the hard ones
    assert [h["fraction"] for h in auto.history][0] == 0.25
    assert auto.history[-1]["probes"] == 8


def test_auto_fidelity_needs_every_objective_ranked() -> None:
    easy = table(6, swaps={0.1: 0, 0.25: 0, 0.5: 0})
    backwards = table(6, swaps={0.1: -1, 0.25: 0, 0.5: 0}, seed=2)
    auto = AutoFidelity(FRACTIONS, warmup=6)
    for a, b in zip(easy, backwards, strict=True):
        auto.observe({f: (a[f], b[f]) for f in FRACTIONS})
    assert auto.fraction == 0.25  # 0.1 ranks the second objective backwards


def test_auto_fidelity_keeps_probing_while_warm_up_probes_run() -> None:
    auto = AutoFidelity((0.25, 1.0), warmup=3)
    assert all(auto.plan().probe for _ in range(5))  # 5 workers asked before any finished
    for v in (0.1, 0.2, 0.3):
        auto.observe({0.25: v, 1.0: v})
    assert not auto.plan().probe


def test_auto_fidelity_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="end at 1.0 and hold a cheaper one"):
        AutoFidelity((1.0,))
    with pytest.raises(ValueError, match="warmup >= 3"):
        AutoFidelity((0.5, 1.0), warmup=2)
    with pytest.raises(ValueError, match="needs its full score"):
        AutoFidelity((0.5, 1.0)).observe({0.5: 1.0})


def test_a_resumed_run_replays_its_stored_probes() -> None:
    from evomerge.search.rank_fidelity import PROBE_ATTR, stored_probes

    probes = table(5, swaps={0.1: -1, 0.25: 0, 0.5: 0})
    trials = []
    for i, p in enumerate(probes):
        rungs = [{"fraction": f, "values": [p[f]], "metrics": {}} for f in FRACTIONS]
        t = create_trial(value=p[1.0], user_attrs={"rungs": rungs, PROBE_ATTR: True})
        t.number = 4 - i  # stored out of order: replayed in trial order
        trials.append(t)
    trials.append(create_trial(value=0.0, user_attrs={"rungs": rungs}))  # not a probe
    stored = stored_probes(trials)
    assert stored == [{f: (probes[4 - n][f],) for f in FRACTIONS} for n in range(5)]
    live = AutoFidelity(FRACTIONS, warmup=5)
    for p in stored:
        live.observe(p)
    again = AutoFidelity.replay(stored, fractions=FRACTIONS, warmup=5)
    assert again.fraction == live.fraction == 0.25 and again.history == live.history


def test_a_search_with_fidelity_auto_probes_then_uses_the_chosen_fraction(
    ray_local, search_suite, tmp_path
):
    """A real search (Ray, journal) with ``mode: auto``: the warm-up candidates are probes
    scored at every fraction and never pruned; after them the cheap rung is the chosen fraction
    (threshold -1: the smallest one passes), one probe follows every ``recheck_every``
    candidates, and the decision is stored where the summary reads it."""
    import math

    from optuna.trial import TrialState

    from evomerge.config import parse_job
    from evomerge.runs.summary import run_summary
    from evomerge.search.driver import run_search
    from evomerge.search.rank_fidelity import PROBE_ATTR, STUDY_ATTR
    from tests.test_search import job_dict

    fractions = [0.25, 0.5, 1.0]
    data = job_dict(search_suite, tmp_path / "run", trials=14, held_out_top_k=1,
                    sampler={"name": "random", "seed": 5},
                    fidelity={"mode": "auto", "fractions": fractions, "warmup": 4,
                              "recheck_every": 4, "threshold": -1.0})
    job = parse_job(data)
    study = run_search(job, progress=False)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert len(trials) == 14
    probes = [t for t in trials if t.user_attrs.get(PROBE_ATTR)]
    others = [t for t in trials if not t.user_attrs.get(PROBE_ATTR)]
    assert len(probes) >= 4 and others
    for t in probes:  # scored at every fraction, never pruned
        assert t.state == TrialState.COMPLETE
        assert [r["fraction"] for r in t.user_attrs["rungs"]] == fractions
        per = [r["metrics"]["scored/examples/entropy/" + search_suite["expert_tasks"][0]]
               for r in t.user_attrs["rungs"]]
        assert per == [math.ceil(f * 32) for f in fractions]  # limit 32: 8, 16, 32 examples
    first_other = others[0].number
    assert all(t.user_attrs.get(PROBE_ATTR) for t in trials[:4])  # the warm-up comes first
    for t in others:  # the chosen cheap rung (0.25), then the full one if promoted
        rungs = [r["fraction"] for r in t.user_attrs.get("rungs", [])]
        assert rungs in ([0.25], [0.25, 1.0]), (t.number, rungs)
        assert (t.state == TrialState.PRUNED) == (rungs == [0.25])
    assert any(t.state == TrialState.PRUNED for t in others)
    assert any(t.user_attrs.get(PROBE_ATTR) for t in trials if t.number > first_other)  # recheck
    state = study.user_attrs[STUDY_ATTR]
    assert state["fraction"] == 0.25 and len(state["history"]) == len(
        [t for t in probes if t.number >= 0]) - 3  # one decision per probe from the 4th on
    assert f"fidelity: auto chose 0.25 (after {len(probes)} probes" in " ".join(
        run_summary(study, job).split())
