# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The node registry (``steep_repl.nodes``), shared by ``steep.repl.node`` and the agent.

Writes go through the extension's ``steep_repl.register_node`` / ``steep_repl.remove_node``
(change and audit row in one transaction); this module validates, reads the current row,
plans, and runs (or in check mode only records) the call. No Ansible imports.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.steep.repl.plugins.module_utils.db import (
    SteepError, extension_version, fetch_all, fetch_one, fetch_value, validate_node_id)

MANAGED = ("node_id", "node_name", "host", "port", "priority", "is_local")


def wanted_node(node_id, node_name=None, host=None, port=5432, priority=50, is_local=False):
    """The managed columns of a node row, validated (raises SteepError naming the fix)."""
    validate_node_id(node_id)
    if not host:
        raise SteepError("node %s has no host. Fix: give the address the peers use to reach it "
                         "(steep_pg_replication_host or steep_pg_host)." % node_id)
    try:
        port = int(port)
        priority = int(priority)
    except (TypeError, ValueError):
        raise SteepError("node %s: port %r and priority %r must be integers. Fix: set steep_pg_port / "
                         "steep_node_priority to numbers." % (node_id, port, priority))
    if not 1 <= port <= 65535:
        raise SteepError("node %s: port %s is out of range. Fix: use 1-65535." % (node_id, port))
    if not 0 <= priority <= 1000:
        raise SteepError("node %s: priority %s is out of range. Fix: use 0-1000 (higher wins the "
                         "coordinator election)." % (node_id, priority))
    return dict(node_id=node_id, node_name=node_name or node_id, host=str(host), port=port,
                priority=priority, is_local=bool(is_local))


def changed_columns(before, wanted):
    """Managed columns whose value differs (all of them when the row is missing)."""
    if before is None:
        return list(MANAGED)
    return [c for c in MANAGED if before.get(c) != wanted.get(c)]


def require_registry(conn):
    """Raise unless the installed steep_repl provides register_node (1.1+)."""
    version = extension_version(conn)
    if not version:
        raise SteepError("the steep_repl extension is not installed in this database. Fix: install it first "
                         "(steep.repl.extension, or playbooks/steep_foundation.yml).")
    if not has_registry(conn):
        raise SteepError("steep_repl %s has no steep_repl.register_node(). Fix: update the extension "
                         "(steep.repl.extension state=latest)." % version)
    return version


def has_registry(conn):
    return bool(fetch_value(conn, "SELECT count(*) FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n "
                                  "ON n.oid = p.pronamespace WHERE n.nspname = 'steep_repl' "
                                  "AND p.proname = 'register_node'"))


def get_node(conn, node_id):
    """The managed columns of one node row, or None."""
    return fetch_one(conn, "SELECT node_id, node_name, host, port, priority, is_local FROM steep_repl.nodes "
                           "WHERE node_id = %s", (node_id,))


def local_node(conn):
    return fetch_value(conn, "SELECT node_id FROM steep_repl.nodes WHERE is_local")


def list_nodes(conn):
    """Every node row (all columns) as JSON-able dicts, by node id."""
    return [r["n"] for r in fetch_all(conn, "SELECT pg_catalog.to_jsonb(n) AS n FROM steep_repl.nodes n "
                                            "ORDER BY node_id")]


def plan_register(conn, wanted):
    """(before, changes) without changing anything; raises when the row cannot be applied."""
    before = get_node(conn, wanted["node_id"])
    if wanted["is_local"]:
        other = local_node(conn)
        if other is not None and other != wanted["node_id"]:
            raise SteepError("this database is already registered as node %s, not %s. Fix: point the "
                             "connection (steep_pg_host/steep_pg_port/steep_pg_database) of %s at its own "
                             "database, or remove node %s first." % (other, wanted["node_id"], wanted["node_id"], other))
    return before, changed_columns(before, wanted)


def register(state, conn, wanted):
    """Insert/update the row through steep_repl.register_node. ``state`` is a db.SqlState.

    Returns (changed, before, after).
    """
    before, changes = plan_register(conn, wanted)
    if not changes:
        return False, before, before
    state.execute("SELECT steep_repl.register_node(%s, %s, %s, %s, %s, %s)",
                  (wanted["node_id"], wanted["node_name"], wanted["host"], wanted["port"],
                   wanted["priority"], wanted["is_local"]))
    return True, before, dict(wanted)


def remove(state, conn, node_id):
    """Delete the row through steep_repl.remove_node. Returns (changed, before)."""
    validate_node_id(node_id)
    before = get_node(conn, node_id)
    if before is None:
        return False, None
    if before["is_local"]:
        raise SteepError("node %s is this database's own node and cannot be removed from it. Fix: remove it "
                         "from the other nodes (or drop the extension on this node)." % node_id)
    state.execute("SELECT steep_repl.remove_node(%s)", (node_id,))
    return True, before
