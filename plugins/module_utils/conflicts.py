# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Conflict strategies and resolution (shared by ``steep.repl.conflict`` and the agent).

The decisions themselves are made inside PostgreSQL (``extension/sql/20_conflicts.sql``);
this module validates configuration, reads and writes the strategy tables and calls the
resolution API (``steep_repl.resolve_conflict``, ``resolve_conflicts_bulk``,
``revert_resolution``). No Ansible imports.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import re

from ansible_collections.steep.repl.plugins.module_utils.db import (
    SteepError, fetch_all, fetch_one, fetch_value, psycopg2, split_qualified)

STRATEGIES = ("last_write_wins", "first_write_wins", "node_priority", "keep_local", "apply_remote", "manual")
DEFAULT_STRATEGY = "last_write_wins"
RESOLUTIONS = ("local", "remote", "merge")
LABELS = {"local": "KEPT_LOCAL", "remote": "APPLIED_REMOTE", "merge": "MERGED"}
TABLE_RE = re.compile(r"^[^.\s]+\.[^.\s]+$")
CONFLICT_COLUMNS = ("id, detected_at, subscription, table_schema, table_name, pk, conflict_type, local_tuple, "
                    "remote_tuple, local_origin, remote_origin, local_xact_ts, remote_xact_ts, origin_xid, "
                    "resolution, resolved_at, resolved_by, strategy, winner, resolved_tuple, reverts, reverted_by, note")


# --------------------------------------------------------------------------- validation (pure)
def validate_strategy(name, where="steep_conflict_default_strategy"):
    if name not in STRATEGIES:
        raise SteepError("unknown conflict strategy %r in %s. Fix: use one of %s." % (name, where, ", ".join(STRATEGIES)))
    return name


def normalize_table_name(name):
    """'schema.table' (schema defaults to public)."""
    if not isinstance(name, str) or not name.strip():
        raise SteepError("steep_conflict_strategies has an empty table name. Fix: key it by schema.table.")
    name = name.strip()
    if "." not in name:
        name = "public." + name
    if not TABLE_RE.match(name):
        raise SteepError("steep_conflict_strategies key %r is not schema.table. Fix: write it as e.g. public.orders." % name)
    return name


def normalize_strategies(tables, known_nodes=None):
    """{'schema.table': {'strategy': s, 'priority': [..] or None}} from the user's mapping.

    Accepts ``{t: 'manual'}`` or ``{t: {'strategy': 'node_priority', 'priority': [a, b]}}``.
    ``known_nodes``: node ids that exist (checked when given). Raises SteepError naming the fix.
    """
    out = {}
    if tables is None:
        return out
    if not isinstance(tables, dict):
        raise SteepError("steep_conflict_strategies must be a mapping {schema.table: strategy}. Fix: e.g. "
                         "{public.orders: manual}.")
    for raw, spec in tables.items():
        name = normalize_table_name(raw)
        if isinstance(spec, str):
            spec = {"strategy": spec}
        if not isinstance(spec, dict) or "strategy" not in spec:
            raise SteepError("steep_conflict_strategies[%s] must be a strategy name or {strategy: ..., priority: [...]}. "
                             "Fix: e.g. {strategy: node_priority, priority: [node_a, node_b]}." % name)
        extra = set(spec) - {"strategy", "priority"}
        if extra:
            raise SteepError("steep_conflict_strategies[%s] has unknown key(s) %s. Fix: use only strategy and priority."
                             % (name, ", ".join(sorted(extra))))
        strategy = validate_strategy(spec["strategy"], "steep_conflict_strategies[%s]" % name)
        priority = spec.get("priority")
        if priority is not None:
            if strategy != "node_priority":
                raise SteepError("steep_conflict_strategies[%s]: a priority list is only valid with node_priority "
                                 "(got %s). Fix: drop the list or use node_priority." % (name, strategy))
            if not isinstance(priority, (list, tuple)) or not priority or not all(isinstance(n, str) for n in priority):
                raise SteepError("steep_conflict_strategies[%s]: priority must be a non-empty list of node ids. "
                                 "Fix: e.g. priority: [node_a, node_b]." % name)
            if len(set(priority)) != len(priority):
                raise SteepError("steep_conflict_strategies[%s]: priority names a node twice. Fix: list every node once."
                                 % name)
            if known_nodes is not None:
                unknown = [n for n in priority if n not in known_nodes]
                if unknown:
                    raise SteepError("steep_conflict_strategies[%s]: node_priority list names unknown node(s) %s. Fix: use "
                                     "registered node ids (%s)."
                                     % (name, ", ".join(unknown), ", ".join(sorted(known_nodes)) or "none"))
            priority = list(priority)
        if name in out:
            raise SteepError("steep_conflict_strategies names %s twice. Fix: keep one entry." % name)
        out[name] = {"strategy": strategy, "priority": priority}
    return out


