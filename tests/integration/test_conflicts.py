"""Conflict strategies, manual resolution, bulk resolution, revert and bad input on a real
2-node mesh (PG 17 + PG 18) built by the real site.yml; conflicts are made deterministic by
pausing the subscriptions while both nodes write."""
import json
import threading
import time
import uuid

import psycopg2
import pytest

import conflict_support as cs
import mesh
from conftest import LAB_BASE, run_playbook
from steeplab import make_lab

TABLES = ["lww", "fww", "np", "kl", "ar", "man", "bulk", "lk"]
SETUP = ["CREATE TABLE public.%s (id int PRIMARY KEY, v text, n int NOT NULL DEFAULT 0)" % t for t in TABLES] + [
    "CREATE TABLE public.nopk (id int, v text)", "CREATE TABLE public.marker (id int PRIMARY KEY, v int)",
    "CREATE TABLE public.tz (id int PRIMARY KEY, at timestamptz, b bytea)",
    "CREATE TABLE public.alt (id int PRIMARY KEY, v text, n int NOT NULL DEFAULT 0)"]
STRATEGIES = {
    "public.fww": "first_write_wins",
    "public.np": {"strategy": "node_priority", "priority": ["node2", "node1"]},
    "public.kl": "keep_local",
    "public.ar": "apply_remote",
    "public.man": "manual",
    "public.bulk": "manual",
    "public.alt": "manual",
}
GROUP_VARS = {"steep_replicated_tables": ["public.%s" % t for t in TABLES] + ["public.marker", "public.tz", "public.alt"],
              "steep_conflict_strategies": STRATEGIES}


@pytest.fixture(scope="module")
def lab():
    lab = make_lab(LAB_BASE / ("cf" + uuid.uuid4().hex[:8]), 2, (17, 18))
    try:
        lab.inventory_path = mesh.build_mesh(lab, SETUP, GROUP_VARS)
        for t in TABLES:
            lab.nodes[0].sql("INSERT INTO public.%s VALUES (1, 'base', 0), (2, 'base', 0), (3, 'base', 0)" % t)
        mesh.wait_converged(lab, "SELECT count(*) FROM public.bulk", timeout=30)
        yield lab
    finally:
        lab.destroy()


def conflicting(lab, statements):
    """Run {node_index: [sql, ...]} while replication is paused (node order = time order), then resume."""
    cs.pause(lab)
    try:
        for idx in sorted(statements):
            for q in statements[idx]:
                lab.nodes[idx].sql(q)
    finally:
        cs.resume(lab)
    cs.sync(lab)


def value(node, table, key=1):
    r = node.sql("SELECT v FROM public.%s WHERE id = %%s" % table, (key,))
    return r[0][0] if r else None


def healthy(lab):
    assert cs.apply_errors(lab) == {"node1": 0, "node2": 0}
    mesh.assert_healthy(lab)


# --------------------------------------------------------------------------- strategies
def test_last_write_wins_update_insert_delete(lab):
    n1, n2 = lab.nodes
    conflicting(lab, {0: ["UPDATE public.lww SET v = 'n1' WHERE id = 1",
                          "INSERT INTO public.lww VALUES (10, 'n1', 0)",
                          "UPDATE public.lww SET v = 'n1' WHERE id = 2"],
                      1: ["UPDATE public.lww SET v = 'n2' WHERE id = 1",
                          "INSERT INTO public.lww VALUES (10, 'n2', 0)",
                          "DELETE FROM public.lww WHERE id = 2"]})
    rows = mesh.wait_converged(lab, "SELECT id, v FROM public.lww ORDER BY id")
    assert rows == [(1, "n2"), (3, "base"), (10, "n2")]   # later write wins, delete beats the update
    for node, other in ((n1, "node2"), (n2, "node1")):
        logged = {(c["pk"], c["type"]): c for c in cs.conflicts(node, "public.lww")}
        assert set(logged) == {("[1]", "UPDATE_UPDATE"), ("[10]", "INSERT_INSERT"), ("[2]", "UPDATE_DELETE")}
        c = logged[("[1]", "UPDATE_UPDATE")]
        assert c["remote_origin"] == other and c["local_origin"] == node.name
        assert {c["local_tuple"]["v"], c["remote_tuple"]["v"]} == {"n1", "n2"}
        assert c["local_ts"] and c["remote_ts"] and c["origin_xid"]
        assert c["resolution"] == ("APPLIED_REMOTE" if node is n1 else "KEPT_LOCAL")
        assert c["strategy"] == "last_write_wins"
    healthy(lab)


def test_first_write_wins(lab):
    conflicting(lab, {0: ["UPDATE public.fww SET v = 'n1' WHERE id = 1"],
                      1: ["UPDATE public.fww SET v = 'n2' WHERE id = 1"]})
    assert mesh.wait_converged(lab, "SELECT v FROM public.fww WHERE id = 1") == [("n1",)]
    assert [c["resolution"] for c in cs.conflicts(lab.nodes[0], "public.fww")] == ["KEPT_LOCAL"]
    assert [c["resolution"] for c in cs.conflicts(lab.nodes[1], "public.fww")] == ["APPLIED_REMOTE"]
    healthy(lab)


