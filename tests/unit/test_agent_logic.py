"""Coordinator election, alerts and Prometheus rendering: pure functions."""
import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from steep_repl_agent import alerts, election, metrics  # noqa: E402

PRIO = {"a": 100, "b": 90, "c": 80}


def round_(views, alive=None, mode="mesh", hub=None):
    """Every node votes from its view (set of nodes it can see incl. itself), then decides with the votes it can read."""
    alive = alive or set(views)
    votes = {n: election.choose_vote({m: PRIO[m] for m in views[n]}, mode, hub) for n in alive}
    out = {}
    for n in alive:
        peer_votes = {p: votes[p] for p in views[n] if p != n and p in alive}
        out[n] = election.decide(n, {m: PRIO[m] for m in views[n]}, peer_votes, len(PRIO), PRIO, mode, hub)
    return out


def coordinators(res):
    return sorted(n for n, d in res.items() if d["is_coordinator"])


def test_priority_sorting_and_ties():
    assert election.choose_vote({"b": 90, "a": 100, "c": 80}) == "a"
    assert election.choose_vote({"x": 50, "y": 50}) == "x"
    assert election.choose_vote({"a": 100, "c": 10}, mode="star", hub="c") == "c"
    assert election.choose_vote({}) is None


def test_quorum():
    assert [election.quorum_size(n) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 3, 3]


def test_all_healthy_highest_wins():
    full = {n: set(PRIO) for n in PRIO}
    res = round_(full)
    assert coordinators(res) == ["a"]
    assert res["b"]["coordinator"] == "a"


def test_coordinator_down_next_takes_over():
    res = round_({"b": {"b", "c"}, "c": {"b", "c"}}, alive={"b", "c"})
    assert coordinators(res) == ["b"]


def test_minority_never_coordinates():
    res = round_({"a": {"a"}, "b": {"b", "c"}, "c": {"b", "c"}})
    assert coordinators(res) == ["b"]


def test_two_nodes_survivor_self_promotes():
    prio = {"a": 100, "b": 90}
    d = election.decide("b", {"b": 90}, {}, 2, prio)
    assert d["is_coordinator"] and d["quorum"] == 1
    # both visible: only the higher one
    assert not election.decide("b", {"a": 100, "b": 90}, {"a": "a"}, 2, prio)["is_coordinator"]
    # asymmetric 2-node view: b sees itself only, but a's agent answers and claims -> b defers
    assert not election.decide("b", {"b": 90}, {"a": "a"}, 2, prio)["is_coordinator"]


def test_never_two_coordinators_among_majority_views():
    """Every combination of 3-node views (each node sees itself): at most one node holds a majority."""
    nodes = sorted(PRIO)
    pairs = list(itertools.combinations(nodes, 2))
    for links in itertools.product([False, True], repeat=len(pairs) * 2):
        sees = {n: {n} for n in nodes}
        for i, (x, y) in enumerate(pairs):
            if links[2 * i]:
                sees[x].add(y)
            if links[2 * i + 1]:
                sees[y].add(x)
        for mode, hub in (("mesh", None), ("star", "c")):
            assert len(coordinators(round_(sees, mode=mode, hub=hub))) <= 1


def test_startup_hold_votes_only_for_a_visible_coordinator():
    eligible = {"node1": 100, "node2": 90, "node3": 80}
    # not holding (grace over), or every peer's agent answered: the vote is free
    assert election.startup_eligible(eligible, [], ["node1"], False) == eligible
    assert election.startup_eligible(eligible, [], [], True) == eligible
    # holding with an unanswered peer: only visible claimers, never itself
    assert election.startup_eligible(eligible, ["node2"], ["node1"], True) == {"node2": 90}
    assert election.startup_eligible(eligible, [], ["node1"], True) == {}
    assert election.startup_eligible({"node3": 80}, ["node2"], ["node1"], True) == {}   # a claimer it cannot check
    # the decision on the held set: abstain, or follow the visible coordinator
    dec = election.decide("node3", {}, {"node2": "node2"}, 3, eligible)
    assert dec["vote"] is None and not dec["is_coordinator"]
    dec = election.decide("node3", {"node2": 90}, {"node2": "node2"}, 3, eligible)
    assert dec["vote"] == "node2" and dec["coordinator"] == "node2"


def test_star_hub_preferred():
    full = {n: set(PRIO) for n in PRIO}
    assert coordinators(round_(full, mode="star", hub="c")) == ["c"]
    res = round_({"a": {"a", "b"}, "b": {"a", "b"}}, alive={"a", "b"}, mode="star", hub="c")
    assert coordinators(res) == ["a"]


def test_peer_health_threshold():
    h = election.PeerHealth(3)
    assert not h.healthy
    assert h.record(True)
    assert h.record(False) and h.record(False)
    assert not h.record(False)
    assert h.record(True)


@pytest.mark.parametrize("value,rule,level", [
    (10, dict(warning=5, critical=20), "warning"),
    (25, dict(warning=5, critical=20), "critical"),
    (1, dict(warning=5, critical=20), "ok"),
    (None, dict(warning=5, critical=20), "ok"),
    (100, dict(warning=1000, critical=200, direction="below"), "critical"),
    (500, dict(warning=1000, critical=200, direction="below"), "warning"),
    (5000, dict(warning=1000, critical=200, direction="below"), "ok"),
    (3, dict(warning=None, critical=3), "critical"),
])
def test_alert_levels(value, rule, level):
    assert alerts.level_for(value, rule) == level


def test_evaluate_and_worst():
    rules = [dict(name="lag", metric="m", warning=5, critical=10, direction="above")]
    fired = alerts.evaluate(rules, {"m": [({"s": "x"}, 7), ({"s": "y"}, 11), ({"s": "z"}, 1)]})
    assert [(a["labels"]["s"], a["level"]) for a in fired] == [("x", "warning"), ("y", "critical")]
    assert alerts.worst(["ok", "warning", "critical"]) == "critical"
    assert alerts.worst([]) == "ok"


def test_metrics_render_parses():
    from prometheus_client.parser import text_string_to_metric_families
    snap = dict(node='n"1', status="degraded", role="coordinator", coordinator="n1", term=3, cycles=7,
                postgresql=dict(ok=True, extension="1.1"),
                subscriptions=[dict(name="s1", direction="incoming", peer="b", lag_bytes=10, lag_seconds=0.5, running=True),
                               dict(name="s2", direction="outgoing", lag_bytes=None, lag_seconds=None, wal_status="lost",
                                    safe_wal_size=None)],
                conflicts=dict(per_minute=1.0, pending=2, resolved_24h=3), ddl_queue=0,
                ranges=[dict(table_schema="public", table_name="orders", utilization_pct=87.5)],
                peers={"b": dict(healthy=False)}, nodes=[dict(node_id="n1", init_state="SYNCHRONIZED")],
                alerts=[dict(level="warning")], cycle_duration_seconds=0.01)
    fams = {f.name: f for f in text_string_to_metric_families(metrics.render(snap))}
    assert fams["steep_repl_health_status"].samples[0].value == 1
    assert fams["steep_repl_is_coordinator"].samples[0].value == 1
    assert fams["steep_repl_range_utilization_pct"].samples[0].labels["table"] == "public.orders"
    assert fams["steep_repl_agent_cycles"].samples[0].value == 7
    assert fams["steep_repl_up"].samples[0].labels["node"] == 'n"1'
