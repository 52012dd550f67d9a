"""Full-mesh replication set-up on real labs with the real site.yml (no mocks)."""
import concurrent.futures
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mesh  # noqa: E402
from conftest import run_playbook  # noqa: E402
from steeplab import LAB_PASSWORD  # noqa: E402

T = "CREATE TABLE public.t (id int PRIMARY KEY, v text)"
GV = {"steep_replicated_tables": ["public.t"]}
MESH_TASK = "Set up the replication mesh"
CLOCK_TASK = "Check the clock drift"


def task(res, name):
    got = res.task_results(name)
    assert got, "task %r did not run: %s" % (name, res.failure_messages())
    return got[0][1]


def states(lab, nodes=None):
    return {n.name: mesh.mesh_state(n) for n in (mesh._lab_nodes(lab, nodes))}


def triggers(lab):
    return {n.name: n.sql("SELECT tgrelid::regclass::text, tgname FROM pg_trigger "
                          "WHERE tgname LIKE 'steep%%' AND tgrelid::regclass::text NOT LIKE 'steep\\_repl.%%' "
                          "ORDER BY 1, 2") for n in lab.nodes}


def write_everywhere_and_converge(lab, table="t", start=0, nodes=None):
    members = mesh._lab_nodes(lab, nodes)
    for i, n in enumerate(members):
        n.sql("INSERT INTO %s VALUES (%%s, %%s)" % table, (start + i, n.name))
    rows = mesh.wait_converged(lab, "SELECT id, v FROM %s ORDER BY id" % table, nodes=nodes)
    for i, n in enumerate(members):
        assert (start + i, n.name) in rows
    return rows


@pytest.mark.parametrize("count,majors", [(2, (18,)), (2, (17,)), (3, (17, 18))],
                         ids=["pg18-2nodes", "pg17-2nodes", "mixed-3nodes"])
def test_mesh_setup_replicates_every_direction_and_is_idempotent(lab_factory, count, majors):
    lab = lab_factory(count=count, majors=majors)
    inv = mesh.build_mesh(lab, T, GV)
    mesh.assert_healthy(lab)
    ids = [n.name for n in lab.nodes]
    for n in lab.nodes:
        st = mesh.mesh_state(n)
        peers = [p for p in ids if p != n.name]
        assert st["subscriptions"] == {"steep_from_" + p: True for p in peers}
        assert st["slots"] == ["steep_to_" + p for p in peers]
        assert "public.t" in st["publication"] and "steep_repl.row_version" in st["publication"]
    # the conflict triggers were installed on every node (steep_repl.enable_table)
    assert all(rows == [("t", "steep_repl_apply"), ("t", "steep_repl_capture"), ("t", "steep_repl_truncate")] for rows in triggers(lab).values())
    write_everywhere_and_converge(lab)
    # the versions travel with the data
    versions = mesh.wait_converged(lab, "SELECT tbl, pk, ver_node FROM steep_repl.row_version ORDER BY 1, 2")
    assert len(versions) == count
    # second run: nothing to do, the clock check passed with a small drift, no password anywhere
    res = run_playbook("site.yml", inv)
    assert res.rc == 0, res.failure_messages()
    assert res.changed() == 0, res.stdout[-3000:]
    assert task(res, MESH_TASK)["queries"] == []
    clock = task(res, CLOCK_TASK)
    assert clock["status"] == "ok" and clock["drift_ms"] < 100, clock
    assert set(clock["offsets"]) == set(ids)
    assert LAB_PASSWORD not in res.stdout + res.stderr
    mesh.assert_healthy(lab)


def test_first_run_reports_queries_without_the_password(lab_factory):
    lab = lab_factory(count=2, majors=(18,))
    inv = mesh.build_mesh(lab, T, GV, run=False)
    res = run_playbook("site.yml", inv, extra_args=["-v"])
    assert res.rc == 0, res.failure_messages()
    queries = task(res, MESH_TASK)["queries"]
    creates = [q for q in queries if "CREATE SUBSCRIPTION" in q]
    assert len(creates) == 2 and all("password=********" in q for q in creates)
    slot_idx = [i for i, q in enumerate(queries) if "pg_create_logical_replication_slot" in q]
    sub_idx = [i for i, q in enumerate(queries) if "CREATE SUBSCRIPTION" in q]
    assert max(slot_idx) < min(sub_idx)
    assert LAB_PASSWORD not in res.stdout + res.stderr
    # the server keeps the real conninfo (the subscription works), the module never shows it
    assert all(n.sql("SELECT count(*) FROM pg_subscription WHERE subconninfo LIKE %s",
                     ("%" + LAB_PASSWORD + "%",))[0][0] == 1 for n in lab.nodes)
    mesh.assert_healthy(lab)


