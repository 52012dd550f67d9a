"""The origin side of the conflict engine on one real server (PG 17 and 18): upgrade 1.0 -> 1.1,
enable_table/disable_table, versions of local writes, DDL regeneration."""
import json

import pytest

import mesh


@pytest.fixture(params=[17, 18], ids=["pg17", "pg18"])
def node(request, lab_factory):
    lab = lab_factory(count=1, majors=(request.param,))
    n = lab.nodes[0]
    import sys
    sys.path.insert(0, str(mesh.ROOT / ".collections"))
    from ansible_collections.steep.repl.plugins.module_utils.extfiles import install_files
    install_files(n.pg_config)
    n.sql("CREATE EXTENSION steep_repl VERSION '1.0'")
    n.sql("ALTER EXTENSION steep_repl UPDATE")          # 1.0 -> 1.1 runs every piece on top of 1.0
    n.sql("INSERT INTO steep_repl.nodes (node_id, node_name, host, port, is_local) VALUES (%s, %s, %s, %s, true)",
          (n.node_id, n.name, n.host, n.port))
    n.sql("CREATE TABLE public.t (id int, k text, v text, PRIMARY KEY (id, k))")
    return n


def version(n, pk):
    r = n.sql("SELECT depth, epoch, deleted, op, base_ts IS NOT NULL, img, gen FROM steep_repl.row_version "
              "WHERE tbl = 'public.t' AND pk = %s", (pk,))
    return r[0] if r else None


def test_versions_of_local_writes(node):
    n = node
    assert n.sql("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'steep_repl'") == [("1.1",)]
    n.sql("SELECT steep_repl.enable_table('public.t')")
    n.sql("SELECT steep_repl.enable_table('public.t')")   # idempotent
    assert n.sql("SELECT tgname, tgenabled FROM pg_catalog.pg_trigger WHERE tgrelid = 'public.t'::regclass "
                 "ORDER BY 1") == [("steep_repl_apply", "R"), ("steep_repl_capture", "O"), ("steep_repl_truncate", "A")]
    pk = json.dumps([1, "a"], separators=(", ", ": "))
    n.sql("INSERT INTO public.t VALUES (1, 'a', 'x')")
    assert version(n, pk) == (0, 0, False, "I", False, {"id": 1, "k": "a", "v": "x"}, 0)
    n.sql("INSERT INTO public.t VALUES (1, 'a', 'y') ON CONFLICT DO NOTHING")   # not written: no version
    assert version(n, pk)[0] == 0
    n.sql("INSERT INTO public.t VALUES (1, 'a', 'z') ON CONFLICT (id, k) DO UPDATE SET v = EXCLUDED.v")
    assert version(n, pk)[:6] == (1, 0, False, "U", True, {"id": 1, "k": "a", "v": "z"})
    n.sql("DELETE FROM public.t WHERE id = 1")
    assert version(n, pk)[:6] == (2, 0, True, "D", True, None)
    n.sql("INSERT INTO public.t VALUES (1, 'a', 'again')")
    assert version(n, pk)[:4] == (3, 1, False, "I")       # re-insert: new incarnation
    n.sql("UPDATE public.t SET k = 'b' WHERE id = 1")     # PK change: tombstone + new key
    assert version(n, pk)[2] is True
    assert version(n, json.dumps([1, "b"], separators=(", ", ": ")))[:4] == (0, 0, False, "I")
    # forced writes raise the generation
    n.sql("BEGIN; SELECT set_config('steep_repl.forced', 'on', true); UPDATE public.t SET v = 'f'; COMMIT")
    assert version(n, json.dumps([1, "b"], separators=(", ", ": ")))[6] == 1


def test_ddl_regenerates_and_disable(node):
    n = node
    n.sql("SELECT steep_repl.enable_table('public.t')")
    n.sql("ALTER TABLE public.t ADD COLUMN w int DEFAULT 7")
    assert "w" in n.sql("SELECT pg_catalog.pg_get_functiondef(p.oid) FROM pg_catalog.pg_proc p "
                        "JOIN pg_catalog.pg_namespace s ON s.oid = p.pronamespace "
                        "WHERE s.nspname = 'steep_repl' AND p.proname LIKE 'rowop\\_%%'")[0][0]
    n.sql("INSERT INTO public.t VALUES (2, 'a', 'x')")
    assert n.sql("SELECT img ->> 'w' FROM steep_repl.row_version WHERE tbl = 'public.t'") == [("7",)]
    # the resolution API writes through the generated functions
    assert n.sql("SELECT steep_repl._rowop('public.t', 'get', %s, NULL)",
                 (json.dumps([2, "a"]),))[0][0] == {"id": 2, "k": "a", "v": "x", "w": 7}
    n.sql("SELECT steep_repl.disable_table('public.t')")
    assert n.sql("SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = 'public.t'::regclass") == [(0,)]
    assert n.sql("SELECT count(*) FROM steep_repl.row_version") == [(0,)]
    assert n.sql("SELECT count(*) FROM steep_repl.conflict_tables") == [(0,)]
    n.sql("UPDATE public.t SET v = 'no version'")
    assert n.sql("SELECT count(*) FROM steep_repl.row_version") == [(0,)]
    n.sql("SELECT steep_repl.disable_table('public.t')")   # idempotent


def test_unregistered_node_refuses_writes_clearly(node):
    n = node
    n.sql("SELECT steep_repl.enable_table('public.t')")
    n.sql("UPDATE steep_repl.nodes SET is_local = false")
    with pytest.raises(Exception) as err:
        n.sql("INSERT INTO public.t VALUES (3, 'a', 'x')")
    assert "not registered" in str(err.value) and "foundation" in str(err.value)
    assert n.sql("SELECT count(*) FROM public.t") == [(0,)]
