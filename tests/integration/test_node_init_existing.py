"""Joining a node that already holds rows (seed 6.8, existing_data=reconcile) on real clusters."""
import json
import random
import threading
import time

import pytest

from conflict_support import write_loop
from conftest import run_playbook
from mesh import assert_healthy, build_mesh, wait_converged

SETUP = [
    "CREATE TABLE IF NOT EXISTS public.items (id integer PRIMARY KEY, val text NOT NULL, n integer NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS public.notes (k text PRIMARY KEY, body text)",
]
TABLES = ["public.items", "public.notes"]
# items: last_write_wins (default); notes: keep_local (the joining node's row wins a reconcile)
GROUP_VARS = {"steep_replicated_tables": TABLES, "steep_conflict_strategies": {"public.notes": "keep_local"}}
QUERY_ITEMS = "SELECT id, val, n FROM public.items ORDER BY id"
QUERY_NOTES = "SELECT k, body FROM public.notes ORDER BY k"


def _writer(node, seed, stop, errors, base):
    """Writes on the existing members while the new node joins (never touches ids 1..50)."""
    rnd = random.Random(seed)

    def step(cur, i):
        if rnd.random() < 0.5:
            cur.execute("INSERT INTO public.items VALUES (%s, %s, 0)", (base + i, node.name))
        else:
            cur.execute("UPDATE public.items SET n = n + 1, val = %s WHERE id = %s", (node.name, rnd.randint(51, 100)))
    write_loop(node, stop, step, errors)


def _states(lab, node_id):
    return {n.name: n.sql("SELECT init_state FROM steep_repl.nodes WHERE node_id = %s", (node_id,))[0][0]
            for n in lab.nodes}


def _init(inventory, reconcile=True):
    extra = {"steep_init_target": "node3", "steep_init_source": "node1"}
    if reconcile:
        extra["steep_init_existing_data"] = "reconcile"
    return run_playbook("init_node.yml", inventory, extra_vars=extra)


