# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Divergence check: which members hold rows that differ from a reference member's (DIVERGED).

Safe while writes run: a key is compared only where the two nodes hold the SAME version of it
(same ``ver_ts`` and ``ver_node`` in steep_repl.row_version, or no version on either side). The
same version must mean the same row on every node, so a difference there is real divergence (a
write that bypassed the capture trigger, a manual fix-up with replication off, a restored
backup), never a change still in flight (in flight = different versions, skipped). A key with no
version on either node is stable too (it has not been written since the table was enabled) and
must be present on both or on neither. Nothing here imports Ansible (the agent may use it).
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.steep.repl.plugins.module_utils.db import SteepError, fetch_value, quote_ident

SAMPLE_KEYS = 5


def _key_expr(conn, qual, table):
    """The engine's canonical key of row ``t`` of the table (steep_repl._key_expr), as SQL."""
    expr = fetch_value(conn, "SELECT steep_repl._key_expr(%s::pg_catalog.regclass, 't')", (qual,))
    if not expr:
        raise SteepError("table %s has no primary key, so it cannot be compared. Fix: add one (it is required for "
                         "replication anyway)." % table)
    return expr


# the row digests are compared across nodes: every setting that changes a value's text is fixed
CANONICAL_SETTINGS = ("SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; "
                      "SET LOCAL bytea_output = 'hex'; SET LOCAL extra_float_digits = 1")


def snapshot(conn, table):
    """{canonical key: (version or None, row digest or None)} of one table on one node, read in one
    REPEATABLE READ snapshot. The key is the engine's canonical text (jsonb array of the PK)."""
    schema, name = table.split(".", 1)
    qual = "%s.%s" % (quote_ident(schema), quote_ident(name))
    key = _key_expr(conn, qual, table)
    old_autocommit = conn.autocommit
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur.execute(CANONICAL_SETTINGS)
            cur.execute("SELECT %s, pg_catalog.md5(pg_catalog.to_jsonb(t.*)::text) FROM %s AS t" % (key, qual))
            rows = dict(cur.fetchall())
            cur.execute("SELECT pg_catalog.to_regclass('steep_repl.row_version') IS NOT NULL")
            versions = {}
            if cur.fetchone()[0]:
                cur.execute("SELECT pk, ver_ts::text || ' ' || ver_node FROM steep_repl.row_version WHERE tbl = %s",
                            (table,))
                versions = dict(cur.fetchall())
        conn.rollback()
    finally:
        conn.autocommit = old_autocommit
    return {k: (versions.get(k), rows.get(k)) for k in set(rows) | set(versions)}


def differences(reference, other):
    """Keys whose rows differ although both nodes hold the same version of them (see the module
    docstring). ``reference`` / ``other``: results of :func:`snapshot`. Pure."""
    out = []
    for key in sorted(set(reference) | set(other)):
        ref_ver, ref_row = reference.get(key, (None, None))
        oth_ver, oth_row = other.get(key, (None, None))
        if ref_ver != oth_ver:
            continue                    # different versions: in flight (or a PENDING manual conflict)
        if ref_row != oth_row:
            out.append(key)
    return out


def describe(table, keys):
    shown = ", ".join(keys[:SAMPLE_KEYS]) + (" ..." if len(keys) > SAMPLE_KEYS else "")
    return "%s: %d row(s) differ (keys %s)" % (table, len(keys), shown)


def verify(specs, reference, tables=None, schemas=None, excluded=None, check_mode=False):
    """Compare every member with ``reference``; members that differ become DIVERGED (every member
    records it, with the tables and keys as the reason); a DIVERGED member that no longer differs
    goes back to SYNCHRONIZED. Only SYNCHRONIZED / UNINITIALIZED (wired) members are marked: a node
    in the middle of an init or reinit is reported, not marked. Returns a result dict."""
    from ansible_collections.steep.repl.plugins.module_utils.db import connect
    from ansible_collections.steep.repl.plugins.module_utils.nodeinit import set_state_everywhere
    from ansible_collections.steep.repl.plugins.module_utils.replication import (
        build_members, candidate_catalog, candidate_schemas, resolve_tables)
    members = build_members(specs)
    by_id = {m.node_id: m for m in members}
    if reference not in by_id:
        raise SteepError("reference node %r is not in the mesh inventory (nodes: %s). Fix: pass the steep_node_id of "
                         "a member whose data you trust." % (reference, ", ".join(sorted(by_id))))
    conns = {}
    try:
        for m in members:
            conns[m.node_id] = connect(m.conn_kw())
        ref = conns[reference]
        desired = resolve_tables({reference: candidate_catalog(ref, candidate_schemas(tables, schemas))},
                                 tables, schemas, excluded)
        states = {m.node_id: fetch_value(ref, "SELECT init_state FROM steep_repl.nodes WHERE node_id = %s", (m.node_id,))
                  for m in members}
        diverged, compared = {}, 0
        for table in desired:
            base = snapshot(ref, table)
            for m in members:
                if m.node_id == reference:
                    continue
                keys = differences(base, snapshot(conns[m.node_id], table))
                compared += 1
                if keys:
                    diverged.setdefault(m.node_id, []).append(describe(table, keys))
        marks, clears, queries = [], [], []
        for m in members:
            if m.node_id == reference:
                continue
            if m.node_id in diverged and states[m.node_id] in ("SYNCHRONIZED", "UNINITIALIZED"):
                marks.append(m.node_id)
            elif m.node_id not in diverged and states[m.node_id] == "DIVERGED":
                clears.append(m.node_id)
        for node in marks:
            queries.append("SELECT steep_repl.set_init_state('%s', 'DIVERGED', ...)  -- on every member" % node)
        for node in clears:
            queries.append("SELECT steep_repl.set_init_state('%s', 'SYNCHRONIZED', ...)  -- on every member" % node)
    finally:
        for c in conns.values():
            c.close()
    if not check_mode:
        for node in marks:
            set_state_everywhere(members, node, "DIVERGED", "differs from %s: %s. Fix: playbooks/reinit_node.yml "
                                 "-e steep_reinit_target=%s -e steep_reinit_source=%s"
                                 % (reference, "; ".join(diverged[node]), node, reference))
        for node in clears:
            set_state_everywhere(members, node, "SYNCHRONIZED", "identical to %s again" % reference)
    warnings = ["%s differs from %s: %s. Fix: playbooks/reinit_node.yml -e steep_reinit_target=%s "
                "-e steep_reinit_source=%s" % (n, reference, "; ".join(d), n, reference) for n, d in sorted(diverged.items())]
    return {"changed": bool(marks or clears), "diverged": diverged, "marked": marks, "cleared": clears,
            "tables": desired, "comparisons": compared, "queries": queries, "warnings": warnings}
