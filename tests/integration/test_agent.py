"""Real steep-repl agents against real 2-node labs (PG 17 + 18): health, IPC, metrics, alerts, faults."""
import json
import os
import signal
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_support import AgentProc, cli, make_configs, setup_extension, wait_for

SEED_CHECKS = {"postgresql", "extension", "peer_connectivity", "replication_lag", "conflict_rate", "range_utilization"}


def start_agents(tmp_path, lab, **kw):
    cfgs = make_configs(tmp_path, lab, **kw)
    agents = {n: AgentProc(p, port, tmp_path / ("%s.log" % n)).start() for n, (p, port) in cfgs.items()}
    return cfgs, agents


def coordinator_everywhere(agents, name, timeout=30):
    return wait_for(lambda: all((a.get("/status")[1] or {}).get("coordinator") == name for a in agents.values()), timeout)


@pytest.fixture
def two(lab_factory, tmp_path):
    lab = lab_factory(count=2, majors=(17, 18))
    setup_extension(lab)
    cfgs, agents = start_agents(tmp_path, lab)
    yield lab, cfgs, agents
    for a in agents.values():
        a.stop()


def test_health_ipc_metrics_and_alerts(two):
    lab, cfgs, agents = two
    n1, n2 = lab.nodes
    a1, a2 = agents["node1"], agents["node2"]
    assert coordinator_everywhere(agents, "node1"), a2.log_path.read_text()[-2000:]

    # /health: seed 8.2 shape, 200; probes. Right after start a1 may still report a cycle in which node2's agent
    # had not answered yet (peer_connectivity: warning -> degraded, which is right): wait for a cycle that saw it.
    h = a1.wait_status(lambda b: b["status"] == "healthy", 15, path="/health")
    assert h, a1.get("/health")
    assert a1.get("/health")[0] == 200 and h["node"] == "node1"
    assert SEED_CHECKS <= set(h["checks"])
    assert h["checks"]["postgresql"] == "ok" and h["checks"]["extension"] == "ok" and h["checks"]["peer_connectivity"] == "ok"
    assert set(h["checks"]["replication_lag"]) >= {"status", "lag_bytes"}
    assert set(h["checks"]["conflict_rate"]) >= {"status", "per_minute"}
    assert "tables_above_80pct" in h["checks"]["range_utilization"]
    assert a1.get("/liveness")[0] == 200 and a1.get("/readiness")[0] == 200
    assert a1.get("/coordinator")[0] == 200 and a2.get("/coordinator")[0] == 503
    assert a1.get("/nope")[0] == 404

    # heartbeat + coordinator state in PostgreSQL
    row = n1.sql("SELECT status, now() - last_seen < interval '5 seconds' FROM steep_repl.nodes WHERE node_id = 'node1'")
    assert row == [("online", True)]
    for n in lab.nodes:
        assert wait_for(lambda: n.sql("SELECT value->>'node' FROM steep_repl.coordinator_state WHERE key = 'coordinator'")
                        == [("node1",)], 10)
        assert n.sql("SELECT node_id FROM steep_repl.nodes WHERE is_coordinator") == [("node1",)]

    # /metrics parsed by prometheus_client
    code, text = a1.get("/metrics")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("steep_repl_up", "steep_repl_replication_lag_bytes", "steep_repl_pending_conflicts",
                 "steep_repl_range_utilization_pct", "steep_repl_node_state", "steep_repl_is_coordinator",
                 "steep_repl_coordinator_info", "steep_repl_peer_up"):
        assert name in fams, name
    assert fams["steep_repl_is_coordinator"].samples[0].value == 1
    assert {s.labels["node_id"]: s.labels["state"] for s in fams["steep_repl_node_state"].samples} == \
        {"node1": "SYNCHRONIZED", "node2": "SYNCHRONIZED"}

    # IPC round trip (no fallback message), several commands
    r = cli(cfgs["node2"][0], "health", "--json")
    assert r.returncode == 0, r.stderr
    assert "not running" not in r.stderr
    hj = json.loads(r.stdout)
    assert hj["node"] == "node2" and hj["coordinator"] == "node1" and "source" not in hj
    r = cli(cfgs["node2"][0], "node", "status")
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data["peers"]["node1"]["healthy"] and {n["node_id"] for n in data["nodes"]} == {"node1", "node2"}
    assert json.loads(cli(cfgs["node1"][0], "init", "status").stdout)["nodes"][0]["init_state"] == "SYNCHRONIZED"
    assert cli(cfgs["node1"][0], "status").returncode == 0

    # replication lag per subscription: incoming on the subscriber (bytes against the publisher's LSN), outgoing slot
    for n in lab.nodes:
        n.sql("CREATE TABLE public.lagt (id int PRIMARY KEY)")
    n1.sql("CREATE PUBLICATION agent_pub FOR TABLE public.lagt")
    n2.sql("CREATE SUBSCRIPTION agent_sub CONNECTION '%s' PUBLICATION agent_pub" % n1.dsn())
    n1.sql("INSERT INTO public.lagt SELECT generate_series(1, 100)")
    s2 = a2.wait_status(lambda b: [x for x in b["subscriptions"] if x["name"] == "agent_sub" and x["running"]
                                   and x["lag_bytes"] is not None], 30)
    sub = [x for x in s2["subscriptions"] if x["name"] == "agent_sub"][0]
    assert sub["direction"] == "incoming" and sub["peer"] == "node1" and sub["lag_bytes"] >= 0
    s1 = a1.wait_status(lambda b: [x for x in b["subscriptions"] if x["name"] == "agent_sub" and x["direction"] == "outgoing"], 20)
    assert [x for x in s1["subscriptions"] if x["name"] == "agent_sub"][0]["wal_status"] == "reserved"
    fams = {f.name: f for f in text_string_to_metric_families(a2.get("/metrics")[1])}
    assert [x.labels for x in fams["steep_repl_replication_lag_bytes"].samples if x.labels["subscription"] == "agent_sub"]
    assert wait_for(lambda: n2.sql("SELECT count(*) FROM public.lagt") == [(100,)], 20)

    # alerts: pending conflicts, DDL queue depth, range utilisation on node2
    n2.sql("INSERT INTO steep_repl.conflict_log (subscription, table_schema, table_name, conflict_type, resolution) "
           "SELECT 'sub', 'public', 'orders', 'UPDATE_UPDATE', 'PENDING' FROM generate_series(1, 3)")
    n2.sql("INSERT INTO steep_repl.ddl_queue (origin_node, ddl_command, object_type, status) "
           "SELECT 'node1', 'ALTER TABLE t ADD c int', 'TABLE', 'PENDING' FROM generate_series(1, 6)")
    n2.sql("CREATE TABLE public.orders (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY)")
    n2.sql("INSERT INTO steep_repl.identity_ranges (table_schema, table_name, node_id, range_start, range_end) "
           "VALUES ('public', 'orders', 'node2', 1, 10)")
    n2.sql("INSERT INTO public.orders SELECT FROM generate_series(1, 9)")
    h = a2.wait_status(lambda b: b["checks"]["pending_conflicts"]["count"] == 3 and b["ranges"], 15)
    assert h, a2.get("/status")
    code, h = a2.get("/health")
    assert code == 200 and h["status"] == "degraded"
    assert h["checks"]["pending_conflicts"]["status"] == "warning"
    assert h["checks"]["ddl_queue"] == {"status": "warning", "depth": 6}
    assert h["checks"]["range_utilization"]["tables_above_80pct"] == ["orders"]
    assert h["checks"]["range_utilization"]["status"] == "warning"
    assert {a["name"] for a in h["alerts"]} >= {"pending_conflicts", "ddl_queue_depth", "range_exhaustion_warning"}
    fams = {f.name: f for f in text_string_to_metric_families(a2.get("/metrics")[1])}
    assert fams["steep_repl_pending_conflicts"].samples[0].value == 3
    assert fams["steep_repl_range_utilization_pct"].samples[0].value == 90.0
    r = cli(cfgs["node2"][0], "health")
    assert r.returncode == 1 and "pending_conflicts" in r.stdout
    r = cli(cfgs["node2"][0], "conflicts", "list", "--pending")
    assert len(json.loads(r.stdout)["conflicts"]) == 3

    # another owner's API (conflicts/ranges module_utils or the seed-named SQL): a clear error when it is missing,
    # and nothing changed
    r = cli(cfgs["node2"][0], "conflicts", "resolve", "1", "--resolution", "local")
    if r.returncode != 0:
        assert r.returncode == 3 and r.stderr.startswith("steep-repl: ") and "Traceback" not in r.stderr, r.stderr
        assert n2.sql("SELECT count(*) FROM steep_repl.conflict_log WHERE resolution = 'PENDING'") == [(3,)]
    r = cli(cfgs["node2"][0], "conflicts", "resolve", "1")
    assert r.returncode == 2 and "--resolution" in r.stderr
    has_alloc = n2.sql("SELECT count(*) FROM pg_proc WHERE proname = 'allocate_range'")[0][0]
    if not has_alloc:
        r = cli(cfgs["node2"][0], "range", "allocate", "public.orders")
        assert r.returncode == 3 and "steep_repl.allocate_range() does not exist" in r.stderr
        assert n2.sql("SELECT count(*) FROM steep_repl.identity_ranges") == [(1,)]
    r = cli(cfgs["node2"][0], "range", "status")
    assert r.returncode == 0 and json.loads(r.stdout)["ranges"][0]["utilization_pct"] == 90.0

    # node add / remove through the agent, audited
    r = cli(cfgs["node1"][0], "node", "add", "node9", "--host", "127.0.0.1", "--port", "5999", "--priority", "5")
    assert r.returncode == 0 and json.loads(r.stdout)["changed"]
    assert json.loads(cli(cfgs["node1"][0], "node", "add", "node9", "--host", "127.0.0.1", "--port", "5999",
                          "--priority", "5").stdout)["changed"] is False
    r = cli(cfgs["node1"][0], "node", "remove", "node1")
    assert r.returncode == 3 and "cannot be removed" in r.stderr
    assert json.loads(cli(cfgs["node1"][0], "node", "remove", "node9").stdout)["changed"]
    assert n1.sql("SELECT count(*) FROM steep_repl.nodes WHERE node_id = 'node9'") == [(0,)]
    assert n1.sql("SELECT array_agg(action ORDER BY id) FROM steep_repl.audit_log WHERE target_id = 'node9'")[0][0] == \
        ["node_added", "node_removed"]
    r = cli(cfgs["node1"][0], "node", "add", "Bad-Name")
    assert r.returncode == 3 and "not a valid identifier" in r.stderr

    # one JSON line per cycle, seed 8.6 shape, never the password
    assert a1.stop() == 0 and a2.stop() == 0
    for a in (a1, a2):
        lines = a.lines()
        text = a.log_path.read_text()
        assert "steep-lab-secret" not in text
        cycles = [line for line in lines if line.get("msg") == "cycle"]
        assert len(cycles) >= 3
        assert all({"level", "ts", "msg", "node", "status", "coordinator"} <= set(c) for c in cycles)
        assert lines[-1]["msg"] == "agent stopped"
        assert not os.path.exists(cfgs[a.log_path.stem][0].parent / ("%s.sock" % a.log_path.stem))
    assert any(c["level"] == "warn" for c in a2.lines() if c.get("msg") == "cycle")

    # agent down: the CLI answers from the database and says so
    r = cli(cfgs["node2"][0], "health", "--json")
    assert "agent is not running" in r.stderr and "answering from the database" in r.stderr
    hj = json.loads(r.stdout)
    assert hj["source"].startswith("database") and hj["checks"]["pending_conflicts"]["count"] == 3
    r = cli(cfgs["node2"][0], "conflicts", "list")
    assert r.returncode == 0 and "agent is not running" in r.stderr


