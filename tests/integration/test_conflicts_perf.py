"""The conflict engine's fast paths (issue #3) on a real 2-node mesh (PG 17 + PG 18) built by the real
site.yml: versions sent as INSERTs and replaced in place on the receiver, native apply without materialisation,
primary-key changes decided per key (with and without conflicts), re-inserts over tombstones, duplicate
delivery, and a bulk load into an empty, analysed table (the generic-plan trap). Every case ends with
identical rows AND versions on both nodes, and every live row equal to its version's image."""
import contextlib
import uuid

import pytest

import conflict_support as cs
import mesh
from conftest import LAB_BASE
from steeplab import make_lab

SETUP = ["CREATE TABLE public.f (id int PRIMARY KEY, v text, n int NOT NULL DEFAULT 0)",
         "CREATE TABLE public.g (a int, b text, v text, PRIMARY KEY (a, b))",
         "CREATE TABLE public.marker (id int PRIMARY KEY, v int)",
         # big values stored out of line, uncompressed
         "CREATE TABLE public.t (id int PRIMARY KEY, big text, small int NOT NULL DEFAULT 0, code int NOT NULL UNIQUE)",
         "ALTER TABLE public.t ALTER COLUMN big SET STORAGE EXTERNAL"]
GROUP_VARS = {"steep_replicated_tables": ["public.f", "public.g", "public.marker", "public.t"]}


@pytest.fixture(scope="module")
def lab():
    lab = make_lab(LAB_BASE / ("cp" + uuid.uuid4().hex[:8]), 2, (17, 18))
    try:
        mesh.build_mesh(lab, SETUP, GROUP_VARS)
        yield lab
    finally:
        lab.destroy()


def converged(lab, table):
    rows = mesh.wait_converged(lab, "SELECT * FROM %s ORDER BY 1, 2" % table, timeout=60)
    mesh.wait_converged(lab, "SELECT pk, ver_ts, ver_node, deleted, epoch, gen FROM steep_repl.row_version "
                             "WHERE tbl = %s ORDER BY pk", timeout=30, params=(table,))
    for n in lab.nodes:     # every live row is its version's image, every tombstone has no row, no row lacks one
        assert cs.image_mismatches(n, table, "id" if table in ("public.f", "public.t") else ("a", "b")) == [], n.name
    assert cs.apply_errors(lab) == {"node1": 0, "node2": 0}
    return rows


def n_conflicts(node, table):
    return node.sql("SELECT count(*) FROM steep_repl.conflict_log WHERE table_schema || '.' || table_name = %s",
                    (table,))[0][0]


def version_writes(node):
    return node.sql("SELECT n_tup_ins, n_tup_upd, n_tup_del FROM pg_catalog.pg_stat_user_tables "
                    "WHERE relid = 'steep_repl.row_version'::regclass")[0]