@pytest.mark.parametrize("majors", [(18,), (17,), (17, 18)], ids=["pg18", "pg17", "mixed"])
def test_join_with_existing_data_reconciles(lab_factory, majors):
    lab = lab_factory(3, majors)
    n1, n2, n3 = lab.nodes
    for stmt in SETUP:
        n3.sql(stmt)
    # written on the joining node BEFORE the mesh's rows: the mesh's later rows win (last_write_wins)
    n3.sql("INSERT INTO public.items SELECT g, 'old-on-node3', 9 FROM generate_series(41, 45) g")
    inventory = build_mesh(lab, SETUP, GROUP_VARS, nodes=["node1", "node2"])
    n1.sql("INSERT INTO public.items SELECT g, 'seed', 0 FROM generate_series(1, 100) g")
    n1.sql("INSERT INTO public.notes SELECT 'k' || g, 'mesh' FROM generate_series(1, 20) g")
    wait_converged(lab, QUERY_ITEMS, nodes=["node1", "node2"])
    wait_converged(lab, QUERY_NOTES, nodes=["node1", "node2"])
    # written on the joining node AFTER: identical rows, rows that win, rows only here
    n3.sql("INSERT INTO public.items SELECT g, 'seed', 0 FROM generate_series(1, 40) g")
    n3.sql("INSERT INTO public.items SELECT g, 'new-on-node3', 7 FROM generate_series(46, 50) g")
    n3.sql("INSERT INTO public.items SELECT g, 'only-node3', 1 FROM generate_series(1001, 1010) g")
    n3.sql("INSERT INTO public.notes SELECT 'k' || g, 'mesh' FROM generate_series(1, 10) g")
    n3.sql("INSERT INTO public.notes SELECT 'k' || g, 'node3 keeps' FROM generate_series(11, 13) g")
    n3.sql("INSERT INTO public.notes VALUES ('only3', 'x')")
    inventory = lab.write_inventory(group_vars=GROUP_VARS)

    # the default refuses a target with rows, naming the option; nothing is copied, no slot stays
    before = n3.sql(QUERY_ITEMS)
    res = _init(inventory, reconcile=False)
    msg = " ".join(res.failure_messages())
    assert res.rc != 0 and "not empty" in msg and "steep_init_existing_data=reconcile" in msg, msg
    assert n3.sql(QUERY_ITEMS) == before
    assert n1.sql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'steep_to_node3'")[0][0] == 0

    stop, errors = threading.Event(), []
    writers = [threading.Thread(target=_writer, args=(n, s, stop, errors, b))
               for n, s, b in ((n1, 1, 100000), (n2, 2, 200000))]
    for w in writers:
        w.start()
    try:
        res = _init(inventory)
        assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
        time.sleep(0.5)
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert not errors, errors
    items = wait_converged(lab, QUERY_ITEMS, timeout=120)
    notes = wait_converged(lab, QUERY_NOTES, timeout=60)
    assert_healthy(lab)
    assert set(_states(lab, "node3").values()) == {"SYNCHRONIZED"}
    by_id = {r[0]: r for r in items}
    assert all(by_id[i][1:] == ("seed", 0) for i in range(1, 41))
    assert all(by_id[i][1:] == ("seed", 0) for i in range(41, 46))            # the mesh's later rows won
    assert all(by_id[i][1:] == ("new-on-node3", 7) for i in range(46, 51))    # node3's later rows won
    assert all(by_id[i][1:] == ("only-node3", 1) for i in range(1001, 1011))  # reached every node
    assert set(range(51, 101)) <= set(by_id)
    assert dict(notes)["k11"] == "node3 keeps" and dict(notes)["only3"] == "x" and dict(notes)["k20"] == "mesh"

    log = n3.sql("SELECT table_name, pk, winner, local_tuple, remote_tuple, strategy FROM steep_repl.conflict_log "
                 "WHERE subscription = 'reconcile:node1' ORDER BY table_name, pk")
    items_log = {json.loads(r[1])[0]: r for r in log if r[0] == "items"}
    assert sorted(items_log) == list(range(41, 51))  # identical rows are not conflicts
    assert all(items_log[i][2] == "remote" for i in range(41, 46))
    assert all(items_log[i][2] == "local" for i in range(46, 51))
    assert items_log[46][3]["val"] == "new-on-node3" and items_log[46][4]["val"] == "seed"
    assert items_log[46][5] == "last_write_wins"
    notes_log = [r for r in log if r[0] == "notes"]
    assert [(json.loads(r[1])[0], r[2], r[5]) for r in notes_log] == [
        ("k11", "local", "keep_local"), ("k12", "local", "keep_local"), ("k13", "local", "keep_local")]
    assert n3.sql("SELECT count(*) FROM steep_repl.reconcile_push")[0][0] == 0
    # every node holds the same versions, so later writes replicate without conflicts
    versions = "SELECT tbl, pk, ver_ts, ver_node FROM steep_repl.row_version WHERE tbl = 'public.items' " \
               "AND pk IN ('[46]', '[1001]', '[1]') ORDER BY 1, 2"
    wait_converged(lab, versions)
    conflicts = [n.sql("SELECT count(*) FROM steep_repl.conflict_log")[0][0] for n in lab.nodes]
    n2.sql("UPDATE public.items SET val = 'after-join' WHERE id IN (1, 46, 1001)")
    assert [r[0] for r in wait_converged(lab, QUERY_ITEMS) if r[1] == "after-join"] == [1, 46, 1001]
    assert [n.sql("SELECT count(*) FROM steep_repl.conflict_log")[0][0] for n in lab.nodes] == conflicts


def test_reconcile_manual_strategy_fails_clearly_then_recovers(lab_factory):
    lab = lab_factory(3, (18,))
    n1, n2, n3 = lab.nodes
    group_vars = dict(GROUP_VARS, steep_conflict_strategies={"public.notes": "manual"})
    inventory = build_mesh(lab, SETUP, group_vars, nodes=["node1", "node2"])
    n1.sql("INSERT INTO public.notes VALUES ('a', 'mesh'), ('b', 'mesh')")
    wait_converged(lab, QUERY_NOTES, nodes=["node1", "node2"])
    for stmt in SETUP:
        n3.sql(stmt)
    n3.sql("INSERT INTO public.notes VALUES ('a', 'mine'), ('c', 'only3')")
    inventory = lab.write_inventory(group_vars=group_vars)

    res = _init(inventory)
    msg = " ".join(res.failure_messages())
    assert res.rc != 0 and "manual" in msg and "public.notes" in msg and "Fix" in msg, msg
    assert n3.sql(QUERY_NOTES) == [("a", "mine"), ("c", "only3")]  # the table is all or nothing
    assert set(_states(lab, "node3").values()) == {"FAILED"}
    assert n3.sql("SELECT count(*) FROM steep_repl.conflict_log")[0][0] == 0

    # fixed by the user (an automatic strategy for the join): the same command recovers
    inventory = lab.write_inventory(group_vars=GROUP_VARS)
    res = _init(inventory)
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    notes = wait_converged(lab, QUERY_NOTES)
    assert notes == [("a", "mine"), ("b", "mesh"), ("c", "only3")]
    assert set(_states(lab, "node3").values()) == {"SYNCHRONIZED"}
    assert_healthy(lab)
