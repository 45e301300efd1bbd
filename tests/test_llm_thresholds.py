"""The false-hit bound: its math (pure) and its keeping in Redis by racing replicas.

The Redis tests run several `Thresholds` (each its own connection: a broker
replica each) against the test valkey and replay the script's serial order
through the pure `bound.decide`: a lost update, a move the evidence did not
allow or a Lua/Python disagreement fails the replay.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis

from services.llm_broker import bound, guard
from services.llm_broker.thresholds import KEY, VERSIONS, Thresholds
from shared.llm_config import DEFAULT_CONFIG, Config, check_rate
from shared.wilson import wilson_upper

DEFAULT = 0.6
RATE = 0.01

# --------------------------------------------------------------------------- pure math


def test_loosening_needs_hundreds_of_clean_checks_at_one_percent():
    assert bound.checks_to_loosen(0, 0.01) == 268
    assert wilson_upper(0, 268) <= 0.01 < wilson_upper(0, 267)
    assert bound.checks_to_loosen(1, 0.01) == 446
    assert bound.checks_to_loosen(0, 0.05) < bound.checks_to_loosen(0, 0.01)


def test_the_grid_halves_the_margin_and_ends_at_the_cap():
    g = bound.grid(0.6, guard.MAX_THRESHOLD)
    assert g[:4] == pytest.approx([0.6, 0.8, 0.9, 0.95])
    assert g[-1] == guard.MAX_THRESHOLD and all(a < b for a, b in zip(g, g[1:]))
    assert bound.grid(0.9995, guard.MAX_THRESHOLD) == [guard.MAX_THRESHOLD]


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, "x", float("nan"), None])
def test_a_bound_outside_zero_one_is_refused_with_a_clear_error(bad):
    with pytest.raises(ValueError, match="max_false_hit_rate"):
        check_rate(bad)


def test_config_carries_the_bound_and_refuses_a_bad_one(tmp_path):
    assert Config.load().max_false_hit_rate == 0.01
    text = DEFAULT_CONFIG.read_text().replace("max_false_hit_rate = 0.01", "max_false_hit_rate = 2.0")
    bad = tmp_path / "c.toml"
    bad.write_text(text)
    with pytest.raises(ValueError, match="max_false_hit_rate must be in"):
        Config.load(bad)


def test_a_wrong_hit_tightens_a_young_level_and_a_proven_level_tolerates_it():
    s, move = bound.decide(bound.State(), wrong=True, evidence=True, top=9, max_rate=RATE)
    assert (s, move) == (bound.State(level=1), "tightened")
    proven = bound.State(level=1, checks=2000, wrong=0)
    s, move = bound.decide(proven, wrong=True, evidence=True, top=9, max_rate=RATE)
    assert move == "" and (s.checks, s.wrong) == (2001, 1)


def test_loosening_happens_only_once_the_upper_bound_is_within_it():
    s = bound.State(level=2)
    for i in range(bound.checks_to_loosen(0, RATE) - 1):
        s, move = bound.decide(s, wrong=False, evidence=True, top=9, max_rate=RATE)
        assert move == "" and s.upper() > RATE
    s, move = bound.decide(s, wrong=False, evidence=True, top=9, max_rate=RATE)
    assert (s, move) == (bound.State(level=1), "loosened")
    # never below the fitted threshold: level 0 only gathers evidence
    s = bound.State(level=0, checks=5000)
    assert bound.decide(s, wrong=False, evidence=True, top=9, max_rate=RATE)[1] == ""


def test_which_verdicts_are_evidence_about_the_current_threshold():
    t = 0.9
    assert bound.counts(True, t, 0.95, 0.8)  # wrong and still served at t
    assert not bound.counts(True, t, 0.85, 0.8)  # wrong but t already refuses it
    assert bound.counts(False, t, 0.95, 0.9)  # right, served at t
    assert bound.counts(False, t, 0.95, 0.8)  # right, drawn from a wider population
    assert not bound.counts(False, t, 0.99, 0.95)  # right, from a tighter past: would flatter t
    assert bound.counts(True, t, None, None) and not bound.counts(False, t, None, None)


# --------------------------------------------------------------------------- Redis


async def replicas(url: str, n: int, rate: float = RATE):
    clients = [aioredis.from_url(url) for _ in range(n)]
    return clients, [Thresholds(c, DEFAULT, rate) for c in clients]


async def close(clients) -> None:
    for c in clients:
        await c.aclose()


def replay(verdicts_by_total, standings, top, rate=RATE):
    """Replay the script's serial order (total_checks numbers it) through bound.decide."""
    grid = bound.grid(DEFAULT, guard.MAX_THRESHOLD)
    state, version = bound.State(), 0
    for st in sorted(standings, key=lambda s: s.total_checks):
        wrong, score, served_at = verdicts_by_total[st.total_checks]
        evidence = bound.counts(wrong, grid[state.level], score, served_at)
        before = state
        state, move = bound.decide(state, wrong, evidence, top, rate)
        version += bool(move)
        assert (st.level, st.checks, st.wrong, st.move, st.version) == \
            (state.level, state.checks, state.wrong, move, version), st
        assert st.threshold == pytest.approx(grid[state.level])
        if move == "loosened":  # the guarantee: only on evidence within the bound
            assert wilson_upper(before.wrong, before.checks + 1) <= rate
            assert before.checks + 1 >= bound.checks_to_loosen(before.wrong, rate)
    return state