def test_versions_travel_as_inserts_and_descendants_apply_natively(lab):
    """An origin replaces every version with DELETE + INSERT (never an UPDATE, which the receiving apply worker
    would look up itself and could miss: docs/conflicts.md); the receiver ignores the DELETE and takes the fast
    path for a version that descends from its own: one UPDATE of its version row, the user-row change native."""
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.f SELECT g, 'a', 0 FROM generate_series(1, 200) g")
    converged(lab, "public.f")
    for n in (n1, n2):
        n.sql("SELECT pg_catalog.pg_stat_force_next_flush()")
    before = {n.name: version_writes(n) for n in (n1, n2)}
    n1.sql("UPDATE public.f SET n = n + 1")                      # 200 new versions
    n1.sql("UPDATE public.f SET v = 'b' WHERE id <= 50")         # 50
    n1.sql("DELETE FROM public.f WHERE id > 190")                 # 10 tombstones
    n1.sql("SELECT pg_catalog.pg_stat_force_next_flush()")

    def grown(node, col):
        def check():
            a = version_writes(node)
            if a[col] - before[node.name][col] >= 260:
                return a
            # one more applied transaction: the apply worker reports its statistics at most once a second
            n1.sql("INSERT INTO public.marker VALUES (-1, 0) ON CONFLICT (id) DO UPDATE SET v = public.marker.v + 1")
            return None
        return check

    origin = cs.wait_for(grown(n1, 0), what="node1's row_version statistics")
    assert origin[1] == before["node1"][1], "node1 updated a version row in place"
    assert origin[2] - before["node1"][2] >= 260
    rows = converged(lab, "public.f")
    receiver = cs.wait_for(grown(n2, 1), timeout=60, what="node2's row_version statistics")
    # the DELETE halves were ignored, no version was inserted (the marker's first version aside)
    assert receiver[2] == before["node2"][2] and receiver[0] - before["node2"][0] <= 1, (before, receiver)
    rows = converged(lab, "public.f")
    assert len(rows) == 190 and rows[0] == (1, "b", 1) and rows[-1] == (190, "a", 1)
    assert n_conflicts(n1, "public.f") == n_conflicts(n2, "public.f") == 0
    # node2 writes keys whose version came from node1: DELETE + INSERT (a third node may lack the version)
    n2.sql("UPDATE public.f SET n = 7 WHERE id = 1")
    assert converged(lab, "public.f")[0] == (1, "b", 7)
    # re-insert over a tombstone (new incarnation), applied natively on the other node
    n2.sql("INSERT INTO public.f VALUES (195, 'again', 0)")
    rows = converged(lab, "public.f")
    assert (195, "again", 0) in rows
    assert n1.sql("SELECT epoch, op FROM steep_repl.row_version WHERE tbl = 'public.f' AND pk = '[195]'") == [(1, "I")]


def test_primary_key_changes_with_and_without_conflicts(lab):
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.g SELECT g, 'k', 'x' FROM generate_series(1, 6) g")
    converged(lab, "public.g")
    # no conflict: tombstone of the old key + version of the new key, native UPDATE moves the row
    n1.sql("UPDATE public.g SET b = 'moved' WHERE a = 1")
    rows = converged(lab, "public.g")
    assert (1, "moved", "x") in rows and (1, "k", "x") not in rows
    # node2 updates the row that node1 moves meanwhile: the move's tombstone beats the update
    cs.pause(lab)
    try:
        n2.sql("UPDATE public.g SET v = 'node2' WHERE a = 2")
        n1.sql("UPDATE public.g SET b = 'moved' WHERE a = 2")
    finally:
        cs.resume(lab)
    cs.sync(lab)
    rows = converged(lab, "public.g")
    assert (2, "moved", "x") in rows and not [r for r in rows if r[:2] == (2, "k")]
    # both nodes create the same new key: node1 by moving a row, node2 by inserting it (INSERT_INSERT
    # on the new key, decided by last_write_wins; the old key's tombstone applies everywhere)
    cs.pause(lab)
    try:
        n1.sql("UPDATE public.g SET b = 'dup' WHERE a = 3")
        n2.sql("INSERT INTO public.g VALUES (3, 'dup', 'inserted-on-node2')")
    finally:
        cs.resume(lab)
    cs.sync(lab)
    rows = converged(lab, "public.g")
    assert (3, "dup", "inserted-on-node2") in rows and not [r for r in rows if r[:2] == (3, "k")]
    assert n_conflicts(n1, "public.g") >= 1 and n_conflicts(n2, "public.g") >= 1
    # node1's later update wins on the new key; on the old key the move's tombstone beats node2's
    # concurrent update (tombstones beat updates of the same incarnation)
    cs.pause(lab)
    try:
        n1.sql("UPDATE public.g SET b = 'dup4' WHERE a = 4")
        n2.sql("INSERT INTO public.g VALUES (4, 'dup4', 'first')")
        n1.sql("UPDATE public.g SET v = 'last' WHERE a = 4 AND b = 'dup4'")
        n2.sql("UPDATE public.g SET v = 'survivor' WHERE a = 4 AND b = 'k'")
    finally:
        cs.resume(lab)
    cs.sync(lab)
    rows = converged(lab, "public.g")
    assert (4, "dup4", "last") in rows and not [r for r in rows if r[:2] == (4, "k")]
    mesh.assert_healthy(lab)