def test_node_priority_list(lab):
    # node2 is first in the table's list: it wins although node1 wrote later (and has the higher nodes.priority)
    conflicting(lab, {1: ["UPDATE public.np SET v = 'n2' WHERE id = 1"],
                      0: ["UPDATE public.np SET v = 'n1' WHERE id = 1"]})
    assert mesh.wait_converged(lab, "SELECT v FROM public.np WHERE id = 1") == [("n2",)]
    assert [c["winner"] for c in cs.conflicts(lab.nodes[0], "public.np")] == ["remote"]
    healthy(lab)


def test_keep_local_and_apply_remote_diverge_as_documented(lab):
    n1, n2 = lab.nodes
    conflicting(lab, {0: ["UPDATE public.kl SET v = 'n1' WHERE id = 1", "UPDATE public.ar SET v = 'n1' WHERE id = 1"],
                      1: ["UPDATE public.kl SET v = 'n2' WHERE id = 1", "UPDATE public.ar SET v = 'n2' WHERE id = 1"]})
    assert (value(n1, "kl"), value(n2, "kl")) == ("n1", "n2")
    assert (value(n1, "ar"), value(n2, "ar")) == ("n2", "n1")
    assert [c["resolution"] for c in cs.conflicts(n1, "public.kl")] == ["KEPT_LOCAL"]
    assert [c["resolution"] for c in cs.conflicts(n2, "public.ar")] == ["APPLIED_REMOTE"]
    healthy(lab)


def test_playbook_warned_and_is_idempotent(lab):
    res = run_playbook("steep_conflicts.yml", lab.inventory_path)
    assert res.rc == 0 and res.changed() == 0, res.stdout[-3000:]
    warnings = [w for _host, r in res.task_results("Configure the conflict strategies") for w in r.get("warnings", [])]
    assert any("public.kl uses keep_local" in w for w in warnings), warnings
    assert any("public.ar uses apply_remote" in w for w in warnings), warnings
    assert any("public.man uses manual" in w for w in warnings), warnings
    # --check --diff of a change tells the truth and changes nothing
    gv = dict(GROUP_VARS, steep_conflict_default_strategy="first_write_wins")
    inv = lab.write_inventory(lab.root / "inv-check.yml", group_vars=gv)
    res = run_playbook("steep_conflicts.yml", inv, check=True, diff=True)
    assert res.rc == 0 and res.changed() == 2, res.stdout[-3000:]
    for _host, r in res.task_results("Configure the conflict strategies"):
        assert r["diff"]["after"]["default_strategy"] == "first_write_wins"
    for n in lab.nodes:
        assert n.sql("SELECT value FROM steep_repl.conflict_settings WHERE name = 'default_strategy'") == [
            ("last_write_wins",)]
        assert n.sql("SELECT strategy, priority FROM steep_repl.conflict_strategies "
                     "WHERE table_name = 'np'") == [("node_priority", ["node2", "node1"])]


# --------------------------------------------------------------------------- manual, bulk, revert
def resolve_task(lab, host, args, check=False):
    pb = lab.root / ("resolve-%s.yml" % uuid.uuid4().hex[:6])
    task = {"steep.repl.conflict": dict({
        "login_host": "{{ steep_pg_host }}", "login_port": "{{ steep_pg_port }}",
        "login_password": "{{ steep_pg_password }}", "login_db": "{{ steep_pg_database }}"}, **args),
        "name": "conflict task", "register": "out"}
    pb.write_text(json.dumps([{"hosts": host, "gather_facts": False, "tasks": [task]}]))
    return run_playbook(str(pb), lab.inventory_path, check=check)


def test_manual_resolve_converges(lab):
    n1, n2 = lab.nodes
    conflicting(lab, {0: ["UPDATE public.man SET v = 'n1' WHERE id = 1"],
                      1: ["UPDATE public.man SET v = 'n2', n = 7 WHERE id = 1"]})
    # manual keeps each local row and leaves the conflict PENDING on both nodes
    assert (value(n1, "man"), value(n2, "man")) == ("n1", "n2")
    pend1 = [c for c in cs.conflicts(n1, "public.man") if c["resolution"] == "PENDING"]
    pend2 = [c for c in cs.conflicts(n2, "public.man") if c["resolution"] == "PENDING"]
    assert len(pend1) == 1 and len(pend2) == 1
    assert pend1[0]["local_tuple"]["v"] == "n1" and pend1[0]["remote_tuple"] == {"id": 1, "v": "n2", "n": 7}
    cid = pend1[0]["id"]
    # check mode: nothing happens
    res = resolve_task(lab, "node1", {"state": "resolved", "conflict_id": cid, "resolution": "remote"}, check=True)
    assert res.rc == 0 and res.changed() == 1
    assert cs.conflicts(n1, "public.man")[-1]["resolution"] == "PENDING"
    # resolve on node1: take node2's row; it reaches node2 and both converge
    res = resolve_task(lab, "node1", {"state": "resolved", "conflict_id": cid, "resolution": "remote"})
    assert res.rc == 0 and res.changed() == 1, res.failure_messages()
    assert mesh.wait_converged(lab, "SELECT id, v, n FROM public.man ORDER BY id") == [
        (1, "n2", 7), (2, "base", 0), (3, "base", 0)]
    assert [c["resolution"] for c in cs.conflicts(n1, "public.man")] == ["APPLIED_REMOTE"]
    settled = cs.wait_for(lambda: [c for c in cs.conflicts(n2, "public.man") if c["resolution"] != "PENDING"],
                          what="node2 settles its pending conflict")
    assert settled[0]["resolution"] == "APPLIED_REMOTE" and settled[0]["resolved_by"] == "steep_repl:resolution@node1"
    assert n1.sql("SELECT count(*) FROM steep_repl.audit_log WHERE action = 'conflict.resolve' AND target_id = %s",
                  (str(cid),)) == [(1,)]
    # idempotent re-run
    res = resolve_task(lab, "node1", {"state": "resolved", "conflict_id": cid, "resolution": "remote"})
    assert res.rc == 0 and res.changed() == 0
    healthy(lab)


