"""Manual node initialisation with the REAL pg_dump / pg_restore, as docs/node-init.md tells a user.

node1 + node2 form a mesh taking writes; node3 joins:
  1. playbooks/init_manual_prepare.yml           (the target's slots on every node)
  2. on the source: read the backup LSN, pg_dump -Fc the replicated tables + steep_repl.row_version;
     pg_restore them on node3                     (writes keep running the whole time)
  3. playbooks/init_manual_complete.yml -e steep_init_source_lsn=<LSN>
Then every node holds the same rows, including the writes made during and after the backup.
"""
import os
import random
import subprocess
import threading
import time

import pytest

from conflict_support import write_loop
from conftest import run_playbook
from mesh import assert_healthy, build_mesh, mesh_state, wait_converged

SETUP = [
    "CREATE TABLE IF NOT EXISTS public.items (id integer PRIMARY KEY, val text NOT NULL, n integer NOT NULL DEFAULT 0)",
    "CREATE TABLE IF NOT EXISTS public.notes (k text PRIMARY KEY, body text)",
]
TABLES = ["public.items", "public.notes"]
QUERY_ITEMS = "SELECT id, val, n FROM public.items ORDER BY id"
QUERY_NOTES = "SELECT k, body FROM public.notes ORDER BY k"
INIT = {"steep_init_target": "node3", "steep_init_source": "node1"}
# the complete step checks source_lsn (syntax, ahead of the WAL, before the slot) once nodeinit does


def _writer(node, seed, stop, errors, base, counter):
    rnd = random.Random(seed)

    def step(cur, i):
        op = rnd.random()
        if op < 0.5:
            cur.execute("INSERT INTO public.items VALUES (%s, %s, 0)", (base + i, node.name))
        elif op < 0.8:
            cur.execute("UPDATE public.items SET n = n + 1, val = %s WHERE id = %s", (node.name, rnd.randint(1, 300)))
        elif op < 0.9:
            cur.execute("UPDATE public.notes SET body = %s WHERE k = %s",
                        ("%s-%d" % (node.name, i), "k%d" % rnd.randint(1, 2000)))
        else:
            cur.execute("DELETE FROM public.items WHERE id = %s", (base + rnd.randint(1, max(i - 1, 1)),))
        counter[0] += 1
    write_loop(node, stop, step, errors, pause=0.004)


