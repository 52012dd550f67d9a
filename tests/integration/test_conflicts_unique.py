"""Other unique keys: two rows of different primary keys that take one value of a UNIQUE constraint (two
nodes insert the same e-mail address under two ids). Native apply stops on it for ever (insert_exists on
the unique index; the reproduction had 8 apply errors per subscription in 8 s). steep decides between the
two rows' versions on every node (steep_repl._unique_decide) and the losing row goes everywhere, logged as
a UNIQUE_VIOLATION with both tuples. Real meshes: PostgreSQL 17/18 (2 nodes) and 17/18/17 (3 nodes)."""
import os
import random
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import agent_support  # noqa: E402
import conflict_support as cs  # noqa: E402
import mesh  # noqa: E402
from conftest import run_playbook  # noqa: E402

SEED = int(os.environ.get("STEEP_CONFLICT_SEED", "20261129"))
SETUP = ["CREATE TABLE public.acct (id int PRIMARY KEY, email text UNIQUE, v text)",
         "CREATE TABLE public.seat (id int PRIMARY KEY, row_no int NOT NULL, seat_no int NOT NULL, who text, "
         "UNIQUE (row_no, seat_no))",
         "CREATE TABLE public.marker (id int PRIMARY KEY, v int)"]
TABLES = ["public.acct", "public.seat", "public.marker"]


def unique_conflicts(node, table="public.acct"):
    got = [c for c in cs.conflicts(node, table) if c["type"] == "UNIQUE_VIOLATION"]
    resolved = dict(node.sql("SELECT id, resolved_tuple FROM steep_repl.conflict_log"))
    for c in got:
        c["resolved_tuple"] = resolved[c["id"]]
    return got


def settle(lab, rounds=5):
    """steep_repl.settle_unique_conflicts() on every node until no node has anything left to send (what the
    agents do every cycle), with a sync after each round. Returns how many tombstones went out."""
    total = 0
    for _round in range(rounds):
        cs.sync(lab)
        sent = sum(n.sql("SELECT steep_repl.settle_unique_conflicts()")[0][0] for n in lab.nodes)
        total += sent
        if not sent and not any(n.sql("SELECT count(*) FROM steep_repl.unique_settle")[0][0] for n in lab.nodes):
            return total
    raise AssertionError("tombstones still queued after %d rounds" % rounds)


def consistent(lab, tables=("public.acct", "public.seat")):
    for n in lab.nodes:
        for t in tables:
            assert cs.image_mismatches(n, t) == [], (n.name, t)
    assert cs.apply_errors(lab) == {n.name: 0 for n in lab.nodes}, cs.server_errors(lab)
    mesh.assert_healthy(lab)


@pytest.mark.parametrize("strategy,winner", [
    ("last_write_wins", "node2"), ("first_write_wins", "node1"),
    ({"strategy": "node_priority", "priority": ["node1", "node2"]}, "node1"), ("keep_local", "node2")],
    ids=["lww", "fww", "node_priority", "keep_local-decides-by-lww"])