def test_manual_merge(lab):
    n1, n2 = lab.nodes
    conflicting(lab, {0: ["UPDATE public.man SET v = 'm1' WHERE id = 2"],
                      1: ["UPDATE public.man SET v = 'm2', n = 3 WHERE id = 2"]})
    pend = cs.wait_for(lambda: [c for c in cs.conflicts(n2, "public.man", "[2]") if c["resolution"] == "PENDING"],
                       timeout=20, what="a PENDING conflict on node2: node1 %r node2 %r rows %r/%r" % (
                           cs.conflicts(n1, "public.man", "[2]"), cs.conflicts(n2, "public.man", "[2]"),
                           cs.rows(n1, "public.man"), cs.rows(n2, "public.man")))
    cid = pend[0]["id"]
    assert n2.sql("SELECT steep_repl.resolve_conflict(%s, 'merge', %s::jsonb)",
                  (cid, json.dumps({"v": "merged"}))) == [("MERGED",)]
    assert mesh.wait_converged(lab, "SELECT id, v, n FROM public.man WHERE id = 2") == [(2, "merged", 3)]
    cs.wait_for(lambda: not [c for c in cs.conflicts(n1, "public.man", "[2]") if c["resolution"] == "PENDING"],
                what="node1 settles")
    healthy(lab)


def test_bulk_resolve_by_xid(lab):
    n1, n2 = lab.nodes
    conflicting(lab, {0: ["BEGIN; UPDATE public.bulk SET v = 'a1' WHERE id = 1; UPDATE public.bulk SET v = 'a2' "
                          "WHERE id = 2; UPDATE public.bulk SET v = 'a3' WHERE id = 3; COMMIT"],
                      1: ["UPDATE public.bulk SET v = 'b' || id"]})
    pend = [c for c in cs.conflicts(n2, "public.bulk") if c["resolution"] == "PENDING"]
    assert len(pend) == 3 and len({c["origin_xid"] for c in pend}) == 1
    xid = pend[0]["origin_xid"]
    res = resolve_task(lab, "node2", {"state": "resolved", "xid": xid, "resolution": "local"})
    assert res.rc == 0 and res.changed() == 1, res.failure_messages()
    assert [r["resolved"] for _host, r in res.task_results("conflict task")] == [3]
    assert mesh.wait_converged(lab, "SELECT id, v FROM public.bulk ORDER BY id") == [(1, "b1"), (2, "b2"), (3, "b3")]
    cs.wait_for(lambda: not [c for c in cs.conflicts(n1, "public.bulk") if c["resolution"] == "PENDING"],
                what="node1 settles")
    # nothing left: a re-run changes nothing
    res = resolve_task(lab, "node2", {"state": "resolved", "xid": xid, "resolution": "local"})
    assert res.rc == 0 and res.changed() == 0
    healthy(lab)


def test_revert_resolution(lab):
    n1, n2 = lab.nodes
    conflicting(lab, {0: ["UPDATE public.lww SET v = 'r1' WHERE id = 3"],
                      1: ["UPDATE public.lww SET v = 'r2' WHERE id = 3"]})
    assert mesh.wait_converged(lab, "SELECT v FROM public.lww WHERE id = 3") == [("r2",)]
    c = list(cs.conflicts(n1, "public.lww", "[3]"))[-1]
    assert c["resolution"] == "APPLIED_REMOTE"
    res = resolve_task(lab, "node1", {"state": "reverted", "conflict_id": c["id"], "reason": "wrong winner"})
    assert res.rc == 0 and res.changed() == 1, res.failure_messages()
    new_id = [r["new_conflict_id"] for _host, r in res.task_results("conflict task")][0]
    assert mesh.wait_converged(lab, "SELECT v FROM public.lww WHERE id = 3") == [("r1",)]
    rows = {r[0]: r[1:] for r in n1.sql("SELECT id, resolution, reverted_by, reverts, note FROM steep_repl.conflict_log "
                                        "WHERE id IN (%s, %s)", (c["id"], new_id))}
    assert rows[c["id"]][:2] == ("REVERTED", new_id)
    assert rows[new_id][0] == "KEPT_LOCAL" and rows[new_id][2] == c["id"] and "wrong winner" in rows[new_id][3]
    assert n1.sql("SELECT count(*) FROM steep_repl.audit_log WHERE action = 'conflict.revert'") == [(1,)]
    res = resolve_task(lab, "node1", {"state": "reverted", "conflict_id": c["id"]})
    assert res.rc == 0 and res.changed() == 0
    healthy(lab)