def test_faults_db_down_agent_killed_bad_config(lab_factory, tmp_path):
    lab = lab_factory(count=2, majors=(18,))
    setup_extension(lab)
    cfgs, agents = start_agents(tmp_path, lab)
    a1, a2 = agents["node1"], agents["node2"]
    n1, n2 = lab.nodes
    try:
        assert coordinator_everywhere(agents, "node1")

        # database down: the agent keeps running and reports it
        n2.stop()
        assert wait_for(lambda: a2.get("/health")[0] == 503, 15)
        code, h = a2.get("/health")
        assert h["status"] == "unhealthy" and h["checks"]["postgresql"] == "critical"
        assert a2.get("/readiness")[0] == 503 and a2.get("/liveness")[0] == 200
        assert wait_for(lambda: a1.get("/health")[1]["checks"]["peer_connectivity"] == "warning", 15)
        assert a1.get("/status")[1]["role"] == "coordinator"
        assert a2.proc.poll() is None
        errs = wait_for(lambda: [c for c in a2.lines() if c.get("msg") == "cycle" and c["level"] == "error"
                                 and "unreachable" in c["postgresql"]], 10)
        assert errs and "Fix:" in errs[-1]["postgresql"] and "steep-lab-secret" not in json.dumps(errs)
        n2.start()
        assert wait_for(lambda: a2.get("/health")[0] == 200, 20)

        # peer agent killed (SIGKILL): the 2-node survivor self-promotes; the restarted agent takes over again
        a1.proc.send_signal(signal.SIGKILL)
        a1.proc.wait()
        assert a2.wait_status(lambda b: b["role"] == "coordinator", 15)
        assert n2.sql("SELECT value->>'node' FROM steep_repl.coordinator_state WHERE key = 'coordinator'") == [("node2",)]
        a1.start()  # stale socket of the killed agent is replaced
        assert a2.wait_status(lambda b: b["role"] == "follower" and b["coordinator"] == "node1", 20)
        assert a1.wait_status(lambda b: b["role"] == "coordinator", 10)
        assert a2.proc.poll() is None
    finally:
        for a in agents.values():
            a.stop()

    # bad config: error names the key, nothing started
    bad = tmp_path / "bad.yml"
    bad.write_text(cfgs["node1"][0].read_text().replace("interval: 0.5s", "interval: fast"))
    r = cli(bad, "agent", "run", timeout=30)
    assert r.returncode == 2 and "replication.topology.health_check.interval" in r.stderr
    r = cli(bad, "agent", "check-config")
    assert r.returncode == 2
    assert cli(cfgs["node1"][0], "agent", "check-config").returncode == 0


