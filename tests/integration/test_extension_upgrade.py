"""Upgrade path of the steep_repl extension through steep.repl.extension: 1.0 -> latest loses nothing."""

import pytest
import yaml

TABLES = {  # table -> ORDER BY; the 1.0 columns are compared before/after
    "nodes": "node_id", "coordinator_state": "key", "audit_log": "id", "identity_ranges": "id",
    "conflict_log": "id", "ddl_queue": "id", "schema_fingerprints": "table_schema, table_name",
}
COLUMNS_1_0 = {
    "nodes": "node_id, node_name, host, port, priority, is_coordinator, last_seen, status",
    "coordinator_state": "key, value, updated_at",
    "audit_log": "id, occurred_at, action, actor, target_type, target_id, old_value, new_value, client_ip, success, "
                 "error_message",
    "identity_ranges": "id, table_schema, table_name, node_id, range_start, range_end, allocated_at, status",
    "conflict_log": "id, detected_at, subscription, table_schema, table_name, conflict_type, local_tuple, remote_tuple, "
                    "resolution",
    "ddl_queue": "id, captured_at, origin_node, ddl_command, object_type, status",
    "schema_fingerprints": "table_schema, table_name, fingerprint, column_count",
}


def play(tmp_path, node, delegate=False, **ext_args):
    args = {"login_host": node.host, "login_port": node.port, "login_user": node.user,
            "login_password": node.password, "login_db": node.database, "pg_config": node.pg_config}
    args.update(ext_args)
    task = {"name": "ext", "steep.repl.extension": args}
    if delegate:
        task["delegate_to"] = "localhost"
    path = tmp_path / "upgrade.yml"
    path.write_text(yaml.safe_dump([{"name": "extension", "hosts": "steep_nodes", "gather_facts": False,
                                     "tasks": [task]}]))
    return path


def snapshot(node):
    return {t: node.sql("SELECT %s FROM steep_repl.%s ORDER BY %s" % (COLUMNS_1_0[t], t, TABLES[t]))
            for t in TABLES}


def version(node):
    rows = node.sql("SELECT extversion FROM pg_extension WHERE extname = 'steep_repl'")
    return rows[0][0] if rows else None


@pytest.mark.parametrize("major", [17, 18])
def test_upgrade_1_0_to_latest_keeps_data(lab_factory, playbook, tmp_path, major):
    lab = lab_factory(count=1, majors=(major,))
    n = lab.nodes[0]
    inv = lab.write_inventory(tmp_path / "inventory.yml")

    res = playbook(play(tmp_path, n, version="1.0"), inv)
    assert res.rc == 0, res.failure_messages()
    assert version(n) == "1.0"
    r = res.task_results("ext")[0][1]
    assert r["version_before"] is None and r["version_after"] == "1.0"

    n.sql("INSERT INTO steep_repl.nodes (node_id, node_name, host, port, priority, is_coordinator, status) VALUES "
          "('node_a', 'A', '10.0.0.1', 5432, 100, true, 'online'), ('node_b', 'B', '10.0.0.2', 5433, 90, false, 'x')")
    n.sql("INSERT INTO steep_repl.coordinator_state (key, value) VALUES ('leader', '{\"node\": \"node_a\"}')")
    n.sql("INSERT INTO steep_repl.audit_log (action, actor, target_type, target_id, new_value) "
          "SELECT 'seed', 'test', 'row', g::text, jsonb_build_object('g', g) FROM generate_series(1, 50) g")
    n.sql("INSERT INTO steep_repl.identity_ranges (table_schema, table_name, node_id, range_start, range_end) "
          "VALUES ('public', 'orders', 'node_a', 1, 10000), ('public', 'orders', 'node_b', 10001, 20000)")
    n.sql("INSERT INTO steep_repl.conflict_log (subscription, table_schema, table_name, conflict_type, local_tuple, "
          "remote_tuple, resolution) VALUES ('sub', 'public', 'orders', 'update_exists', '{\"id\": 1}', "
          "'{\"id\": 1, \"v\": 2}', 'PENDING')")
    n.sql("INSERT INTO steep_repl.ddl_queue (origin_node, ddl_command, object_type, status) "
          "VALUES ('node_a', 'ALTER TABLE t ADD c int', 'table', 'PENDING')")
    n.sql("INSERT INTO steep_repl.schema_fingerprints (table_schema, table_name, fingerprint, column_count) "
          "VALUES ('public', 'orders', 'abc', 3)")
    before = snapshot(n)

    # --check of the whole foundation play on 1.0: no failure, nothing changed
    res = playbook("steep_foundation.yml", inv, check=True, diff=True)
    assert res.rc == 0 and res.changed() > 0, res.failure_messages()
    assert version(n) == "1.0" and snapshot(n) == before

    # --check: honest, changes nothing
    res = playbook(play(tmp_path, n, state="latest"), inv, check=True, diff=True)
    assert res.rc == 0 and res.changed() == 1
    r = res.task_results("ext")[0][1]
    assert r["version_before"] == "1.0" and r["version_after"] == "1.1"
    assert any("UPDATE TO '1.1'" in q for q in r["queries"])
    assert version(n) == "1.0"

    res = playbook(play(tmp_path, n, state="latest"), inv)
    assert res.rc == 0, res.failure_messages()
    assert version(n) == "1.1"
    assert snapshot(n) == before
    # the 1.1 objects work on the upgraded data
    assert n.sql("SELECT count(*) FROM steep_repl.nodes WHERE is_local") == [(0,)]
    assert n.sql("SELECT steep_repl.register_node('node_c', 'C', '10.0.0.3', 5432, 50, true)->>'changed'") == [("true",)]
    assert n.sql("SELECT steep_repl.local_node_id()") == [("node_c",)]

    res = playbook(play(tmp_path, n, state="latest"), inv)
    assert res.changed() == 0, res.task_results("ext")

    # going back is refused, naming the fix, and changes nothing
    res = playbook(play(tmp_path, n, version="1.0"), inv)
    msg = "\n".join(res.failure_messages())
    assert res.rc != 0 and "going back to 1.0 is not supported" in msg and "Fix:" in msg
    assert version(n) == "1.1"


def test_unknown_version_is_refused(lab_factory, playbook, tmp_path):
    lab = lab_factory(count=1, majors=(18,))
    n = lab.nodes[0]
    inv = lab.write_inventory(tmp_path / "inventory.yml")
    res = playbook(play(tmp_path, n, version="9.9"), inv)
    msg = "\n".join(res.failure_messages())
    assert res.rc != 0 and "version 9.9 is not available" in msg and "Fix:" in msg
    assert version(n) is None


def test_drop_extension(lab_factory, playbook, tmp_path):
    lab = lab_factory(count=1, majors=(17,))
    n = lab.nodes[0]
    inv = lab.write_inventory(tmp_path / "inventory.yml")
    assert playbook(play(tmp_path, n), inv).changed() == 1
    assert version(n) == "1.1"
    res = playbook(play(tmp_path, n, state="absent"), inv, check=True)
    assert res.changed() == 1 and version(n) == "1.1"
    assert playbook(play(tmp_path, n, state="absent"), inv).changed() == 1
    assert version(n) is None
    assert playbook(play(tmp_path, n, state="absent"), inv).changed() == 0

    # the database part alone, from the controller (how the Windows role runs it)
    res = playbook(play(tmp_path, n, delegate=True, install_files=False, state="latest"), inv)
    assert res.rc == 0 and res.changed() == 1, res.failure_messages()
    assert res.task_results("ext")[0][1]["files"] == [] and version(n) == "1.1"