def test_revert_compares_rows_not_their_text(lab):
    """The apply worker wrote the resolution's row in the server's TimeZone; a revert from a session in another
    TimeZone and bytea_output sees the same values in a different text, and goes ahead."""
    n1 = lab.nodes[0]
    n1.sql("INSERT INTO public.tz VALUES (1, '2026-01-01 00:00+00', '\\x00ff')")
    mesh.wait_converged(lab, "SELECT count(*) FROM public.tz")
    conflicting(lab, {0: ["UPDATE public.tz SET at = '2026-03-01 10:00+00', b = '\\x0101' WHERE id = 1"],
                      1: ["UPDATE public.tz SET at = '2026-03-02 10:00+00', b = '\\x0202' WHERE id = 1"]})
    assert mesh.wait_converged(lab, "SELECT extract(epoch FROM at)::bigint, encode(b, 'hex') FROM public.tz") == [
        (1772445600, "0202")]
    c = cs.conflicts(n1, "public.tz")[-1]
    assert c["resolution"] == "APPLIED_REMOTE"
    conn = n1.connect()
    try:
        cur = conn.cursor()
        cur.execute("SET TimeZone = 'Asia/Kolkata'; SET bytea_output = 'escape'")
        cur.execute("SELECT steep_repl.revert_resolution(%s, 'tz')", (c["id"],))
        new_id = cur.fetchone()[0]
    finally:
        conn.close()
    assert mesh.wait_converged(lab, "SELECT extract(epoch FROM at)::bigint, encode(b, 'hex') FROM public.tz") == [
        (1772359200, "0101")]
    assert n1.sql("SELECT resolution, reverted_by FROM steep_repl.conflict_log WHERE id = %s", (c["id"],)) == [
        ("REVERTED", new_id)]
    healthy(lab)


def test_revert_refuses_when_the_row_changed_since(lab):
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.tz VALUES (2, '2026-01-01 00:00+00', '\\x00')")
    mesh.wait_converged(lab, "SELECT count(*) FROM public.tz")
    conflicting(lab, {0: ["UPDATE public.tz SET b = '\\x01' WHERE id = 2"],
                      1: ["UPDATE public.tz SET b = '\\x02' WHERE id = 2"]})
    assert mesh.wait_converged(lab, "SELECT encode(b, 'hex') FROM public.tz WHERE id = 2") == [("02",)]
    c = cs.conflicts(n1, "public.tz", "[2]")[-1]
    n2.sql("UPDATE public.tz SET b = '\\x03' WHERE id = 2")
    assert mesh.wait_converged(lab, "SELECT encode(b, 'hex') FROM public.tz WHERE id = 2") == [("03",)]
    before = state(n1)
    e = sql_error(n1, "SELECT steep_repl.revert_resolution(%s)", (c["id"],))
    assert "row of conflict %s changed after the resolution" % c["id"] in e.diag.message_primary
    assert "\\\\x03" in e.diag.message_detail and "nothing was changed" in e.diag.message_hint, e.diag.message_detail
    assert state(n1) == before
    assert mesh.wait_converged(lab, "SELECT encode(b, 'hex') FROM public.tz WHERE id = 2") == [("03",)]
    healthy(lab)


