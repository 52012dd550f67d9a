"""Node initialisation on real clusters: a node joins a live mesh with writes running."""
import random
import threading
import time

import pytest

from conflict_support import write_loop
from conftest import run_playbook
from mesh import assert_healthy, build_mesh, wait_converged, wire_like_earlier_build

SETUP = [
    "CREATE TABLE IF NOT EXISTS public.items (id integer PRIMARY KEY, val text NOT NULL, n integer NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS public.notes (k text PRIMARY KEY, body text)",
]
TABLES = ["public.items", "public.notes"]
QUERY_ITEMS = "SELECT id, val, n FROM public.items ORDER BY id"
QUERY_NOTES = "SELECT k, body FROM public.notes ORDER BY k"


def _writer(node, seed, stop, errors, base):
    rnd = random.Random(seed)

    def step(cur, i):
        op = rnd.random()
        if op < 0.5:
            cur.execute("INSERT INTO public.items VALUES (%s, %s, 0)", (base + i, node.name))
        elif op < 0.9:
            cur.execute("UPDATE public.items SET n = n + 1, val = %s WHERE id = %s", (node.name, rnd.randint(1, 200)))
        else:
            cur.execute("DELETE FROM public.items WHERE id = %s", (base + rnd.randint(1, max(i - 1, 1)),))
    write_loop(node, stop, step, errors)


def _states(lab, node_id):
    return {n.name: n.sql("SELECT init_state FROM steep_repl.nodes WHERE node_id = %s", (node_id,))[0][0]
            for n in lab.nodes}


@pytest.mark.parametrize("majors", [(18,), (17,), (17, 18)], ids=["pg18", "pg17", "mixed"])
def test_snapshot_init_joins_live_mesh(lab_factory, majors):
    lab = lab_factory(3, majors)
    group_vars = {"steep_replicated_tables": TABLES}
    build_mesh(lab, SETUP, group_vars, nodes=["node1", "node2"])
    n1, n2, n3 = lab.nodes
    n1.sql("INSERT INTO public.items SELECT g, 'seed', 0 FROM generate_series(1, 200) g")
    n2.sql("INSERT INTO public.notes SELECT 'k' || g, repeat('x', 50) FROM generate_series(1, 3000) g")
    wait_converged(lab, QUERY_ITEMS, nodes=["node1", "node2"])
    for stmt in SETUP:  # the new node has the schema, no data
        n3.sql(stmt)

    stop, errors = threading.Event(), []
    writers = [threading.Thread(target=_writer, args=(n, s, stop, errors, b))
               for n, s, b in ((n1, 1, 100000), (n2, 2, 200000))]
    for w in writers:
        w.start()
    try:
        inventory = lab.write_inventory(group_vars=group_vars)
        res = run_playbook("init_node.yml", inventory,
                           extra_vars={"steep_init_target": "node3", "steep_init_source": "node1",
                                       "steep_init_parallel_workers": 2})
        assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
        time.sleep(1.0)  # writes keep going after the join
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert not errors, errors
    rows = wait_converged(lab, QUERY_ITEMS, timeout=120)
    assert len(rows) > 200
    notes = wait_converged(lab, QUERY_NOTES, timeout=60)
    assert len(notes) == 3000
    assert_healthy(lab)
    assert set(_states(lab, "node3").values()) == {"SYNCHRONIZED"}
    status = n3.sql("SELECT tables_total, tables_done, rows_copied FROM steep_repl.init_status WHERE target_node = 'node3'")
    assert status and status[0][0] == status[0][1] == 2 and status[0][2] >= 3200
    audit = n3.sql("SELECT new_value->>'state' FROM steep_repl.audit_log WHERE action = 'init_state' "
                   "AND target_id = 'node3' ORDER BY id")
    assert [a[0] for a in audit][-4:] == ["PREPARING", "COPYING", "CATCHING_UP", "SYNCHRONIZED"]

    again = run_playbook("site.yml", inventory)
    assert again.rc == 0 and again.changed() == 0, again.failure_messages() or again.changed_tasks()


