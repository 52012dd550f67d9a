"""Primary keys whose text depends on session settings (timestamptz: TimeZone; bytea: bytea_output;
interval: IntervalStyle), written by sessions with different settings on a real 3-node mesh
(PostgreSQL 17, 18, 17). The engine names a row by the JSON text of its key; before the key was made
canonical (steep_repl._key_expr / _canon) the same row had one key per TimeZone, its versions never
met, and concurrent updates from two time zones diverged without a logged conflict."""
import os
import random
import threading
import time

import psycopg2
import pytest

import conflict_support as cs
import mesh

SEED = int(os.environ.get("STEEP_CONFLICT_SEED", "20261129"))
TABLES = {   # table: (DDL, key columns, SQL of key k as a row of the key columns)
    "public.ev": ("CREATE TABLE public.ev (dev int, at timestamptz, v int, who text, n int NOT NULL DEFAULT 0, "
                  "PRIMARY KEY (dev, at))", ("dev", "at"),
                  "mod(%s, 2), timestamptz '2026-01-01 00:00:00.25+00' + make_interval(hours => %s)"),
    "public.blob": ("CREATE TABLE public.blob (id bytea PRIMARY KEY, v int, who text, n int NOT NULL DEFAULT 0)",
                    ("id",), "decode(lpad(to_hex(%s * 4099), 8, '0'), 'hex')"),
    "public.span": ("CREATE TABLE public.span (id interval PRIMARY KEY, v int, who text, n int NOT NULL DEFAULT 0)",
                    ("id",), "make_interval(days => %s, hours => %s)"),
}
# each node's application sessions: other settings than the server's and than each other's
SESSIONS = {
    "node1": "SET TimeZone = 'Asia/Kolkata'; SET bytea_output = 'escape'; SET IntervalStyle = 'sql_standard'",
    "node2": "SET TimeZone = 'America/New_York'; SET IntervalStyle = 'iso_8601'; SET DateStyle = 'SQL, DMY'",
    "node3": "SET TimeZone = 'Pacific/Chatham'; SET extra_float_digits = 0",
}


def key_sql(table, k):
    expr = TABLES[table][2]
    return expr % ((k,) * expr.count("%s"))


def writer(node, idx, seed, stop, keys, stats, lock, failures):
    rng = random.Random("%s-%s-%s" % (seed, node.name, idx))
    conn = node.connect(autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute(SESSIONS[node.name])
            conn.commit()
        while time.monotonic() < stop:
            table = rng.choice(sorted(TABLES))
            cols = ", ".join(TABLES[table][1])
            ks = sorted(rng.sample(range(1, keys + 1), rng.choice((1, 1, 2))))
            try:
                with conn.cursor() as cur:
                    for k in ks:
                        op, val, key = rng.random(), rng.randint(0, 10 ** 6), key_sql(table, k)
                        if op < 0.5:
                            cur.execute("UPDATE %s SET v = %%s, who = %%s, n = n + 1 WHERE (%s) = (SELECT %s)"
                                        % (table, cols, key), (val, node.name))
                        elif op < 0.8:
                            cur.execute("INSERT INTO %s (%s, v, who) SELECT %s, %%s, %%s ON CONFLICT (%s) DO UPDATE "
                                        "SET v = EXCLUDED.v, who = EXCLUDED.who" % (table, cols, key, cols),
                                        (val, node.name))
                        else:
                            cur.execute("DELETE FROM %s WHERE (%s) = (SELECT %s)" % (table, cols, key))
                conn.commit()
                with lock:
                    stats["commits"] += 1
            except psycopg2.Error:
                conn.rollback()                      # a deadlock victim or a duplicate key: client-side
                with lock:
                    stats["errors"] += 1
            time.sleep(rng.random() * 0.01)
    except Exception as exc:  # pragma: no cover - reported by the test
        failures.append(repr(exc))
    finally:
        conn.close()


@pytest.fixture
def lab(lab_factory):
    lab = lab_factory(count=3, majors=(17, 18))
    mesh.build_mesh(lab, [ddl for ddl, _k, _e in TABLES.values()] + ["CREATE TABLE public.marker (id int PRIMARY KEY, v int)"],
                    {"steep_replicated_tables": sorted(TABLES) + ["public.marker"]})
    return lab


def test_keys_whose_text_depends_on_the_session_are_the_same_key_everywhere(lab):
    n1, n2, n3 = lab.nodes
    # one row, written from three time zones while no node applies the others: one key, three conflicts
    cs.pause(lab)
    for n in lab.nodes:
        conn = n.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(SESSIONS[n.name])
                cur.execute("INSERT INTO public.ev (dev, at, v, who) SELECT %s, 1, %%s" % key_sql("public.ev", 3), (n.name,))
                cur.execute("INSERT INTO public.blob (id, v, who) SELECT %s, 1, %%s" % key_sql("public.blob", 3), (n.name,))
                cur.execute("INSERT INTO public.span (id, v, who) SELECT %s, 1, %%s" % key_sql("public.span", 3), (n.name,))
        finally:
            conn.close()
    cs.resume(lab)
    cs.sync(lab)
    for table in TABLES:
        rows = mesh.wait_converged(lab, "SELECT who FROM %s" % table)
        assert len(rows) == 1, (table, rows)
        # the engine named the row the same way on every node, whatever the writer's settings
        keys = {n.name: n.sql("SELECT pk FROM steep_repl.row_version WHERE tbl = %s", (table,)) for n in lab.nodes}
        assert len(set(map(tuple, keys.values()))) == 1 and len(keys["node1"]) == 1, keys
        for n in lab.nodes:
            assert {c["pk"] for c in cs.conflicts(n, table)} == {keys["node1"][0][0]}, (n.name, table)
    assert keys["node1"][0][0] == '["3 days 03:00:00"]'
    assert n1.sql("SELECT pk FROM steep_repl.row_version WHERE tbl = 'public.ev'") == [
        ('[1, "2026-01-01T03:00:00.25+00:00"]',)]

    # a seeded concurrent workload over a few hot keys of every table, every node in its own settings
    stats, lock, failures = {"commits": 0, "errors": 0}, threading.Lock(), []
    stop = time.monotonic() + 3.0
    threads = [threading.Thread(target=writer, args=(n, i, SEED, stop, 4, stats, lock, failures))
               for n in lab.nodes for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert stats["commits"] > 50, stats
    cs.sync(lab)
    for table, (_ddl, key, _e) in TABLES.items():
        try:
            mesh.wait_converged(lab, "SELECT %s, v, who, n FROM %s ORDER BY 1, 2" % (", ".join(key), table), timeout=90)
        except AssertionError as exc:
            raise AssertionError("%s\n%r" % (exc, cs.server_errors(lab))) from None
        mesh.wait_converged(lab, "SELECT pk, ver_ts, ver_node, deleted FROM steep_repl.row_version WHERE tbl = %s "
                                 "ORDER BY pk", params=(table,), timeout=30)
        for n in lab.nodes:
            # this session has the server's settings, which are the canonical ones for these types
            assert cs.image_mismatches(n, table, key=key) == [], (n.name, table)
    assert sum(len(cs.conflicts(n)) for n in lab.nodes) > 9
    assert cs.apply_errors(lab) == {n.name: 0 for n in lab.nodes}, cs.server_errors(lab)
    mesh.assert_healthy(lab)
