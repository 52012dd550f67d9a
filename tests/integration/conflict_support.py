"""Helpers of the conflict-engine tests: pause/resume the mesh, wait, randomised workloads.

Real servers only (steeplab), the mesh is built by the real site.yml (tests/mesh.py).
"""
import random
import sys
import threading
import time
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import mesh  # noqa: E402


def subscriptions(node):
    return [r[0] for r in node.sql("SELECT subname FROM pg_catalog.pg_subscription WHERE subname LIKE 'steep\\_%%'")]


def pause(lab, timeout=30):
    """Disable every steep subscription and wait until no apply worker runs (writes now conflict)."""
    for n in lab.nodes:
        for s in subscriptions(n):
            n.sql('ALTER SUBSCRIPTION "%s" DISABLE' % s)
    deadline = time.monotonic() + timeout
    # no apply worker on any subscriber AND no walsender on any steep slot of any publisher
    while any(n.sql("SELECT (SELECT count(*) FROM pg_catalog.pg_stat_subscription WHERE subname LIKE 'steep\\_%%' "
                    "AND pid IS NOT NULL) + (SELECT count(*) FROM pg_catalog.pg_replication_slots "
                    "WHERE slot_name LIKE 'steep\\_to\\_%%' AND active)")[0][0] for n in lab.nodes):
        assert time.monotonic() < deadline, "apply workers did not stop"
        time.sleep(0.1)


def resume(lab):
    for n in lab.nodes:
        for s in subscriptions(n):
            n.sql('ALTER SUBSCRIPTION "%s" ENABLE' % s)


def sync(lab, table="public.marker", timeout=60):
    """Every node writes its own marker row; wait until every node has every node's marker.
    Changes of one origin are applied in commit order, so everything written before is applied too
    (a slot's confirmed position alone can run ahead of the apply right after ENABLE)."""
    token = random.randint(1, 2 ** 30)
    for i, n in enumerate(lab.nodes):
        n.sql("INSERT INTO %s (id, v) VALUES (%%s, %%s) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v" % table,
              (i, token))
    want = [(i, token) for i in range(len(lab.nodes))]
    wait_for(lambda: all(n.sql("SELECT id, v FROM %s ORDER BY id" % table) == want for n in lab.nodes),
             timeout=timeout, what="markers on every node")
    caught_up(lab, timeout)


def caught_up(lab, timeout=60):
    """Wait until every slot confirmed the WAL written before the call (rows may differ)."""
    mesh.wait_converged(lab, "SELECT 1", timeout=timeout)


def wait_for(pred, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.2)


def rows(node, table):
    return node.sql("SELECT * FROM %s ORDER BY 1" % table)


def conflicts(node, table=None, pk=None):
    q = ("SELECT id, conflict_type, resolution, winner, local_tuple, remote_tuple, local_origin, remote_origin, "
         "local_xact_ts, remote_xact_ts, origin_xid, pk, resolved_by, strategy FROM steep_repl.conflict_log")
    where, args = [], []
    if table:
        where.append("table_schema || '.' || table_name = %s")
        args.append(table)
    if pk is not None:
        where.append("pk = %s")
        args.append(pk)
    if where:
        q += " WHERE " + " AND ".join(where)
    keys = ["id", "type", "resolution", "winner", "local_tuple", "remote_tuple", "local_origin", "remote_origin",
            "local_ts", "remote_ts", "origin_xid", "pk", "resolved_by", "strategy"]
    return [dict(zip(keys, r)) for r in node.sql(q + " ORDER BY id", args or None)]


def apply_errors(lab):
    return {n.name: n.sql("SELECT coalesce(sum(apply_error_count), 0)::int FROM pg_catalog.pg_stat_subscription_stats "
                          "WHERE subname LIKE 'steep\\_%%'")[0][0] for n in lab.nodes}


REPORTED = ("id", "pk", "type", "resolution", "winner", "local_origin", "remote_origin", "local_ts", "remote_ts",
            "local_tuple", "remote_tuple")


def divergence_report(lab, table, limit=8):
    """What a test needs to explain rows that did not converge: per node, the version rows of every key whose
    row differs between nodes, and the last conflicts logged for those keys."""
    rows = {n.name: {r[0]: r for r in n.sql("SELECT pg_catalog.jsonb_build_array(id)::text, * FROM %s" % table)}
            for n in lab.nodes}
    keys = sorted(set().union(*rows.values()))
    differ = [k for k in keys if len(set(repr(r.get(k)) for r in rows.values())) > 1]
    out = {}
    for n in lab.nodes:
        out[n.name] = {
            "versions": n.sql("SELECT pk, ver_ts::text, ver_node, depth, epoch, deleted, op, base_ts::text, base_node, gen, "
                              "forced, img::text FROM steep_repl.row_version WHERE tbl = %s AND pk = ANY(%s) ORDER BY pk",
                              (table, differ)),
            "conflicts": [dict((k, c[k]) for k in REPORTED) for c in conflicts(n, table) if c["pk"] in differ][-limit:]}
    return {"differing keys": differ, "nodes": out}