def convergence_warnings(config, node_configs=None):
    """Warnings for configurations under which the nodes cannot (or not automatically) converge.

    ``config``: {'default_strategy': s, 'tables': {t: {'strategy', 'priority'}}} used on every node.
    ``node_configs``: optional {node_id: config} when nodes are configured differently.
    """
    warnings = []
    items = [("default", (config or {}).get("default_strategy") or DEFAULT_STRATEGY)]
    items += [(t, s["strategy"]) for t, s in sorted(((config or {}).get("tables") or {}).items())]
    for target, strategy in items:
        what = "the default strategy" if target == "default" else "table %s" % target
        if strategy == "keep_local":
            warnings.append("%s uses keep_local on every node: each node keeps its own row on a conflict, so the nodes "
                            "DIVERGE until someone resolves it. Use last_write_wins, first_write_wins or node_priority "
                            "for automatic convergence." % what)
        elif strategy == "apply_remote":
            warnings.append("%s uses apply_remote on every node: on a conflict each node takes the other's row, so the "
                            "nodes swap values and DIVERGE. Use last_write_wins, first_write_wins or node_priority for "
                            "automatic convergence." % what)
        elif strategy == "manual":
            warnings.append("%s uses manual: conflicting rows stay different on the nodes (PENDING in "
                            "steep_repl.conflict_log) until resolved with steep.repl.conflict state=resolved." % what)
    if node_configs:
        seen = {}
        for node_id, cfg in sorted(node_configs.items()):
            key = (cfg.get("default_strategy"), tuple(sorted(
                (t, s["strategy"], tuple(s.get("priority") or ())) for t, s in (cfg.get("tables") or {}).items())))
            seen.setdefault(key, []).append(node_id)
        if len(seen) > 1:
            warnings.append("the nodes use different conflict strategies (%s): different rules pick different winners "
                            "and the nodes can diverge. Fix: configure the same strategies on every node "
                            "(playbooks/steep_conflicts.yml does)." % "; ".join(
                                ", ".join(nodes) for nodes in seen.values()))
    return warnings


def plan_configuration(current, default_strategy, tables, purge=True):
    """Calls that bring ``current`` ({'default_strategy', 'tables'}) to the wanted configuration.

    Returns [(function, args)] with function in 'set' / 'clear'. Pure.
    """
    calls = []
    if default_strategy is not None and current.get("default_strategy") != default_strategy:
        calls.append(("set", (None, default_strategy, None)))
    have = current.get("tables") or {}
    for name, spec in sorted((tables or {}).items()):
        old = have.get(name)
        if old is None or old["strategy"] != spec["strategy"] or (old.get("priority") or None) != (spec.get("priority") or None):
            calls.append(("set", (name, spec["strategy"], spec.get("priority"))))
    if purge:
        for name in sorted(set(have) - set(tables or {})):
            calls.append(("clear", (name,)))
    return calls


# --------------------------------------------------------------------------- database
def engine_installed(conn):
    return bool(fetch_value(conn, "SELECT pg_catalog.to_regprocedure('steep_repl.set_conflict_strategy(text,text,text[])') "
                                  "IS NOT NULL"))