def test_check_mode_and_diff_change_nothing(lab_factory):
    lab = lab_factory(count=2, majors=(17, 18))
    inv = mesh.build_mesh(lab, T, GV, run=False)
    foundation(inv)  # the extension must exist for the later plays to plan anything
    before, trig_before = states(lab), triggers(lab)
    res = run_playbook("site.yml", inv, check=True, diff=True)
    assert res.rc == 0, res.failure_messages()
    r = task(res, MESH_TASK)
    assert r["changed"] is True
    assert any("CREATE SUBSCRIPTION" in q for q in r["queries"])
    assert r["diff"]["before"]["node1"]["subscriptions"] == []
    assert r["diff"]["after"]["node1"]["subscriptions"] == ["steep_from_node2"]
    assert states(lab) == before and triggers(lab) == trig_before
    # now for real, then a check run on a converged mesh with one more table
    assert run_playbook("site.yml", inv).rc == 0
    for n in lab.nodes:
        n.sql("CREATE TABLE public.t2 (id int PRIMARY KEY, v text)")
    mid = states(lab)
    gv = {"steep_replicated_tables": ["public.t", "public.t2"]}
    inv = lab.write_inventory(inv, group_vars=gv)
    res = run_playbook("site.yml", inv, check=True, diff=True)
    assert res.rc == 0, res.failure_messages()
    r = task(res, MESH_TASK)
    assert r["changed"] is True
    assert any("ADD TABLE" in q and "t2" in q for q in r["queries"])
    assert any("REFRESH PUBLICATION" in q for q in r["queries"])
    assert "public.t2" in r["diff"]["after"]["node2"]["publication"]
    assert states(lab) == mid


def test_adding_a_table_extends_publication_and_refreshes_subscriptions(lab_factory):
    lab = lab_factory(count=2, majors=(18,))
    inv = mesh.build_mesh(lab, T, GV)
    for n in lab.nodes:
        n.sql("CREATE TABLE public.t2 (id int PRIMARY KEY, v text)")
    gv = {"steep_replicated_tables": ["public.t"], "steep_replicated_schemas": [],
          "steep_excluded_tables": []}
    gv["steep_replicated_tables"].append("public.t2")
    inv = lab.write_inventory(inv, group_vars=gv)
    res = run_playbook("site.yml", inv)
    assert res.rc == 0, res.failure_messages()
    queries = task(res, MESH_TASK)["queries"]
    assert sum("REFRESH PUBLICATION WITH (copy_data = false)" in q for q in queries) == 2
    for n in lab.nodes:
        assert "public.t2" in mesh.mesh_state(n)["publication"]
        assert n.sql("SELECT count(*) FROM pg_subscription_rel WHERE srrelid = 'public.t2'::regclass")[0][0] == 1
    write_everywhere_and_converge(lab, "t2")
    write_everywhere_and_converge(lab, "t", start=10)
    res = run_playbook("site.yml", inv)
    assert res.rc == 0 and res.changed() == 0
    # public.t leaves the set: out of the publications, subscriptions refreshed, triggers off
    inv = lab.write_inventory(inv, group_vars={"steep_replicated_tables": ["public.t2"]})
    res = run_playbook("site.yml", inv)
    assert res.rc == 0, res.failure_messages()
    queries = task(res, MESH_TASK)["queries"]
    assert sum("disable_table" in q for q in queries) == 2
    for n in lab.nodes:
        assert "public.t" not in mesh.mesh_state(n)["publication"]
        assert n.sql("SELECT count(*) FROM pg_subscription_rel WHERE srrelid = 'public.t'::regclass")[0][0] == 0
    assert all(rows == [("t2", "steep_repl_apply"), ("t2", "steep_repl_capture"), ("t2", "steep_repl_truncate")] for rows in triggers(lab).values())
    write_everywhere_and_converge(lab, "t2", start=20)
    res = run_playbook("site.yml", inv)
    assert res.rc == 0 and res.changed() == 0


def _generated(node, table="public.t"):
    """{trigger name: source of the function it runs} for the table's conflict triggers on ``node``."""
    return dict(node.sql("SELECT g.tgname, p.prosrc FROM pg_trigger g JOIN pg_proc p ON p.oid = g.tgfoid "
                         "WHERE g.tgrelid = %s::regclass AND g.tgname LIKE 'steep%%' ORDER BY 1", (table,)))


