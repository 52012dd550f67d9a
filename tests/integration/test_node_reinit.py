"""Reinitialisation of tables of a live member (seed 6.4) on real clusters, with writers running."""
import random
import threading
import time

import pytest

from conflict_support import write_loop
from conftest import run_playbook
from mesh import assert_healthy, build_mesh, wait_converged

SETUP = [
    "CREATE SCHEMA IF NOT EXISTS sales",
    "CREATE TABLE IF NOT EXISTS public.items (id integer PRIMARY KEY, val text NOT NULL, n integer NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS public.notes (k text PRIMARY KEY, body text)",
    "CREATE TABLE IF NOT EXISTS sales.orders (id integer PRIMARY KEY, amount integer NOT NULL)",
]
TABLES = ["public.items", "public.notes", "sales.orders"]
QUERY_ITEMS = "SELECT id, val, n FROM public.items ORDER BY id"
QUERY_NOTES = "SELECT k, body FROM public.notes ORDER BY k"
QUERY_ORDERS = "SELECT id, amount FROM sales.orders ORDER BY id"
GROUP_VARS = {"steep_replicated_tables": TABLES}


class Writer(threading.Thread):
    """Random writes on one node; remembers the keys it inserted (and did not delete) for sure."""

    def __init__(self, node, seed, base):
        super().__init__(daemon=True)
        self.node, self.rnd, self.base = node, random.Random(seed), base
        self.stop = threading.Event()
        self.alive = set()
        self.notes = set()
        self.errors = []

    @property
    def error(self):
        return self.errors[0] if self.errors else None

    def _step(self, cur, i):
        op = self.rnd.random()
        if op < 0.4:
            cur.execute("INSERT INTO public.items VALUES (%s, %s, 0)", (self.base + i, self.node.name))
            self.alive.add(self.base + i)
        elif op < 0.7:
            cur.execute("UPDATE public.items SET n = n + 1, val = %s WHERE id = %s",
                        (self.node.name, self.rnd.randint(1, 100)))
        elif op < 0.8 and self.alive:
            victim = self.rnd.choice(sorted(self.alive))
            cur.execute("DELETE FROM public.items WHERE id = %s", (victim,))
            self.alive.discard(victim)
        else:  # another table keeps replicating during the reinit
            key = "%s-%d" % (self.node.name, i)
            cur.execute("INSERT INTO public.notes VALUES (%s, 'w')", (key,))
            self.notes.add(key)

    def run(self):
        write_loop(self.node, self.stop, self._step, self.errors)


def _states(lab, node_id):
    return {n.name: n.sql("SELECT init_state FROM steep_repl.nodes WHERE node_id = %s", (node_id,))[0][0]
            for n in lab.nodes}


def _diverge(node):
    """Local damage that never replicates (as after a manual fix-up with replication off): written
    under a replication origin, which peers subscribed with origin = none ignore."""
    conn = node.connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET session_replication_role = replica")
        cur.execute("SELECT pg_replication_origin_create('test_damage') WHERE NOT EXISTS "
                    "(SELECT 1 FROM pg_replication_origin WHERE roname = 'test_damage')")
        cur.execute("SELECT pg_replication_origin_session_setup('test_damage')")
        cur.execute("UPDATE public.items SET val = 'garbage' WHERE id <= 10")
        cur.execute("DELETE FROM public.items WHERE id BETWEEN 11 AND 20")
        cur.execute("INSERT INTO public.items VALUES (99999, 'local-only', 0)")
        cur.execute("DELETE FROM sales.orders WHERE id <= 5")
        cur.execute("UPDATE sales.orders SET amount = -1 WHERE id BETWEEN 6 AND 10")
    conn.close()


def _reinit(inventory, target, source, check=False, **selection):
    extra = {"steep_reinit_target": target, "steep_reinit_source": source}
    extra.update(("steep_reinit_%s" % k, v) for k, v in selection.items())
    return run_playbook("reinit_node.yml", inventory, extra_vars=extra, check=check)


def _seed(lab):
    n1 = lab.nodes[0]
    n1.sql("INSERT INTO public.items SELECT g, 'seed', 0 FROM generate_series(1, 100) g")
    n1.sql("INSERT INTO public.notes SELECT 'k' || g, 'seed' FROM generate_series(1, 50) g")
    n1.sql("INSERT INTO sales.orders SELECT g, g * 10 FROM generate_series(1, 30) g")
    wait_converged(lab, QUERY_ITEMS)
    wait_converged(lab, QUERY_ORDERS)