def test_rows_that_do_not_fit_the_table_are_refused_before_anything_is_written(lab):
    """A merged row with a misspelt column, a value of the wrong type or a NULL in a NOT NULL column, and a
    revert whose image no longer fits the table after ALTER TABLE: each is refused with the column named and
    the fix, and nothing changed (read back)."""
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.alt VALUES (1, '5', 0)")
    mesh.wait_converged(lab, "SELECT count(*) FROM public.alt")
    conflicting(lab, {0: ["UPDATE public.alt SET v = '12' WHERE id = 1"],
                      1: ["UPDATE public.alt SET v = 'x1' WHERE id = 1"]})
    cid = cs.wait_for(lambda: [c["id"] for c in cs.conflicts(n1, "public.alt") if c["resolution"] == "PENDING"],
                      what="a PENDING conflict on node1")[0]
    before, row = state(n1), n1.sql("SELECT * FROM public.alt")
    for merged, expected in (({"vv": "typo"}, "vv is not a column of the table"),
                             ({"n": "many"}, 'column n (integer): invalid input syntax for type integer: "many"'),
                             ({"n": None}, "column n (integer) is NOT NULL, the row has null")):
        e = sql_error(n1, "SELECT steep_repl.resolve_conflict(%s, 'merge', %s::jsonb)", (cid, json.dumps(merged)))
        assert "does not fit the table: " + expected in e.diag.message_primary, e.diag.message_primary
        assert "nothing was changed" in e.diag.message_hint and e.pgcode == "22023"
    res = resolve_task(lab, "node1", {"state": "resolved", "conflict_id": cid, "resolution": "merge",
                                      "merged": {"n": "many"}})
    assert res.rc != 0 and "invalid input syntax for type integer" in " ".join(res.failure_messages())
    assert state(n1) == before and n1.sql("SELECT * FROM public.alt") == row
    assert n1.sql("SELECT steep_repl.resolve_conflict(%s, 'local')", (cid,)) == [("KEPT_LOCAL",)]
    assert mesh.wait_converged(lab, "SELECT id, v FROM public.alt") == [(1, "12")]
    # the column's type changes on every node; reverting would write node2's 'x1' into an integer
    for n in lab.nodes:
        n.sql("ALTER TABLE public.alt ALTER COLUMN v TYPE int USING v::int")
    before, row = state(n1), n1.sql("SELECT * FROM public.alt")
    e = sql_error(n1, "SELECT steep_repl.revert_resolution(%s, 'after the type change')", (cid,))
    assert 'does not fit the table: column v (integer): invalid input syntax for type integer: "x1"' in \
        e.diag.message_primary, e.diag.message_primary
    assert "ALTER TABLE" in e.diag.message_hint and "nothing was changed" in e.diag.message_hint
    assert state(n1) == before and n1.sql("SELECT * FROM public.alt") == row == [(1, 12, 0)]
    n2.sql("UPDATE public.alt SET v = 13 WHERE id = 1")
    assert mesh.wait_converged(lab, "SELECT id, v FROM public.alt") == [(1, 13)]
    healthy(lab)


# --------------------------------------------------------------------------- what the module says on retryable errors
def test_retryable_errors_are_explained(lab):
    """A resolution that loses a deadlock or waits past lock_timeout was rolled back: the module's message says
    so and names the fix (a real 55P03 from the server)."""
    from ansible_collections.steep.repl.plugins.module_utils import conflicts as cu
    n1 = lab.nodes[0]
    hold = n1.connect(autocommit=False)
    hold.cursor().execute("LOCK TABLE public.lww IN ACCESS EXCLUSIVE MODE")
    try:
        conn = n1.connect()
        try:
            with pytest.raises(psycopg2.errors.LockNotAvailable) as err:
                conn.cursor().execute("SET lock_timeout = '100ms'; UPDATE public.lww SET v = 'x' WHERE id = 1")
        finally:
            conn.close()
    finally:
        hold.rollback()
        hold.close()
    msg = cu.explain_db_error(err.value)
    assert msg.startswith("canceling statement due to lock timeout. Fix: re-run the task, nothing was written"), msg
    assert value(n1, "lww") != "x"


# --------------------------------------------------------------------------- locking
SLEEP_TRIGGER = """CREATE OR REPLACE FUNCTION public.lk_sleep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.tbl = 'public.lk' THEN PERFORM pg_catalog.pg_sleep(2.5); END IF;
    RETURN NEW;
END $$"""


@pytest.mark.parametrize("target", [0, 1], ids=["apply-pg17", "apply-pg18"])
def test_local_write_loses_a_deadlock_that_closes_late(lab, target):
    """The three-node deadlock corner made deterministic: the apply worker holds a key's version and reaches the
    row only after the local UPDATE, which holds that row and waits for the version, made its first deadlock
    check (a REPLICA trigger on row_version sleeps 2.5 s in the apply worker after the version is locked). The
    local write must lose (40P01) and the apply worker go on: no apply error, the remote value everywhere."""
    origin, tgt = lab.nodes[1 - target], lab.nodes[target]
    key = 1 + target
    errors_before = cs.apply_errors(lab)
    tgt.sql(SLEEP_TRIGGER)
    tgt.sql("CREATE TRIGGER zz_lk_sleep BEFORE UPDATE ON steep_repl.row_version "
            "FOR EACH ROW EXECUTE FUNCTION public.lk_sleep()")
    tgt.sql("ALTER TABLE steep_repl.row_version ENABLE REPLICA TRIGGER zz_lk_sleep")
    outcome = []
    try:
        origin.sql("UPDATE public.lk SET v = 'remote' WHERE id = %s", (key,))
        cs.wait_for(lambda: tgt.sql("SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE wait_event = 'PgSleep' "
                                    "AND backend_type = 'logical replication apply worker'")[0][0] == 1,
                    timeout=30, what="the apply worker holding the version")

        def local_write():
            conn = tgt.connect()
            try:
                conn.cursor().execute("UPDATE public.lk SET v = 'local' WHERE id = %s", (key,))
                outcome.append("committed")
            except psycopg2.Error as exc:
                outcome.append(exc.pgcode)
            finally:
                conn.close()
        writer = threading.Thread(target=local_write)
        writer.start()
        writer.join(60)
    finally:
        tgt.sql("DROP TRIGGER IF EXISTS zz_lk_sleep ON steep_repl.row_version")
        tgt.sql("DROP FUNCTION IF EXISTS public.lk_sleep()")
    assert outcome == ["40P01"], outcome           # deadlock_detected: the local session was the victim
    cs.sync(lab)
    assert [value(n, "lk", key) for n in lab.nodes] == ["remote", "remote"]
    assert cs.apply_errors(lab) == errors_before, cs.server_errors(lab)
    mesh.assert_healthy(lab)


