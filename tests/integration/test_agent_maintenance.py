"""The agent's housekeeping (replication.maintenance, agent/steep_repl_agent/maintenance.py) with real agent
processes: conflict-log retention on every node (and the CLI's `conflicts purge`, with every bad input refused
and nothing deleted), and tombstone purging by the coordinator on a real 3-node mesh (PG 17 + 18 + 17) built by
site.yml, including the refusal when the agents' topology leaves out a node of the mesh."""
import json
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

import conflict_support as cs
import mesh
from agent_support import AgentProc, cli, make_configs, setup_extension, wait_for
from conftest import LAB_BASE
from steeplab import make_lab

INSERT = ("INSERT INTO steep_repl.conflict_log (subscription, table_schema, table_name, conflict_type, resolution, "
          "detected_at) SELECT 'sub', 'public', 't', 'UPDATE_UPDATE', %s, pg_catalog.now() - %s::interval "
          "FROM generate_series(1, %s)")


def count(node, where="true"):
    return node.sql("SELECT count(*)::int FROM steep_repl.conflict_log WHERE " + where)[0][0]


def start(tmp_path, lab, names=None, **maintenance):
    cfgs = make_configs(tmp_path, lab, names=names, extra={"maintenance": maintenance})
    return cfgs, {n: AgentProc(p, port, tmp_path / ("%s.log" % n)).start() for n, (p, port) in cfgs.items()}


def stop(agents):
    for a in agents.values():
        a.stop()


def metrics(agent):
    return {f.name: f for f in text_string_to_metric_families(agent.get("/metrics")[1])}


def events(agent):
    return [e for line in agent.lines() if line.get("msg") == "cycle" for e in line.get("events") or []]


def test_conflict_log_retention_by_the_agent_and_the_cli(lab_factory, tmp_path):
    lab = lab_factory(count=2, majors=(17, 18))
    setup_extension(lab)
    n1, n2 = lab.nodes
    n1.sql(INSERT, ("KEPT_LOCAL", "100 days", 5))      # old and decided: they go
    n1.sql(INSERT, ("PENDING", "100 days", 2))         # old but undecided: they stay
    n1.sql(INSERT, ("APPLIED_REMOTE", "1 day", 3))     # decided but young: they stay
    n1.sql(INSERT, ("KEPT_LOCAL", "100 days", 1))      # an old decision whose revert is still PENDING: both stay
    n1.sql(INSERT, ("PENDING", "100 days", 1))
    n1.sql("UPDATE steep_repl.conflict_log SET reverted_by = (SELECT max(id) FROM steep_repl.conflict_log) "
           "WHERE id = (SELECT max(id) - 1 FROM steep_repl.conflict_log)")
    n1.sql("UPDATE steep_repl.conflict_log SET reverts = id - 1 WHERE id = (SELECT max(id) FROM steep_repl.conflict_log)")
    n2.sql(INSERT, ("MERGED", "40 days", 2))
    assert count(n1) == 12
    cfg1 = make_configs(tmp_path / "cli", lab)["node1"][0]

    # the CLI, agent down: bad inputs are refused, named, and nothing is deleted (read back)
    r = cli(cfg1, "conflicts", "purge")
    assert r.returncode == 2 and "--older-than" in r.stderr
    for args, words in ((["--older-than", "soon"], "not a PostgreSQL interval"),
                        (["--older-than", "-1 day"], "0 or more"),
                        (["--older-than", "30d", "--batch-size", "0"], "batch_size must be 1 or more")):
        r = cli(cfg1, "conflicts", "purge", *args)
        assert r.returncode == 3 and words in r.stderr and "Fix:" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert count(n1) == 12
    assert n1.sql("SELECT count(*) FROM steep_repl.audit_log WHERE action = 'conflict_log.purge'") == [(0,)]

    # --dry-run: the exact count, nothing deleted
    r = cli(cfg1, "conflicts", "purge", "--older-than", "30d", "--dry-run")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["would_purge"] == 5 and out["changed"] is False and out["dry_run"] is True
    assert out["older_than"] == "2592000 seconds"
    assert count(n1) == 12
    assert n1.sql("SELECT count(*) FROM steep_repl.audit_log WHERE action = 'conflict_log.purge'") == [(0,)]

    # the agents purge with a retention of 30 days, one batch of 2 per cycle, each node its own log
    cfgs, agents = start(tmp_path / "agents", lab, conflict_log_retention="30d", batch_size=2)
    try:
        a1, a2 = agents["node1"], agents["node2"]
        assert wait_for(lambda: count(n1) == 7 and count(n2) == 0, 30), (count(n1), count(n2))
        assert count(n1, "resolution = 'PENDING'") == 3
        assert count(n1, "detected_at > now() - interval '2 days'") == 3
        assert count(n1, "reverted_by IS NOT NULL OR reverts IS NOT NULL") == 2
        assert n1.sql("SELECT array_agg((new_value->>'deleted')::int ORDER BY id) FROM steep_repl.audit_log "
                      "WHERE action = 'conflict_log.purge'") == [([2, 2, 1],)]
        st = a1.wait_status(lambda b: b["maintenance"]["conflict_log"]["purged_total"] == 5, 10)
        assert st, a1.get("/status")
        assert st["maintenance"]["conflict_log"]["enabled"] and st["maintenance"]["conflict_log"]["error"] is None
        assert st["maintenance"]["tombstones"]["enabled"] is False
        assert a2.wait_status(lambda b: b["maintenance"]["conflict_log"]["purged_total"] == 2, 10)
        assert "purged 2 conflict log entries older than 2592000 seconds" in events(a1)
        fams = metrics(a1)
        assert fams["steep_repl_conflict_log_purged"].samples[0].value == 5     # the parser drops "_total"
        assert [(x.labels["task"], x.value) for x in fams["steep_repl_maintenance_failing"].samples] == [("conflict_log", 0)]
        assert not fams["steep_repl_tombstone_purge_last_success_timestamp_seconds"].samples

        # the CLI through the agent (IPC): a purge, then a re-run that finds nothing (changed false)
        cfg1 = cfgs["node1"][0]
        n1.sql(INSERT, ("KEPT_LOCAL", "31 days", 1))
        r = cli(cfg1, "conflicts", "purge", "--older-than", "30 days")
        assert r.returncode == 0 and "not running" not in r.stderr, r.stderr
        out = json.loads(r.stdout)
        assert out["purged"] == 1 and out["changed"] is True and out["before"] == {"entries": 8}
        r = cli(cfg1, "conflicts", "purge", "--older-than", "30 days")
        assert json.loads(r.stdout)["changed"] is False and count(n1) == 7

        # a write the agent took but did not answer in time (it waits for a row lock) is not run a second time
        # against the database: the CLI says so, and the agent's own run completes once, when the lock goes
        n1.sql("INSERT INTO steep_repl.nodes (node_id, node_name, host, port) VALUES ('node9', 'node9', '127.0.0.1', 5999)")
        holder = n1.connect(autocommit=False)
        try:
            with holder.cursor() as cur:
                cur.execute("SELECT 1 FROM steep_repl.nodes WHERE node_id = 'node9' FOR UPDATE")
            r = cli(cfg1, "node", "remove", "node9", env={"STEEP_REPL_IPC_TIMEOUT": "2"})
            assert r.returncode == 3 and "it was not run again" in r.stderr and "Fix:" in r.stderr, r.stderr
            assert "answering from the database" not in r.stderr
        finally:
            holder.rollback()
            holder.close()
        assert wait_for(lambda: n1.sql("SELECT count(*) FROM steep_repl.nodes WHERE node_id = 'node9'") == [(0,)], 15)
        assert n1.sql("SELECT count(*) FROM steep_repl.audit_log WHERE action = 'node_removed' AND target_id = 'node9'") == [(1,)]
    finally:
        stop(agents)
    assert all("cycle failed" not in json.dumps(line) for a in agents.values() for line in a.lines())


