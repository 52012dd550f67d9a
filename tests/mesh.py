"""Test helper: build a real steep.repl mesh on a lab and wait for it to converge.

Stable API (used by the replication AND the conflict-engine tests):

* ``build_mesh(lab, setup_sql, group_vars=None, run=True, host_vars=None, nodes=None,
  inventory=None) -> Path`` runs ``setup_sql`` on every lab node, writes the inventory
  (``steep_replicated_tables`` etc. go in ``group_vars``) and, when ``run``, runs the REAL
  ``playbooks/site.yml`` and asserts it succeeded. Returns the inventory path.
* ``wait_converged(lab, query, timeout=60, nodes=None) -> rows``: polls until every node
  returns identical rows for ``query`` AND every steep subscription has caught up.
* ``assert_healthy(lab, nodes=None)``: every steep subscription enabled, running, with
  ``apply_error_count == 0`` and ``sync_error_count == 0``; each node subscribes to every other.
* ``mesh_state(node)``: publication tables, subscriptions and slots of one node (for asserts).
* ``wire_like_earlier_build(nodes)``: the publications and subscriptions an earlier build left, to
  test a migration.

No mocks: real servers, real ansible-playbook.
"""
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUB_PREFIX = "steep_from_"
SLOT_PREFIX = "steep_to_"
PUBLICATION = "steep_pub"
VERSIONS_PUBLICATION = PUBLICATION + "_versions"


def _conftest():
    """tests/conftest.py as a module (pytest already imported it; reuse that copy)."""
    path = (ROOT / "tests" / "conftest.py").resolve()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve() == path:
            return mod
    spec = importlib.util.spec_from_file_location("steep_tests_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["steep_tests_conftest"] = mod
    return mod


def run_playbook(*args, **kwargs):
    return _conftest().run_playbook(*args, **kwargs)


def _lab_nodes(lab, nodes=None):
    if nodes is None:
        return list(lab.nodes)
    names = [n if isinstance(n, str) else n.name for n in nodes]
    return [lab.node(n) for n in names]


def _foundation_is_placeholder():
    text = (ROOT / "playbooks" / "steep_foundation.yml").read_text()
    return "tasks: []" in text


def install_extension_by_sql(lab, nodes=None):
    """Fallback while playbooks/steep_foundation.yml is a placeholder: copy the
    extension files, CREATE EXTENSION and register the nodes by SQL."""
    sys.path.insert(0, str(ROOT / ".collections"))
    from ansible_collections.steep.repl.plugins.module_utils.extfiles import install_files
    members = _lab_nodes(lab, nodes)
    for node in members:
        install_files(node.pg_config)
        node.sql("CREATE EXTENSION IF NOT EXISTS steep_repl")
        node.sql("ALTER EXTENSION steep_repl UPDATE")
        for peer in members:
            node.sql("INSERT INTO steep_repl.nodes (node_id, node_name, host, port, priority, is_local) "
                     "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (node_id) DO UPDATE SET "
                     "host = EXCLUDED.host, port = EXCLUDED.port, priority = EXCLUDED.priority, "
                     "is_local = EXCLUDED.is_local",
                     (peer.node_id, peer.name, peer.host, peer.port, peer.priority, peer is node))


def build_mesh(lab, setup_sql, group_vars=None, run=True, host_vars=None, nodes=None,
               inventory=None, playbook="site.yml", extra_vars=None):
    """Create the schema on every node, write the inventory and run site.yml.

    ``setup_sql``: a string (or list of strings) run on EVERY node of the lab (or of ``nodes``).
    ``group_vars``: e.g. ``{"steep_replicated_tables": ["public.t"]}``.
    ``nodes``: names of the lab nodes that form the mesh (default: all).
    Returns the inventory path; asserts the playbook succeeded when ``run``.
    """
    members = _lab_nodes(lab, nodes)
    stmts = [setup_sql] if isinstance(setup_sql, str) else list(setup_sql or [])
    for node in members:
        for stmt in stmts:
            if stmt and stmt.strip():
                node.sql(stmt)
    path = Path(inventory) if inventory else lab.root / "inventory.yml"
    lab.write_inventory(path, group_vars=group_vars or {}, host_vars=host_vars,
                        nodes=[n.name for n in members])
    if _foundation_is_placeholder():
        install_extension_by_sql(lab, members)
    if run:
        res = run_playbook(playbook, path, extra_vars=extra_vars)
        assert res.rc == 0 and res.failed() == 0, (
            "site.yml failed (rc=%s): %s\n%s"
            % (res.rc, res.failure_messages(), res.stdout[-4000:] + res.stderr[-2000:]))
    return path


def mesh_state(node):
    """{'publication': [tables of steep_pub and steep_pub_versions], 'subscriptions': {name: enabled},
    'slots': [names]}."""
    pub = [r[0] for r in node.sql(
        "SELECT DISTINCT schemaname || '.' || tablename FROM pg_catalog.pg_publication_tables "
        "WHERE pubname IN (%s, %s) ORDER BY 1", (PUBLICATION, VERSIONS_PUBLICATION))]
    subs = {r[0]: r[1] for r in node.sql(
        "SELECT subname, subenabled FROM pg_catalog.pg_subscription s "
        "JOIN pg_catalog.pg_database d ON d.oid = s.subdbid AND d.datname = current_database() "
        "WHERE subname LIKE 'steep\\_%%' ORDER BY 1")}
    slots = [r[0] for r in node.sql(
        "SELECT slot_name FROM pg_catalog.pg_replication_slots "
        "WHERE slot_name LIKE 'steep\\_%%' ORDER BY 1")]
    return {"publication": pub, "subscriptions": subs, "slots": slots}


def wire_like_earlier_build(nodes):
    """Turn a mesh built by this build into the shape an earlier build left (steep_repl.row_version in
    steep_pub with every operation, every subscription reading steep_pub only, no versions publication),
    waiting until every apply worker restarted with the old list: the starting point of a migration."""
    workers = ("SELECT pid FROM pg_catalog.pg_stat_subscription WHERE subname LIKE 'steep%%' "
               "AND relid IS NULL AND pid IS NOT NULL")
    for n in nodes:
        n.sql("ALTER PUBLICATION %s ADD TABLE steep_repl.row_version" % PUBLICATION)
    for n in nodes:
        before = set(n.sql(workers))
        for (sub,) in n.sql("SELECT subname FROM pg_catalog.pg_subscription WHERE subname LIKE 'steep%%'"):
            n.sql('ALTER SUBSCRIPTION "%s" SET PUBLICATION %s WITH (refresh = false)' % (sub, PUBLICATION))
        deadline = time.time() + 30
        while set(n.sql(workers)) & before:
            assert time.time() < deadline, "apply workers on %s did not restart" % n.name
            time.sleep(0.1)
    for n in nodes:
        n.sql("DROP PUBLICATION %s" % VERSIONS_PUBLICATION)


def _caught_up(members, targets):
    """Slots (publisher, slot, confirmed, target) feeding a member that have not yet
    confirmed the publisher's WAL position ``targets[publisher]``."""
    behind = []
    for node in members:
        wanted = [SLOT_PREFIX + m.node_id for m in members if m is not node]
        rows = node.sql(
            "SELECT slot_name, confirmed_flush_lsn::text, "
            "coalesce(confirmed_flush_lsn >= %s::pg_lsn, false) FROM pg_catalog.pg_replication_slots "
            "WHERE slot_name = ANY(%s) AND slot_type = 'logical'", (targets[node.name], wanted))
        behind.extend((node.name, s, lsn, targets[node.name]) for s, lsn, ok in rows if not ok)
    return behind


def wait_converged(lab, query, timeout=60, nodes=None, params=None):
    """Poll until every node returns the same rows for ``query`` and all steep slots
    have confirmed the WAL written before the check. Returns the (common) rows."""
    members = _lab_nodes(lab, nodes)
    deadline = time.monotonic() + timeout
    last = None
    behind = []
    while True:
        targets = {n.name: n.sql("SELECT pg_catalog.pg_current_wal_lsn()::text")[0][0] for n in members}
        behind = _caught_up(members, targets)
        results = {n.name: n.sql(query, params) for n in members}
        first = results[members[0].name]
        if not behind and all(r == first for r in results.values()):
            return first
        last = results
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)
    errors = {n.name: n.sql("SELECT subname, apply_error_count, sync_error_count "
                            "FROM pg_catalog.pg_stat_subscription_stats") for n in members}
    raise AssertionError("mesh did not converge within %ss.\nrows per node: %r\nslots behind: %r\n"
                         "subscription errors: %r" % (timeout, last, behind, errors))