def test_functions_an_earlier_build_generated_are_regenerated(lab_factory):
    """An extension update that changes the templates of enable_table() leaves every enabled table's
    functions as the earlier build generated them; the next site.yml regenerates them (and only them)."""
    lab = lab_factory(count=2, majors=(17, 18))
    inv = mesh.build_mesh(lab, T, GV)
    n1, n2 = lab.nodes
    current = _generated(n1)
    stamp = n1.sql("SELECT steep_repl._generator()")[0][0]
    assert n1.sql("SELECT generator FROM steep_repl.conflict_tables")[0][0] == stamp
    # node1's functions as an earlier build left them: other bodies, another stamp
    for (oid,) in n1.sql("SELECT tgfoid FROM pg_trigger WHERE tgrelid = 'public.t'::regclass "
                         "AND tgname IN ('steep_repl_capture', 'steep_repl_apply')"):
        ddl = n1.sql("SELECT pg_get_functiondef(%s)", (oid,))[0][0]
        n1.sql(ddl.replace("BEGIN\n", "BEGIN\n    -- earlier build\n", 1))
    n1.sql("UPDATE steep_repl.conflict_tables SET generator = 'an earlier build'")
    earlier = _generated(n1)
    assert earlier != current and all("earlier build" in earlier[k] for k in ("steep_repl_apply", "steep_repl_capture"))

    res = run_playbook("site.yml", inv, check=True, diff=True)
    assert res.rc == 0, res.failure_messages()
    r = task(res, MESH_TASK)
    assert r["changed"] is True
    assert [q for q in r["queries"] if "enable_table" in q] == [
        "/* node1 */ SELECT steep_repl.enable_table('\"public\".\"t\"'::regclass)"]
    assert r["diff"]["before"]["node1"]["outdated_tables"] == ["public.t"]
    assert r["diff"]["after"]["node1"]["outdated_tables"] == []
    assert r["diff"]["before"]["node2"]["outdated_tables"] == r["diff"]["after"]["node2"]["outdated_tables"] == []
    assert _generated(n1) == earlier                                        # --check changed nothing
    assert n1.sql("SELECT generator FROM steep_repl.conflict_tables")[0][0] == "an earlier build"

    res = run_playbook("site.yml", inv)
    assert res.rc == 0, res.failure_messages()
    assert [q for q in task(res, MESH_TASK)["queries"] if "enable_table" in q] == [
        "/* node1 */ SELECT steep_repl.enable_table('\"public\".\"t\"'::regclass)"]
    assert _generated(n1) == current == _generated(n2)
    assert [g for (g,) in n1.sql("SELECT generator FROM steep_repl.conflict_tables")] == [stamp]
    res = run_playbook("site.yml", inv)
    assert res.rc == 0 and res.changed() == 0, res.failure_messages()
    write_everywhere_and_converge(lab)
    mesh.assert_healthy(lab)


def test_a_dropped_and_recreated_table_starts_without_its_old_versions(lab_factory):
    """DROP TABLE forgets the table's versions and generated functions on that node (an event trigger).
    Left behind, the version of a key the new table does not have made a local INSERT of it write no
    version, and two nodes inserting that key stopped each other's subscription (insert_exists)."""
    import conflict_support as cs
    lab = lab_factory(count=2, majors=(17, 18))
    inv = mesh.build_mesh(lab, [T, "CREATE TABLE public.u (id int PRIMARY KEY, v text)",
                                "CREATE TABLE public.marker (id int PRIMARY KEY, v int)"],
                          {"steep_replicated_tables": ["public.t", "public.u", "public.marker"]})
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.t SELECT g, 'old' FROM generate_series(1, 10) g")
    assert mesh.wait_converged(lab, "SELECT count(*) FROM public.t") == [(10,)]
    n2.sql("DELETE FROM public.t WHERE id <= 3")
    n1.sql("INSERT INTO public.u VALUES (1, 'kept')")
    assert mesh.wait_converged(lab, "SELECT count(*) FROM public.t") == [(7,)]
    functions = ("SELECT count(*) FROM pg_proc WHERE pronamespace = 'steep_repl'::regnamespace AND proname IN "
                 "(SELECT f || steep_repl._conflict_fn_suffix(t) FROM unnest(ARRAY['capture_', 'apply_', 'rowop_']) f, "
                 "unnest(ARRAY['public.t', 'public.u']) t)")
    assert [n.sql(functions)[0][0] for n in lab.nodes] == [6, 6]            # public.t and public.u
    for n in lab.nodes:
        n.sql("DROP TABLE public.t")
        assert n.sql("SELECT count(*) FROM steep_repl.row_version WHERE tbl = 'public.t'") == [(0,)]
        assert n.sql("SELECT tbl FROM steep_repl.conflict_tables ORDER BY 1") == [("public.marker",), ("public.u",)]
        assert n.sql(functions) == [(3,)]
        assert n.sql("SELECT count(*) FROM steep_repl.row_version WHERE tbl = 'public.u'") == [(1,)]  # kept
    for n in lab.nodes:
        n.sql(T)
    res = run_playbook("site.yml", inv)
    assert res.rc == 0, res.failure_messages()
    # both nodes insert keys the old table had (live, and deleted) while neither applies the other
    cs.pause(lab)
    n1.sql("INSERT INTO public.t VALUES (2, 'node1'), (8, 'node1')")
    n2.sql("INSERT INTO public.t VALUES (2, 'node2'), (8, 'node2')")
    cs.resume(lab)
    cs.sync(lab)
    assert mesh.wait_converged(lab, "SELECT id, v FROM public.t ORDER BY id") == [(2, "node2"), (8, "node2")]
    assert sorted(c["pk"] for c in cs.conflicts(n1, "public.t")) == ["[2]", "[8]"]
    assert cs.apply_errors(lab) == {"node1": 0, "node2": 0}
    mesh.assert_healthy(lab)
    assert run_playbook("site.yml", inv).changed() == 0


