"""Purging settled tombstones (playbooks/purge_tombstones.yml, steep.repl.tombstones, docs/conflicts.md
Tombstones) on a real 3-node mesh (PG 17 + 18 + 17) built by the real site.yml: what is purged and what stays,
--check/--diff, idempotence, the rule that lets a re-insert from a node that purged beat a tombstone another
node still holds, a purge during a concurrent randomised workload (the nodes converge), and every refusal
(nothing changed, read back on every node)."""
import datetime
import json
import sys
import threading
import uuid

import pytest

import conflict_support as cs
import mesh
from agent_support import wait_for
from conftest import LAB_BASE, run_playbook
from steeplab import make_lab

sys.path.insert(0, str(mesh.ROOT / ".collections"))
from ansible_collections.steep.repl.plugins.module_utils import nodeinit  # noqa: E402

SETUP = ["CREATE TABLE public.t (id int PRIMARY KEY, v text)",
         "CREATE TABLE public.kl (id int PRIMARY KEY, v text)",
         "CREATE TABLE public.w (id int PRIMARY KEY, v int, who text, n int NOT NULL DEFAULT 0)",
         "CREATE TABLE public.marker (id int PRIMARY KEY, v int)"]
GROUP_VARS = {"steep_replicated_tables": ["public.t", "public.kl", "public.w", "public.marker"],
              "steep_conflict_strategies": {"public.kl": "keep_local"}}
TASK = "Purge settled tombstones"


@pytest.fixture(scope="module")
def lab():
    lab = make_lab(LAB_BASE / ("tb" + uuid.uuid4().hex[:8]), 3, (17, 18))
    try:
        lab.inventory_path = mesh.build_mesh(lab, SETUP, GROUP_VARS)
        lab.nodes[0].sql("INSERT INTO public.t SELECT g, 'v' || g FROM generate_series(1, 30) g")
        lab.nodes[0].sql("INSERT INTO public.kl SELECT g, 'v' || g FROM generate_series(1, 5) g")
        mesh.wait_converged(lab, "SELECT count(*) FROM public.t, public.kl")
        yield lab
    finally:
        lab.destroy()


def tombstones(node):
    """{table: number of tombstones} of one node."""
    return dict(node.sql("SELECT tbl, count(*)::int FROM steep_repl.row_version WHERE deleted GROUP BY tbl"))


def horizons(node):
    return node.sql("SELECT node_id, horizon FROM steep_repl.tombstone_horizon ORDER BY node_id")


def everything(lab):
    """What a refused run must leave as it was, on every node."""
    return {n.name: (tombstones(n), horizons(n), n.sql("SELECT count(*) FROM steep_repl.row_version")) for n in lab.nodes}


def purge(lab, **kw):
    return run_playbook("purge_tombstones.yml", lab.inventory_path, **kw)


def result_of(res):
    [(_host, r)] = res.task_results(TASK)
    return r


def healthy(lab):
    assert cs.apply_errors(lab) == {"node1": 0, "node2": 0, "node3": 0}
    mesh.assert_healthy(lab)


def test_purge_removes_settled_tombstones_on_every_node(lab):
    n1, n2, n3 = lab.nodes
    n1.sql("DELETE FROM public.t WHERE id BETWEEN 1 AND 5")
    n2.sql("DELETE FROM public.t WHERE id BETWEEN 6 AND 10")
    n3.sql("DELETE FROM public.t WHERE id = 11")
    n1.sql("DELETE FROM public.kl WHERE id = 1")       # keep_local: never settled
    cs.sync(lab)
    for n in lab.nodes:
        assert tombstones(n) == {"public.t": 11, "public.kl": 1}

    # --check --diff: tells what a run purges, changes nothing (not even a horizon)
    before = everything(lab)
    res = purge(lab, check=True, diff=True)
    assert res.rc == 0 and res.changed() == 1, res.stdout[-3000:]
    r = result_of(res)
    assert r["would_purge"] == {"node1": 11, "node2": 11, "node3": 11}
    assert r["diff"]["before"]["node2"] == {"tombstones": 12, "settled": 0}
    assert r["diff"]["after"]["node2"] == {"tombstones": 1, "settled": 0}
    assert everything(lab) == before

    res = purge(lab, diff=True)
    assert res.rc == 0 and res.changed() == 1, res.failure_messages() or res.stdout[-3000:]
    r = result_of(res)
    assert r["purged"] == {"node1": 11, "node2": 11, "node3": 11}
    assert set(r["horizons"]) == {"node1", "node2", "node3"}
    assert r["diff"]["after"]["node3"] == {"tombstones": 1, "settled": 0}
    for n in lab.nodes:
        assert tombstones(n) == {"public.kl": 1}
        assert [h[0] for h in horizons(n)] == ["node1", "node2", "node3"]
        assert n.sql("SELECT count(*) FROM steep_repl.row_version WHERE tbl = 'public.t'") == [(19,)]
        assert cs.image_mismatches(n, "public.t") == []
        assert n.sql("SELECT count(*) FROM steep_repl.audit_log WHERE action = 'tombstones.horizon'")[0][0] >= 1

    res = purge(lab)                                   # nothing left to purge: changed=0
    assert res.rc == 0 and res.changed() == 0, res.stdout[-3000:]

    # the purged keys are written again, on several nodes at once: the mesh converges on them
    n2.sql("INSERT INTO public.t VALUES (1, 'again on node2')")
    n3.sql("INSERT INTO public.t VALUES (6, 'again on node3')")
    n1.sql("INSERT INTO public.t VALUES (11, 'again on node1')")
    rows = mesh.wait_converged(lab, "SELECT id, v FROM public.t WHERE id IN (1, 6, 11) ORDER BY id")
    assert rows == [(1, "again on node2"), (6, "again on node3"), (11, "again on node1")]
    healthy(lab)


