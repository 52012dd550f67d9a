"""Operations behind the CLI. The agent runs them for IPC requests; the CLI runs
them itself against the database when the agent is down. Each takes a psycopg2
connection and returns JSON-able data, or raises CommandError naming the fix."""
import json

from ansible_collections.steep.repl.plugins.module_utils import db
from ansible_collections.steep.repl.plugins.module_utils import nodeinit

from . import collect
from .config import ConfigError, interval_text, parse_duration


class CommandError(Exception):
    pass


def _require_extension(conn):
    version = db.extension_version(conn)
    if not version:
        raise CommandError("the steep_repl extension is not installed in this database. Fix: run "
                           "playbooks/steep_foundation.yml (or CREATE EXTENSION steep_repl).")
    return version


def _require_function(conn, name, provided_by):
    if not collect.has_function(conn, name):
        raise CommandError("steep_repl.%s() does not exist in this database (steep_repl %s). Fix: install the "
                           "steep_repl version that provides it (%s)." % (name, db.extension_version(conn), provided_by))


def node_status(conn, args=None):
    _require_extension(conn)
    return dict(nodes=collect.nodes(conn))


def node_add(conn, args):
    _require_extension(conn)
    name = db.validate_node_id(args.get("name"))
    host = args.get("host") or "127.0.0.1"
    port = int(args.get("port") or 5432)
    priority = int(args.get("priority") if args.get("priority") is not None else 50)
    before = db.fetch_one(conn, "SELECT node_id, node_name, host, port, priority FROM steep_repl.nodes WHERE node_id = %s",
                          (name,))
    wanted = dict(node_id=name, node_name=args.get("node_name") or name, host=host, port=port, priority=priority)
    if before == wanted:
        return dict(changed=False, node=wanted)
    db.fetch_all(conn, "INSERT INTO steep_repl.nodes (node_id, node_name, host, port, priority) VALUES "
                       "(%(node_id)s, %(node_name)s, %(host)s, %(port)s, %(priority)s) ON CONFLICT (node_id) DO UPDATE "
                       "SET node_name = EXCLUDED.node_name, host = EXCLUDED.host, port = EXCLUDED.port, "
                       "priority = EXCLUDED.priority", wanted)
    collect.audit(conn, "node_added" if before is None else "node_updated", "node", name, before, wanted)
    return dict(changed=True, node=wanted, note="add the node to replication.topology.nodes of every agent's config "
                                                "so it is health-checked and can vote")


def node_remove(conn, args):
    _require_extension(conn)
    name = db.validate_node_id(args.get("name"))
    row = db.fetch_one(conn, "SELECT pg_catalog.to_jsonb(n) AS n FROM steep_repl.nodes n WHERE node_id = %s", (name,))
    if row is None:
        return dict(changed=False, node=name)
    if row["n"].get("is_local"):
        raise CommandError("node %s is this database's own node; it cannot be removed from itself. Fix: remove it "
                           "from the other nodes." % name)
    try:
        with conn.cursor() as cur:
            cur.execute("DELETE FROM steep_repl.nodes WHERE node_id = %s", (name,))
    except db.psycopg2.IntegrityError as exc:
        raise CommandError("node %s still owns rows that reference it (%s). Fix: release its identity ranges first."
                           % (name, str(exc).splitlines()[0]))
    collect.audit(conn, "node_removed", "node", name, row["n"], None)
    return dict(changed=True, node=name)


def conflicts_list(conn, args=None):
    args = args or {}
    _require_extension(conn)
    limit = int(args.get("limit") or 50)
    where = "WHERE resolution = 'PENDING'" if args.get("pending") else ""
    rows = db.fetch_all(conn, "SELECT id, detected_at::text, subscription, table_schema, table_name, conflict_type, "
                              "resolution, resolved_at::text, resolved_by, origin_xid, local_tuple, remote_tuple "
                              "FROM steep_repl.conflict_log %s ORDER BY id DESC LIMIT %%s" % where, (limit,))
    return dict(conflicts=rows)


SEED_LABELS = {"KEPT_LOCAL": "local", "APPLIED_REMOTE": "remote", "MERGED": "merge",
               "keep_local": "local", "apply_remote": "remote"}