def test_a_new_primary_key_starts_the_table_without_its_old_versions(lab_factory):
    """ALTER TABLE ... DROP CONSTRAINT <pk>, ADD PRIMARY KEY (<other columns>) on every node: the versions
    keyed by the old key go (enable_table, run by the DDL event trigger). Left behind, the old version
    '[9]' of another row made a local INSERT of the new key 9 write no version, and two nodes inserting it
    stopped each other's subscription (insert_exists)."""
    import conflict_support as cs
    lab = lab_factory(count=2, majors=(17, 18))
    inv = mesh.build_mesh(lab, ["CREATE TABLE public.t (id int PRIMARY KEY, k int NOT NULL UNIQUE, v text)",
                                "CREATE TABLE public.marker (id int PRIMARY KEY, v int)"],
                          {"steep_replicated_tables": ["public.t", "public.marker"]})
    n1, n2 = lab.nodes
    n1.sql("INSERT INTO public.t SELECT g, 11 - g, 'old' FROM generate_series(1, 10) g")   # k 10..1: the ids reversed
    assert mesh.wait_converged(lab, "SELECT count(*) FROM public.t") == [(10,)]
    n2.sql("DELETE FROM public.t WHERE id <= 3")
    assert mesh.wait_converged(lab, "SELECT count(*) FROM public.t") == [(7,)]
    for n in lab.nodes:
        n.sql("ALTER TABLE public.t DROP CONSTRAINT t_pkey, ADD PRIMARY KEY (k)")
        assert n.sql("SELECT pk_columns FROM steep_repl.conflict_tables WHERE tbl = 'public.t'") == [(["k"],)]
        assert n.sql("SELECT count(*) FROM steep_repl.row_version WHERE tbl = 'public.t'") == [(0,)]
    assert run_playbook("site.yml", inv).changed() == 0
    cs.pause(lab)
    n1.sql("INSERT INTO public.t VALUES (20, 9, 'node1')")          # k = 9: the old id 9 had a live version
    n2.sql("INSERT INTO public.t VALUES (20, 9, 'node2')")
    n1.sql("UPDATE public.t SET v = 'node1' WHERE k = 5")           # a row without a version yet
    n2.sql("UPDATE public.t SET v = 'node2' WHERE k = 5")
    cs.resume(lab)
    cs.sync(lab)
    assert mesh.wait_converged(lab, "SELECT k, v FROM public.t WHERE k IN (5, 9) ORDER BY k") == [
        (5, "node2"), (9, "node2")]
    assert sorted(c["pk"] for c in cs.conflicts(n1, "public.t")) == ["[5]", "[9]"]
    assert cs.apply_errors(lab) == {"node1": 0, "node2": 0}
    mesh.assert_healthy(lab)


def test_schemas_and_exclusion_globs(lab_factory):
    lab = lab_factory(count=2, majors=(18,))
    setup = ["CREATE SCHEMA sales",
             "CREATE TABLE sales.orders (id int PRIMARY KEY, v text)",
             "CREATE TABLE sales.tmp_load (id int PRIMARY KEY, v text)",
             "CREATE TABLE sales.scratch_nopk (v text)"]
    gv = {"steep_replicated_schemas": ["sales"],
          "steep_excluded_tables": ["sales.tmp_*", "sales.scratch_*"]}
    mesh.build_mesh(lab, setup, gv)
    for n in lab.nodes:
        pub = mesh.mesh_state(n)["publication"]
        assert "sales.orders" in pub and "sales.tmp_load" not in pub and "sales.scratch_nopk" not in pub
    write_everywhere_and_converge(lab, "sales.orders")