def test_local_write_waits_for_a_version_within_its_lock_timeout(lab):
    """A local UPDATE waiting for a version another transaction holds waits in rounds (a deadlock check each
    round) but keeps the caller's lock_timeout: it fails with 55P03 and writes nothing when the limit passes,
    and without a limit it waits as long as the holder holds (more than one round) and then writes. The
    session's lock_timeout is its own again afterwards."""
    for n in lab.nodes:
        before_version = n.sql("SELECT depth, ver_ts FROM steep_repl.row_version WHERE tbl = 'public.lk' AND pk = '[3]'")
        before_value = value(n, "lk", 3)
        hold = n.connect(autocommit=False)
        hold.cursor().execute("SELECT 1 FROM steep_repl.row_version WHERE tbl = 'public.lk' AND pk = '[3]' FOR UPDATE")
        try:
            conn = n.connect()
            try:
                cur = conn.cursor()
                cur.execute("SET lock_timeout = '300ms'")
                with pytest.raises(psycopg2.errors.LockNotAvailable) as err:
                    cur.execute("UPDATE public.lk SET v = 'limited' WHERE id = 3")
                assert "lock timeout" in str(err.value)
                cur.execute("SHOW lock_timeout")
                assert cur.fetchone() == ("300ms",)
            finally:
                conn.close()
            assert value(n, "lk", 3) == before_value
            assert n.sql("SELECT depth, ver_ts FROM steep_repl.row_version "
                         "WHERE tbl = 'public.lk' AND pk = '[3]'") == before_version
            done = []

            def patient():
                c = n.connect()
                try:
                    cur = c.cursor()
                    cur.execute("UPDATE public.lk SET v = %s WHERE id = 3", ("waited-" + n.name,))
                    cur.execute("SHOW lock_timeout")
                    done.append(cur.fetchone())
                finally:
                    c.close()
            writer = threading.Thread(target=patient)
            writer.start()
            time.sleep(2.5)          # longer than one wait round (1.5 s)
            assert writer.is_alive() and not done
        finally:
            hold.rollback()
            hold.close()
        writer.join(30)
        assert done == [("0",)]
        assert value(n, "lk", 3) == "waited-" + n.name
        cs.sync(lab)            # the write has reached the other node before that node's turn
    assert cs.apply_errors(lab) == {"node1": 0, "node2": 0}


# --------------------------------------------------------------------------- bad input
def sql_error(node, q, args=None):
    with pytest.raises(psycopg2.Error) as err:
        node.sql(q, args)
    return err.value


def state(node):
    return (node.sql("SELECT table_schema, table_name, strategy, priority FROM steep_repl.conflict_strategies ORDER BY 1, 2"),
            node.sql("SELECT value FROM steep_repl.conflict_settings"),
            node.sql("SELECT id, resolution, resolved_at FROM steep_repl.conflict_log ORDER BY id"),
            node.sql("SELECT count(*) FROM steep_repl.audit_log"),
            node.sql("SELECT tbl FROM steep_repl.conflict_tables ORDER BY 1"))


def test_bad_input_sql(lab):
    n1 = lab.nodes[0]
    before = state(n1)
    e = sql_error(n1, "SELECT steep_repl.set_conflict_strategy('public.lww', 'newest_wins')")
    assert "unknown conflict strategy 'newest_wins'" in e.diag.message_primary and "last_write_wins" in e.diag.message_hint
    e = sql_error(n1, "SELECT steep_repl.set_conflict_strategy('public.np', 'node_priority', ARRAY['node1', 'node9'])")
    assert "unknown node(s): node9" in e.diag.message_primary and "node1, node2" in e.diag.message_hint
    e = sql_error(n1, "SELECT steep_repl.resolve_conflict(999999, 'local')")
    assert "conflict 999999 does not exist" in e.diag.message_primary
    pending = [c for c in cs.conflicts(n1) if c["resolution"] == "PENDING"]
    target = pending[0]["id"] if pending else cs.conflicts(n1)[0]["id"]
    e = sql_error(n1, "SELECT steep_repl.resolve_conflict(%s, 'merge')", (target,))
    assert "merge needs the merged row" in e.diag.message_primary or "is not pending" in e.diag.message_primary
    e = sql_error(n1, "SELECT steep_repl.resolve_conflict(%s, 'theirs')", (target,))
    assert "unknown resolution 'theirs'" in e.diag.message_primary
    e = sql_error(n1, "SELECT steep_repl.enable_table('public.nopk'::regclass)")
    assert "has no primary key" in e.diag.message_primary and "ADD PRIMARY KEY" in e.diag.message_hint
    e = sql_error(n1, "SELECT steep_repl.resolve_conflicts_bulk('merge', 1)")
    assert "bulk resolution must be local or remote" in e.diag.message_primary
    e = sql_error(n1, "SELECT steep_repl.revert_resolution(999999)")
    assert "does not exist" in e.diag.message_primary
    assert state(n1) == before                      # nothing changed
    assert n1.sql("SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = 'public.nopk'::regclass") == [(0,)]