def replay_session(node, origin):
    """A transaction on node that writes as an apply worker does (replica role, a replication origin, the
    deadlock_timeout the engine sets for it), counting the PL/pgSQL calls it makes (track_functions)."""
    conn = node.connect(autocommit=False)
    cur = conn.cursor()
    cur.execute("SELECT pg_catalog.pg_replication_origin_create(%s) WHERE NOT EXISTS "
                "(SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = %s)", (origin, origin))
    cur.execute("SET session_replication_role = replica")
    cur.execute("SET track_functions = 'pl'")
    cur.execute("SET deadlock_timeout = '5s'")      # as an apply worker's session after its first decision
    cur.execute("SELECT pg_catalog.pg_replication_origin_session_setup(%s)", (origin,))
    return conn, cur


@contextlib.contextmanager
def replayed_version(n1, n2, table, pk, origin):
    """node1's current version of (table, pk), INSERTed on node2 as node2's apply worker receives it (in
    a replay_session); yields the cursor for the row change and checks that follow, then commits."""
    ver = n1.sql("SELECT pg_catalog.to_jsonb(v)::text FROM steep_repl.row_version v WHERE tbl = %s AND pk = %s",
                 (table, pk))[0][0]
    conn, cur = replay_session(n2, origin)
    try:
        cur.execute("INSERT INTO steep_repl.row_version SELECT * FROM "
                    "pg_catalog.jsonb_populate_record(NULL::steep_repl.row_version, %s::jsonb)", (ver,))
        yield cur
        cur.execute("SELECT pg_catalog.pg_replication_origin_session_reset()")
        conn.commit()
    finally:
        conn.close()


def version_trigger_calls(cur):
    cur.execute("SELECT pg_catalog.pg_stat_get_xact_function_calls('steep_repl._row_version_apply()'::regprocedure)")
    return cur.fetchone()[0]


def test_duplicate_delivery_is_a_silent_noop(lab):
    """A version re-delivered (copy + replay during node initialisation) changes nothing and logs nothing."""
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.f VALUES (500, 'dup', 0)")
    converged(lab, "public.f")
    n1.sql("UPDATE public.f SET n = 1 WHERE id = 500")
    converged(lab, "public.f")
    logged = n_conflicts(n2, "public.f")
    # replay node1's current version of key 500 (and the row change) on node2 as the apply worker would
    conn, cur = replay_session(n2, "steep_test_dup")
    try:
        cur.execute("UPDATE steep_repl.row_version SET origin_xid = origin_xid "
                    "WHERE tbl = 'public.f' AND pk = '[500]'")          # identical version again
        cur.execute("UPDATE public.f SET v = 'replayed' WHERE id = 500")  # its (older) row change
        cur.execute("SELECT pg_catalog.pg_replication_origin_session_reset()")
        conn.commit()
    finally:
        conn.close()
    assert n2.sql("SELECT v, n FROM public.f WHERE id = 500") == [("dup", 1)]
    assert n_conflicts(n2, "public.f") == logged