def conflicts_resolve(conn, args):
    """Through the conflicts module_utils when present (idempotent, validated), else the seed-named SQL functions."""
    _require_extension(conn)
    resolution = args.get("resolution")
    if not resolution:
        raise CommandError("--resolution is required: local, remote or merge (seed labels KEPT_LOCAL, APPLIED_REMOTE, "
                           "MERGED are accepted)")
    resolution = SEED_LABELS.get(resolution, resolution)
    merged = args.get("merged")
    if isinstance(merged, str):
        try:
            merged = json.loads(merged)
        except ValueError:
            raise CommandError("--merged must be a JSON object of columns, e.g. '{\"status\": \"shipped\"}'")
    if args.get("id") is None and args.get("xid") is None:
        raise CommandError("give a conflict id (or --xid for every conflict of one origin transaction)")
    mod = collect.optional_module("conflicts")
    try:
        if mod is not None and hasattr(mod, "resolve"):
            sql = db.SqlState(conn)
            if args.get("xid") is not None:
                res = mod.resolve_bulk(sql, conn, resolution, xid=int(args["xid"]))
            else:
                res = mod.resolve(sql, conn, int(args["id"]), resolution, merged)
            res.pop("queries", None)
            return res
        if args.get("xid") is not None:
            _require_function(conn, "resolve_conflicts_bulk", "the conflicts feature, playbooks/steep_conflicts.yml")
            n = db.fetch_value(conn, "SELECT steep_repl.resolve_conflicts_bulk(%s, %s::bigint)", (resolution, int(args["xid"])))
            return dict(changed=bool(n), resolved=n)
        _require_function(conn, "resolve_conflict", "the conflicts feature, playbooks/steep_conflicts.yml")
        result = db.fetch_value(conn, "SELECT steep_repl.resolve_conflict(%s::bigint, %s, %s::jsonb)::text",
                                (int(args["id"]), resolution, json.dumps(merged) if merged is not None else None))
        return dict(changed=True, id=int(args["id"]), result=result)
    except db.psycopg2.Error as exc:
        raise CommandError("resolving conflict %s failed: %s" % (args.get("id") or "xid %s" % args.get("xid"),
                                                                 str(exc).strip().splitlines()[0]))


def conflicts_purge(conn, args):
    """Retention of this node's conflict log (conflicts module_utils, ``steep_repl.purge_conflict_log``);
    ``--dry-run`` counts in a transaction that is rolled back."""
    _require_extension(conn)
    older = args.get("older_than")
    if older is None or not str(older).strip():
        raise CommandError("--older-than is required: how long a decided conflict is kept, e.g. 90d or '90 days'. "
                           "Nothing was deleted.")
    try:  # the agent's durations (90d, 12h) or a PostgreSQL interval ('90 days')
        older = interval_text(parse_duration(older, "--older-than"))
    except ConfigError:
        older = str(older)
    batch = args.get("batch_size")
    batch = 10000 if batch is None else int(batch)
    mod = collect.optional_module("conflicts")
    if mod is None or not hasattr(mod, "purge_log"):
        raise CommandError("this installation has no conflict-log retention. Fix: install the steep.repl collection "
                           "that provides it (plugins/module_utils/conflicts.py).")
    dry = bool(args.get("dry_run"))
    conn.autocommit = not dry
    try:
        res = mod.purge_log(conn, older, batch)
    finally:
        if dry:
            conn.rollback()
            conn.autocommit = True
    res.pop("queries", None)
    res.pop("complete", None)
    res["older_than"] = older
    if dry:
        res = dict(res, changed=False, dry_run=True, would_purge=res.pop("purged"))
    return res


def range_status(conn, args=None):
    _require_extension(conn)
    node = (args or {}).get("node")
    out = dict(ranges=collect.range_utilization(collect.range_rows(conn, node)))
    mod = collect.optional_module("ranges")
    if mod is not None and hasattr(mod, "utilization") and collect.has_relation(conn, "steep_repl.range_tables"):
        try:
            out["managed_tables"] = mod.utilization(conn, node)  # current/next range per table (ranges module_utils)
        except db.SteepError as exc:
            out["managed_tables_error"] = str(exc)
    return out


def range_allocate(conn, args):
    _require_extension(conn)
    table = args.get("table")
    if not table:
        raise CommandError("give the table as schema.table (e.g. public.orders)")
    schema, dummy, name = db.split_qualified(table)
    size = int(args.get("size") or 10000)
    _require_function(conn, "allocate_range", "the identity ranges feature, playbooks/steep_ranges.yml")
    try:
        row = db.fetch_one(conn, "SELECT * FROM steep_repl.allocate_range(%s, %s, %s::bigint)", (schema, name, size))
    except db.psycopg2.Error as exc:
        raise CommandError("allocating a range for %s.%s failed: %s" % (schema, name, str(exc).strip().splitlines()[0]))
    return dict(changed=True, table="%s.%s" % (schema, name), range=row)


def init_status(conn, args=None):
    _require_extension(conn)
    out = []
    for n in collect.nodes(conn):
        out.append(dict(node_id=n.get("node_id"), init_state=n.get("init_state", "UNKNOWN"),
                        init_state_reason=n.get("init_state_reason"), is_local=n.get("is_local")))
    progress = []
    if db.fetch_value(conn, "SELECT pg_catalog.to_regclass('steep_repl.init_status') IS NOT NULL"):
        progress = [{k: (str(v) if v is not None and not isinstance(v, (int, float, str, bool)) else v)
                     for k, v in row.items()} for row in nodeinit.status(conn)]
    return dict(nodes=out, progress=progress)


DB_COMMANDS = {
    "node_status": node_status, "node_add": node_add, "node_remove": node_remove,
    "conflicts_list": conflicts_list, "conflicts_resolve": conflicts_resolve, "conflicts_purge": conflicts_purge,
    "range_status": range_status, "range_allocate": range_allocate, "init_status": init_status,
}


def run(conn, cmd, args):
    fn = DB_COMMANDS.get(cmd)
    if fn is None:
        raise CommandError("unknown command %r" % cmd)
    try:
        return fn(conn, args or {})
    except db.SteepError as exc:
        raise CommandError(str(exc))


def dumps(data):
    return json.dumps(data, indent=2, sort_keys=True, default=str)