def require_engine(conn):
    if not engine_installed(conn):
        raise SteepError("the conflict engine of steep_repl is not installed in this database (steep_repl 1.1 or newer "
                         "needed). Fix: run the foundation play (playbooks/steep_foundation.yml) first.")


def current_configuration(conn):
    """{'default_strategy': s, 'tables': {t: {'strategy', 'priority'}}} of one node."""
    default = fetch_value(conn, "SELECT value FROM steep_repl.conflict_settings WHERE name = 'default_strategy'")
    rows = fetch_all(conn, "SELECT table_schema || '.' || table_name AS t, strategy, priority "
                           "FROM steep_repl.conflict_strategies ORDER BY 1")
    return {"default_strategy": default or DEFAULT_STRATEGY,
            "tables": {r["t"]: {"strategy": r["strategy"], "priority": list(r["priority"]) if r["priority"] else None}
                       for r in rows}}


def known_nodes(conn):
    return set(r["node_id"] for r in fetch_all(conn, "SELECT node_id FROM steep_repl.nodes"))


def configure(sql, conn, default_strategy=None, tables=None, purge=True):
    """Apply the wanted configuration through ``sql`` (a db.SqlState). Returns a result dict."""
    require_engine(conn)
    if default_strategy is not None:
        validate_strategy(default_strategy)
    wanted = normalize_strategies(tables, known_nodes(conn))
    missing = [t for t in wanted if not fetch_value(conn, "SELECT pg_catalog.to_regclass(%s) IS NOT NULL",
                                                    (quote_for_regclass(t),))]
    if missing:
        raise SteepError("steep_conflict_strategies names table(s) that do not exist here: %s. Fix: create them or "
                         "remove them from steep_conflict_strategies." % ", ".join(missing))
    before = current_configuration(conn)
    calls = plan_configuration(before, default_strategy, wanted, purge)
    for kind, args in calls:
        if kind == "set":
            name, strategy, priority = args
            sql.execute("SELECT steep_repl.set_conflict_strategy(%s, %s, %s::text[])",
                        (quote_for_regclass(name) if name else None, strategy, priority))
        else:
            schema, _dot, table = split_qualified(args[0])
            sql.execute("SELECT steep_repl.clear_conflict_strategy(%s, %s)", (schema, table))
    if sql.check_mode:
        after = {"default_strategy": default_strategy or before["default_strategy"],
                 "tables": dict(wanted) if purge else dict(before["tables"], **wanted)}
    else:
        after = current_configuration(conn)
    config = {"default_strategy": after["default_strategy"], "tables": after["tables"]}
    return {"changed": after != before, "before": before, "after": after, "queries": sql.queries,
            "warnings": convergence_warnings(config)}


def quote_for_regclass(name):
    schema, _dot, table = split_qualified(name)
    return '"%s"."%s"' % (schema.replace('"', '""'), table.replace('"', '""'))