def test_removing_a_node_drops_its_subscriptions_and_slots_everywhere(lab_factory):
    lab = lab_factory(count=3, majors=(17, 18))
    inv = mesh.build_mesh(lab, T, GV)
    mesh.assert_healthy(lab)
    node3_before = mesh.mesh_state(lab.node("node3"))
    inv2 = lab.write_inventory(lab.root / "inventory-2.yml", group_vars=GV, nodes=["node1", "node2"])
    res = run_playbook("site.yml", inv2)
    assert res.rc == 0, res.failure_messages()
    r = task(res, MESH_TASK)
    assert r["removed_nodes"] == ["node3"]
    for name in ("node1", "node2"):
        st = mesh.mesh_state(lab.node(name))
        assert not any("node3" in s for s in st["subscriptions"]), st
        assert not any("node3" in s for s in st["slots"]), st
    # the departed node itself is not contacted
    assert mesh.mesh_state(lab.node("node3"))["subscriptions"] == node3_before["subscriptions"]
    mesh.assert_healthy(lab, nodes=["node1", "node2"])
    write_everywhere_and_converge(lab, nodes=["node1", "node2"])
    res = run_playbook("site.yml", inv2)
    assert res.rc == 0 and res.changed() == 0, res.failure_messages()
    assert inv.exists()


def refused(lab, inv, expected, also_site=False):
    """The replication play refuses with ``expected`` in its message (and, with ``also_site``,
    site.yml refuses too, whichever play notices first); nothing changes (second query)."""
    before, trig_before = states(lab), triggers(lab)
    res = run_playbook("steep_replication.yml", inv)
    msg = " ".join(res.failure_messages())
    assert res.rc != 0 and expected in msg, msg
    assert LAB_PASSWORD not in res.stdout + res.stderr
    assert states(lab) == before and triggers(lab) == trig_before
    if also_site:
        res = run_playbook("site.yml", inv)
        assert res.rc != 0
        assert states(lab) == before and triggers(lab) == trig_before
    return msg


def foundation(inv):
    res = run_playbook("steep_foundation.yml", inv)
    assert res.rc == 0, res.failure_messages()


def test_table_without_primary_key_is_refused_and_nothing_changes(lab_factory):
    lab = lab_factory(count=2, majors=(18,))
    gv = {"steep_replicated_tables": ["public.t", "public.nopk"]}
    inv = mesh.build_mesh(lab, [T, "CREATE TABLE public.nopk (v text)"], gv, run=False)
    foundation(inv)
    msg = refused(lab, inv, "public.nopk has no primary key (on node1, node2)", also_site=True)
    assert "ALTER TABLE public.nopk ADD PRIMARY KEY" in msg
    assert "steep_excluded_tables" in msg and "nothing was changed" in msg
    # on an existing mesh the refusal changes nothing either
    inv = lab.write_inventory(inv, group_vars=GV)
    assert run_playbook("site.yml", inv).rc == 0
    inv = lab.write_inventory(inv, group_vars=gv)
    refused(lab, inv, "public.nopk has no primary key")


def test_unknown_or_partly_missing_table_is_refused_and_nothing_changes(lab_factory):
    lab = lab_factory(count=2, majors=(18,))
    inv = mesh.build_mesh(lab, T, {"steep_replicated_tables": ["public.t", "public.nope"]}, run=False)
    foundation(inv)
    refused(lab, inv, "table public.nope does not exist on any node", also_site=True)
    lab.node("node1").sql("CREATE TABLE public.only1 (id int PRIMARY KEY)")
    inv = lab.write_inventory(inv, group_vars={"steep_replicated_tables": ["public.t", "public.only1"]})
    refused(lab, inv, "public.only1 is missing on node(s) node2 (present on node1)")
    inv = lab.write_inventory(inv, group_vars={"steep_replicated_schemas": ["nosuch"]})
    refused(lab, inv, "schema nosuch (steep_replicated_schemas) does not exist on any node")
    # inconsistent clock thresholds: the clock check refuses before anything is touched
    inv = lab.write_inventory(inv, group_vars=dict(GV, steep_max_drift_ms=10, steep_warn_drift_ms=50))
    refused(lab, inv, "steep_warn_drift_ms (50) is above steep_max_drift_ms (10)")


def _teardown_mesh(lab):
    for n in lab.nodes:
        for (name,) in n.sql("SELECT subname FROM pg_subscription WHERE subname LIKE 'steep%%'"):
            n.sql('DROP SUBSCRIPTION "%s"' % name)
    for n in lab.nodes:
        n.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
              "WHERE slot_name LIKE 'steep%%'")
        n.sql("DROP PUBLICATION IF EXISTS steep_pub, steep_pub_versions")