def assert_healthy(lab, nodes=None, timeout=30):
    """Every node subscribes to every other member; every steep subscription is enabled,
    has a running apply worker and apply_error_count == sync_error_count == 0."""
    members = _lab_nodes(lab, nodes)
    deadline = time.monotonic() + timeout
    while True:
        problems = []
        for node in members:
            rows = node.sql(
                "SELECT s.subname, s.subenabled, coalesce(st.apply_error_count, 0), "
                "coalesce(st.sync_error_count, 0), "
                "EXISTS (SELECT 1 FROM pg_catalog.pg_stat_subscription w WHERE w.subid = s.oid "
                "        AND w.pid IS NOT NULL) "
                "FROM pg_catalog.pg_subscription s "
                "JOIN pg_catalog.pg_database d ON d.oid = s.subdbid AND d.datname = current_database() "
                "LEFT JOIN pg_catalog.pg_stat_subscription_stats st ON st.subid = s.oid "
                "WHERE s.subname LIKE 'steep\\_%%'")
            subs = {r[0]: r[1:] for r in rows}
            expected = {SUB_PREFIX + p.node_id for p in members if p is not node}
            missing = expected - set(subs)
            if missing:
                problems.append("%s: missing subscriptions %s" % (node.name, sorted(missing)))
            for name, (enabled, apply_err, sync_err, running) in sorted(subs.items()):
                if not enabled:
                    problems.append("%s: subscription %s is disabled" % (node.name, name))
                if apply_err or sync_err:
                    problems.append("%s: subscription %s apply_error_count=%s sync_error_count=%s"
                                    % (node.name, name, apply_err, sync_err))
                if enabled and not running:
                    problems.append("%s: subscription %s has no running apply worker" % (node.name, name))
        errors_only = [p for p in problems if "no running apply worker" not in p]
        if not problems or errors_only or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert not problems, "mesh unhealthy:\n" + "\n".join(problems)