def test_a_reinsert_after_a_purge_beats_the_tombstone_another_node_still_holds(lab):
    """node1 purged, node2 and node3 have the horizon but not yet purged (a run between its two last steps):
    node1's re-insert starts over at epoch 0, which a tombstone of the same epoch would beat; the settled
    tombstone gives way instead, on every node, without a conflict."""
    n1, n2, n3 = lab.nodes
    n1.sql("DELETE FROM public.t WHERE id = 20")
    n2.sql("DELETE FROM public.kl WHERE id = 2")
    cs.sync(lab)
    held = tombstones(n1)               # what earlier tests left (purged or keep_local)
    assert held.get("public.t", 0) == 1 and held.get("public.kl", 0) >= 1
    # the mesh is quiet and every change applied everywhere (sync): everything up to now is settled
    now = n1.sql("SELECT pg_catalog.clock_timestamp()::text")[0][0]
    for n in lab.nodes:
        n.sql("SELECT steep_repl.set_tombstone_horizon(%s::jsonb)",
              (json.dumps({"node1": now, "node2": now, "node3": now}),))
    assert n1.sql("SELECT steep_repl.purge_tombstones()") == [(1,)]            # t 20; kl 2 is keep_local
    assert tombstones(n1) == {"public.kl": held["public.kl"]}
    assert tombstones(n2) == tombstones(n3) == held
    # node initialisation copies versions without settled tombstones (a copy of one would beat the re-insert)
    conn = n2.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(nodeinit._versions_select(cur, "public.t", "pk, deleted"))
            copied = dict(cur.fetchall())
    finally:
        conn.close()
    assert "[20]" not in copied and copied["[21]"] is False
    n1.sql("INSERT INTO public.t VALUES (20, 'after the purge')")
    assert n1.sql("SELECT epoch, depth FROM steep_repl.row_version WHERE tbl = 'public.t' AND pk = '[20]'") == [(0, 0)]
    rows = mesh.wait_converged(lab, "SELECT id, v FROM public.t WHERE id = 20")
    assert rows == [(20, "after the purge")]
    for n in lab.nodes:
        assert cs.conflicts(n, "public.t", "[20]") == []
        assert n.sql("SELECT deleted, ver_node FROM steep_repl.row_version "
                     "WHERE tbl = 'public.t' AND pk = '[20]'") == [(False, "node1")]
        assert cs.image_mismatches(n, "public.t") == []
    healthy(lab)