def _plain(row):
    """A conflict row with JSON-safe values (timestamps as ISO 8601 text)."""
    if row is None:
        return None
    return dict((k, v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items())


def get_conflict(conn, conflict_id):
    return _plain(fetch_one(conn, "SELECT %s FROM steep_repl.conflict_log WHERE id = %%s" % CONFLICT_COLUMNS, (conflict_id,)))


def list_conflicts(conn, resolution="PENDING", table=None, limit=100):
    where, args = [], []
    if resolution:
        where.append("resolution = %s")
        args.append(resolution)
    if table:
        schema, _dot, name = split_qualified(table)
        where.append("table_schema = %s AND table_name = %s")
        args += [schema, name]
    q = "SELECT %s FROM steep_repl.conflict_log%s ORDER BY id LIMIT %%s" % (
        CONFLICT_COLUMNS, (" WHERE " + " AND ".join(where)) if where else "")
    return [_plain(r) for r in fetch_all(conn, q, args + [int(limit)])]


def _json(value):
    return None if value is None else json.dumps(value)


def resolve(sql, conn, conflict_id, resolution, merged=None):
    """Resolve one conflict. Idempotent: a conflict already resolved the same way is unchanged."""
    require_engine(conn)
    if resolution not in RESOLUTIONS:
        raise SteepError("unknown resolution %r. Fix: use local, remote or merge." % (resolution,))
    if resolution == "merge" and not isinstance(merged, dict):
        raise SteepError("resolution merge needs the merged row (option merged, a mapping of columns). Fix: e.g. "
                         "merged: {status: shipped}.")
    if resolution != "merge" and merged is not None:
        raise SteepError("option merged is only valid with resolution merge.")
    before = get_conflict(conn, conflict_id)
    if before is None:
        raise SteepError("conflict %s does not exist. Fix: list pending conflicts with SELECT id, table_schema, "
                         "table_name, pk FROM steep_repl.conflict_log WHERE resolution = 'PENDING';" % conflict_id)
    if before["resolution"] != "PENDING":
        if before["resolution"] == LABELS[resolution]:
            return {"changed": False, "conflict": before, "before": before, "queries": sql.queries, "resolved": 0}
        raise SteepError("conflict %s is already resolved (%s at %s by %s). Fix: use state=reverted to undo it."
                         % (conflict_id, before["resolution"], before["resolved_at"], before["resolved_by"]))
    sql.execute("SELECT steep_repl.resolve_conflict(%s, %s, %s::jsonb)", (conflict_id, resolution, _json(merged)))
    after = before if sql.check_mode else get_conflict(conn, conflict_id)
    return {"changed": True, "conflict": after, "before": before, "queries": sql.queries, "resolved": 1}


def resolve_bulk(sql, conn, resolution, xid=None, table=None, time_start=None, time_end=None):
    require_engine(conn)
    if resolution not in ("local", "remote"):
        raise SteepError("bulk resolution must be local or remote (got %r). Fix: merge needs a row per conflict; "
                         "resolve those one by one with conflict_id." % (resolution,))
    if xid is None and table is None and time_start is None and time_end is None:
        raise SteepError("bulk resolution needs a filter (xid, table, time_start or time_end). Fix: give at least one, "
                         "or conflict_id for a single conflict.")
    if table is not None:
        table = normalize_table_name(table)
    pending = fetch_value(conn, """
        SELECT count(*) FROM steep_repl.conflict_log
        WHERE resolution = 'PENDING' AND (%(xid)s::bigint IS NULL OR origin_xid = %(xid)s::bigint)
          AND (%(t)s::text IS NULL OR table_schema || '.' || table_name = %(t)s::text)
          AND (%(s)s::timestamptz IS NULL OR detected_at >= %(s)s::timestamptz)
          AND (%(e)s::timestamptz IS NULL OR detected_at <= %(e)s::timestamptz)""",
                          {"xid": xid, "t": table, "s": time_start, "e": time_end})
    if not pending:
        return {"changed": False, "resolved": 0, "queries": sql.queries}
    rows = sql.execute("SELECT steep_repl.resolve_conflicts_bulk(%s, %s, %s, %s::timestamptz, %s::timestamptz) AS n",
                       (resolution, xid, table, time_start, time_end))
    n = int(rows[0]["n"]) if rows else int(pending)
    return {"changed": n > 0, "resolved": n, "queries": sql.queries}


def revert(sql, conn, conflict_id, reason="Manual revert"):
    require_engine(conn)
    before = get_conflict(conn, conflict_id)
    if before is None:
        raise SteepError("conflict %s does not exist. Fix: SELECT id, resolution FROM steep_repl.conflict_log ORDER BY "
                         "id DESC; to find it." % conflict_id)
    if before["resolution"] == "REVERTED":
        return {"changed": False, "conflict": before, "before": before, "new_conflict_id": before["reverted_by"],
                "queries": sql.queries}
    rows = sql.execute("SELECT steep_repl.revert_resolution(%s, %s) AS id", (conflict_id, reason or "Manual revert"))
    new_id = rows[0]["id"] if rows else None
    after = before if sql.check_mode else get_conflict(conn, conflict_id)
    return {"changed": True, "conflict": after, "before": before, "new_conflict_id": new_id, "queries": sql.queries}


def purge_log(conn, older_than, batch=10000, max_batches=None):
    """Retention: delete this node's decided conflict_log entries detected more than ``older_than`` (a
    PostgreSQL interval) ago, in batches (``steep_repl.purge_conflict_log``: PENDING entries and unfinished
    revert chains stay). The module runs it in its transaction (in check mode rolled back, so the count is
    exact and nothing stays); the agent on an autocommit connection, one batch per cycle (``max_batches``).
    Returns a result dict."""
    require_engine(conn)
    if not fetch_value(conn, "SELECT pg_catalog.to_regprocedure('steep_repl.purge_conflict_log(interval,integer)') IS NOT NULL"):
        raise SteepError("this node's steep_repl extension has no conflict-log retention. Fix: run the foundation "
                         "play (playbooks/steep_foundation.yml) to update it, then re-run.")
    if batch < 1:
        raise SteepError("batch_size must be 1 or more, got %s. Fix: pass a positive batch size (default 10000); "
                         "nothing was deleted." % batch)
    try:
        fetch_value(conn, "SELECT %s::interval", (older_than,))
    except psycopg2.DataError:
        raise SteepError("older_than %r is not a PostgreSQL interval. Fix: give one such as '90 days' or "
                         "'12 hours'; nothing was deleted." % (older_than,))
    before = fetch_value(conn, "SELECT count(*) FROM steep_repl.conflict_log")
    query = "SELECT steep_repl.purge_conflict_log(%s::interval, %s)"
    purged = batches = 0
    while True:
        try:
            n = fetch_value(conn, query, (older_than, batch))
        except psycopg2.Error as exc:
            raise SteepError("purging the conflict log failed: %s" % explain_db_error(exc))
        purged += n
        batches += 1
        if n < batch or (max_batches and batches >= max_batches):
            break
    with conn.cursor() as cur:
        text = cur.mogrify(query, (older_than, batch)).decode()
    return {"changed": purged > 0, "purged": purged, "before": {"entries": before}, "complete": n < batch,
            "after": {"entries": before - purged}, "queries": [text] if purged else []}


# Errors a write of the resolution API can meet next to apply workers and other sessions: rolled back, a re-run works.
RETRYABLE = {
    "40P01": "this write was the victim of a deadlock, as a local write next to an apply worker must be",
    "55P03": "it waited for a lock longer than lock_timeout allows",
}


def explain_db_error(exc):
    """'message. Fix: hint' of a psycopg2 error raised by the resolution API."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag else None
    hint = getattr(diag, "message_hint", None) if diag else None
    text = primary or str(exc).strip().splitlines()[0]
    if hint:
        text += ". " + (hint if hint.startswith("Fix") else "Fix: " + hint)
    elif getattr(exc, "pgcode", None) in RETRYABLE:
        text += ". Fix: re-run the task, nothing was written (%s: docs/conflicts.md, Deadlocks)." % RETRYABLE[exc.pgcode]
    return text


def settle_unique(conn, limit=1000, check_mode=False):
    """Send the tombstones of rows that lost a UNIQUE_VIOLATION on this node to the other nodes
    (``steep_repl.settle_unique_conflicts``). Returns how many went out (in check mode: how many are
    queued, nothing sent); 0 on an extension without the function. The agent calls it every cycle, the
    tombstones module once per node before it settles horizons."""
    if not fetch_value(conn, "SELECT pg_catalog.to_regprocedure('steep_repl.settle_unique_conflicts(integer)') IS NOT NULL"):
        return 0
    if check_mode:
        return fetch_value(conn, "SELECT count(*) FROM steep_repl.unique_settle")
    sent = fetch_value(conn, "SELECT steep_repl.settle_unique_conflicts(%s)", (int(limit),))
    conn.commit()
    return sent