def test_bad_input_module(lab):
    n1 = lab.nodes[0]
    before = state(n1)
    cases = [
        ({"state": "configured", "strategies": {"public.lww": "newest_wins"}}, "unknown conflict strategy 'newest_wins'"),
        ({"state": "configured", "strategies": {"public.np": {"strategy": "node_priority", "priority": ["nodeX"]}}},
         "unknown node(s) nodeX"),
        ({"state": "configured", "strategies": {"public.nosuch": "manual"}}, "do not exist here: public.nosuch"),
        ({"state": "resolved", "conflict_id": 999999, "resolution": "local"}, "conflict 999999 does not exist"),
        ({"state": "resolved", "conflict_id": 1, "resolution": "merge"}, "merge needs the merged row"),
        ({"state": "resolved", "resolution": "local"}, "needs a filter"),
        ({"state": "reverted", "conflict_id": 999999}, "conflict 999999 does not exist"),
    ]
    for args, expected in cases:
        res = resolve_task(lab, "node1", args)
        msgs = " ".join(res.failure_messages())
        assert res.rc != 0 and expected in msgs, (args, msgs)
    assert state(n1) == before


# --------------------------------------------------------------------------- module code in process
def run_module(node, args, check=False):
    """Run plugins/modules/conflict.py main() in this process against the real server (coverage)."""
    import contextlib
    import io
    from ansible.module_utils import basic
    from ansible_collections.steep.repl.plugins.modules import conflict
    full = dict(login_host=node.host, login_port=node.port, login_user=node.user, login_password=node.password,
                login_db=node.database, _ansible_check_mode=check, _ansible_diff=True, **args)
    basic._ANSIBLE_ARGS = json.dumps({"ANSIBLE_MODULE_ARGS": full}).encode()
    basic._ANSIBLE_PROFILE = "legacy"
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            conflict.main()
    except SystemExit:
        pass
    finally:
        basic._ANSIBLE_ARGS = None
    return json.loads(out.getvalue())


def test_module_in_process(lab):
    from ansible_collections.steep.repl.plugins.module_utils import conflicts as cu
    from ansible_collections.steep.repl.plugins.module_utils import db
    n1 = lab.nodes[0]
    same = run_module(n1, {"default_strategy": "last_write_wins", "strategies": STRATEGIES})
    assert same["changed"] is False and same["queries"] == [] and same["diff"]["before"] == same["diff"]["after"]
    r = run_module(n1, {"default_strategy": "node_priority", "strategies": STRATEGIES}, check=True)
    assert r["changed"] is True and "set_conflict_strategy(NULL, 'node_priority'" in r["queries"][0]
    assert n1.sql("SELECT value FROM steep_repl.conflict_settings WHERE name = 'default_strategy'") == [("last_write_wins",)]
    r = run_module(n1, {"strategies": {"lww": "last_write_wins"}, "purge": False})
    assert r["changed"] is True and r["after"]["tables"]["public.lww"]["strategy"] == "last_write_wins"
    r = run_module(n1, {"strategies": STRATEGIES})
    assert r["changed"] is True and "public.lww" not in r["after"]["tables"]
    assert any("clear_conflict_strategy" in q for q in r["queries"])
    r = run_module(n1, {"state": "resolved", "conflict_id": 999999, "resolution": "remote"})
    assert r["failed"] and "does not exist" in r["msg"]
    r = run_module(n1, {"state": "resolved", "table": "public.man", "resolution": "merge"})
    assert r["failed"] and "bulk resolution must be local or remote" in r["msg"]
    r = run_module(n1, {"state": "resolved", "table": "public.man", "resolution": "local",
                        "time_start": "2000-01-01T00:00:00Z", "time_end": "2000-01-02T00:00:00Z"})
    assert r["changed"] is False and r["resolved"] == 0
    done = [c for c in cs.conflicts(n1, "public.lww") if c["resolution"] == "KEPT_LOCAL"][0]
    r = run_module(n1, {"state": "resolved", "conflict_id": done["id"], "resolution": "remote"})
    assert r["failed"] and "already resolved" in r["msg"]
    r = run_module(n1, {"state": "reverted", "conflict_id": done["id"]}, check=True)
    assert r["changed"] is True and "revert_resolution" in r["queries"][0]
    assert [c["resolution"] for c in cs.conflicts(n1, "public.lww") if c["id"] == done["id"]] == ["KEPT_LOCAL"]
    conflicting(lab, {0: ["UPDATE public.man SET v = 'p1' WHERE id = 3"], 1: ["UPDATE public.man SET v = 'p2' WHERE id = 3"]})
    pend = [c for c in cs.conflicts(n1, "public.man", "[3]") if c["resolution"] == "PENDING"][0]
    r = run_module(n1, {"state": "reverted", "conflict_id": pend["id"]})
    assert r["failed"] and "cannot be reverted: its resolution is PENDING" in r["msg"] and "Fix: resolve it" in r["msg"]
    r = run_module(n1, {"state": "resolved", "conflict_id": pend["id"], "resolution": "merge", "merged": {"id": 99}})
    assert r["failed"] and "changes the primary key" in r["msg"] and "nothing was changed" in r["msg"]
    r = run_module(n1, {"state": "resolved", "conflict_id": pend["id"], "resolution": "local"})
    assert r["changed"] is True and r["conflict"]["resolution"] == "KEPT_LOCAL"
    assert mesh.wait_converged(lab, "SELECT v FROM public.man WHERE id = 3") == [("p1",)]
    conn = db.connect(db.conn_params_from(dict(login_host=n1.host, login_port=n1.port, login_user=n1.user,
                                               login_password=n1.password, login_db=n1.database)))
    try:
        listed = cu.list_conflicts(conn, resolution=None, table="public.lww", limit=5)
        assert listed and all(c["table_name"] == "lww" for c in listed)
        assert isinstance(listed[0]["detected_at"], str)
        assert cu.current_configuration(conn)["tables"]["public.np"] == {
            "strategy": "node_priority", "priority": ["node2", "node1"]}
    finally:
        conn.close()