def test_purge_during_a_concurrent_workload_converges(lab):
    """Seeded writers on every node (updates, inserts of the same keys, deletes, multi-row transactions) while
    the playbook settles and purges twice: when writes stop, every node holds the same rows, each row the
    image of its version. Keys the workload never touches are deleted first, so that the runs during the
    workload surely have settled tombstones to purge (the workload's own deletes are often re-inserted before
    a run ends its rounds)."""
    errors = []
    done = threading.Event()
    n1, n2 = lab.nodes[:2]
    n1.sql("INSERT INTO public.w (id, v, who) SELECT g, g, 'node1' FROM generate_series(101, 120) g")
    cs.sync(lab)
    n2.sql("DELETE FROM public.w WHERE id BETWEEN 101 AND 120")
    cs.sync(lab)

    def workload():
        try:
            for seed in (11, 12):
                cs.run_workload(lab, "public.w", seed, seconds=6.0, keys=8)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=workload)
    t.start()
    runs = []
    while not done.is_set() or len(runs) < 2:
        runs.append(purge(lab, extra_vars={"steep_tombstone_stall_timeout": 30}))
        if len(runs) >= 4:
            break
    t.join()
    assert not errors, errors
    assert all(r.rc == 0 for r in runs), [r.failure_messages() for r in runs]
    assert sum(sum(result_of(r).get("purged", {}).values()) for r in runs) >= 3 * 20
    cs.sync(lab)
    mesh.wait_converged(lab, "SELECT id, v, who, n FROM public.w ORDER BY id")
    for n in lab.nodes:
        assert cs.image_mismatches(n, "public.w") == []
    assert any(cs.conflicts(n, "public.w") for n in lab.nodes)
    healthy(lab)


# --------------------------------------------------------------------------- refusals: nothing changed
def refused(lab, expected, **kw):
    before = everything(lab)
    res = purge(lab, **kw)
    assert res.rc != 0
    msg = " ".join(res.failure_messages())
    assert all(e in msg for e in expected) and "Fix:" in msg, msg
    assert everything(lab) == before
    return msg


def test_refuses_with_a_disabled_subscription(lab):
    n1, n3 = lab.nodes[0], lab.nodes[2]
    n1.sql("DELETE FROM public.t WHERE id = 21")
    cs.sync(lab)
    n3.sql("ALTER SUBSCRIPTION steep_from_node1 DISABLE")
    try:
        refused(lab, ["subscription steep_from_node1 on node3 is disabled", "ALTER SUBSCRIPTION steep_from_node1 ENABLE"])
    finally:
        n3.sql("ALTER SUBSCRIPTION steep_from_node1 ENABLE")