def test_supervisor_restarts_killed_agent(lab_factory, tmp_path):
    lab = lab_factory(count=1, majors=(18,))
    setup_extension(lab)
    cfgs = make_configs(tmp_path, lab)
    path, port = cfgs["node1"]
    pid_file = tmp_path / "agent.pid"
    log = tmp_path / "sup.log"
    from agent_support import agent_env
    import sys
    sup = subprocess.Popen([sys.executable, "-m", "steep_repl_agent", "--config", str(path), "agent", "supervise",
                            "--pid-file", str(pid_file), "--log-file", str(log)], env=agent_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = AgentProc(path, port, log)
    try:
        assert wait_for(lambda: probe.get("/liveness")[0] == 200, 20)
        child = int((tmp_path / "agent.pid.agent").read_text())
        os.kill(child, signal.SIGKILL)
        assert wait_for(lambda: (tmp_path / "agent.pid.agent").exists() and
                        int((tmp_path / "agent.pid.agent").read_text()) != child, 20)
        assert wait_for(lambda: probe.get("/liveness")[0] == 200, 20)
        assert any(line.get("msg") == "agent exited; restarting" for line in probe.lines())
    finally:
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(20) == 0
    assert not pid_file.exists()
    assert probe.get("/liveness") == (None, None)


def _healthy_coordinator(resp):
    code, body = resp
    return code == 200 and body["status"] == "healthy" and body["role"] == "coordinator"


def test_tls_http_api(lab_factory, tmp_path):
    lab = lab_factory(count=2, majors=(18,))
    setup_extension(lab)
    crt, key = tmp_path / "agent.crt", tmp_path / "agent.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    cfgs = make_configs(tmp_path, lab, extra={"tls": {"cert_file": str(crt), "key_file": str(key), "ca_file": str(crt)}})
    import ssl
    ctx = ssl.create_default_context(cafile=str(crt))
    agents = {n: AgentProc(p, port, tmp_path / ("%s.log" % n), scheme="https", ctx=ctx).start() for n, (p, port) in cfgs.items()}
    try:
        a1, a2 = agents["node1"], agents["node2"]
        # votes travel over HTTPS between the agents
        assert a2.wait_status(lambda b: b["peers"]["node1"]["agent"] == "ok" and b["coordinator"] == "node1", 20)
        # poll for the whole condition: one fetch right after the first 200 can still see the cycle before
        assert wait_for(lambda: _healthy_coordinator(a1.get("/health")), 30), a1.get("/health")
        plain = AgentProc(None, a1.port, tmp_path / "x.log")
        assert plain.get("/health") == (None, None)  # no plain HTTP on a TLS port
        assert a1.proc.poll() is None
    finally:
        for a in agents.values():
            a.stop()