# --------------------------------------------------------------------------- conflict log retention
def test_conflict_log_retention(lab):
    """state=purged deletes a node's decided conflict_log entries older than older_than: PENDING entries stay,
    and so does a revert chain with a young member. Check mode counts exactly and deletes nothing; a re-run
    is changed=0; bad input is refused with nothing deleted (second queries). Runs last in this file: it
    deletes conflict history of node1."""
    n1, n2 = lab.nodes
    conflicting(lab, {0: ["UPDATE public.lww SET v = 'r1' WHERE id IN (2, 3)", "UPDATE public.man SET v = 'r1' WHERE id = 2"],
                      1: ["UPDATE public.lww SET v = 'r2' WHERE id IN (2, 3)", "UPDATE public.man SET v = 'r2' WHERE id = 2"]})
    decided = [c for c in cs.conflicts(n1, "public.lww") if c["resolution"] in ("KEPT_LOCAL", "APPLIED_REMOTE")]
    pending = [c for c in cs.conflicts(n1, "public.man") if c["resolution"] == "PENDING"]
    assert decided and pending
    old_chain = decided[-1]["id"]
    new_id = n1.sql("SELECT steep_repl.revert_resolution(%s, 'retention test')", (old_chain,))[0][0]
    # everything is old except the revert: the reverted entry keeps its young partner company
    n1.sql("UPDATE steep_repl.conflict_log SET detected_at = detected_at - interval '400 days' WHERE id <> %s", (new_id,))
    rows = "SELECT id, resolution FROM steep_repl.conflict_log ORDER BY id"
    all_rows = n1.sql(rows)
    keep = sorted(set(i for i, r in all_rows if r == "PENDING") | {old_chain, new_id})
    audits = n1.sql("SELECT count(*) FROM steep_repl.audit_log WHERE action = 'conflict_log.purge'")[0][0]
    n2_rows = n2.sql(rows)

    # bad input: refused, nothing deleted
    for args, expected in (({"older_than": "soon"}, "is not a PostgreSQL interval"),
                           ({"older_than": "-1 day"}, "interval of 0 or more"),
                           ({"older_than": "1 day", "batch_size": 0}, "batch_size must be 1 or more")):
        res = resolve_task(lab, "node1", dict(args, state="purged"))
        msgs = " ".join(res.failure_messages())
        assert res.rc != 0 and expected in msgs and "Fix:" in msgs, (args, msgs)
    res = resolve_task(lab, "node1", {"state": "purged"})
    assert res.rc != 0 and "older_than" in " ".join(res.failure_messages())
    e = sql_error(n1, "SELECT steep_repl.purge_conflict_log(NULL)")
    assert "interval of 0 or more" in e.diag.message_primary and "Fix:" in e.diag.message_hint
    e = sql_error(n1, "SELECT steep_repl.purge_conflict_log('1 day', 0)")
    assert "batch size" in e.diag.message_primary
    assert n1.sql(rows) == all_rows

    # check mode: the exact count, nothing deleted
    res = resolve_task(lab, "node1", {"state": "purged", "older_than": "90 days", "batch_size": 2}, check=True)
    [(_h, r)] = res.task_results("conflict task")
    assert res.rc == 0 and r["changed"] and r["purged"] == len(all_rows) - len(keep), (r, all_rows, keep)
    assert "purge_conflict_log" in r["queries"][0]
    assert n1.sql(rows) == all_rows

    res = resolve_task(lab, "node1", {"state": "purged", "older_than": "90 days", "batch_size": 2})
    [(_h, r)] = res.task_results("conflict task")
    assert res.rc == 0 and r["changed"] and r["purged"] == len(all_rows) - len(keep)
    assert [i for i, _r in n1.sql(rows)] == keep
    assert n1.sql("SELECT count(*) FROM steep_repl.audit_log WHERE action = 'conflict_log.purge'")[0][0] > audits
    assert n2.sql(rows) == n2_rows          # each node keeps its own log
    res = resolve_task(lab, "node1", {"state": "purged", "older_than": "90 days"})
    assert res.rc == 0 and res.changed() == 0                                # idempotent
    healthy(lab)