class Writers:
    def __init__(self, nodes):
        self.stop, self.errors, self.count = threading.Event(), [], [0]
        self.threads = [threading.Thread(target=_writer, args=(n, i, self.stop, self.errors, 100000 * (i + 1), self.count))
                        for i, n in enumerate(nodes)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def backup_lsn(source, timeout=30):
    """The LSN the backup is consistent from, read as a user does BEFORE the dump starts.

    ``pg_current_wal_lsn()`` alone is not enough: a transaction whose commit record is already in
    the WAL below that LSN can still be in flight (invisible to a snapshot taken now). So we also
    wait until every transaction running at that moment has ended; the dump's snapshot, taken
    afterwards, then holds every commit below the LSN, and the slot replays everything above it.
    """
    lsn, xmax = source.sql("SELECT pg_catalog.pg_current_wal_lsn()::text, "
                           "pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text")[0]
    deadline = time.monotonic() + timeout
    while not source.sql("SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()) >= %s::xid8", (xmax,))[0][0]:
        assert time.monotonic() < deadline, "transactions running at %s did not end" % lsn
        time.sleep(0.05)
    return lsn


def dump_and_restore(source, target, path):
    """pg_dump -Fc --data-only of the replicated tables and their versions; pg_restore on the target."""
    env = dict(os.environ, PGPASSWORD=source.password)
    cmd = [source.tool("pg_dump"), "-Fc", "--data-only", "-f", str(path),
           "-h", source.host, "-p", str(source.port), "-U", source.user, "-d", source.database]
    for t in TABLES + ["steep_repl.row_version"]:
        cmd += ["-t", t]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr
    env["PGPASSWORD"] = target.password
    res = subprocess.run([target.tool("pg_restore"), "--data-only", "--single-transaction", "--exit-on-error",
                          "-h", target.host, "-p", str(target.port), "-U", target.user, "-d", target.database, str(path)],
                         capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr


def _states(lab):
    """node3's init state as every node records it (None where node3 is not registered)."""
    out = {}
    for n in lab.nodes:
        if n.sql("SELECT to_regclass('steep_repl.nodes') IS NULL")[0][0]:
            out[n.name] = None
            continue
        rows = n.sql("SELECT init_state FROM steep_repl.nodes WHERE node_id = 'node3'")
        out[n.name] = rows[0][0] if rows else None
    return out


def _mesh(lab_factory, majors):
    lab = lab_factory(3, majors)
    group_vars = {"steep_replicated_tables": TABLES}
    build_mesh(lab, SETUP, group_vars, nodes=["node1", "node2"])
    n1, n2, n3 = lab.nodes
    n1.sql("INSERT INTO public.items SELECT g, 'seed', 0 FROM generate_series(1, 300) g")
    n2.sql("INSERT INTO public.notes SELECT 'k' || g, repeat('x', 100) FROM generate_series(1, 20000) g")
    wait_converged(lab, "SELECT count(*) FROM public.notes", nodes=["node1", "node2"], timeout=120)
    for stmt in SETUP:  # the new node: the schema, no data
        n3.sql(stmt)
    return lab, lab.write_inventory(group_vars=group_vars)


@pytest.mark.parametrize("majors", [(17,), (18,)], ids=["pg17", "pg18"])
def test_manual_init_with_pg_dump_and_pg_restore(lab_factory, majors, tmp_path):
    lab, inventory = _mesh(lab_factory, majors)
    n1, n2, n3 = lab.nodes
    with Writers([n1, n2]) as writers:
        res = run_playbook("init_manual_prepare.yml", inventory, extra_vars=INIT)
        assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
        prepared = [r for _h, r in res.task_results("Prepare (") if "source_slot_lsn" in r]
        assert prepared and prepared[0]["state"] == "PREPARING", res.task_results("Prepare (")
        slot_lsn = prepared[0]["source_slot_lsn"]
        for n in (n1, n2):
            assert "steep_to_node3" in mesh_state(n)["slots"]
        assert set(_states(lab).values()) == {"PREPARING"}

        lsn = backup_lsn(n1)
        assert n1.sql("SELECT %s::pg_lsn >= %s::pg_lsn", (lsn, slot_lsn))[0][0]
        writes_before = writers.count[0]
        dump_and_restore(n1, n3, tmp_path / "node1.dump")
        assert writers.count[0] > writes_before, "no write ran during the backup"
        restored = n3.sql("SELECT count(*) FROM public.items")[0][0]

        res = run_playbook("init_manual_complete.yml", inventory, extra_vars=dict(INIT, steep_init_source_lsn=lsn))
        assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
        after = writers.count[0]
        deadline = time.monotonic() + 20  # writes go on after the join
        while writers.count[0] < after + 100 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not writers.errors, writers.errors
    rows = wait_converged(lab, QUERY_ITEMS, timeout=120)
    assert len(rows) > restored > 300 - 50
    assert len(wait_converged(lab, QUERY_NOTES, timeout=60)) == 20000
    versions = "SELECT tbl, pk, ver_ts, ver_node, deleted FROM steep_repl.row_version ORDER BY tbl, pk"
    wait_converged(lab, versions, timeout=60)
    assert_healthy(lab)  # apply_error_count == sync_error_count == 0 everywhere
    assert set(_states(lab).values()) == {"SYNCHRONIZED"}
    # init_manual_complete.yml does not run steep_ranges.yml / steep_agent.yml (init_node.yml does): the next
    # site.yml gives node3 its identity ranges; after that the mesh is stable
    first = run_playbook("site.yml", inventory)
    assert first.rc == 0, first.failure_messages()
    again = run_playbook("site.yml", inventory)
    assert again.rc == 0 and again.changed() == 0, again.failure_messages() or again.changed_tasks()


def _nothing_changed(lab, before):
    now = {n.name: (mesh_state(n), _slot(n)) for n in lab.nodes}
    assert now == before


def _slot(node):
    return node.sql("SELECT slot_name, confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots "
                    "WHERE slot_name = 'steep_to_node3'")


def _complete(inventory, lsn):
    return run_playbook("init_manual_complete.yml", inventory, extra_vars=dict(INIT, steep_init_source_lsn=lsn))


def test_manual_complete_before_prepare_fails_and_changes_nothing(lab_factory):
    lab, inventory = _mesh(lab_factory, (18,))
    n1 = lab.node("node1")
    lsn = n1.sql("SELECT pg_catalog.pg_current_wal_lsn()::text")[0][0]
    before = {n.name: (mesh_state(n), _slot(n)) for n in lab.nodes}
    states = _states(lab)
    res = _complete(inventory, lsn)
    assert res.rc != 0
    msg = " ".join(res.failure_messages())
    assert "steep_to_node3" in msg and "prepare" in msg, msg
    _nothing_changed(lab, before)
    assert _states(lab) == states


def test_manual_complete_refuses_a_bad_lsn_and_changes_nothing(lab_factory):
    lab, inventory = _mesh(lab_factory, (18,))
    n1, n2, n3 = lab.nodes
    early = n1.sql("SELECT pg_catalog.pg_current_wal_lsn()::text")[0][0]  # a "backup" taken before prepare
    res = run_playbook("init_manual_prepare.yml", inventory, extra_vars=INIT)
    assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
    before = {n.name: (mesh_state(n), _slot(n)) for n in lab.nodes}
    states = _states(lab)
    bad = {
        "not an LSN": ("banana", ["banana", "LSN"]),
        # a backup older than the slot misses what happened in between: must be refused, not ignored
        "before the slot": (early, [early, "steep_to_node3", "after"]),
        # an LSN the source has not reached: advancing there would skip changes not in the backup
        "in the future": ("FF/0", ["FF/0", "ahead"]),
    }
    for case, (lsn, words) in bad.items():
        res = _complete(inventory, lsn)
        assert res.rc != 0, case
        msg = " ".join(res.failure_messages())
        assert all(w in msg for w in words) and "MODULE FAILURE" not in msg, (case, msg)
        _nothing_changed(lab, before)
        assert _states(lab) == states, case
        assert n3.sql("SELECT count(*) FROM public.items")[0][0] == 0