def test_two_rows_taking_one_unique_value_converge(lab_factory, strategy, winner):
    lab = lab_factory(count=2, majors=(17, 18))
    gv = {"steep_replicated_tables": TABLES,
          "steep_conflict_strategies": {"public.acct": strategy, "public.seat": strategy}}
    inv = mesh.build_mesh(lab, SETUP, gv)
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.acct VALUES (10, 'old@x', 'seed'), (11, NULL, 'seed')")
    mesh.wait_converged(lab, "SELECT count(*) FROM public.acct")

    cs.pause(lab)                    # node2 writes second: the later version of each pair
    n1.sql("INSERT INTO public.acct VALUES (1, 'a@x', 'node1')")
    n1.sql("INSERT INTO public.seat VALUES (1, 7, 3, 'node1')")
    n1.sql("UPDATE public.acct SET email = 'b@x', v = 'node1' WHERE id = 10")     # an UPDATE takes the value
    n1.sql("INSERT INTO public.acct VALUES (12, NULL, 'node1')")                   # NULL matches nothing
    time.sleep(0.01)
    n2.sql("INSERT INTO public.acct VALUES (2, 'a@x', 'node2')")
    n2.sql("INSERT INTO public.seat VALUES (2, 7, 3, 'node2')")
    n2.sql("INSERT INTO public.acct VALUES (3, 'b@x', 'node2')")
    n2.sql("INSERT INTO public.acct VALUES (13, NULL, 'node2')")
    cs.resume(lab)
    cs.sync(lab)
    acct = mesh.wait_converged(lab, "SELECT id, email, v FROM public.acct ORDER BY id")
    seat = mesh.wait_converged(lab, "SELECT row_no, seat_no, who FROM public.seat")
    a_row = [r for r in acct if r[1] == "a@x"]
    b_row = [r for r in acct if r[1] == "b@x"]
    assert seat == [(7, 3, winner)] and a_row == [(1 if winner == "node1" else 2, "a@x", winner)], acct
    # the loser of b@x was an UPDATE (id 10 on node1) or an INSERT (id 3 on node2): a loser goes whole
    assert b_row == ([(10, "b@x", "node1")] if winner == "node1" else [(3, "b@x", "node2")]), acct
    assert sorted(r[0] for r in acct if r[1] is None) == [11, 12, 13]
    loser_ids = {2, 3} if winner == "node1" else {1, 10}
    assert not loser_ids & {r[0] for r in acct}
    for n in lab.nodes:             # the loser's version is a tombstone at the same version on every node
        assert n.sql("SELECT count(*) FROM steep_repl.row_version WHERE tbl = 'public.acct' AND deleted") == [(2,)]
    mesh.wait_converged(lab, "SELECT pk, ver_ts, ver_node, deleted FROM steep_repl.row_version ORDER BY tbl, pk")
    # one UNIQUE_VIOLATION per pair on each node, both tuples, the winner's row as the resolved tuple
    for n in lab.nodes:
        got = unique_conflicts(n)
        assert len(got) == 2 and len(unique_conflicts(n, "public.seat")) == 1, (n.name, got)
        for c in got:
            assert c["local_tuple"]["email"] == c["remote_tuple"]["email"]
            assert c["local_tuple"]["id"] != c["remote_tuple"]["id"]
            assert c["resolution"] in ("APPLIED_REMOTE", "KEPT_LOCAL")
            assert c["resolved_tuple"]["v"] == ("node1" if winner == "node1" else "node2")
    consistent(lab)

    # a UNIQUE_VIOLATION cannot be reverted (both rows cannot exist): refused, naming the fix; nothing changed
    c = unique_conflicts(n1)[0]
    before = (n1.sql("SELECT * FROM public.acct ORDER BY id"),
              n1.sql("SELECT id, resolution FROM steep_repl.conflict_log ORDER BY id"))
    with pytest.raises(psycopg2.Error) as err:
        n1.sql("SELECT steep_repl.revert_resolution(%s, 'try')", (c["id"],))
    assert "UNIQUE_VIOLATION" in str(err.value) and "Fix:" in str(err.value), str(err.value)
    assert (n1.sql("SELECT * FROM public.acct ORDER BY id"),
            n1.sql("SELECT id, resolution FROM steep_repl.conflict_log ORDER BY id")) == before

    # the loser's key is free again: writing it afterwards is an ordinary write that replicates
    loser = min(loser_ids)
    n1.sql("INSERT INTO public.acct VALUES (%s, 'again@x', 'node1')", (loser,))
    assert (loser, "again@x", "node1") in mesh.wait_converged(lab, "SELECT id, email, v FROM public.acct ORDER BY id")
    consistent(lab)
    assert run_playbook("site.yml", inv).changed() == 0


def seat_writer(node, idx, stop, stats, lock, failures):
    """Book random seats of a small hall (ids of this writer, seats shared by every node): inserts, moves
    to another seat, and a few cancellations."""
    rng = random.Random("%s-%s-%s" % (SEED, node.name, idx))
    base = {"node1": 1000, "node2": 2000, "node3": 3000}[node.name] + idx * 100
    conn = node.connect(autocommit=False)
    try:
        while time.monotonic() < stop:
            i = base + rng.randrange(40)
            r, s = rng.randrange(3), rng.randrange(4)
            try:
                with conn.cursor() as cur:
                    op = rng.random()
                    if op < 0.55:
                        cur.execute("INSERT INTO public.seat VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE "
                                    "SET row_no = EXCLUDED.row_no, seat_no = EXCLUDED.seat_no, who = EXCLUDED.who",
                                    (i, r, s, node.name))
                    elif op < 0.9:
                        cur.execute("UPDATE public.seat SET row_no = %s, seat_no = %s, who = %s WHERE id = %s",
                                    (r, s, node.name, i))
                    else:
                        cur.execute("DELETE FROM public.seat WHERE id = %s", (i,))
                conn.commit()
                with lock:
                    stats["commits"] += 1
            except psycopg2.Error:
                conn.rollback()                      # the seat is taken locally: a client-side error
                with lock:
                    stats["errors"] += 1
            time.sleep(rng.random() * 0.01)
    except Exception as exc:  # pragma: no cover - reported by the test
        failures.append(repr(exc))
    finally:
        conn.close()