def test_refuses_when_a_node_has_not_applied_a_peer(lab):
    """node3's apply worker waits behind a lock: its slot on node1 stops; the run fails after the stall
    timeout, before any horizon or purge."""
    n1, n3 = lab.nodes[0], lab.nodes[2]
    holder = n3.connect(autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE public.t IN SHARE MODE")
        n1.sql("UPDATE public.t SET v = 'held' WHERE id = 22")
        refused(lab, ["slot steep_to_node3 on node1 has not moved for 3s", "node3 has not applied node1's changes",
                      "no tombstone was purged"], extra_vars={"steep_tombstone_stall_timeout": 3})
    finally:
        holder.rollback()
        holder.close()
    cs.sync(lab)


def test_refuses_while_an_old_transaction_runs(lab):
    n2 = lab.nodes[1]
    holder = n2.connect(autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("INSERT INTO public.t VALUES (100, 'open')")
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
        refused(lab, ["transactions on node2 that began before this run are still running after 3s",
                      "pid %s (client backend" % pid], extra_vars={"steep_tombstone_stall_timeout": 3})
    finally:
        holder.rollback()
        holder.close()


def test_refuses_while_a_node_is_initialised(lab):
    n2 = lab.nodes[1]
    state = n2.sql("SELECT init_state FROM steep_repl.nodes WHERE node_id = 'node2'")[0][0]
    n2.sql("UPDATE steep_repl.nodes SET init_state = 'CATCHING_UP' WHERE node_id = 'node2'")
    try:
        refused(lab, ["node2 is CATCHING_UP, not SYNCHRONIZED", "init_node.yml"])
    finally:
        n2.sql("UPDATE steep_repl.nodes SET init_state = %s WHERE node_id = 'node2'", (state,))


def test_refuses_a_run_that_leaves_out_a_node_of_the_mesh(lab, tmp_path):
    """An inventory without node3 (which still replicates with both): its versions would escape the rounds."""
    lab.nodes[0].sql("DELETE FROM public.t WHERE id = 24")
    cs.sync(lab)
    before = everything(lab)
    inv = lab.write_inventory(tmp_path / "two.yml", group_vars=GROUP_VARS, nodes=["node1", "node2"])
    res = run_playbook("purge_tombstones.yml", inv)
    assert res.rc != 0
    msg = " ".join(res.failure_messages())
    assert "node1 replicates with node(s) node3, which this run does not include" in msg and "Fix:" in msg, msg
    assert everything(lab) == before


def test_refuses_a_bad_batch_size(lab):
    refused(lab, ["batch_size must be 1 or more, got 0"], extra_vars={"steep_tombstone_batch_size": 0})


@pytest.mark.parametrize("arg, expected", [
    ("'[]'", "tombstone horizons must be a JSON object"),
    ("'{\"node9\": \"2020-01-01\"}'", "tombstone horizons name nodes this node does not know: 'node9'"),
    ("'{\"node1\": \"soon\"}'", "tombstone horizons must be finite timestamps"),
    ("'{\"node1\": \"infinity\"}'", "tombstone horizons must be finite timestamps"),
    ("pg_catalog.jsonb_build_object('node1', (pg_catalog.now() + interval '1 day')::text)",
     "at most a minute ahead of this node's clock"),
])
def test_set_tombstone_horizon_refuses_bad_input(lab, arg, expected):
    n1 = lab.nodes[0]
    before = horizons(n1)
    with pytest.raises(Exception) as exc:
        n1.sql("SELECT steep_repl.set_tombstone_horizon(%s)" % arg)
    assert expected in str(exc.value) and "Fix:" in str(exc.value.diag.message_hint or ""), str(exc.value)
    assert horizons(n1) == before


def test_purge_tombstones_refuses_a_bad_batch(lab):
    n1 = lab.nodes[0]
    n1.sql("DELETE FROM public.t WHERE id = 23")
    cs.sync(lab)
    before = tombstones(n1)
    with pytest.raises(Exception) as exc:
        n1.sql("SELECT steep_repl.purge_tombstones(0)")
    assert "the batch size must be a positive number, got 0" in str(exc.value)
    assert tombstones(n1) == before


def test_a_table_switched_from_keep_local_to_an_order_converges_after_a_purge(lab):
    """keep_local leaves the nodes with different versions of a key on purpose; once the table's strategy
    is an order, its old tombstones are settled and purged like any other, and the next write of the key
    brings every node to the same row (runs last: it changes the strategy of public.kl)."""
    n1, n2, n3 = lab.nodes
    n1.sql("INSERT INTO public.kl VALUES (2002, 'v'), (2003, 'v')")
    assert mesh.wait_converged(lab, "SELECT count(*) FROM public.kl WHERE id > 2000") == [(2,)]
    cs.pause(lab)
    n1.sql("DELETE FROM public.kl WHERE id = 2002")
    n2.sql("UPDATE public.kl SET v = 'node2' WHERE id = 2002")
    n3.sql("UPDATE public.kl SET v = 'node3' WHERE id = 2003")
    n1.sql("UPDATE public.kl SET v = 'node1' WHERE id = 2003")
    cs.resume(lab)
    cs.sync(lab)
    assert n1.sql("SELECT v FROM public.kl WHERE id = 2002") == []            # each node kept its own
    assert n2.sql("SELECT v FROM public.kl WHERE id = 2002") == [("node2",)]
    gv = dict(GROUP_VARS, steep_conflict_strategies={})
    lab.inventory_path = lab.write_inventory(lab.inventory_path, group_vars=gv)
    res = run_playbook("site.yml", lab.inventory_path)
    assert res.rc == 0, res.failure_messages()
    assert all(n.sql("SELECT strategy FROM steep_repl.table_strategy('public', 'kl')") == [("last_write_wins",)]
               for n in lab.nodes)
    res = purge(lab)
    assert res.rc == 0, res.failure_messages()
    assert n1.sql("SELECT count(*) FROM steep_repl.row_version WHERE tbl = 'public.kl' AND pk = '[2002]'") == [(0,)]
    # the next writes of the diverged keys: a node that has the row, a node that has not
    n2.sql("UPDATE public.kl SET v = 'after2' WHERE id = 2002")
    n3.sql("UPDATE public.kl SET v = 'after3' WHERE id = 2003")
    cs.sync(lab)
    assert mesh.wait_converged(lab, "SELECT id, v FROM public.kl WHERE id IN (2002, 2003) ORDER BY id") == [
        (2002, "after2"), (2003, "after3")]
    n1.sql("INSERT INTO public.kl VALUES (7, 'new') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v")
    mesh.wait_converged(lab, "SELECT id, v FROM public.kl ORDER BY id")
    for n in lab.nodes:
        assert cs.image_mismatches(n, "public.kl") == [], n.name
    healthy(lab)


def test_tombstones_of_a_node_that_left_the_mesh_are_settled(lab, tmp_path):
    """Runs last. node3 deletes rows while node2 does not receive from it, then leaves the mesh (site.yml
    without it drops its subscriptions and slots; node1 and node2 forget its row): node1 holds node3's
    tombstones, node2 neither holds them nor knows node3. The next purge settles them on node1 with the run's
    earliest mark as horizon (before, they stayed for ever), and node2 is not asked about a node it does not
    know. Then node2's next writes of those keys reach node1 (a kept tombstone would have beaten them: the
    nodes would stay apart), and the mesh converges."""
    n1, n2, n3 = lab.nodes
    keys = "SELECT id, v FROM public.t WHERE id BETWEEN 25 AND 29 ORDER BY id"
    mesh.wait_converged(lab, keys)
    n2.sql("ALTER SUBSCRIPTION steep_from_node3 DISABLE")
    n3.sql("DELETE FROM public.t WHERE id BETWEEN 25 AND 28")
    n1.sql("DELETE FROM public.t WHERE id = 29")
    of_node3 = "SELECT count(*) FROM steep_repl.row_version WHERE deleted AND ver_node = 'node3' AND tbl = 'public.t'"
    assert wait_for(lambda: n1.sql(of_node3) == [(4,)], 30)
    assert wait_for(lambda: n2.sql("SELECT count(*) FROM public.t WHERE id = 29") == [(0,)], 30)
    assert n2.sql(of_node3) == [(0,)] and len(n2.sql(keys)) == 4      # node2 never got node3's deletes
    inv = lab.write_inventory(tmp_path / "two.yml", group_vars=dict(GROUP_VARS, steep_conflict_strategies={}),
                              nodes=["node1", "node2"])
    res = run_playbook("site.yml", inv)
    assert res.rc == 0, res.failure_messages()
    for n in (n1, n2):
        st = mesh.mesh_state(n)
        assert "steep_from_node3" not in st["subscriptions"] and "steep_to_node3" not in st["slots"]
        assert n.sql("SELECT steep_repl.remove_node('node3')") == [(True,)]
    with pytest.raises(Exception) as exc:     # a node this node does not know and that left nothing here: refused
        n2.sql("""SELECT steep_repl.set_tombstone_horizon('{"node3": "2020-01-01"}')""")
    assert "does not know: 'node3'" in str(exc.value)

    h3 = "SELECT horizon FROM steep_repl.tombstone_horizon WHERE node_id = 'node3'"
    before = [(n.sql(of_node3), n.sql(h3)) for n in (n1, n2)]
    res = run_playbook("purge_tombstones.yml", inv, check=True)
    assert res.rc == 0 and res.changed() == 1, res.failure_messages()
    assert result_of(res)["departed"] == ["node3"]
    assert [(n.sql(of_node3), n.sql(h3)) for n in (n1, n2)] == before
    res = run_playbook("purge_tombstones.yml", inv, diff=True)
    assert res.rc == 0 and res.changed() == 1, res.failure_messages()
    r = result_of(res)
    assert r["departed"] == ["node3"] and r["horizons"]["node3"] == min(r["horizons"][i] for i in ("node1", "node2"))
    assert n1.sql(of_node3) == [(0,)] and n1.sql(h3)[0][0] == datetime.datetime.fromisoformat(r["horizons"]["node3"])
    assert n2.sql(h3) == before[1][1]                                  # not sent where node3 is unknown
    for n in (n1, n2):
        assert n.sql("SELECT count(*) FROM steep_repl.row_version WHERE tbl = 'public.t' AND pk = '[29]'") == [(0,)]
    assert run_playbook("purge_tombstones.yml", inv).changed() == 0

    assert n1.sql(keys) == [] and len(n2.sql(keys)) == 4               # apart since node3 left
    n2.sql("UPDATE public.t SET v = 'kept on node2' WHERE id BETWEEN 25 AND 27")
    n2.sql("DELETE FROM public.t WHERE id = 28")
    n1.sql("INSERT INTO public.t VALUES (29, 'back on node1')")
    rows = mesh.wait_converged(lab, keys, nodes=["node1", "node2"])
    assert rows == [(25, "kept on node2"), (26, "kept on node2"), (27, "kept on node2"), (29, "back on node1")]
    for n in (n1, n2):
        assert cs.image_mismatches(n, "public.t") == [], n.name
    errors = cs.apply_errors(lab)
    assert errors["node1"] == 0 and errors["node2"] == 0, errors
    mesh.assert_healthy(lab, nodes=["node1", "node2"])