def _snapshot(lab):
    """Everything a reinit may change, per node (the 'second query' of the bad-input checks)."""
    out = {}
    for n in lab.nodes:
        out[n.name] = (
            n.sql("SELECT node_id, init_state, init_state_reason FROM steep_repl.nodes ORDER BY 1"),
            n.sql("SELECT count(*) FROM steep_repl.audit_log"),
            n.sql("SELECT subname, subenabled FROM pg_subscription ORDER BY 1"),
            n.sql("SELECT count(*) FROM steep_repl.init_progress"),
            n.sql(QUERY_ITEMS), n.sql(QUERY_ORDERS))
    return out


@pytest.mark.parametrize("majors", [(18,), (17,), (17, 18)], ids=["pg18", "pg17", "mixed"])
def test_reinit_tables_under_writes_converges(lab_factory, majors):
    lab = lab_factory(3, majors)
    inventory = build_mesh(lab, SETUP, GROUP_VARS)
    _seed(lab)
    n1, n2, n3 = lab.nodes
    _diverge(n3)
    assert n3.sql(QUERY_ITEMS) != n1.sql(QUERY_ITEMS)

    writers = [Writer(n, s, b) for n, s, b in ((n1, 1, 100000), (n2, 2, 200000), (n3, 3, 300000))]
    for w in writers:
        w.start()
    try:
        time.sleep(0.5)
        res = _reinit(inventory, "node3", "node1", tables=["items", "sales.orders"])
        assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
        assert res.changed() >= 1  # an action: always changed
        time.sleep(0.5)  # writes keep going after the reinit
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join()
    assert not [w.error for w in writers if w.error]
    items = wait_converged(lab, QUERY_ITEMS, timeout=120)
    wait_converged(lab, QUERY_ORDERS, timeout=60)
    notes = wait_converged(lab, QUERY_NOTES, timeout=60)
    assert_healthy(lab)
    # the damage is gone, nothing written during the reinit is lost
    ids = {r[0] for r in items}
    assert 99999 not in ids and set(range(1, 101)) <= ids
    assert not [r for r in items if r[1] == "garbage"]
    for w in writers:
        assert w.alive <= ids, sorted(w.alive - ids)[:10]
        assert w.notes <= {r[0] for r in notes}
    assert n3.sql("SELECT count(*) FROM sales.orders WHERE amount < 0")[0][0] == 0
    assert set(_states(lab, "node3").values()) == {"SYNCHRONIZED"}
    audit = n3.sql("SELECT new_value->>'state' FROM steep_repl.audit_log WHERE action = 'init_state' "
                   "AND target_id = 'node3' ORDER BY id")
    assert [a[0] for a in audit][-3:] == ["REINITIALIZING", "CATCHING_UP", "SYNCHRONIZED"]
    status = n3.sql("SELECT tables_total, tables_done, state FROM steep_repl.init_status WHERE target_node = 'node3'")
    assert status == [(2, 2, "SYNCHRONIZED")]
    assert n3.sql("SELECT count(*) FROM pg_subscription WHERE NOT subenabled")[0][0] == 0


def test_reinit_schema_full_and_check_mode(lab_factory):
    lab = lab_factory(2, (18,))
    inventory = build_mesh(lab, SETUP, GROUP_VARS)
    _seed(lab)
    n1, n2 = lab.nodes
    _diverge(n2)
    before = _snapshot(lab)

    res = _reinit(inventory, "node2", "node1", check=True, schema="sales")
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    assert res.changed() == 1
    assert _snapshot(lab) == before  # --check wrote nothing

    res = _reinit(inventory, "node2", "node1", schema="sales")
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    wait_converged(lab, QUERY_ORDERS)
    assert n2.sql(QUERY_ITEMS) != n1.sql(QUERY_ITEMS)  # public.items was not part of it

    res = _reinit(inventory, "node2", "node1", full=True)
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    n1.sql("UPDATE public.items SET n = 7 WHERE id = 1")
    wait_converged(lab, QUERY_ITEMS)
    wait_converged(lab, QUERY_NOTES)
    assert_healthy(lab)
    assert set(_states(lab, "node2").values()) == {"SYNCHRONIZED"}
    assert n2.sql("SELECT tables_total, tables_done FROM steep_repl.init_status") == [(3, 3)]
    assert n2.sql("SELECT count(*) FROM pg_replication_origin WHERE roname = 'steep_reinit'") == [(0,)]
    again = run_playbook("site.yml", inventory)  # nothing left for the mesh to fix
    assert again.rc == 0 and again.changed() == 0, again.failure_messages() or again.changed_tasks()


