"""What the agent reads from PostgreSQL (local node and peers). SQL only, no state.

Where another owner's module_utils exists (``ranges.expand_if_needed``) it is
used; everything else reads the seed tables and the catalog directly.
"""
import importlib
import json

from ansible_collections.steep.repl.plugins.module_utils import db


def lsn_int(lsn):
    if not lsn:
        return None
    hi, lo = str(lsn).split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def optional_module(name):
    """A collection module_utils module written by another owner, or None when absent."""
    try:
        return importlib.import_module("ansible_collections.steep.repl.plugins.module_utils." + name)
    except ImportError:
        return None


def has_function(conn, name):
    return bool(db.fetch_value(conn, "SELECT count(*) FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n "
                                     "ON n.oid = p.pronamespace WHERE n.nspname = 'steep_repl' AND p.proname = %s",
                               (name,)))


def has_relation(conn, name):
    return db.fetch_value(conn, "SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (name,))


def heartbeat(conn, node, status):
    """last_seen/status of the local node; registers the node row when it is missing."""
    with conn.cursor() as cur:
        cur.execute("UPDATE steep_repl.nodes SET last_seen = pg_catalog.now(), status = %s WHERE node_id = %s",
                    (status, node["name"]))
        if cur.rowcount:
            return False
        cur.execute("INSERT INTO steep_repl.nodes (node_id, node_name, host, port, priority, last_seen, status) "
                    "VALUES (%s, %s, %s, %s, %s, pg_catalog.now(), %s) ON CONFLICT (node_id) DO NOTHING",
                    (node["name"], node["name"], node["host"], node["port"], node["priority"], status))
        return cur.rowcount > 0


def nodes(conn):
    return [r["n"] for r in db.fetch_all(conn, "SELECT pg_catalog.to_jsonb(n) AS n FROM steep_repl.nodes n ORDER BY node_id")]


def subscriptions_in(conn):
    """Local subscriptions (incoming changes): worker state, received LSN and time lag."""
    return db.fetch_all(conn, """
        SELECT s.subname, s.subconninfo, s.subenabled, st.pid,
               st.received_lsn::text AS received_lsn,
               EXTRACT(EPOCH FROM pg_catalog.now() - st.latest_end_time)::float8 AS lag_seconds
        FROM pg_catalog.pg_subscription s
        LEFT JOIN pg_catalog.pg_stat_subscription st
               ON st.subid = s.oid AND st.relid IS NULL AND st.worker_type = 'apply'
        WHERE s.subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
        ORDER BY s.subname""")


def slots_out(conn):
    """Logical slots of this database (outgoing changes): lag to each subscriber and WAL retention."""
    return db.fetch_all(conn, """
        SELECT s.slot_name, s.active, s.wal_status, s.safe_wal_size,
               pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.confirmed_flush_lsn)::float8 AS lag_bytes,
               EXTRACT(EPOCH FROM r.replay_lag)::float8 AS lag_seconds
        FROM pg_catalog.pg_replication_slots s
        LEFT JOIN pg_catalog.pg_stat_replication r ON r.pid = s.active_pid
        WHERE s.slot_type = 'logical' AND s.database = pg_catalog.current_database()
        ORDER BY s.slot_name""")


def conflicts(conn):
    row = db.fetch_one(conn, """
        SELECT (SELECT count(*) FROM steep_repl.conflict_log
                WHERE detected_at > pg_catalog.now() - interval '1 minute') AS last_minute,
               (SELECT count(*) FROM steep_repl.conflict_log
                WHERE detected_at > pg_catalog.now() - interval '24 hours'
                  AND resolution IS DISTINCT FROM 'PENDING') AS resolved_24h,
               (SELECT count(*) FROM steep_repl.conflict_log WHERE resolution = 'PENDING') AS pending""")
    return dict(per_minute=float(row["last_minute"]), resolved_24h=int(row["resolved_24h"]), pending=int(row["pending"]))


def ddl_depth(conn):
    return int(db.fetch_value(conn, "SELECT count(*) FROM steep_repl.ddl_queue WHERE status IN ('PENDING', 'APPROVED')"))


RANGES_SQL = """
    SELECT r.table_schema, r.table_name, r.node_id, r.range_start, r.range_end, r.status,
           (SELECT max(ps.last_value)
              FROM pg_catalog.pg_depend d
              JOIN pg_catalog.pg_class sc ON sc.oid = d.objid AND sc.relkind = 'S'
              JOIN pg_catalog.pg_namespace sn ON sn.oid = sc.relnamespace
              JOIN pg_catalog.pg_sequences ps ON ps.schemaname = sn.nspname AND ps.sequencename = sc.relname
              JOIN pg_catalog.pg_class t ON t.oid = d.refobjid
              JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
             WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
               AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
               AND d.deptype IN ('a', 'i') AND tn.nspname = r.table_schema AND t.relname = r.table_name
           ) AS last_value
    FROM steep_repl.identity_ranges r
    WHERE r.status = 'active' AND (%s::text IS NULL OR r.node_id = %s)
    ORDER BY r.table_schema, r.table_name, r.node_id, r.range_start"""


def range_rows(conn, node_id=None):
    return db.fetch_all(conn, RANGES_SQL, (node_id, node_id))


def range_utilization(rows):
    """Per (schema, table, node): used / capacity over its active ranges, in percent."""
    out = {}
    for r in rows:
        key = (r["table_schema"], r["table_name"], r["node_id"])
        t = out.setdefault(key, dict(table_schema=r["table_schema"], table_name=r["table_name"], node_id=r["node_id"],
                                     ranges=[], capacity=0, used=0, last_value=r["last_value"]))
        size = int(r["range_end"]) - int(r["range_start"]) + 1
        lv = r["last_value"]
        used = 0 if lv is None else max(0, min(int(lv), int(r["range_end"])) - int(r["range_start"]) + 1)
        t["ranges"].append([int(r["range_start"]), int(r["range_end"])])
        t["capacity"] += size
        t["used"] += used
    for t in out.values():
        t["utilization_pct"] = round(100.0 * t["used"] / t["capacity"], 2) if t["capacity"] else 0.0
    return list(out.values())


def expand_ranges(conn, threshold):
    """Pre-allocate the next range where the ranges module_utils provides it; None when it does not exist yet."""
    mod = optional_module("ranges")
    fn = getattr(mod, "expand_if_needed", None) if mod else None
    if fn is None or not has_relation(conn, "steep_repl.range_tables"):
        return None
    return fn(conn, threshold)


def settle_unique(conn):
    """Tombstones of rows that lost a UNIQUE_VIOLATION here, sent to the other nodes (conflicts module_utils)."""
    mod = optional_module("conflicts")
    fn = getattr(mod, "settle_unique", None) if mod else None
    return fn(conn) if fn else 0


def local_snapshot(conn, me):
    """Everything the agent reports about its own node (one round trip per area)."""
    snap = dict(extension=db.extension_version(conn))
    snap["server_version"] = db.fetch_value(conn, "SHOW server_version")
    snap["current_lsn"] = db.fetch_value(conn, "SELECT pg_catalog.pg_current_wal_lsn()::text")
    snap["subscriptions"] = subscriptions_in(conn)
    snap["slots"] = slots_out(conn)
    if snap["extension"]:
        snap["nodes"] = nodes(conn)
        snap["conflicts"] = conflicts(conn)
        snap["ddl_queue"] = ddl_depth(conn)
        snap["ranges"] = range_utilization(range_rows(conn, me))
    return snap


def peer_probe(conn):
    row = db.fetch_one(conn, "SELECT pg_catalog.pg_current_wal_lsn()::text AS lsn, "
                             "(SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'steep_repl') AS extension")
    return row


def put_state(cur, key, value):
    """Upsert one key of steep_repl.coordinator_state (stamped with this node's clock)."""
    cur.execute("INSERT INTO steep_repl.coordinator_state (key, value, updated_at) VALUES (%s, %s, "
                "pg_catalog.now()) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = "
                "EXCLUDED.updated_at", (key, json.dumps(value, default=str)))


def write_coordinator(conn, me, state):
    """The coordinator this node believes in: steep_repl.coordinator_state + nodes.is_coordinator."""
    with conn.cursor() as cur:
        put_state(cur, "coordinator", state)
        coord = state.get("node")
        cur.execute("UPDATE steep_repl.nodes SET is_coordinator = (node_id IS NOT DISTINCT FROM %s) "
                    "WHERE is_coordinator IS DISTINCT FROM (node_id IS NOT DISTINCT FROM %s)", (coord, coord))


def read_coordinator(conn):
    row = db.fetch_one(conn, "SELECT value FROM steep_repl.coordinator_state WHERE key = 'coordinator'")
    return row["value"] if row else None


def audit(conn, action, target_type, target_id, old=None, new=None):
    if not has_function(conn, "audit"):
        return
    db.fetch_value(conn, "SELECT steep_repl.audit(%s, %s, %s, %s::jsonb, %s::jsonb, true, NULL, 'steep-repl-agent')",
                   (action, target_type, target_id, json.dumps(old) if old is not None else None,
                    json.dumps(new) if new is not None else None))