def publications(node):
    """{publication: (tables, publish)} of the steep publications, and the subscriptions' lists."""
    pubs = {r[0]: (list(r[1]), r[2]) for r in node.sql(
        "SELECT p.pubname, coalesce((SELECT array_agg(t.schemaname || '.' || t.tablename ORDER BY 1) "
        "FROM pg_publication_tables t WHERE t.pubname = p.pubname), '{}'), "
        "concat_ws(',', CASE WHEN pubinsert THEN 'insert' END, CASE WHEN pubupdate THEN 'update' END, "
        "CASE WHEN pubdelete THEN 'delete' END, CASE WHEN pubtruncate THEN 'truncate' END) "
        "FROM pg_publication p WHERE p.pubname LIKE 'steep%%' ORDER BY 1")}
    subs = {r[0]: sorted(r[1]) for r in node.sql(
        "SELECT subname, subpublications FROM pg_subscription WHERE subname LIKE 'steep%%'")}
    return pubs, subs


@pytest.mark.parametrize("majors,load", [((18, 17), True), ((17, 17), False)], ids=["mixed-under-load", "pg17-idle"])
def test_versions_move_to_their_insert_only_publication(lab_factory, majors, load):
    """A mesh wired by an earlier build (row_version in steep_pub with every operation) is migrated by one
    run of site.yml, idle or while every node writes the same hot keys: nothing diverges, no change arrives
    without its version, no apply error (a PostgreSQL 17 walsender fails for good on a publication newer
    than its slot's position: the run waits for the slots first); --check tells the truth first; the next
    run changes nothing."""
    import threading
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import conflict_support as cs
    lab = lab_factory(count=2, majors=majors)
    table = "CREATE TABLE public.w (id int PRIMARY KEY, v int, who text, n int NOT NULL DEFAULT 0)"
    gv = {"steep_replicated_tables": ["public.t", "public.w"]}
    inv = mesh.build_mesh(lab, [T, table], gv)
    new_shape = {"steep_pub": (["public.t", "public.w"], "insert,update,delete,truncate"),
                 "steep_pub_versions": (["steep_repl.row_version"], "insert")}
    for n in lab.nodes:
        pubs, subs = publications(n)
        assert pubs == new_shape and set(map(tuple, subs.values())) == {("steep_pub", "steep_pub_versions")}
    mesh.wire_like_earlier_build(lab.nodes)
    old = {n.name: publications(n) for n in lab.nodes}
    assert all(o[0] == {"steep_pub": (["public.t", "public.w", "steep_repl.row_version"],
                                      "insert,update,delete,truncate")} for o in old.values())
    # --check: the migration, in order, and nothing changed (read back)
    res = run_playbook("steep_replication.yml", inv, check=True)
    assert res.rc == 0, res.failure_messages()
    queries = task(res, MESH_TASK)["queries"]
    create = [i for i, q in enumerate(queries) if 'CREATE PUBLICATION "steep_pub_versions" FOR TABLE '
              '"steep_repl"."row_version" WITH (publish = \'insert\')' in q]
    switch = [i for i, q in enumerate(queries) if 'SET PUBLICATION "steep_pub", "steep_pub_versions"' in q]
    leave = [i for i, q in enumerate(queries) if 'ALTER PUBLICATION "steep_pub" DROP TABLE "steep_repl"."row_version"' in q]
    assert len(create) == len(switch) == len(leave) == 2, queries
    assert max(create) < min(switch) and max(switch) < min(leave) and len(queries) == 6, queries
    assert {n.name: publications(n) for n in lab.nodes} == old
    # the real run, under load on the same keys from both nodes
    stop, errors = threading.Event(), []

    def step_for(node):
        def step(cur, i):
            k = 1 + (i * 7 + len(node.name)) % 5
            if i % 9 == 0:
                cur.execute("DELETE FROM public.w WHERE id = %s", (k,))
            else:
                cur.execute("INSERT INTO public.w (id, v, who) VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE "
                            "SET v = EXCLUDED.v, who = EXCLUDED.who, n = public.w.n + 1", (k, i, node.name))
        return step
    writers = [threading.Thread(target=cs.write_loop, args=(n, stop, step_for(n), errors))
               for n in lab.nodes if load]
    for w in writers:
        w.start()
    try:
        time.sleep(1.0)
        res = run_playbook("steep_replication.yml", inv)
        time.sleep(1.0)
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert res.rc == 0, res.failure_messages()
    assert not errors, errors
    assert [q.split(" */ ")[1][:40] for q in task(res, MESH_TASK)["queries"]] == [
        q.split(" */ ")[1][:40] for q in queries]
    for n in lab.nodes:
        pubs, subs = publications(n)
        assert pubs == new_shape and set(map(tuple, subs.values())) == {("steep_pub", "steep_pub_versions")}
    try:
        rows = mesh.wait_converged(lab, "SELECT id, v, who FROM public.w ORDER BY id")
    except AssertionError as exc:
        raise AssertionError("%s\napply errors in the server logs: %r" % (exc, cs.server_errors(lab)))
    assert rows or not load, "the writers wrote nothing"
    for n in lab.nodes:
        assert cs.image_mismatches(n, "public.w") == [], cs.divergence_report(lab, "public.w")
    mesh.assert_healthy(lab)
    assert cs.server_errors(lab) == {}
    write_everywhere_and_converge(lab)
    res = run_playbook("steep_replication.yml", inv)
    assert res.rc == 0 and res.changed() == 0, res.stdout[-3000:]