def test_reinit_bad_input_fails_clearly_and_changes_nothing(lab_factory):
    lab = lab_factory(2, (18,))
    inventory = build_mesh(lab, SETUP, GROUP_VARS)
    _seed(lab)
    n1, n2 = lab.nodes
    _diverge(n2)
    before = _snapshot(lab)

    cases = [
        (dict(target="nodeX", source="node1", tables=["items"]), "known: node1, node2"),
        (dict(target="node2", source="node2", tables=["items"]), "FROM another node"),
        (dict(target="node2", source="node1", tables=["public.nope"]), "public.nope is not replicated"),
        (dict(target="node2", source="node1", schema="nope"), "schema nope holds no replicated table"),
        (dict(target="node2", source="node1"), "choose exactly one of"),
        (dict(target="node2", source="node1", tables=["items"], full=True), "choose exactly one of"),
    ]
    for args, expected in cases:
        res = _reinit(inventory, args.pop("target"), args.pop("source"), **args)
        msg = " ".join(res.failure_messages())
        assert res.rc != 0 and expected in msg and "Fix" in msg, (args, msg)
        assert _snapshot(lab) == before, args

    # a source that is not SYNCHRONIZED is refused
    for n in lab.nodes:
        n.sql("SELECT steep_repl.set_init_state('node1', 'FAILED', 'test')")
    before = _snapshot(lab)
    res = _reinit(inventory, "node2", "node1", tables=["items"])
    msg = " ".join(res.failure_messages())
    assert res.rc != 0 and "not SYNCHRONIZED" in msg and "steep_reinit_source" in msg, msg
    assert _snapshot(lab) == before


def test_failed_reinit_is_recovered_by_rerun(lab_factory):
    lab = lab_factory(2, (17,))
    inventory = build_mesh(lab, SETUP, GROUP_VARS)
    _seed(lab)
    n1, n2 = lab.nodes
    n1.sql("UPDATE public.items SET n = 5000 WHERE id = 50")
    wait_converged(lab, QUERY_ITEMS)
    _diverge(n2)
    # a constraint only the target has (fingerprints compare columns): the copy fails on it
    n2.sql("ALTER TABLE public.items ADD CONSTRAINT small_n CHECK (n < 1000) NOT VALID")
    damaged = n2.sql(QUERY_ITEMS)

    res = _reinit(inventory, "node2", "node1", tables=["items"])
    msg = " ".join(res.failure_messages())
    assert res.rc != 0 and "small_n" in msg and "reinit_node.yml again" in msg, msg
    assert set(_states(lab, "node2").values()) == {"FAILED"}
    assert "small_n" in n1.sql("SELECT init_state_reason FROM steep_repl.nodes WHERE node_id = 'node2'")[0][0]
    assert n2.sql(QUERY_ITEMS) == damaged  # all or nothing
    assert n2.sql("SELECT count(*) FROM pg_subscription WHERE NOT subenabled")[0][0] == 0
    assert n2.sql("SELECT status FROM steep_repl.init_progress WHERE table_name = 'items'") == [("failed",)]
    n1.sql("INSERT INTO public.notes VALUES ('while-failed', 'x')")  # replication still runs
    wait_converged(lab, QUERY_NOTES)

    n2.sql("ALTER TABLE public.items DROP CONSTRAINT small_n")
    res = _reinit(inventory, "node2", "node1", tables=["items"])
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    wait_converged(lab, QUERY_ITEMS)
    assert set(_states(lab, "node2").values()) == {"SYNCHRONIZED"}
    assert_healthy(lab)