# ----------------------------------------------------------------------------- tombstones
SETUP = ["CREATE TABLE public.t (id int PRIMARY KEY, v text)",
         "CREATE TABLE public.marker (id int PRIMARY KEY, v int)"]


@pytest.fixture(scope="module")
def meshlab():
    lab = make_lab(LAB_BASE / ("am" + uuid.uuid4().hex[:8]), 3, (17, 18))
    try:
        lab.inventory_path = mesh.build_mesh(lab, SETUP, {"steep_replicated_tables": ["public.t", "public.marker"]})
        lab.nodes[0].sql("INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(1, 30) g")
        mesh.wait_converged(lab, "SELECT count(*) FROM public.t")
        yield lab
    finally:
        lab.destroy()


def tombstones(node):
    return node.sql("SELECT count(*)::int FROM steep_repl.row_version WHERE deleted AND tbl = 'public.t'")[0][0]


def forget_last_purge(lab):
    """What the agents remember of earlier tests' purges (each node's coordinator_state)."""
    for n in lab.nodes:
        n.sql("DELETE FROM steep_repl.coordinator_state WHERE key = 'tombstone_purge'")


def coordinator_of(agents):
    def one():
        roles = [n for n, a in agents.items() if (a.get("/status")[1] or {}).get("role") == "coordinator"]
        return roles[0] if len(roles) == 1 else None
    return wait_for(one, 30)