def test_publication_name_without_room_for_its_versions_publication_is_refused(lab_factory, tmp_path):
    """The module's ``publication`` option (not exposed by the playbooks): a name longer than 54 bytes leaves
    no room for ``<name>_versions``; the run fails naming the limit and the fix, and no node changed."""
    lab = lab_factory(count=2, majors=(18,))
    inv = mesh.build_mesh(lab, [T], {"steep_replicated_tables": ["public.t"]})
    before = {n.name: (publications(n), mesh.mesh_state(n)) for n in lab.nodes}
    name = "p" * 55
    book = tmp_path / "long_publication.yml"
    book.write_text("""- hosts: steep_nodes
  gather_facts: false
  vars_files: [%s]
  tasks:
    - steep.repl.replication:
        nodes: "{{ steep_mesh_nodes }}"
        tables: [public.t]
        publication: %s
      run_once: true
      delegate_to: localhost
""" % (Path(__file__).resolve().parents[2] / "playbooks" / "vars" / "mesh.yml", name))
    res = run_playbook(str(book), inv)
    assert res.rc != 0
    msg = " ".join(res.failure_messages())
    assert "publication name '%s' is longer than 54 bytes" % name in msg and "Fix: choose a shorter name" in msg, msg
    assert {n.name: (publications(n), mesh.mesh_state(n)) for n in lab.nodes} == before
    assert all(n.sql("SELECT count(*) FROM pg_publication WHERE pubname LIKE 'ppp%%'")[0][0] == 0 for n in lab.nodes)