def test_a_seeded_booking_workload_on_three_nodes_converges(lab_factory):
    """Three nodes book the 12 seats of a hall at once (their own booking ids, the same seats): every
    booking that lost its seat to another node's is gone everywhere, the rows are identical, no apply
    error. Cancellations (10 %) only remove a node's own bookings."""
    lab = lab_factory(count=3, majors=(17, 18))
    mesh.build_mesh(lab, SETUP, {"steep_replicated_tables": TABLES})
    stats, lock, failures = {"commits": 0, "errors": 0}, threading.Lock(), []
    stop = time.monotonic() + 3.0
    threads = [threading.Thread(target=seat_writer, args=(n, i, stop, stats, lock, failures))
               for n in lab.nodes for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert stats["commits"] > 50, stats
    # every node sends its losers' tombstones, as its agent does every cycle: a node that never saw both rows
    # of a pair (it applied the winner's deletion or move first) learns that way that the loser lost
    sent = settle(lab)
    assert sent > 0
    try:
        rows = mesh.wait_converged(lab, "SELECT id, row_no, seat_no, who FROM public.seat ORDER BY id", timeout=90)
    except AssertionError as exc:
        raise AssertionError("%s\n%r" % (exc, cs.server_errors(lab))) from None
    assert len({(r[1], r[2]) for r in rows}) == len(rows) <= 12
    mesh.wait_converged(lab, "SELECT pk, ver_ts, ver_node, deleted FROM steep_repl.row_version "
                             "WHERE tbl = 'public.seat' ORDER BY pk", timeout=30)
    assert sum(len(unique_conflicts(n, "public.seat")) for n in lab.nodes) > 0
    consistent(lab, tables=("public.seat",))


def test_a_unique_index_created_or_dropped_later_is_followed(lab_factory):
    """CREATE UNIQUE INDEX on a replicated table (a DDL event trigger regenerates its functions) is
    decided like a unique constraint; after DROP INDEX two rows with one value both stay."""
    lab = lab_factory(count=2, majors=(18, 17))
    inv = mesh.build_mesh(lab, ["CREATE TABLE public.tag (id int PRIMARY KEY, name text, v text)",
                                "CREATE TABLE public.marker (id int PRIMARY KEY, v int)"],
                          {"steep_replicated_tables": ["public.tag", "public.marker"]})
    n1, n2 = lab.nodes
    triggers = ("SELECT tgname, tgenabled FROM pg_catalog.pg_trigger WHERE tgrelid = 'public.tag'::regclass "
                "AND tgname LIKE 'steep_repl_a%' ORDER BY tgname")
    assert n1.sql(triggers) == [("steep_repl_apply", "R")]
    for n in lab.nodes:
        n.sql("CREATE UNIQUE INDEX tag_name ON public.tag (name)")
    assert run_playbook("site.yml", inv).changed() == 0
    # the changes without a context are checked by two more triggers of the apply function (name order:
    # before steep_repl_apply)
    assert n1.sql(triggers) == [("steep_repl_a_unique_ins", "R"), ("steep_repl_a_unique_upd", "R"), ("steep_repl_apply", "R")]
    cs.pause(lab)
    n1.sql("INSERT INTO public.tag VALUES (1, 'red', 'node1')")
    time.sleep(0.01)
    n2.sql("INSERT INTO public.tag VALUES (2, 'red', 'node2')")
    cs.resume(lab)
    cs.sync(lab)
    assert mesh.wait_converged(lab, "SELECT id, name, v FROM public.tag ORDER BY id") == [(2, "red", "node2")]
    assert [c["type"] for c in cs.conflicts(n1, "public.tag")] == ["UNIQUE_VIOLATION"]
    for n in lab.nodes:
        n.sql("DROP INDEX public.tag_name")
    cs.pause(lab)
    n1.sql("INSERT INTO public.tag VALUES (3, 'blue', 'node1')")
    n2.sql("INSERT INTO public.tag VALUES (4, 'blue', 'node2')")
    cs.resume(lab)
    cs.sync(lab)
    assert mesh.wait_converged(lab, "SELECT id, name FROM public.tag ORDER BY id") == [(2, "red"), (3, "blue"), (4, "blue")]
    assert len(cs.conflicts(n1, "public.tag")) == 1
    assert n1.sql(triggers) == [("steep_repl_apply", "R")]
    consistent(lab, tables=("public.tag",))
    assert run_playbook("site.yml", inv).changed() == 0
    # a unique index on an expression is not decided: the play says so, naming the index and the fix
    for n in lab.nodes:
        n.sql("CREATE UNIQUE INDEX tag_lower ON public.tag (id, lower(name))")
    res = run_playbook("site.yml", inv)
    assert res.rc == 0 and res.changed() == 0, res.failure_messages()
    warned = [w for _h, r in res.task_results("Set up the replication mesh") for w in r.get("warnings", [])]
    assert any("public.tag_lower" in w and "Fix:" in w for w in warned), warned


def enable(node, publisher):
    node.sql('ALTER SUBSCRIPTION "steep_from_%s" ENABLE' % publisher)


def wait_rows(node, query, want, timeout=30):
    cs.wait_for(lambda: node.sql(query) == want, timeout=timeout, what="%s on %s" % (want, node.name))


@pytest.mark.parametrize("settler", ["agent", "playbook"])
def test_a_node_that_never_saw_both_rows_learns_the_loser_lost(lab_factory, settler):
    """3 nodes (17/18/17). node1 decides the value for its own row A over node2's B and then deletes A;
    node3 gets node1's stream (A inserted, A deleted) before node2's (B): it never sees A and B together,
    so nothing there says B lost. steep_repl.settle_unique_conflicts() on node1 sends B's tombstone, the
    same version every deciding node wrote: node3 drops B, the others take it as a duplicate. Before it,
    node3 keeps B: the test checks that first. The sender is node1's agent (every cycle) or, for a mesh
    without agents, playbooks/purge_tombstones.yml (every node, before its rounds)."""
    lab = lab_factory(count=3, majors=(17, 18))
    inv = mesh.build_mesh(lab, SETUP, {"steep_replicated_tables": TABLES})
    n1, n2, n3 = lab.nodes
    q = "SELECT id, email FROM public.acct ORDER BY id"
    cs.pause(lab)
    n2.sql("INSERT INTO public.acct VALUES (2, 'e@x', 'node2')")     # B, the earlier write: it loses
    time.sleep(0.01)
    n1.sql("INSERT INTO public.acct VALUES (1, 'e@x', 'node1')")     # A
    enable(n1, "node2")
    wait_rows(n1, "SELECT count(*) FROM steep_repl.conflict_log WHERE conflict_type = 'UNIQUE_VIOLATION'", [(1,)])
    assert n1.sql(q) == [(1, "e@x")]
    n1.sql("DELETE FROM public.acct WHERE id = 1")
    enable(n3, "node1")
    wait_rows(n3, "SELECT count(*) FROM steep_repl.row_version WHERE tbl = 'public.acct'", [(1,)])
    cs.resume(lab)
    cs.sync(lab)
    assert n3.sql(q) == [(2, "e@x")] and n1.sql(q) == [] and n2.sql(q) == []     # what settling is for
    assert n1.sql("SELECT count(*) FROM steep_repl.unique_settle") == [(1,)]
    conflicts_before = {n.name: len(cs.conflicts(n)) for n in lab.nodes}
    queued = "SELECT count(*) FROM steep_repl.unique_settle"

    if settler == "agent":
        # node1's agent (a real process) sends it in its next cycle
        cfg = agent_support.make_configs(lab.root / "agent", lab, names=["node1"])
        path, port = cfg["node1"]
        agent = agent_support.AgentProc(path, port, lab.root / "agent" / "node1.log").start()
        try:
            wait_rows(n3, q, [])
            assert agent_support.wait_for(lambda: any("unique-conflict tombstone" in str(line.get("events", line))
                                                      for line in agent.lines()), 15), agent.lines()[-3:]
        finally:
            assert agent.stop() == 0
        assert n1.sql(queued) == [(0,)]
        assert n2.sql("SELECT steep_repl.settle_unique_conflicts()") == [(1,)]      # node2 decided too: same version
    else:
        task = "Purge settled tombstones on every node"
        res = run_playbook("purge_tombstones.yml", inv, check=True)
        [(_h, r)] = res.task_results(task)
        assert res.rc == 0 and r["changed"] and r["would_settle_unique"] == {"node1": 1, "node2": 1, "node3": 0}, r
        assert any("settle_unique_conflicts" in x for x in r["queries"]), r["queries"]
        # check mode sent nothing (second queries): node3 still holds the loser, both queues are full
        assert n3.sql(q) == [(2, "e@x")] and [n.sql(queued)[0][0] for n in lab.nodes] == [1, 1, 0]
        res = run_playbook("purge_tombstones.yml", inv)
        [(_h, r)] = res.task_results(task)
        assert res.rc == 0 and r["changed"] and r["unique_settled"] == {"node1": 1, "node2": 1, "node3": 0}, r
        wait_rows(n3, q, [])
        assert [n.sql(queued)[0][0] for n in lab.nodes] == [0, 0, 0]
    cs.sync(lab)
    assert mesh.wait_converged(lab, q) == []
    mesh.wait_converged(lab, "SELECT pk, ver_ts, ver_node, deleted, gen FROM steep_repl.row_version "
                             "WHERE tbl = 'public.acct' ORDER BY pk")
    derived = "SELECT ver_node, deleted, forced FROM steep_repl.row_version WHERE tbl = 'public.acct' AND pk = '[2]'"
    assert n3.sql(derived) == [("steep_repl", True, True)]
    if settler == "playbook":
        # the next run settles the derived tombstone, which every node now holds (its time is the loser's, so no
        # horizon covers it: each node records it, then purges it); a third run has nothing left (changed=0)
        res = run_playbook("purge_tombstones.yml", inv, check=True)
        [(_h, r)] = res.task_results(task)
        assert res.rc == 0 and r["would_purge"] == {"node1": 1, "node2": 1, "node3": 1}, r
        assert all(n.sql(derived) == [("steep_repl", True, True)] for n in lab.nodes)
        res = run_playbook("purge_tombstones.yml", inv)
        [(_h, r)] = res.task_results(task)
        assert res.rc == 0 and r["purged"] == {"node1": 1, "node2": 1, "node3": 1}, r
        for n in lab.nodes:
            assert n.sql(derived) == [] and n.sql("SELECT count(*) FROM steep_repl.derived_settled") == [(0,)]
            assert n.sql("SELECT (new_value->>'settled')::int FROM steep_repl.audit_log "
                         "WHERE action = 'tombstones.derived'") == [(1,)]
        res = run_playbook("purge_tombstones.yml", inv)
        assert res.rc == 0 and res.changed() == 0, res.task_results(task)     # idempotent
    # duplicates were no-ops, node3 applied a descending version: no new conflict anywhere
    assert {n.name: len(cs.conflicts(n)) for n in lab.nodes} == conflicts_before
    assert n1.sql("SELECT steep_repl.settle_unique_conflicts()") == [(0,)]          # the queue is empty
    consistent(lab, tables=("public.acct",))
    # bad input: refused, the queue untouched (second query)
    n2.sql("INSERT INTO steep_repl.unique_settle (tbl, pk) VALUES ('public.acct', '[99]')")
    with pytest.raises(psycopg2.Error) as err:
        n2.sql("SELECT steep_repl.settle_unique_conflicts(0)")
    assert "p_limit" in str(err.value) and "Fix:" in str(err.value)
    assert n2.sql("SELECT pk FROM steep_repl.unique_settle") == [("[99]",)]
    assert n2.sql("SELECT steep_repl.settle_unique_conflicts()") == [(0,)]          # no such version: dequeued only
    assert n2.sql("SELECT count(*) FROM steep_repl.unique_settle") == [(0,)]
    for bad in ("'{}'", "'[[\"public.acct\", \"[2]\"]]'", "'[[\"public.acct\", \"[2]\", \"soon\"]]'", "NULL"):
        with pytest.raises(psycopg2.Error) as err:
            n2.sql("SELECT steep_repl.settle_derived_tombstones(%s)" % bad)
        assert "derived tombstones must be a JSON array" in str(err.value) and "Fix:" in str(err.value.diag.message_hint)
    assert n2.sql("SELECT count(*) FROM steep_repl.derived_settled") == [(0,)]
    # the loser's key and its value written again, on two nodes: every node takes them (after the purge, over no
    # version; with the agent, over the derived tombstone, which they descend from on the writing node)
    n3.sql("INSERT INTO public.acct VALUES (2, 'e@x', 'node3 again')")
    assert mesh.wait_converged(lab, "SELECT id, email FROM public.acct ORDER BY id") == [(2, "e@x")]
    consistent(lab, tables=("public.acct",))