def test_a_conflict_calls_the_version_trigger_once(lab):
    """The row_version trigger fires for what a peer sends (INSERTs; UPDATEs and DELETEs from an origin on
    an earlier 1.1 build), never for the engine's own UPDATE of a version inside it: that call only let
    the UPDATE through. A conflict replayed on node2
    as its apply worker receives it: one call, the remote version wins (later), its row change carries
    the winning image, one conflict logged; an earlier build's DELETE half is still ignored."""
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.f VALUES (600, 'base', 0)")
    converged(lab, "public.f")
    logged = n_conflicts(n2, "public.f")
    cs.pause(lab)
    try:
        n2.sql("UPDATE public.f SET v = 'node2' WHERE id = 600")
        n1.sql("UPDATE public.f SET v = 'node1' WHERE id = 600")      # later: wins under last_write_wins
        with replayed_version(n1, n2, "public.f", "[600]", "steep_test_calls") as cur:
            calls = version_trigger_calls(cur)
            cur.execute("UPDATE public.f SET v = 'node1' WHERE id = 600")      # its row change
            cur.execute("DELETE FROM steep_repl.row_version WHERE tbl = 'public.f' AND pk = '[600]'")
            deleted = cur.rowcount
            calls_after_delete = version_trigger_calls(cur)
    finally:
        cs.resume(lab)
    assert (calls, deleted, calls_after_delete) == (1, 0, 2)
    assert n2.sql("SELECT v FROM public.f WHERE id = 600") == [("node1",)]
    assert n2.sql("SELECT conflict_type, resolution, winner, local_tuple->>'v', remote_tuple->>'v' "
                  "FROM steep_repl.conflict_log WHERE table_name = 'f' AND pk = '[600]'") == [
        ("UPDATE_UPDATE", "APPLIED_REMOTE", "remote", "node2", "node1")]
    assert n_conflicts(n2, "public.f") == logged + 1
    cs.sync(lab)
    assert [r for r in converged(lab, "public.f") if r[0] == 600] == [(600, "node1", 0)]


def test_bulk_load_into_an_empty_analysed_table(lab):
    """A generic plan made while the table was empty must not turn every lookup into a scan."""
    n1, n2 = lab.nodes
    for n in lab.nodes:
        n.sql("VACUUM ANALYZE public.f")
    n1.sql("DELETE FROM public.f")
    converged(lab, "public.f")
    for n in lab.nodes:
        n.sql("VACUUM ANALYZE public.f")
    n1.sql("INSERT INTO public.f SELECT g, 'bulk', 0 FROM generate_series(1000, 6000) g")
    rows = mesh.wait_converged(lab, "SELECT count(*), sum(id) FROM public.f", timeout=120)
    assert rows == [(5001, sum(range(1000, 6001)))]
    converged(lab, "public.f")


def test_truncate_then_same_key_inserted_on_both_nodes_converges(lab):
    """TRUNCATE forgets the table's versions on every node, so keys inserted afterwards get first
    versions again: the same key inserted on both nodes is an INSERT_INSERT conflict, never an
    unversioned change that stops a subscription on insert_exists."""
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.g VALUES (100, 't', 'before'), (101, 't', 'before')")
    converged(lab, "public.g")
    n1.sql("TRUNCATE public.g")
    assert converged(lab, "public.g") == []
    for n in lab.nodes:
        assert n.sql("SELECT count(*) FROM steep_repl.row_version WHERE tbl = 'public.g'") == [(0,)], n.name
    before = n_conflicts(n1, "public.g") + n_conflicts(n2, "public.g")
    cs.pause(lab)
    try:
        n1.sql("INSERT INTO public.g VALUES (100, 't', 'node1')")
        n2.sql("INSERT INTO public.g VALUES (100, 't', 'node2')")
    finally:
        cs.resume(lab)
    cs.sync(lab)
    rows = converged(lab, "public.g")
    assert len(rows) == 1 and rows[0][2] in ("node1", "node2"), rows
    assert n_conflicts(n1, "public.g") + n_conflicts(n2, "public.g") > before
    assert all(s[0] for n in lab.nodes for s in n.sql("SELECT subenabled FROM pg_catalog.pg_subscription"))