@pytest.mark.parametrize("case", ["old-transaction", "stuck-slot"])
def test_versions_migration_stops_cleanly_while_a_publisher_cannot_move_on(lab_factory, case):
    """PostgreSQL 17: no subscription switches to the versions publication while its publisher could still
    decode a change with a catalog that lacks it (a PG 17 walsender then fails for good).
    old-transaction: a session on node2 holds a transaction that inserted a row open since before the run
    (decoded with the catalog of its start); stuck-slot: a session on node1 holds a table lock (no
    transaction id) that stops node1's apply worker, so its slot on node2 does not move. Either way the run
    stops after 60 s without progress, naming the session or the slot, the subscription and the fix, with
    every subscription on its old list and the versions still in steep_pub (nothing is lost). Once the
    session commits, the same run completes, the rows arrive with their versions, and a re-run changes nothing."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import conflict_support as cs
    lab = lab_factory(count=2, majors=(17,))
    inv = mesh.build_mesh(lab, [T], {"steep_replicated_tables": ["public.t"]})
    n1, n2 = lab.nodes
    mesh.wire_like_earlier_build(lab.nodes)
    old = case == "old-transaction"
    holder = (n2 if old else n1).connect(autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("INSERT INTO public.t VALUES (2, 'held on node2')" if old else "LOCK TABLE public.t IN SHARE MODE")
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
        (n1 if old else n2).sql("INSERT INTO public.t VALUES (1, 'written')")   # stuck-slot: node1's worker waits
        res = run_playbook("steep_replication.yml", inv)
        assert res.rc != 0
        msg = " ".join(res.failure_messages())
        expected = (["transactions that began on node2 before its publications changed", "pid %s (client backend" % pid,
                     "subscription steep_from_node2 on node1 keeps its old publication list"] if old else
                    ["slot steep_to_node1 on node2 has not moved for 60s",
                     "subscription steep_from_node2 on node1 still reads its old publication list"])
        assert all(e in msg for e in expected) and "nothing is lost" in msg and msg.count("Fix:") == 1, msg
        for n in lab.nodes:   # read back: nothing switched, row_version still in steep_pub
            pubs, subs = publications(n)
            assert "steep_repl.row_version" in pubs["steep_pub"][0] and list(subs.values()) == [["steep_pub"]]
        holder.commit()
    finally:
        holder.close()
    res = run_playbook("steep_replication.yml", inv)
    assert res.rc == 0, res.failure_messages()
    rows = mesh.wait_converged(lab, "SELECT id, v FROM public.t ORDER BY id")
    assert rows == ([(1, "written"), (2, "held on node2")] if old else [(1, "written")]), rows
    assert cs.image_mismatches(n1, "public.t") == [] == cs.image_mismatches(n2, "public.t")
    assert cs.server_errors(lab) == {}
    # a worker blocked for 60 s may have been disconnected by the publisher's wal_sender_timeout (60 s): a
    # native apply error of the blocked period, not of the migration
    n1.sql("SELECT pg_stat_reset_subscription_stats(oid) FROM pg_subscription")
    mesh.assert_healthy(lab)
    assert run_playbook("steep_replication.yml", inv).changed() == 0


def test_three_node_setup_with_forks_and_concurrent_runs_never_deadlocks(lab_factory):
    lab = lab_factory(count=3, majors=(18,))
    inv = mesh.build_mesh(lab, T, GV)  # site.yml once (extension, nodes, ...)
    for attempt in range(3):
        _teardown_mesh(lab)
        # two set-ups of the whole mesh at the same moment, each with --forks 3
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(run_playbook, "steep_replication.yml", inv, extra_args=["--forks", "3"], timeout=240)
                    for _i in range(2)]
            results = [f.result() for f in runs]
        assert all(r.rc == 0 for r in results), [r.failure_messages() for r in results]
        mesh.assert_healthy(lab)
    write_everywhere_and_converge(lab)


def test_replication_host_override_and_connection_change(lab_factory):
    lab = lab_factory(count=2, majors=(17,))
    hv = {"node2": {"steep_pg_replication_host": "localhost"}}
    inv = mesh.build_mesh(lab, T, GV, host_vars=hv)
    conninfo = lab.node("node1").sql("SELECT subconninfo FROM pg_subscription WHERE subname = 'steep_from_node2'")[0][0]
    assert "host=localhost" in conninfo
    write_everywhere_and_converge(lab)
    # the peers' address changes: the subscription follows, nothing else moves
    inv = lab.write_inventory(inv, group_vars=GV)
    res = run_playbook("site.yml", inv, diff=True)
    assert res.rc == 0, res.failure_messages()
    queries = task(res, MESH_TASK)["queries"]
    assert queries == ["/* node1 */ ALTER SUBSCRIPTION \"steep_from_node2\" CONNECTION "
                       "'host=127.0.0.1 port=%d user=postgres password=******** dbname=steep'" % lab.node("node2").port]
    assert LAB_PASSWORD not in res.stdout
    write_everywhere_and_converge(lab, start=10)
    res = run_playbook("site.yml", inv)
    assert res.rc == 0 and res.changed() == 0


def test_uninitialised_node_joining_a_running_mesh_is_left_alone(lab_factory):
    lab = lab_factory(count=3, majors=(18,))
    mesh.build_mesh(lab, T, GV, nodes=["node1", "node2"])
    node3 = lab.node("node3")
    node3.sql(T)
    inv = mesh.build_mesh(lab, [], GV, run=False)  # all three; extension via foundation (or fallback)
    before = states(lab)
    res = run_playbook("site.yml", inv)
    assert res.rc == 0, res.failure_messages()
    r = task(res, MESH_TASK)
    assert r["skipped_nodes"] == ["node3"] and r["queries"] == []
    assert any("init_node.yml" in w and "steep_init_target=node3" in w for w in r.get("warnings", []))
    assert states(lab) == before
    # once steep.repl.init says the node is catching up, site.yml wires it in
    node3.sql("UPDATE steep_repl.nodes SET init_state = 'CATCHING_UP' WHERE node_id = 'node3'")
    res = run_playbook("site.yml", inv)
    assert res.rc == 0, res.failure_messages()
    mesh.assert_healthy(lab)
    write_everywhere_and_converge(lab)


def test_unreachable_peer_undoes_the_wiring_of_the_run(lab_factory):
    from steeplab import free_port
    lab = lab_factory(count=2, majors=(18,))
    bad = {"node1": {"steep_pg_replication_port": free_port()}}
    inv = mesh.build_mesh(lab, T, GV, host_vars=bad, run=False)
    res = run_playbook("site.yml", inv)
    assert res.rc != 0
    msg = " ".join(res.failure_messages())
    assert "could not connect to the publisher" in msg
    assert "make node1 reachable FROM node2" in msg and "steep_pg_replication_host" in msg
    assert "Undone (created by this run)" in msg and "steep_from_node2 on node1" in msg
    assert LAB_PASSWORD not in res.stdout + res.stderr
    for n in lab.nodes:  # no half-wired mesh, no orphan slot retaining WAL
        st = mesh.mesh_state(n)
        assert st["subscriptions"] == {} and st["slots"] == [], st
    inv = lab.write_inventory(inv, group_vars=GV)
    res = run_playbook("site.yml", inv)
    assert res.rc == 0, res.failure_messages()
    mesh.assert_healthy(lab)
    write_everywhere_and_converge(lab)