async def test_racing_replicas_never_loosen_past_the_bound(clean_redis):
    """8 replicas apply 1,500 verdicts of one partition at once: 3 % of the hits a
    threshold serves are wrong (above the 1 % bound), the rest right. Every
    verdict is applied exactly once in some serial order, every loosening had the
    evidence, and the partition ends tighter than where it started."""
    clients, reps = await replicas(clean_redis, 8)
    grid = reps[0].grid
    rng = random.Random(12)
    made: list[tuple[bool, float, float]] = []
    standings = []

    async def one(rep: Thresholds) -> None:
        for _ in range(1500 // len(reps)):
            at = rep.get("p")  # what this replica serves at now (it may be stale)
            wrong = rng.random() < 0.03
            score = at + (1 - at) * rng.random()
            st = await rep.record("p", wrong, tighten=True, score=score, served_at=at)
            made.append((st.total_checks, (wrong, score, at)))
            standings.append(st)
            if rng.random() < 0.05:
                await rep.load()

    try:
        await asyncio.gather(*(one(r) for r in reps))
        by_total = dict(made)
        assert sorted(by_total) == list(range(1, 1 + len(made)))  # none lost, none twice
        final = replay(by_total, standings, len(grid) - 1)
        assert final.level >= 1
        stored = await clients[0].hget(KEY, "p")
        assert float(stored) == pytest.approx(grid[final.level])
        for rep in reps:
            await rep.load()
            assert rep.get("p") == pytest.approx(grid[final.level])
    finally:
        await close(clients)


async def test_racing_replicas_loosen_a_partition_that_keeps_the_bound(clean_redis):
    """Clean checks at a tightened threshold bring it back down, one level per
    `checks_to_loosen(0)` checks, and never below the fitted threshold."""
    clients, reps = await replicas(clean_redis, 4)
    try:
        st = await reps[0].record("q", True, tighten=True, score=0.99, served_at=DEFAULT)
        st = await reps[1].record("q", True, tighten=True, score=0.99, served_at=DEFAULT)
        assert (st.level, st.move) == (2, "tightened")
        need = bound.checks_to_loosen(0, RATE)
        grid = reps[0].grid
        made, standings = {}, []

        async def clean(rep: Thresholds, n: int) -> None:
            for _ in range(n):
                await rep.load()
                at = rep.get("q")
                s = await rep.record("q", False, tighten=True, score=0.999, served_at=at)
                made[s.total_checks] = (False, 0.999, at)
                standings.append(s)

        await asyncio.gather(*(clean(r, (2 * need + 40) // 4) for r in reps))
        moves = [s.move for s in sorted(standings, key=lambda s: s.total_checks) if s.move]
        assert moves == ["loosened", "loosened"]
        assert await clients[0].hget(KEY, "q") is None  # back at the fitted threshold
        assert int(await clients[0].hget(VERSIONS, "q")) == 4
        for rep in reps:
            await rep.load()
            assert rep.get("q") == grid[0] == DEFAULT
    finally:
        await close(clients)


async def test_a_stale_replica_cannot_overwrite_a_tighter_threshold(clean_redis):
    """The old bug: replica B, still at the fitted threshold, used to write its own
    raise over A's higher one."""
    clients, (a, b) = await replicas(clean_redis, 2)
    try:
        await b.load()
        for _ in range(3):
            st = await a.record("p", True, tighten=True, score=0.9999, served_at=a.get("p"))
        assert st.level == 3 and b.get("p") == DEFAULT  # B has not reloaded
        st_b = await b.record("p", True, tighten=True, score=0.9999, served_at=DEFAULT)
        assert st_b.level == 4 and b.get("p") == pytest.approx(a.grid[4])
        assert float(await clients[0].hget(KEY, "p")) == pytest.approx(a.grid[4])
        # a right verdict of a hit B served at the old threshold that the new one refuses
        # is no evidence about the new one
        st_b = await b.record("p", False, tighten=True, score=0.7, served_at=DEFAULT)
        assert (st_b.level, st_b.checks) == (4, 0)
    finally:
        await close(clients)


async def test_a_reload_read_before_a_move_does_not_undo_it(clean_redis):
    clients, (a,) = await replicas(clean_redis, 1)
    try:
        await a.record("p", True, tighten=True, score=0.99, served_at=DEFAULT)
        raised = a.get("p")
        assert raised > DEFAULT
        snapshot = a._snapshot

        async def read_before_the_move(**_kw):
            return [[], []]

        a._snapshot = read_before_the_move
        try:
            await a.load()
        finally:
            a._snapshot = snapshot
        assert a.get("p") == raised
        await a.load()  # a current snapshot agrees
        assert a.get("p") == raised
    finally:
        await close(clients)


async def test_expired_counts_restart_from_the_stored_threshold_never_looser(clean_redis):
    clients, (a,) = await replicas(clean_redis, 1)
    try:
        await clients[0].hset(KEY, "old", "0.93")  # a threshold from before the grid
        st = await a.record("old", False, tighten=True, score=0.99, served_at=0.93)
        assert st.level == 3 and st.threshold == pytest.approx(0.95) and st.move == ""
        # an exact hit's verdict is counted but never moves the threshold
        st = await a.record("old", True, tighten=False)
        assert (st.level, st.move, st.total_checks, st.total_wrong) == (3, "", 2, 1)
    finally:
        await close(clients)


# --------------------------------------------------------------------------- audit.stats


async def test_audit_stats_report_the_bound_the_semantic_rate_and_the_tightest_partitions(
        clean_redis):
    from services.freshness_auditor import tally as tally_mod
    from shared.contract import PartitionBound

    client = aioredis.from_url(clean_redis)
    try:
        t = tally_mod.Tally(client, 0.05)
        for i in range(40):
            t.llm("lead_intent", "intent", "checked", "semantic")
        t.llm("lead_intent", "intent", "wrong", "semantic")
        t.llm("static", "reply", "checked", "exact")
        for i in range(tally_mod.PARTITIONS_REPORTED + 5):
            t.partition(f"p{i}", PartitionBound(threshold=DEFAULT, checks=i, max_false_hit_rate=0.02))
        t.partition("hot", PartitionBound(threshold=0.9, level=2, moves=2, max_false_hit_rate=0.02))
        t.partition("hot", PartitionBound(threshold=0.8, level=1, moves=1))  # older: ignored
        await t.flush()
        stats = await t.read()
        assert stats.max_false_hit_rate == 0.02
        sem = stats.llm_by_match["semantic"]
        assert (sem.checked, sem.wrong, sem.false_hit_rate) == (40, 1, 0.025)
        assert sem.upper_bound == pytest.approx(wilson_upper(1, 40), abs=1e-6)
        assert stats.llm_by_match["exact"].checked == 1
        assert stats.partitions_audited == tally_mod.PARTITIONS_REPORTED + 6
        assert stats.partitions_tightened == 1
        assert len(stats.partitions) == tally_mod.PARTITIONS_REPORTED
        assert next(iter(stats.partitions)) == "hot" and stats.partitions["hot"].level == 2
    finally:
        await client.aclose()


def test_the_demo_table_shows_the_semantic_rate_its_upper_bound_and_the_bound():
    from demo.results import _audit_lines

    audit = {"memory": {}, "max_false_hit_rate": 0.01, "partitions_tightened": 1,
             "partitions_audited": 7, "llm_by_match": {"semantic": {
                 "checked": 40, "wrong": 1, "false_hit_rate": 0.025, "upper_bound": 0.11}}}
    line, = [ln for ln in _audit_lines(audit) if ln.startswith("semantic false hits")]
    assert line.split(None, 3)[3] == ("2.5 % (1/40), 95 % upper bound 11.0 %; bound 1.0 %; "
                                      "partitions tightened 1/7")
    assert "n/a" in [ln for ln in _audit_lines({"memory": {}}) if ln.startswith("semantic")][0]
