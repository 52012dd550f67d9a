"""Agent config validation: every bad input names its key; credentials never stored."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))

from steep_repl_agent import config as C  # noqa: E402


def base(**topo):
    t = {"this_node": {"name": "node_a", "priority": 100, "port": 5432},
         "nodes": [{"name": "node_b", "host": "b.example", "port": 5432, "priority": 90}]}
    t.update(topo)
    return {"replication": {"topology": t}}


def test_defaults_and_seed_shape():
    cfg = C.validate(base(health_check={"interval": "5s", "timeout": "10s", "unhealthy_threshold": 3}), environ={})
    assert cfg["mode"] == "mesh"
    assert cfg["health"] == {"interval": 5.0, "timeout": 10.0, "unhealthy_threshold": 3}
    assert cfg["agent"]["http_port"] == 5433
    assert cfg["this_node"]["agent_port"] == 5433
    assert cfg["lease"] == 16.0 and cfg["takeover_grace"] == 32.0
    assert cfg["election_timeout"] == 37.0
    assert {r["metric"] for r in cfg["rules"]} == set(C.METRICS)


@pytest.mark.parametrize("value,seconds", [("5s", 5), ("500ms", 0.5), ("1m", 60), (2, 2), ("1.5s", 1.5), ("2h", 7200),
                                           ("90d", 7776000)])
def test_durations(value, seconds):
    assert C.parse_duration(value, "k") == seconds


@pytest.mark.parametrize("mutate,key", [
    (lambda r: r["replication"]["topology"].update(mode="ring"), "replication.topology.mode"),
    (lambda r: r["replication"]["topology"].update(health_check={"interval": "5x"}), "replication.topology.health_check.interval"),
    (lambda r: r["replication"]["topology"].update(health_check={"timeout": 0}), "replication.topology.health_check.timeout"),
    (lambda r: r["replication"]["topology"].update(health_check={"unhealthy_threshold": 0}),
     "replication.topology.health_check.unhealthy_threshold"),
    (lambda r: r["replication"]["topology"].update(health_check={"intervall": "5s"}), "replication.topology.health_check.intervall"),
    (lambda r: r["replication"]["topology"]["this_node"].update(name="Node-A"), "replication.topology.this_node.name"),
    (lambda r: r["replication"]["topology"]["nodes"][0].update(port="x"), "replication.topology.nodes[0].port"),
    (lambda r: r["replication"]["topology"]["nodes"][0].update(name="node_a"), "replication.topology.nodes[0].name"),
    (lambda r: r["replication"]["topology"]["nodes"].append({"name": "node_c"}), "replication.topology.nodes[0].agent_port"),
    (lambda r: r["replication"]["topology"].update(hub="node_a"), "replication.topology.hub"),
    (lambda r: r["replication"].update(credentials={"node_a": {"password": "x"}}), "replication.credentials.node_a.password"),
    (lambda r: r["replication"].update(credentials={"node_z": {"password_env": "X"}}), "replication.credentials"),
    (lambda r: r["replication"].update(credentials={"node_a": {"password_env": "NOPE_NOT_SET"}}),
     "replication.credentials.node_a.password_env"),
    (lambda r: r["replication"].update(credentials={"node_a": {"user_env": "NOPE_NOT_SET"}}),
     "replication.credentials.node_a.user_env"),
    (lambda r: r["replication"].update(tls={"cert_file": "/etc/hostname"}), "replication.tls.key_file"),
    (lambda r: r["replication"].update(tls={"cert_file": "/nope.crt", "key_file": "/nope.key"}), "replication.tls.cert_file"),
    (lambda r: r["replication"].update(alerts={"rules": [{"name": "x", "metric": "nope", "warning": 1}]}),
     "replication.alerts.rules[0].metric"),
    (lambda r: r["replication"].update(alerts={"rules": [{"metric": "replication_lag_bytes", "warning": 10, "critical": 5}]}),
     "replication.alerts.rules[0].warning"),
    (lambda r: r["replication"].update(agent={"http_port": 70000}), "replication.agent.http_port"),
    (lambda r: r["replication"].update(bogus=1), "replication.bogus"),
    (lambda r: r["replication"].update(maintenance={"conflict_log_retention": "90 days"}),
     "replication.maintenance.conflict_log_retention"),
    (lambda r: r["replication"].update(maintenance={"tombstone_purge_interval": 0}),
     "replication.maintenance.tombstone_purge_interval"),
    (lambda r: r["replication"].update(maintenance={"batch_size": 0}), "replication.maintenance.batch_size"),
    (lambda r: r["replication"].update(maintenance={"stall_timeout": "soon"}), "replication.maintenance.stall_timeout"),
    (lambda r: r["replication"].update(maintenance={"retention": "90d"}), "replication.maintenance.retention"),
    (lambda r: r.pop("replication"), "replication"),
])
def test_bad_config_names_the_key(mutate, key):
    raw = base()
    mutate(raw)
    with pytest.raises(C.ConfigError) as exc:
        cfg = C.validate(raw, environ={})
        # password_env is checked when the password is resolved
        for n in C.all_nodes(cfg):
            C.resolve_password(cfg, n, environ={})
    assert key in str(exc.value)


def test_credentials_from_env_and_command(tmp_path):
    raw = base()
    raw["replication"]["credentials"] = {"node_a": {"password_env": "PW_A", "user_env": "USER_A"},
                                         "node_b": {"password_command": "printf 's3cret-b\\n'"}}
    cfg = C.validate(raw, environ={"USER_A": "alice", "PW_A": "s3cret-a"})
    env = {"USER_A": "alice", "PW_A": "s3cret-a"}
    a = C.conn_kwargs(cfg, cfg["this_node"], env)
    b = C.conn_kwargs(cfg, cfg["peers"][0], env)
    assert (a["user"], a["password"]) == ("alice", "s3cret-a")
    assert b["password"] == "s3cret-b" and b["host"] == "b.example"
    raw["replication"]["credentials"]["node_b"] = {"password_command": "false"}
    cfg = C.validate(raw, environ=env)
    with pytest.raises(C.ConfigError, match="password_command exited with 1"):
        C.conn_kwargs(cfg, cfg["peers"][0], env)


def test_load_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="cannot be read"):
        C.load(str(tmp_path / "missing.yml"))
    bad = tmp_path / "bad.yml"
    bad.write_text("replication: [\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(str(bad))


def test_star_hub_defaults_to_highest_priority():
    cfg = C.validate(base(mode="star"), environ={})
    assert cfg["hub"] == "node_a"


def test_maintenance_defaults_off_and_parsed():
    cfg = C.validate(base(), environ={})
    assert cfg["maintenance"] == {"conflict_log_retention": None, "tombstone_purge_interval": None,
                                  "batch_size": 10000, "stall_timeout": 60.0}
    raw = base()
    raw["replication"]["maintenance"] = {"conflict_log_retention": "90d", "tombstone_purge_interval": "6h",
                                         "batch_size": 500, "stall_timeout": "2m"}
    assert C.validate(raw, environ={})["maintenance"] == {"conflict_log_retention": 7776000.0,
                                                          "tombstone_purge_interval": 21600.0,
                                                          "batch_size": 500, "stall_timeout": 120.0}
    for off in ("", "off", None, False):
        raw["replication"]["maintenance"] = {"conflict_log_retention": off, "tombstone_purge_interval": off}
        m = C.validate(raw, environ={})["maintenance"]
        assert m["conflict_log_retention"] is None and m["tombstone_purge_interval"] is None


def test_tombstone_purge_needs_the_other_nodes():
    raw = base(nodes=[])
    raw["replication"]["maintenance"] = {"tombstone_purge_interval": "6h"}
    with pytest.raises(C.ConfigError) as exc:
        C.validate(raw, environ={})
    assert "replication.maintenance.tombstone_purge_interval" in str(exc.value) and "Fix:" in str(exc.value)
    raw["replication"]["maintenance"] = {"conflict_log_retention": "30d"}     # a node's own log: no peers needed
    assert C.validate(raw, environ={})["maintenance"]["conflict_log_retention"] == 2592000.0


def test_maintenance_mesh_specs_and_intervals():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / ".collections"))
    from steep_repl_agent import maintenance as M
    assert C.interval_text(2592000.0) == "2592000 seconds" and C.interval_text(1.5) == "1.5 seconds"
    raw = base()
    raw["replication"]["credentials"] = {"node_a": {"password_env": "PW_A"}, "node_b": {"user": "repl"}}
    cfg = C.validate(raw, environ={})
    specs = M.mesh_specs(cfg, environ={"PW_A": "secret-a", C.DEFAULT_PASSWORD_ENV: "secret-b"})
    assert [(s["node_id"], s["host"], s["port"], s["user"], s["password"]) for s in specs] == \
        [("node_a", "127.0.0.1", 5432, "postgres", "secret-a"), ("node_b", "b.example", 5432, "repl", "secret-b")]
    assert all(s["ssl_mode"] == "prefer" and s["database"] == "postgres" for s in specs)
