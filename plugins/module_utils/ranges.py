# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Identity ranges: pure range arithmetic + the database logic shared by the
``steep.repl.identity_range`` module and the agent (``expand_if_needed``).

The arithmetic (docs/identity-ranges.md): block ``k`` of a table with range size
``B`` is ``[k*B + 1, (k+1)*B]``; the n-th range of the node in slot ``s`` out of
``S`` slots is block ``n*S + s``. Different slots never share a block, so nodes
allocate without talking to each other. The SQL in extension/sql/30_ranges.sql
does the same computation; these functions predict it for check mode and tests.
No Ansible imports here.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.steep.repl.plugins.module_utils import db
from ansible_collections.steep.repl.plugins.module_utils.db import SteepError

DEFAULT_RANGE_SIZE = 10000
DEFAULT_THRESHOLD = 80
DEFAULT_SLOTS = 64
MAX_SLOTS = 4096
TYPE_MAX = {"smallint": 32767, "integer": 2147483647, "bigint": 9223372036854775807}


# --------------------------------------------------------------------------- pure arithmetic
def block_bounds(block, size):
    """(start, end) of block ``block`` for range size ``size``."""
    return block * size + 1, (block + 1) * size


def block_of(n, slot, slot_count):
    return n * slot_count + slot


def _ceil_div(a, b):
    return -((-a) // b)


def next_block(slot, slot_count, size, position=0, last_block=None):
    """The block the next allocation of ``slot`` gets: the smallest block of that slot that starts
    above ``position`` (highest id already used) and, when the slot already has blocks, above the last one."""
    if slot < 0 or slot >= slot_count:
        raise SteepError("slot %s is outside 0..%s" % (slot, slot_count - 1))
    kmin = _ceil_div(max(position, 0), size)
    n = max(0, _ceil_div(kmin - slot, slot_count))
    if last_block is not None:
        n = max(n, (last_block - slot) // slot_count + 1)
    return block_of(n, slot, slot_count)


def next_range(slot, slot_count, size, position=0, last_block=None, type_max=None):
    """(block, start, end) of the next range; SteepError when it does not fit ``type_max``."""
    block = next_block(slot, slot_count, size, position, last_block)
    start, end = block_bounds(block, size)
    if type_max is not None and end > type_max:
        raise SteepError("the next range %s-%s does not fit the column (max %s). Fix: change the column to bigint "
                         "(ALTER TABLE ... ALTER COLUMN ... TYPE bigint) or use a smaller range_size." % (start, end, type_max))
    return block, start, end


def slot_of_block(block, slot_count):
    return block % slot_count


def overlaps(ranges):
    """Pairs of overlapping (start, end, owner) triples; empty when all are disjoint."""
    out = []
    ordered = sorted(ranges, key=lambda r: (r[0], r[1]))
    for i in range(1, len(ordered)):
        for j in range(i - 1, -1, -1):
            if ordered[j][1] >= ordered[i][0]:
                out.append((ordered[j], ordered[i]))
            else:
                break
    return out


def percent_used(position, start, end):
    """Percentage of [start, end] handed out when the sequence stands at ``position``."""
    if position is None:
        return 0.0
    used = max(0, min(position, end) - start + 1)
    return round(100.0 * used / (end - start + 1), 2)


def check_size_fits(table, size, slot_count, column_type):
    tmax = TYPE_MAX.get(column_type)
    if tmax is not None and size * slot_count > tmax:
        raise SteepError("range_size %s does not fit %s: its key is %s (max %s) and %s slots x %s ids exceed that. "
                         "Fix: use range_size <= %s for this table, fewer slots (max_nodes), or change the column to "
                         "bigint." % (size, table, column_type, tmax, slot_count, size, tmax // slot_count))


def assign_slots(nodes, known=None, slot_count=DEFAULT_SLOTS):
    """node_id -> slot for every node.

    ``nodes``: [{node_id, priority, slot (configured or None)}]. ``known``: slots recorded by earlier runs
    ([{node_id: slot}], e.g. read from every reachable node). Recorded and configured slots are kept (they
    can never change once a node owns ranges); nodes without one get the lowest free slot in
    (priority desc, node_id) order. Conflicts are errors naming the fix.
    """
    recorded = {}
    for entry in known or []:
        for node_id, slot in (entry or {}).items():
            if slot is None:
                continue
            slot = int(slot)
            if node_id in recorded and recorded[node_id] != slot:
                raise SteepError("node %s is recorded with range slot %s on one node and %s on another. Fix: set "
                                 "steep_range_slot for %s to the slot its ranges use (see steep_repl.identity_ranges.slot)."
                                 % (node_id, recorded[node_id], slot, node_id))
            recorded[node_id] = slot
    out = {}
    for n in nodes:
        node_id = n["node_id"]
        want = n.get("slot")
        if want is not None:
            want = int(want)
            if node_id in recorded and recorded[node_id] != want:
                raise SteepError("node %s is configured with steep_range_slot %s but already uses slot %s. Fix: set "
                                 "steep_range_slot: %s (a node's slot never changes once it owns ranges)."
                                 % (node_id, want, recorded[node_id], recorded[node_id]))
            out[node_id] = want
        elif node_id in recorded:
            out[node_id] = recorded[node_id]
    for node_id, slot in recorded.items():
        out.setdefault(node_id, slot)  # nodes that left the inventory keep their slot reserved
    for node_id, slot in out.items():
        if slot < 0 or slot >= slot_count:
            raise SteepError("range slot %s of node %s is outside 0..%s. Fix: use a smaller steep_range_slot or raise "
                             "steep_identity_ranges.max_nodes." % (slot, node_id, slot_count - 1))
    seen = {}
    for node_id, slot in sorted(out.items()):
        if slot in seen:
            raise SteepError("nodes %s and %s both have range slot %s. Fix: give each node its own steep_range_slot."
                             % (seen[slot], node_id, slot))
        seen[slot] = node_id
    order = sorted(nodes, key=lambda n: (-int(n.get("priority") or 0), n["node_id"]))
    free = (s for s in range(slot_count) if s not in seen)
    for n in order:
        if n["node_id"] not in out:
            try:
                out[n["node_id"]] = next(free)
            except StopIteration:
                raise SteepError("no free range slot for node %s: all %s are taken. Fix: raise "
                                 "steep_identity_ranges.max_nodes (before the first allocation)." % (n["node_id"], slot_count))
    return out


def table_settings(tables, config):
    """{schema.table: {range_size, threshold_percent, enabled, explicit}} for every table to handle.

    ``tables``: replicated tables (bare names mean public). ``config``: the ``steep_identity_ranges``
    dict ``{default_range_size, threshold_percent, tables: {schema.table: {range_size | enabled}}}``.
    """
    config = config or {}
    default_size = config.get("default_range_size", DEFAULT_RANGE_SIZE)
    threshold = config.get("threshold_percent", DEFAULT_THRESHOLD)
    _check_size("default_range_size", default_size)
    if not isinstance(threshold, int) or isinstance(threshold, bool) or not 1 <= threshold <= 100:
        raise SteepError("threshold_percent %r is invalid. Fix: use a whole percentage between 1 and 100 (e.g. 80)."
                         % (threshold,))
    out = {}
    for name in tables or []:
        out[normalize(name)] = dict(range_size=default_size, threshold_percent=threshold, enabled=True, explicit=False)
    for name, opts in sorted((config.get("tables") or {}).items()):
        opts = opts or {}
        unknown = set(opts) - {"range_size", "enabled", "threshold_percent"}
        if unknown:
            raise SteepError("steep_identity_ranges.tables[%s] has unknown key(s) %s. Fix: use range_size, "
                             "threshold_percent or enabled." % (name, ", ".join(sorted(unknown))))
        entry = out.setdefault(normalize(name), dict(range_size=default_size, threshold_percent=threshold,
                                                     enabled=True, explicit=False))
        if "range_size" in opts:
            _check_size("steep_identity_ranges.tables[%s].range_size" % name, opts["range_size"])
            entry["range_size"] = opts["range_size"]
            entry["explicit"] = True
        if "threshold_percent" in opts:
            entry["threshold_percent"] = opts["threshold_percent"]
        if "enabled" in opts:
            entry["enabled"] = bool(opts["enabled"])
            entry["explicit"] = entry["explicit"] or bool(opts["enabled"])
    return out


def _check_size(what, size):
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise SteepError("%s %r is invalid: a range size is a positive number of ids. Fix: use e.g. 10000." % (what, size))


def split_name(name):
    """(schema, table) of ``schema.table`` (a bare name means public)."""
    parts = db.split_qualified(name)
    return parts[0], parts[2]


def normalize(name):
    schema, table = split_name(str(name))
    return "%s.%s" % (schema, table)


# --------------------------------------------------------------------------- database
KEY_SQL = """
SELECT a.attname::text AS column_name, pg_catalog.format_type(a.atttypid, NULL) AS column_type,
       pg_catalog.pg_get_serial_sequence(pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname),
                                         a.attname) AS sequence_name,
       (SELECT fn.nspname || '.' || fc.relname FROM pg_catalog.pg_constraint f
          JOIN pg_catalog.pg_class fc ON fc.oid = f.confrelid
          JOIN pg_catalog.pg_namespace fn ON fn.oid = fc.relnamespace
         WHERE f.conrelid = c.oid AND f.contype = 'f' AND a.attnum = ANY (f.conkey)
         ORDER BY f.conname LIMIT 1) AS references_table
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_constraint p ON p.conrelid = c.oid AND p.contype = 'p'
  CROSS JOIN LATERAL pg_catalog.unnest(p.conkey) WITH ORDINALITY AS k(attnum, ord)
  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
 WHERE n.nspname = %s AND c.relname = %s
 ORDER BY k.ord"""


def table_exists(conn, schema, table):
    return bool(db.fetch_value(conn, "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
                                     "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s "
                                     "AND c.relkind IN ('r', 'p')", (schema, table)))


def classify(conn, name, ranged_names):
    """{'kind': 'ranged'|'inherits'|'skipped'|'missing'|'no_sequence', ...} for ``schema.table``."""
    schema, table = split_name(name)
    if not table_exists(conn, schema, table):
        return dict(kind="missing", reason="table does not exist")
    cols = db.fetch_all(conn, KEY_SQL, (schema, table))
    if not cols:
        return dict(kind="skipped", reason="no primary key")
    if len(cols) == 1:
        col = cols[0]
        if col["column_type"] not in TYPE_MAX:
            return dict(kind="skipped", reason="%s key (%s) needs no range" % (col["column_type"], col["column_name"]))
        if not col["sequence_name"]:
            return dict(kind="no_sequence", column=col["column_name"], column_type=col["column_type"],
                        reason="integer key %s is not fed by a sequence or identity" % col["column_name"])
        return dict(kind="ranged", column=col["column_name"], column_type=col["column_type"],
                    sequence=col["sequence_name"], type_max=TYPE_MAX[col["column_type"]])
    for col in cols:
        ref = col["references_table"]
        if ref and (ref in ranged_names or _is_configured(conn, ref)):
            return dict(kind="inherits", parent=ref, column=col["column_name"],
                        reason="inherits from parent %s (key column %s)" % (ref, col["column_name"]))
    return dict(kind="skipped", reason="composite key (%s) without a ranged parent"
                % ", ".join(c["column_name"] for c in cols))


def _is_configured(conn, name):
    schema, table = split_name(name)
    return bool(db.fetch_value(conn, "SELECT count(*) FROM steep_repl.range_tables WHERE table_schema = %s "
                                     "AND table_name = %s", (schema, table)))


def local_node(conn):
    row = db.fetch_one(conn, "SELECT node_id, range_slot FROM steep_repl.nodes WHERE is_local")
    if not row:
        raise SteepError("this database has no local node registered in steep_repl.nodes. Fix: run "
                         "playbooks/site.yml (steep.repl.node registers every node) before the identity ranges.")
    return row


def recorded_slots(conn):
    """{node_id: slot} recorded on this node (own slot derived from its ranges when they exist)."""
    out = {r["node_id"]: r["range_slot"] for r in db.fetch_all(
        conn, "SELECT node_id, range_slot FROM steep_repl.nodes WHERE range_slot IS NOT NULL")}
    for r in db.fetch_all(conn, "SELECT DISTINCT node_id, slot FROM steep_repl.identity_ranges "
                                "WHERE slot IS NOT NULL AND status <> 'released'"):
        out.setdefault(r["node_id"], r["slot"])
    return out


def sequence_position(conn, sequence):
    return db.fetch_value(conn, "SELECT steep_repl.range_sequence_value(%s)", (sequence,))


def table_state(conn, schema, table, node_id):
    cfg = db.fetch_one(conn, "SELECT * FROM steep_repl.range_tables WHERE table_schema = %s AND table_name = %s",
                       (schema, table))
    ranges = db.fetch_all(conn, "SELECT range_start, range_end, status, block_no, slot FROM steep_repl.identity_ranges "
                                "WHERE table_schema = %s AND table_name = %s AND node_id = %s ORDER BY range_start",
                          (schema, table, node_id))
    any_ranges = bool(db.fetch_value(conn, "SELECT count(*) FROM steep_repl.identity_ranges WHERE table_schema = %s "
                                           "AND table_name = %s", (schema, table)))
    con = pg_name("steep_range_", table)
    trg = pg_name("steep_range_guard_", table)
    qualified = db.quote_qualified("%s.%s" % (schema, table))
    has_con = bool(db.fetch_value(conn, "SELECT count(*) FROM pg_catalog.pg_constraint WHERE conrelid = %s::regclass "
                                        "AND conname = %s", (qualified, con)))
    has_trg = bool(db.fetch_value(conn, "SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = %s::regclass "
                                        "AND tgname = %s", (qualified, trg)))
    return dict(config=cfg, ranges=ranges, any_ranges=any_ranges, constraint=has_con, trigger=has_trg,
                constraint_name=con, trigger_name=trg)


def pg_name(prefix, table):
    return (prefix + table).encode("utf-8")[:63].decode("utf-8", "ignore")


def max_id(conn, schema, table, column):
    qualified = db.quote_qualified("%s.%s" % (schema, table))
    return db.fetch_value(conn, "SELECT max(%s)::bigint FROM %s" % (db.quote_ident(column), qualified))


def usage(ranges, position):
    """Utilisation summary of a node's ranges for a table."""
    live = [r for r in ranges if r["status"] == "active"]
    current = None
    for r in live:
        if r["range_end"] > (position or 0):
            current = r
            break
    out = dict(ranges=["%s-%s (%s)" % (r["range_start"], r["range_end"], r["status"]) for r in ranges],
               current_value=position, current_range=None, percent_used=None, next_range=None)
    if current:
        out["current_range"] = [current["range_start"], current["range_end"]]
        out["percent_used"] = percent_used(position if position and position >= current["range_start"] else None,
                                           current["range_start"], current["range_end"])
        later = [r for r in live if r["range_start"] > current["range_end"]]
        if later:
            out["next_range"] = [later[0]["range_start"], later[0]["range_end"]]
    elif live:
        last = live[-1]
        out["current_range"] = [last["range_start"], last["range_end"]]
        out["percent_used"] = 100.0
    return out


def plan_table(conn, name, info, settings, node_id, slot, slot_count, expand_threshold=None):
    """What has to change for one ranged table (no change made). Raises SteepError on bad input."""
    schema, table = split_name(name)
    size = settings["range_size"]
    threshold = settings["threshold_percent"]
    check_size_fits(name, size, slot_count, info["column_type"])
    st = table_state(conn, schema, table, node_id)
    cfg = st["config"]
    steps = []
    if cfg and st["any_ranges"] and (cfg["range_size"] != size or cfg["slot_count"] != slot_count):
        raise SteepError("%s already has identity ranges of %s ids in %s slots; range_size %s / max_nodes %s cannot be "
                         "applied (the block arithmetic needs a fixed size per table). Fix: set range_size: %s for %s "
                         "(see docs/identity-ranges.md, 'Changing the range size')."
                         % (name, cfg["range_size"], cfg["slot_count"], size, slot_count, cfg["range_size"], name))
    if not cfg or (cfg["range_size"], cfg["threshold_percent"], cfg["slot_count"], cfg["sequence_name"]) != (
            size, threshold, slot_count, info["sequence"]):
        steps.append(("configure", (schema, table, size, threshold, slot_count)))
    position = sequence_position(conn, info["sequence"]) or 0
    ranges = [dict(r) for r in st["ranges"]]
    live = [r for r in ranges if r["status"] == "active"]
    allocated = []
    blocks = [r["block_no"] for r in ranges if r["block_no"] is not None]
    last_block = max(blocks) if blocks else None
    if not live or all(r["range_end"] <= position for r in live):
        floor = position
        if last_block is None:
            floor = max(position, max_id(conn, schema, table, info["column"]) or 0)
        block, start, end = next_range(slot, slot_count, size, floor, last_block, info["type_max"])
        allocated.append(dict(range_start=start, range_end=end, status="active", block_no=block, slot=slot))
        last_block = block
        steps.append(("allocate", (schema, table, size)))
    after = ranges + allocated
    live = [r for r in after if r["status"] == "active" and r["range_end"] > position]
    cur = live[0]
    if cur["range_start"] > position + 1:
        steps.append(("reseed", (schema, table)))
        position_after = cur["range_start"] - 1
    else:
        position_after = position
    pct = percent_used(position_after if position_after >= cur["range_start"] else None, cur["range_start"], cur["range_end"])
    if pct >= (expand_threshold or threshold) and not [r for r in live if r["range_start"] > cur["range_end"]]:
        block, start, end = next_range(slot, slot_count, size, position_after, last_block, info["type_max"])
        allocated.append(dict(range_start=start, range_end=end, status="active", block_no=block, slot=slot))
        steps.append(("allocate", (schema, table, size)))
    if not st["constraint"] or not st["trigger"]:
        steps.append(("constraint", (schema, table, cur["range_start"], cur["range_end"])))
    return dict(name=name, steps=steps, before=st, ranges_before=ranges, allocated=allocated,
                position_before=position, position_after=position_after, ranges_after=ranges + allocated)


STEP_SQL = {
    "configure": "SELECT steep_repl.configure_range_table(%s, %s, %s::bigint, %s, %s)",
    "allocate": "SELECT * FROM steep_repl.allocate_range(%s, %s, %s::bigint)",
    "reseed": "SELECT steep_repl.reseed_into_range(%s, %s)",
    "constraint": "SELECT steep_repl.apply_range_constraint(%s, %s, %s::bigint, %s::bigint)",
}


def apply_plan(state, plan):
    """Run (or in check mode record) the plan's steps through a db.SqlState."""
    for kind, args in plan["steps"]:
        state.execute(STEP_SQL[kind], args)


def expand_if_needed(conn, threshold=None):
    """For the agent and playbooks/expand_ranges.yml: pre-allocate the next range of every managed table whose
    current range passed ``threshold`` percent (default: the table's own threshold). Returns the allocations as
    [{table, range_start, range_end}]; [] when nothing was needed."""
    out = []
    if not db.fetch_value(conn, "SELECT pg_catalog.to_regclass('steep_repl.range_tables') IS NOT NULL"):
        return out  # steep_repl older than 1.1: no managed tables yet
    tables = db.fetch_all(conn, "SELECT table_schema, table_name FROM steep_repl.range_tables ORDER BY 1, 2")
    for t in tables:
        with conn.cursor() as cur:
            cur.execute("SELECT range_start, range_end FROM steep_repl.preallocate_range(%s, %s, %s)",
                        (t["table_schema"], t["table_name"], threshold))
            rows = cur.fetchall()
        if not conn.autocommit:
            conn.commit()
        for start, end in rows:
            out.append(dict(table="%s.%s" % (t["table_schema"], t["table_name"]), range_start=start, range_end=end))
    return out


def utilization(conn, node_id=None):
    """[{table, node_id, ranges, current_value, current_range, percent_used, next_range}] of managed tables."""
    out = []
    if node_id is None:
        node_id = local_node(conn)["node_id"]
    for t in db.fetch_all(conn, "SELECT table_schema, table_name, sequence_name FROM steep_repl.range_tables ORDER BY 1, 2"):
        ranges = db.fetch_all(conn, "SELECT range_start, range_end, status FROM steep_repl.identity_ranges WHERE "
                                    "table_schema = %s AND table_name = %s AND node_id = %s ORDER BY range_start",
                              (t["table_schema"], t["table_name"], node_id))
        u = usage(ranges, sequence_position(conn, t["sequence_name"]))
        u.update(table="%s.%s" % (t["table_schema"], t["table_name"]), node_id=node_id)
        out.append(u)
    return out