def apply_error_blocks(text):
    """The apply workers' ERROR lines in server-log text (and the publisher's errors they received), each with
    the lines that explain it (DETAIL, CONTEXT, ...); clients' errors (e.g. a local deadlock victim) are left out."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if " ERROR: " not in line:
            continue
        block = [line]
        for ln in lines[i + 1:i + 12]:
            if not (ln.startswith("\t") or any(" %s: " % k in ln for k in ("DETAIL", "CONTEXT", "HINT", "STATEMENT"))):
                break
            block.append(ln)
        block = "\n".join(block)
        # "WAL stream: ERROR": the publisher's walsender failed (not a dropped connection)
        if "remote data" in block or "logical replication" in block or "WAL stream: ERROR" in block:
            found.append(block)
    return found


def server_log(node):
    log = Path(node.datadir) / "server.log"
    return log.read_text(errors="replace") if log.exists() else ""


def server_errors(lab, limit=12):
    """The apply workers' errors in every node's server log: the message of an assertion on apply errors,
    so a failure says which error it was."""
    out = {}
    for n in lab.nodes:
        found = apply_error_blocks(server_log(n))
        if found:
            out[n.name] = found[-limit:]
    return out


def image_mismatch_query(table, key="id"):
    """SQL (one parameter: the table name) listing the keys of ``table`` whose row is not the image of its
    version: a row without a version, a live version without its row, a tombstone with a row, or a row that
    differs from the image (compared as rows of the table: an image keeps the text of its writer's session,
    e.g. a timestamptz in its TimeZone). ``key``: the primary-key column, or its columns in key order. One
    statement, so one snapshot: no row on any committed state of a consistent node."""
    cols = (key,) if isinstance(key, str) else tuple(key)
    built = "pg_catalog.jsonb_build_array(%s)::text" % ", ".join("h." + c for c in cols)
    return ("SELECT coalesce(v.pk, {b}), v.deleted, v.img::text, pg_catalog.to_jsonb(h.*)::text "
            "FROM (SELECT * FROM steep_repl.row_version WHERE tbl = %s) v "
            "FULL JOIN {t} h ON {b} = v.pk "
            "WHERE v.pk IS NULL OR v.deleted <> (h.{k} IS NULL) "
            "OR (NOT v.deleted AND pg_catalog.to_jsonb(pg_catalog.jsonb_populate_record(NULL::{t}, v.img)) "
            "<> pg_catalog.to_jsonb(h.*))").format(b=built, k=cols[0], t=table)


def image_mismatches(node, table, key="id"):
    return node.sql(image_mismatch_query(table, key), (table,))


def write_loop(node, stop, step, errors, pause=0.005):
    """The body of a background writer thread: step(cur, i) makes one autocommit write (i = 1, 2, ...)
    until stop is set. A deadlock error is the local write the engine cancels on purpose
    (docs/conflicts.md): that write never happened anywhere, the loop goes on with the next one. Any
    other error ends the loop and is appended to errors (the test reports it)."""
    conn = node.connect()
    i = 0
    try:
        with conn.cursor() as cur:
            while not stop.is_set():
                i += 1
                try:
                    step(cur, i)
                except psycopg2.errors.DeadlockDetected:
                    continue
                time.sleep(pause)
    except Exception as exc:  # pragma: no cover - reported by the test
        errors.append(exc)
    finally:
        conn.close()


def run_workload(lab, table, seed, seconds=3.0, keys=6, threads_per_node=2):
    """Concurrent writers on every node over the same hot keys: updates, inserts of the same keys,
    deletes and multi-row transactions (keys locked in ascending order). Returns op counts."""
    stats = {"commits": 0, "errors": 0}
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    failures = []

    def writer(node, idx):
        rng = random.Random("%s-%s-%s" % (seed, node.name, idx))
        conn = node.connect(autocommit=False)
        try:
            while time.monotonic() < stop:
                ks = sorted(rng.sample(range(1, keys + 1), rng.choice((1, 1, 2, 3))))
                try:
                    with conn.cursor() as cur:
                        for k in ks:
                            op = rng.random()
                            val = rng.randint(0, 10 ** 6)
                            if op < 0.45:
                                cur.execute("UPDATE %s SET v = %%s, who = %%s, n = n + 1 WHERE id = %%s" % table,
                                            (val, node.name, k))
                            elif op < 0.75:
                                cur.execute("INSERT INTO %s (id, v, who, n) VALUES (%%s, %%s, %%s, 0) "
                                            "ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, who = EXCLUDED.who"
                                            % table, (k, val, node.name))
                            elif op < 0.9:
                                cur.execute("DELETE FROM %s WHERE id = %%s" % table, (k,))
                            else:
                                cur.execute("INSERT INTO %s (id, v, who, n) VALUES (%%s, %%s, %%s, 0) "
                                            "ON CONFLICT (id) DO NOTHING" % table, (k, val, node.name))
                    conn.commit()
                    with lock:
                        stats["commits"] += 1
                except psycopg2.Error:
                    conn.rollback()  # a legitimate client-side error (e.g. duplicate key, deadlock victim)
                    with lock:
                        stats["errors"] += 1
                time.sleep(rng.random() * 0.01)
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=writer, args=(n, i)) for n in lab.nodes for i in range(threads_per_node)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    return stats