def test_a_winning_remote_update_brings_its_whole_row(lab):
    """The native UPDATE of a remote version that won a conflict applies the winner's image, not only what
    the change carries: an origin's UPDATE sends a TOASTed value it did not change as "unchanged", and the
    receiver would keep its own. Replayed on node2 as its apply worker receives such a change."""
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.t VALUES (1, repeat('a', 6000), 0, 1)")
    converged(lab, "public.t")
    cs.pause(lab)
    try:
        n2.sql("UPDATE public.t SET big = repeat('b', 6000) WHERE id = 1")
        n1.sql("UPDATE public.t SET small = 1 WHERE id = 1")             # later: wins under last_write_wins
        with replayed_version(n1, n2, "public.t", "[1]", "steep_test_image") as cur:
            cur.execute("UPDATE public.t SET small = 1 WHERE id = 1")      # big left alone: node2's own value
        assert n2.sql("SELECT big = repeat('a', 6000), small FROM public.t WHERE id = 1") == [(True, 1)]
    finally:
        cs.resume(lab)
    (c,) = cs.conflicts(n2, "public.t", "[1]")
    assert (c["type"], c["resolution"], c["winner"]) == ("UPDATE_UPDATE", "APPLIED_REMOTE", "remote")
    assert (c["local_tuple"]["big"], c["local_tuple"]["small"]) == ("b" * 6000, 0)      # node2's row before
    assert (c["remote_tuple"]["big"], c["remote_tuple"]["small"]) == ("a" * 6000, 1)
    cs.sync(lab)                                                       # node1's change again: a duplicate
    rows = converged(lab, "public.t")
    assert [(r[0], r[1] == "a" * 6000, r[2]) for r in rows if r[0] == 1] == [(1, True, 1)]
    assert len(cs.conflicts(n2, "public.t", "[1]")) == 1


def conflicts_under_identity(lab, identity, rows, writes):
    """Both nodes use REPLICA IDENTITY <identity> for public.t: node1 inserts rows, then the writes
    [(node index, sql), ...] run while replication is paused, in that order. Returns the converged rows
    (identity back to DEFAULT afterwards)."""
    for n in lab.nodes:
        n.sql("ALTER TABLE public.t REPLICA IDENTITY " + identity)
    try:
        lab.nodes[0].sql("INSERT INTO public.t VALUES " + rows)
        converged(lab, "public.t")
        cs.pause(lab)
        try:
            for i, sql in writes:
                lab.nodes[i].sql(sql)
        finally:
            cs.resume(lab)
        cs.sync(lab)
        return converged(lab, "public.t")
    finally:
        for n in lab.nodes:
            n.sql("ALTER TABLE public.t REPLICA IDENTITY DEFAULT")


def test_replica_identity_on_other_columns_still_converges(lab):
    """With REPLICA IDENTITY USING INDEX on columns other than the key, the native apply looks the row up
    by those columns, which the conflict changed locally: it would not find the row. The engine
    materialises the winner itself there, and the change that follows finds the row again."""
    rows = conflicts_under_identity(lab, "USING INDEX t_code_key", "(2, 'x', 0, 2)", [
        (1, "UPDATE public.t SET code = 1002 WHERE id = 2"),
        (0, "UPDATE public.t SET small = 1 WHERE id = 2")])             # later: wins under last_write_wins
    assert [r for r in rows if r[0] == 2] == [(2, "x", 1, 2)]
    assert [c["resolution"] for c in cs.conflicts(lab.nodes[1], "public.t", "[2]")] == ["APPLIED_REMOTE"]


def test_replica_identity_full_converges_both_ways(lab):
    """With REPLICA IDENTITY FULL an origin sends the whole old row, which a conflict has changed on the
    receiver; the receiver still finds the row by its primary key, so a winning remote update is applied
    as with the default identity. Both directions: node1 (PostgreSQL 17) and node2 (18) receive a winner."""
    n1, n2 = lab.nodes
    rows = conflicts_under_identity(lab, "FULL", "(3, 'x', 0, 3), (4, 'x', 0, 4)", [
        (0, "UPDATE public.t SET big = 'node1' WHERE id = 3"),
        (1, "UPDATE public.t SET big = 'node2' WHERE id = 4"),
        (1, "UPDATE public.t SET small = 2 WHERE id = 3"),               # later: node1 receives the winner
        (0, "UPDATE public.t SET small = 1 WHERE id = 4")])              # later: node2 receives the winner
    assert [r for r in rows if r[0] in (3, 4)] == [(3, "x", 2, 3), (4, "x", 1, 4)]
    assert [c["resolution"] for c in cs.conflicts(n1, "public.t", "[3]")] == ["APPLIED_REMOTE"]
    assert [c["resolution"] for c in cs.conflicts(n2, "public.t", "[4]")] == ["APPLIED_REMOTE"]