def test_the_coordinator_purges_settled_tombstones_on_the_whole_mesh(meshlab, tmp_path):
    lab = meshlab
    n1, n2, n3 = lab.nodes
    forget_last_purge(lab)
    n2.sql("DELETE FROM public.t WHERE id BETWEEN 1 AND 10")
    cs.sync(lab)
    assert [tombstones(n) for n in lab.nodes] == [10, 10, 10]

    cfgs, agents = start(tmp_path / "a", lab, tombstone_purge_interval="1h", stall_timeout="20s")
    try:
        coord = coordinator_of(agents)
        assert coord, [a.get("/status")[1] for a in agents.values()]
        ca = agents[coord]
        st = ca.wait_status(lambda b: b["maintenance"]["tombstones"]["last_finished_at"], 90)
        assert st, ca.log_path.read_text()[-3000:]
        t = st["maintenance"]["tombstones"]
        assert t["error"] is None, t
        assert t["last_result"]["purged"] == {"node1": 10, "node2": 10, "node3": 10}
        assert set(t["last_result"]["horizons"]) == {"node1", "node2", "node3"}
        for n in lab.nodes:
            assert tombstones(n) == 0
            assert [h[0] for h in n.sql("SELECT node_id FROM steep_repl.tombstone_horizon ORDER BY 1")] == \
                ["node1", "node2", "node3"]
        for n in lab.nodes:                  # every node knows when the mesh was purged, and by whom
            rec = n.sql("SELECT value FROM steep_repl.coordinator_state WHERE key = 'tombstone_purge'")[0][0]
            assert rec["ok"] is True and rec["purged"]["node2"] == 10 and rec["by"] == coord
        fams = metrics(ca)
        assert fams["steep_repl_tombstone_purge_last_success_timestamp_seconds"].samples[0].value > time.time() - 120
        assert [(x.labels["task"], x.value) for x in fams["steep_repl_maintenance_failing"].samples] == [("tombstones", 0)]
        for name, a in agents.items():       # only the coordinator ran it
            if name != coord:
                assert a.get("/status")[1]["maintenance"]["tombstones"]["last_started_at"] is None
        # a restarted coordinator agent, or the one that takes over meanwhile, does not run it again before the
        # interval: it reads the last run from its own node
        ca.stop()
        agents[coord] = ca = AgentProc(cfgs[coord][0], cfgs[coord][1], tmp_path / "a" / ("%s.log" % coord)).start()
        assert ca.wait_status(lambda b: b.get("cycles", 0) >= 6, 30)
        assert coordinator_of(agents)
        started = [e for a in agents.values() for e in events(a) if e.startswith("tombstone purge started")]
        assert started == ["tombstone purge started (every 3600 seconds)"]
        assert [e for e in events(ca) if e.startswith("tombstone purge done")] == \
            ['tombstone purge done: purged {"node1": 10, "node2": 10, "node3": 10}']
    finally:
        stop(agents)

    # the purged keys are written again on two nodes at once (replication paused, so both inserts happen): the
    # mesh converges
    cs.pause(lab)
    n1.sql("INSERT INTO public.t VALUES (1, 'again on node1')")
    n3.sql("INSERT INTO public.t VALUES (1, 'again on node3'), (2, 'two on node3')")
    cs.resume(lab)
    rows = mesh.wait_converged(lab, "SELECT id, v FROM public.t WHERE id IN (1, 2) ORDER BY id")
    assert len(rows) == 2 and rows[1] == (2, "two on node3")
    assert any(cs.conflicts(n, "public.t") for n in lab.nodes)      # key 1: both inserts met, one won everywhere
    assert cs.apply_errors(lab) == {"node1": 0, "node2": 0, "node3": 0}
    mesh.assert_healthy(lab)


def test_agents_that_leave_out_a_mesh_node_purge_nothing(meshlab, tmp_path):
    """node3 replicates with both, but the agents know node1 and node2 only: the rounds would not cover
    node3's versions, so the run is refused, named, and nothing changes on any node."""
    lab = meshlab
    n1, n2, n3 = lab.nodes
    forget_last_purge(lab)
    n1.sql("DELETE FROM public.t WHERE id BETWEEN 20 AND 24")
    cs.sync(lab)
    before = [(tombstones(n), n.sql("SELECT node_id, horizon FROM steep_repl.tombstone_horizon ORDER BY 1"))
              for n in lab.nodes]
    assert [b[0] for b in before] == [5, 5, 5]
    cfgs, agents = start(tmp_path / "b", lab, names=["node1", "node2"], tombstone_purge_interval="1h")
    try:
        coord = coordinator_of(agents)
        assert coord
        st = agents[coord].wait_status(lambda b: b["maintenance"]["tombstones"]["error"], 60)
        assert st, agents[coord].log_path.read_text()[-3000:]
        err = st["maintenance"]["tombstones"]["error"]
        assert "node3" in err and "does not include" in err and "Fix:" in err, err
        assert any(e.startswith("tombstone purge failed") for e in events(agents[coord]))
        fams = metrics(agents[coord])
        assert [(x.labels["task"], x.value) for x in fams["steep_repl_maintenance_failing"].samples] == [("tombstones", 1)]
    finally:
        stop(agents)
    assert [(tombstones(n), n.sql("SELECT node_id, horizon FROM steep_repl.tombstone_horizon ORDER BY 1"))
            for n in lab.nodes] == before
    for n in (n1, n2):
        assert n.sql("SELECT value->>'ok' FROM steep_repl.coordinator_state WHERE key = 'tombstone_purge'") == [("false",)]