def _wait_copying(node, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if node.sql("SELECT 1 FROM steep_repl.init_progress WHERE status = 'copying' AND rows_copied > 0"):
                return
        except Exception:
            pass
        time.sleep(0.05)


def test_killed_reinit_is_recovered_by_rerun(lab_factory):
    lab = lab_factory(2, (18,))
    inventory = build_mesh(lab, SETUP, GROUP_VARS)
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.notes SELECT 'k' || g, repeat('y', 200) FROM generate_series(1, 200000) g")
    wait_converged(lab, "SELECT count(*) FROM public.notes", timeout=120)
    with n2.connect() as conn, conn.cursor() as cur:  # damage that never replicates
        cur.execute("SET session_replication_role = replica")
        cur.execute("SELECT pg_replication_origin_create('test_damage')")
        cur.execute("SELECT pg_replication_origin_session_setup('test_damage')")
        cur.execute("DELETE FROM public.notes WHERE k LIKE 'k1%'")
    conn.close()

    killer = threading.Thread(target=lambda: (_wait_copying(n2), n2.kill()))
    killer.start()
    res = _reinit(inventory, "node2", "node1", tables=["notes"])
    killer.join()
    assert res.rc != 0
    msg = " ".join(res.failure_messages())
    assert "reinit_node.yml again" in msg and "stay disabled" in msg, msg
    assert n1.sql("SELECT init_state FROM steep_repl.nodes WHERE node_id = 'node2'")[0][0] == "FAILED"
    n2.start()
    # node1's apply worker lost its walsender on the killed node2 (counted as an apply error): the
    # errors that matter are the ones from here on
    n1.sql("SELECT pg_stat_reset_subscription_stats(NULL)")
    n1.sql("INSERT INTO public.notes VALUES ('after-kill', 'x')")  # waits in node1's slot for node2
    res = _reinit(inventory, "node2", "node1", tables=["notes"])
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    wait_converged(lab, "SELECT count(*), sum(length(body)), max(k) FILTER (WHERE k = 'after-kill') FROM public.notes",
                   timeout=120)
    assert n2.sql("SELECT count(*) FROM public.notes")[0][0] == 200001
    assert set(_states(lab, "node2").values()) == {"SYNCHRONIZED"}
    assert_healthy(lab)


def _verify(inventory, check=False, **extra):
    return run_playbook("verify_mesh.yml", inventory, extra_vars={"steep_verify_%s" % k: v for k, v in extra.items()},
                        check=check)


def test_verify_marks_diverged_under_writes_and_reinit_recovers(lab_factory):
    """verify_mesh.yml: no false positive while writes run (keys compared only at equal versions);
    damage that never replicated makes that member DIVERGED everywhere (check mode reports only),
    the reason names the reinit; after it, verify finds everything identical again."""
    lab = lab_factory(3, (17, 18))
    inventory = build_mesh(lab, SETUP, GROUP_VARS)
    _seed(lab)
    n1, n2, n3 = lab.nodes
    writers = [Writer(n, s, b) for n, s, b in ((n1, 1, 100000), (n2, 2, 200000))]
    for w in writers:
        w.start()
    try:
        time.sleep(0.5)
        res = _verify(inventory)
        assert res.rc == 0 and res.changed() == 0, res.failure_messages() or res.stdout[-3000:]
        _diverge(n3)
        before = _snapshot(lab)
        res = _verify(inventory, check=True)
        assert res.rc == 0 and res.changed() >= 1, res.stdout[-3000:]
        assert _states(lab, "node3") == {n.name: before[n.name][0][2][1] for n in lab.nodes}   # nothing marked
        res = _verify(inventory, reference="node1")
        assert res.rc == 0 and res.changed() >= 1, res.failure_messages() or res.stdout[-3000:]
        assert set(_states(lab, "node3").values()) == {"DIVERGED"}
        assert "DIVERGED" not in _states(lab, "node2").values()
        reason = n1.sql("SELECT init_state_reason FROM steep_repl.nodes WHERE node_id = 'node3'")[0][0]
        assert "public.items" in reason and "sales.orders" in reason and "reinit_node.yml" in reason, reason
        assert _verify(inventory).changed() == 0                  # idempotent: already DIVERGED
        res = _reinit(inventory, "node3", "node1", full=True)
        assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join()
    assert not [w.error for w in writers if w.error]
    wait_converged(lab, QUERY_ITEMS, timeout=120)
    wait_converged(lab, QUERY_ORDERS, timeout=60)
    assert set(_states(lab, "node3").values()) == {"SYNCHRONIZED"}
    res = _verify(inventory)
    assert res.rc == 0 and res.changed() == 0, res.failure_messages() or res.stdout[-3000:]
    # bad input: an unknown reference is refused, nothing changes
    before = _snapshot(lab)
    res = _verify(inventory, reference="node9")
    assert res.rc != 0 and "node9" in " ".join(res.failure_messages()) and "Fix" in " ".join(res.failure_messages())
    assert _snapshot(lab) == before
