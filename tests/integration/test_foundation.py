"""Foundation: steep.repl.extension / node / info, the role and playbooks/steep_foundation.yml.

Real servers (lab_factory) and real ansible-playbook runs (run_playbook); no mocks.
Every bad input proves a message that names the problem and the fix AND, with a second
query, that nothing changed.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steeplab import free_port, wheel_pg_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def ext_version(node):
    rows = node.sql("SELECT extversion FROM pg_extension WHERE extname = 'steep_repl'")
    return rows[0][0] if rows else None


def registry(node):
    return node.sql("SELECT node_id, node_name, host, port, priority, is_local FROM steep_repl.nodes "
                    "ORDER BY node_id")


def audit(node):
    return node.sql("SELECT action, target_id FROM steep_repl.audit_log WHERE target_type = 'node' "
                    "AND action IN ('node_added', 'node_updated', 'node_removed') ORDER BY id")


def write_play(tmp_path, tasks, name="play.yml", hosts="steep_nodes"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump([{"name": "test play", "hosts": hosts, "gather_facts": False,
                                     "tasks": tasks}], sort_keys=False))
    return path


def conn_args(node, **over):
    args = {"login_host": node.host, "login_port": node.port, "login_user": node.user,
            "login_password": node.password, "login_db": node.database}
    args.update(over)
    return args


def one_message(res):
    msgs = res.failure_messages()
    assert res.rc != 0 and msgs, res.stdout[-3000:] + res.stderr[-3000:]
    return "\n".join(msgs)


# --------------------------------------------------------------------------- the acceptance run
@pytest.mark.parametrize("major", [17, 18])
def test_site_twice_changed_zero(lab_factory, playbook, tmp_path, major):
    """--check on a fresh lab changes nothing; site.yml installs; the second run reports changed=0."""
    lab = lab_factory(count=2, majors=(major,))
    inv = lab.write_inventory(tmp_path / "inventory.yml")
    n1, n2 = lab.nodes

    check = playbook("steep_foundation.yml", inv, check=True, diff=True)
    assert check.rc == 0, check.failure_messages() or check.stdout[-3000:]
    assert check.changed() > 0
    assert ext_version(n1) is None and ext_version(n2) is None  # check mode changed nothing

    first = playbook("site.yml", inv)
    assert first.rc == 0, first.failure_messages() or first.stdout[-3000:]
    assert first.changed() > 0
    for n in lab.nodes:
        assert ext_version(n) == "1.1"
        assert registry(n) == [
            ("node1", "node1", n1.host, n1.port, n1.priority, n is n1),
            ("node2", "node2", n2.host, n2.port, n2.priority, n is n2)]
        assert n.sql("SELECT steep_repl.local_node_id()") == [(n.name,)]
        assert audit(n) == [("node_added", "node1"), ("node_added", "node2")]

    second = playbook("site.yml", inv)
    assert second.rc == 0, second.failure_messages()
    assert second.changed() == 0, [(h, r.get("msg")) for h, r in second.task_results("") if r.get("changed")]
    again = playbook("steep_foundation.yml", inv, check=True, diff=True)
    assert again.rc == 0, again.failure_messages()
    assert again.changed() == 0, [(h, r.get("files"), r.get("queries")) for h, r in again.task_results("")
                                  if r.get("changed")]
    for n in lab.nodes:
        assert len(audit(n)) == 2  # no audit rows for no-op runs


def test_node_update_remove_and_check_mode(lab_factory, playbook, tmp_path):
    lab = lab_factory(count=1, majors=(18,))
    inv = lab.write_inventory(tmp_path / "inventory.yml")
    n1 = lab.nodes[0]
    assert playbook("steep_foundation.yml", inv).rc == 0
    peer = {"node_id": "node_x", "node_host": "10.9.9.9", "node_port": 5433, "priority": 10}

    task = {"name": "peer", "steep.repl.node": dict(conn_args(n1), **peer)}
    res = playbook(write_play(tmp_path, [task]), inv, check=True, diff=True)
    assert res.rc == 0 and res.changed() == 1
    assert [r for _h, r in res.task_results("peer")][0]["queries"]
    assert registry(n1) == [("node1", "node1", n1.host, n1.port, n1.priority, True)]  # nothing written

    assert playbook(write_play(tmp_path, [task]), inv).changed() == 1
    assert playbook(write_play(tmp_path, [task]), inv).changed() == 0
    task["steep.repl.node"]["priority"] = 20
    res = playbook(write_play(tmp_path, [task]), inv, diff=True)
    assert res.changed() == 1
    assert [r for _h, r in res.task_results("peer")][0]["changed_columns"] == ["priority"]
    assert ("node_x", "node_x", "10.9.9.9", 5433, 20, False) in registry(n1)

    gone = {"name": "gone", "steep.repl.node": dict(conn_args(n1), node_id="node_x", state="absent")}
    assert playbook(write_play(tmp_path, [gone]), inv).changed() == 1
    assert playbook(write_play(tmp_path, [gone]), inv).changed() == 0
    assert [r[0] for r in registry(n1)] == ["node1"]
    assert audit(n1)[-3:] == [("node_added", "node_x"), ("node_updated", "node_x"), ("node_removed", "node_x")]

    # the local node cannot be removed from its own database
    own = {"name": "own", "steep.repl.node": dict(conn_args(n1), node_id="node1", state="absent")}
    msg = one_message(playbook(write_play(tmp_path, [own]), inv))
    assert "own node" in msg and "Fix:" in msg
    assert [r[0] for r in registry(n1)] == ["node1"]

    # a second local node in one database is refused
    other = {"name": "other",
             "steep.repl.node": dict(conn_args(n1), node_id="node_y", node_host="10.0.0.2", is_local=True)}
    msg = one_message(playbook(write_play(tmp_path, [other]), inv))
    assert "already registered as node node1" in msg and "Fix:" in msg
    assert [r[0] for r in registry(n1)] == ["node1"]


def test_info_reports_state_read_only(lab_factory, playbook, tmp_path):
    lab = lab_factory(count=2, majors=(17, 18))
    inv = lab.write_inventory(tmp_path / "inventory.yml")
    n1 = lab.nodes[0]
    task = {"name": "info", "steep.repl.info": conn_args(n1), "register": "r"}
    res = playbook(write_play(tmp_path, [task], hosts="node1"), inv, check=True)
    assert res.rc == 0 and res.changed() == 0
    facts = res.task_results("info")[0][1]
    assert facts["extension"]["installed"] is False and facts["nodes"] == [] and facts["conflicts"] is None

    assert playbook("steep_foundation.yml", inv).rc == 0
    n1.sql("INSERT INTO steep_repl.conflict_log (subscription, table_schema, table_name, conflict_type, resolution) "
           "VALUES ('s', 'public', 't', 'update_exists', 'PENDING'), ('s', 'public', 't', 'update_exists', 'KEPT_LOCAL')")
    n1.sql("CREATE TABLE public.t (id int primary key)")
    n1.sql("CREATE PUBLICATION test_pub FOR TABLE public.t")
    res = playbook(write_play(tmp_path, [task], hosts="node1"), inv)
    assert res.rc == 0 and res.changed() == 0
    facts = res.task_results("info")[0][1]
    assert facts["extension"]["version"] == "1.1" and "1.0" in facts["extension"]["available_versions"]
    assert facts["server"]["major"] == 17 and facts["server"]["wal_level"] == "logical"
    assert facts["local_node_id"] == "node1"
    assert [n["node_id"] for n in facts["nodes"]] == ["node1", "node2"]
    assert facts["conflicts"] == {"pending": 1, "total": 2}
    assert facts["ddl_queue"] == {"pending": 0, "total": 0}
    assert {"name": "test_pub", "all_tables": False, "tables": ["public.t"]} in facts["publications"]
    assert facts["subscriptions"] == [] and isinstance(facts["replication_slots"], list)
    assert n1.password not in res.stdout


# --------------------------------------------------------------------------- bad input
def _inv_one(lab, tmp_path, **host_vars):
    return lab.write_inventory(tmp_path / "inventory.yml", host_vars={lab.nodes[0].name: host_vars})


def _nothing_installed(node):
    assert ext_version(node) is None
    assert node.sql("SELECT count(*) FROM pg_namespace WHERE nspname = 'steep_repl'") == [(0,)]


def test_pg_config_of_other_major_is_refused(lab_factory, playbook, tmp_path):
    lab = lab_factory(count=1, majors=(18,))
    inv = _inv_one(lab, tmp_path, steep_pg_config=wheel_pg_config(17))
    msg = one_message(playbook("steep_foundation.yml", inv))
    assert "belongs to PostgreSQL 17 but" in msg and "runs PostgreSQL 18" in msg
    assert "Fix: set steep_pg_config" in msg
    _nothing_installed(lab.nodes[0])


@pytest.mark.skipif(not os.path.exists("/usr/bin/pg_config"), reason="no system pg_config")
def test_pg_config_of_unsupported_major_is_refused(lab_factory, playbook, tmp_path):
    out = subprocess.run(["/usr/bin/pg_config", "--version"], capture_output=True, text=True, check=True).stdout
    major = int(out.split()[1].split(".")[0])
    if major in (17, 18):
        pytest.skip("system pg_config is a supported major")
    lab = lab_factory(count=1, majors=(18,))
    inv = _inv_one(lab, tmp_path, steep_pg_config="/usr/bin/pg_config")
    msg = one_message(playbook("steep_foundation.yml", inv))
    assert "major %d not supported" % major in msg and "Fix:" in msg
    _nothing_installed(lab.nodes[0])


def test_wal_level_replica_is_refused(lab_factory, playbook, tmp_path):
    lab = lab_factory(count=1, majors=(17,), conf={"wal_level": "replica"})
    inv = lab.write_inventory(tmp_path / "inventory.yml")
    msg = one_message(playbook("steep_foundation.yml", inv))
    assert "wal_level is 'replica'" in msg and "Fix: ALTER SYSTEM SET wal_level = logical" in msg
    _nothing_installed(lab.nodes[0])


def test_unreachable_server_is_reported(lab_factory, playbook, tmp_path):
    lab = lab_factory(count=1, majors=(18,))
    port = free_port()
    inv = _inv_one(lab, tmp_path, steep_pg_port=port)
    msg = one_message(playbook("steep_foundation.yml", inv))
    assert "unreachable" in msg and str(port) in msg and "Fix:" in msg
    _nothing_installed(lab.nodes[0])


def test_wrong_password_is_reported(lab_factory, playbook, tmp_path):
    lab = lab_factory(count=1, majors=(18,))
    inv = _inv_one(lab, tmp_path, steep_pg_password="not-the-password")
    res = playbook("steep_foundation.yml", inv)
    msg = one_message(res)
    assert "password authentication failed" in msg and "Fix: set steep_pg_password" in msg
    assert "not-the-password" not in res.stdout
    _nothing_installed(lab.nodes[0])


def test_invalid_node_id_is_refused(lab_factory, playbook, tmp_path):
    lab = lab_factory(count=1, majors=(18,))
    n1 = lab.nodes[0]
    inv = _inv_one(lab, tmp_path, steep_node_id="Node-1")
    msg = one_message(playbook("steep_foundation.yml", inv))
    assert "Node-1" in msg and "not valid" in msg and "Fix:" in msg
    _nothing_installed(n1)

    # the module refuses it too (extension installed, registry untouched)
    assert playbook("steep_foundation.yml", lab.write_inventory(tmp_path / "ok.yml")).rc == 0
    before = registry(n1), audit(n1)
    task = {"name": "bad id", "steep.repl.node": dict(conn_args(n1), node_id="Node-1", node_host="10.0.0.9")}
    msg = one_message(playbook(write_play(tmp_path, [task]), inv))
    assert "'Node-1' is not a valid identifier" in msg and "Fix:" in msg
    assert (registry(n1), audit(n1)) == before


# --------------------------------------------------------------------------- docs
@pytest.mark.parametrize("name", ["extension", "node", "info"])
def test_ansible_doc_renders(name):
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".collections"),
               ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    res = subprocess.run([str(BIN / "ansible-doc"), "steep.repl." + name], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "login_host" in res.stdout and "EXAMPLES" in res.stdout and "RETURN VALUES" in res.stdout
    assert "WARNING" not in res.stderr, res.stderr


def test_windows_tasks_pass_syntax_check_and_lint(tmp_path):
    """The Windows path cannot run here: it must at least pass --syntax-check and ansible-lint."""
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".collections"),
               ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    play = tmp_path / "windows.yml"
    play.write_text(yaml.safe_dump([{
        "name": "windows", "hosts": "all", "gather_facts": False,
        "vars": {"role_path": str(ROOT / "roles" / "extension")},
        "tasks": [{"name": "windows tasks", "ansible.builtin.import_tasks": str(ROOT / "roles/extension/tasks/Windows.yml")}],
    }]))
    res = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i", "winhost,", str(play)],
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([str(BIN / "ansible-lint"), "-q", "roles/extension", "playbooks/steep_foundation.yml"],
                         capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