def test_init_bad_input_fails_clearly_and_changes_nothing(lab_factory):
    lab = lab_factory(3, (18,))
    group_vars = {"steep_replicated_tables": TABLES}
    build_mesh(lab, SETUP, group_vars, nodes=["node1", "node2"])
    n1, n2, n3 = lab.nodes
    n3.sql(SETUP[0])  # notes is missing on the target: strict schema check
    inventory = lab.write_inventory(group_vars=group_vars)

    res = run_playbook("init_node.yml", inventory,
                       extra_vars={"steep_init_target": "node3", "steep_init_source": "nodeX"})
    assert res.rc != 0 and any("steep_init_target" in m or "known:" in m for m in res.failure_messages())

    res = run_playbook("init_node.yml", inventory,
                       extra_vars={"steep_init_target": "node3", "steep_init_source": "node1"})
    assert res.rc != 0
    msg = " ".join(res.failure_messages())
    assert "public.notes" in msg and "absent on node3" in msg and "Fix" in msg
    assert n1.sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'steep_to_node3'")[0][0] == 0
    assert set(_states(lab, "node3").values()) == {"FAILED"}
    assert "public.notes" in n3.sql("SELECT init_state_reason FROM steep_repl.nodes WHERE node_id = 'node3'")[0][0]

    # the target is not empty: refused, FAILED with the reason, nothing copied
    n3.sql(SETUP[1])
    n3.sql("INSERT INTO public.notes VALUES ('local', 'x')")
    res = run_playbook("init_node.yml", inventory,
                       extra_vars={"steep_init_target": "node3", "steep_init_source": "node1"})
    assert res.rc != 0 and "not empty" in " ".join(res.failure_messages())
    assert n3.sql("SELECT count(*) FROM public.notes")[0][0] == 1
    assert n1.sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'steep_to_node3'")[0][0] == 0

    # fixed by the user, the same command recovers without manual SQL
    n3.sql("TRUNCATE public.notes")
    res = run_playbook("init_node.yml", inventory,
                       extra_vars={"steep_init_target": "node3", "steep_init_source": "node1"})
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    n1.sql("INSERT INTO public.items VALUES (1, 'after', 0)")
    wait_converged(lab, QUERY_ITEMS)
    assert set(_states(lab, "node3").values()) == {"SYNCHRONIZED"}


def test_init_refuses_a_mesh_wired_by_an_earlier_build_until_it_is_migrated(lab_factory):
    """The target's slots must not predate the versions publication (a PostgreSQL 17 walsender fails for
    good on a publication newer than the WAL it decodes): init_node.yml on a mesh that an earlier build
    wired refuses before it creates anything and names the fix; after site.yml migrated the mesh, the same
    command joins the node."""
    lab = lab_factory(3, (17,))
    group_vars = {"steep_replicated_tables": TABLES}
    build_mesh(lab, SETUP, group_vars, nodes=["node1", "node2"])
    n1, n2, n3 = lab.nodes
    for stmt in SETUP:
        n3.sql(stmt)
    wire_like_earlier_build([n1, n2])
    inventory = lab.write_inventory(group_vars=group_vars)
    join = {"steep_init_target": "node3", "steep_init_source": "node1"}
    res = run_playbook("init_node.yml", inventory, extra_vars=join)
    assert res.rc != 0
    msg = " ".join(res.failure_messages())
    assert "earlier steep.repl build on node1, node2" in msg and "playbooks/site.yml" in msg, msg
    for n in (n1, n2):  # read back: no slot, no publication, no state change
        assert n.sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'steep_to_node3'")[0][0] == 0
        assert n.sql("SELECT count(*) FROM pg_publication WHERE pubname = 'steep_pub_versions'")[0][0] == 0
    assert set(_states(lab, "node3").values()) == {"UNINITIALIZED"}

    res = run_playbook("steep_replication.yml", inventory)  # node3, a newcomer, is left alone
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    n1.sql("INSERT INTO public.items VALUES (1, 'before', 0)")
    res = run_playbook("init_node.yml", inventory, extra_vars=join)
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    n3.sql("UPDATE public.items SET val = 'from node3' WHERE id = 1")
    assert wait_converged(lab, QUERY_ITEMS) == [(1, "from node3", 0)]
    assert_healthy(lab)
    assert set(_states(lab, "node3").values()) == {"SYNCHRONIZED"}


def test_killed_init_recovers_by_rerun(lab_factory):
    lab = lab_factory(3, (18,))
    group_vars = {"steep_replicated_tables": TABLES}
    build_mesh(lab, SETUP, group_vars, nodes=["node1", "node2"])
    n1, n2, n3 = lab.nodes
    n1.sql("INSERT INTO public.notes SELECT 'k' || g, repeat('y', 200) FROM generate_series(1, 200000) g")
    wait_converged(lab, "SELECT count(*) FROM public.notes", nodes=["node1", "node2"], timeout=120)
    for stmt in SETUP:
        n3.sql(stmt)
    inventory = lab.write_inventory(group_vars=group_vars)

    killer = threading.Thread(target=lambda: (_wait_copying(n3), n3.kill()))
    killer.start()
    res = run_playbook("init_node.yml", inventory,
                       extra_vars={"steep_init_target": "node3", "steep_init_source": "node1"})
    killer.join()
    assert res.rc != 0
    n3.start()
    states = _states(lab, "node3")
    assert states["node1"] == "FAILED" and states["node2"] == "FAILED"
    res = run_playbook("init_node.yml", inventory,
                       extra_vars={"steep_init_target": "node3", "steep_init_source": "node1"})
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    wait_converged(lab, "SELECT count(*), sum(length(body)) FROM public.notes", timeout=120)
    assert set(_states(lab, "node3").values()) == {"SYNCHRONIZED"}
    assert_healthy(lab)


def _wait_copying(node, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            rows = node.sql("SELECT rows_copied FROM steep_repl.init_progress WHERE status = 'copying' AND rows_copied > 0")
            if rows:
                return
        except Exception:
            pass
        time.sleep(0.05)
