# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Node initialisation: join a node to a live mesh by copy + versioned catch-up.

Protocol (docs/node-init.md has the reasoning):

1. prepare: check source/target/schemas, then create the target's slots on every
   other member FIRST (``steep_to_<target>``), and make sure the source has applied
   everything each peer committed before its slot existed (a WAL marker confirmed
   on the peer's slot for the source). From then on no change can fall between
   "in the copy" and "in a slot".
2. copy: each table is streamed with COPY together with its ``steep_repl.row_version``
   rows in ONE source snapshot (per table, ``parallel_workers`` tables at a time),
   into a target transaction with ``session_replication_role = replica``.
   Progress goes to ``steep_repl.init_progress`` (view ``steep_repl.init_status``).
3. finish: the mesh module creates the subscriptions on the existing slots; the
   slots replay everything since step 1, part of which the copy already holds:
   such a change carries a version the target already has (or an older one), so
   the conflict engine skips it. Nothing is lost, nothing is applied twice.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import contextlib
import os
import re
import threading
import time

from ansible_collections.steep.repl.plugins.module_utils import schemasync
from ansible_collections.steep.repl.plugins.module_utils.db import (
    SteepError, connect, fetch_all, fetch_one, fetch_value, quote_ident,
)

PROGRESS_EVERY_ROWS = 5000
COPY_CHUNK = 1 << 18  # bytes per read/write of the COPY stream (psycopg2 default 8 KiB: 40 % slower)
PROGRESS_EVERY_SECONDS = 1.0


def table_sizes(conn, tables):
    """[(schema, name, estimated_rows, bytes)] for ``schema.table`` names, biggest first."""
    rows = fetch_all(conn, """
        SELECT n.nspname AS schema, c.relname AS name,
               GREATEST(c.reltuples, 0)::bigint AS est_rows,
               pg_catalog.pg_total_relation_size(c.oid) AS bytes
          FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE (n.nspname || '.' || c.relname) = ANY (%s) AND c.relkind IN ('r', 'p')""",
                     (list(tables),))
    found = {"%s.%s" % (r["schema"], r["name"]) for r in rows}
    missing = sorted(set(tables) - found)
    if missing:
        raise SteepError("tables missing on the source: %s. Fix: create them there or remove them "
                         "from steep_replicated_tables." % ", ".join(missing))
    out = []
    for r in rows:
        est = r["est_rows"]
        if est <= 0:  # never analysed: count (cheap for the small tables this happens to)
            est = fetch_value(conn, "SELECT count(*) FROM %s.%s" % (quote_ident(r["schema"]), quote_ident(r["name"])))
        out.append((r["schema"], r["name"], est, r["bytes"]))
    return sorted(out, key=lambda r: -r[3])


def nonempty_tables(conn, tables):
    """The tables that hold at least one row."""
    out = []
    for t in tables:
        schema, name = t.split(".", 1)
        if fetch_value(conn, "SELECT EXISTS (SELECT 1 FROM %s.%s)" % (quote_ident(schema), quote_ident(name))):
            out.append(t)
    return out


class _LineCounter:
    """A file-like pipe end that counts COPY text rows (one per newline) as they pass."""

    def __init__(self, fh, on_progress):
        self.fh = fh
        self.rows = 0
        self.on_progress = on_progress
        self._last = time.monotonic()
        self._last_rows = 0

    def read(self, size=-1):
        data = self.fh.read(size)
        if data:
            self.rows += data.count(b"\n")
            now = time.monotonic()
            if self.rows - self._last_rows >= PROGRESS_EVERY_ROWS or now - self._last >= PROGRESS_EVERY_SECONDS:
                self._last, self._last_rows = now, self.rows
                self.on_progress(self.rows)
        return data

    def readline(self, size=-1):
        return self.read(size)


def _stream(src_cur, dst_cur, select, copy_in, on_progress=None):
    """COPY (select) TO STDOUT on the source piped into ``copy_in`` on the target; returns rows."""
    rfd, wfd = os.pipe()
    errors = []

    def produce():
        try:
            with os.fdopen(wfd, "wb") as w:
                src_cur.copy_expert("COPY (%s) TO STDOUT" % select, w, size=COPY_CHUNK)
        except Exception as exc:  # re-raised by the consumer
            errors.append(exc)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        with os.fdopen(rfd, "rb") as r:
            counter = _LineCounter(r, on_progress or (lambda rows: None))
            dst_cur.copy_expert(copy_in, counter, size=COPY_CHUNK)
    finally:
        producer.join()
    if errors:
        raise errors[0]
    return counter.rows


def _columns(conn, qual):
    cols = fetch_all(conn, """
        SELECT a.attname, a.attgenerated <> '' AS generated FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""", (qual,))
    return [c["attname"] for c in cols if not c["generated"]]


def has_row_version(conn):
    return bool(fetch_value(conn, "SELECT pg_catalog.to_regclass('steep_repl.row_version') IS NOT NULL"))


@contextlib.contextmanager
def _copy_transaction(source_kw, target_kw):
    """(source cursor, target cursor) of one copy: the target's work commits when the block ends
    (rolls back on any error, all or nothing); the source only reads; both connections close."""
    src = connect(source_kw, autocommit=False)
    try:
        dst = connect(target_kw, autocommit=False)
    except Exception:
        src.close()
        raise
    try:
        with src.cursor() as scur, dst.cursor() as dcur:
            dcur.execute("SET LOCAL session_replication_role = replica")
            yield scur, dcur
        src.rollback()
        dst.commit()
    except Exception:
        dst.rollback()
        raise
    finally:
        src.close()
        dst.close()     # also releases a replication origin set up in the session


def _versions_select(scur, tbl, vcols):
    """The source's versions of one table, without its settled tombstones (docs/conflicts.md, Tombstones):
    other nodes may have purged them already, and a copy that kept one would let it beat a re-insert made
    after the purge."""
    settled = fetch_value(scur.connection, "SELECT pg_catalog.to_regprocedure("
                                           "'steep_repl._settled(steep_repl.row_version)') IS NOT NULL")
    return scur.mogrify("SELECT %s FROM steep_repl.row_version v WHERE v.tbl = %%s%s" % (
        vcols, " AND NOT (v.deleted AND steep_repl._settled(v))" if settled else ""), (tbl,)).decode()


def _stage(scur, dcur, prefix, schema, name, on_progress=None, extra=None):
    """COPY the source's rows of one table and their versions into the target's temp tables
    ``pg_temp.<prefix>_rows`` / ``pg_temp.<prefix>_versions`` (dropped at commit). ``extra``:
    (column, type, source expression over the row alias steep_x) appended to the rows.
    Returns (rows copied, quoted table, column list, version column list)."""
    qual = "%s.%s" % (quote_ident(schema), quote_ident(name))
    dconn = dcur.connection
    cols = ", ".join(quote_ident(c) for c in _columns(dconn, qual))
    vcols = ", ".join(quote_ident(c) for c in _columns(dconn, "steep_repl.row_version"))
    xcol, xtype, xsel = extra or (None, None, None)
    dcur.execute("CREATE TEMP TABLE %s_rows ON COMMIT DROP AS SELECT %s%s FROM %s WITH NO DATA"
                 % (prefix, cols, ", NULL::%s AS %s" % (xtype, xcol) if extra else "", qual))
    dcur.execute("CREATE TEMP TABLE %s_versions ON COMMIT DROP AS SELECT %s FROM steep_repl.row_version WITH NO DATA"
                 % (prefix, vcols))
    rows = _stream(scur, dcur, "SELECT %s%s FROM %s steep_x" % (cols, ", " + xsel if extra else "", qual),
                   "COPY pg_temp.%s_rows (%s%s) FROM STDIN" % (prefix, cols, ", " + xcol if extra else ""), on_progress)
    _stream(scur, dcur, _versions_select(scur, "%s.%s" % (schema, name), vcols),
            "COPY pg_temp.%s_versions (%s) FROM STDIN" % (prefix, vcols))
    return rows, qual, cols, vcols


def copy_table(source_kw, target_kw, schema, name, on_progress=None, replace=False, origin=None):
    """Copy one table and its row versions from the source, in ONE source snapshot.

    On the target: ``session_replication_role = replica`` (no capture trigger, no FK
    trigger); with ``replace`` the table's rows are deleted first in the same transaction;
    with ``origin`` (a replication origin name) the whole write is marked with it, so that
    peers subscribed with origin = none ignore it (a reinit of a live node).
    Returns the number of rows copied. Runs in one target transaction: all or nothing.
    """
    qual = "%s.%s" % (quote_ident(schema), quote_ident(name))
    with _copy_transaction(source_kw, target_kw) as (scur, dcur):
        scur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        dst = dcur.connection
        if origin:
            ensure_origin(dst, origin)
            dcur.execute("SELECT pg_catalog.pg_replication_origin_session_setup(%s)", (origin,))
        if replace:
            dcur.execute("DELETE FROM %s" % qual)
        cols = ", ".join(quote_ident(c) for c in _columns(dst, qual))
        rows = _stream(scur, dcur, "SELECT %s FROM %s" % (cols, qual),
                       "COPY %s (%s) FROM STDIN" % (qual, cols), on_progress)
        if has_row_version(scur.connection) and has_row_version(dst):
            tbl = "%s.%s" % (schema, name)
            dcur.execute("DELETE FROM steep_repl.row_version WHERE tbl = %s", (tbl,))
            vcols = ", ".join(quote_ident(c) for c in _columns(dst, "steep_repl.row_version"))
            if not origin:  # a plain copy: row_version's REPLICA trigger would only return each row unchanged
                dcur.execute("SET LOCAL session_replication_role = origin")
            _stream(scur, dcur, _versions_select(scur, tbl, vcols),
                    "COPY steep_repl.row_version (%s) FROM STDIN" % vcols)
            dcur.execute("SET LOCAL session_replication_role = replica")
        if origin:
            dcur.execute("SELECT pg_catalog.pg_replication_origin_session_reset()")
    return rows


def reconcile_copy_table(source_kw, target_kw, schema, name, source_node, on_progress=None):
    """existing_data=reconcile: merge one table of a joining (not yet wired) target with the
    source's rows and versions, in ONE source snapshot and ONE target transaction
    (``steep_repl.reconcile_table`` decides). Returns (rows read from the source, counts)."""
    with _copy_transaction(source_kw, target_kw) as (scur, dcur):
        scur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        rows, qual, _cols, _vcols = _stage(
            scur, dcur, "steep_rec", schema, name, on_progress,
            extra=("steep_ts", "timestamptz", "CASE WHEN pg_catalog.current_setting('track_commit_timestamp')::boolean "
                                              "THEN pg_catalog.pg_xact_commit_timestamp(steep_x.xmin) END"))
        dcur.execute("SELECT steep_repl.reconcile_table(%s::regclass, %s)", (qual, source_node))
        counts = dcur.fetchone()[0]
    return rows, counts


def push_reconciled(target_kw, attempts=5):
    """Write the target's queued rows (steep_repl.reconcile_push) again as local writes, table by
    table; a deadlock with an apply worker (the local write is the victim) is retried."""
    import psycopg2
    conn = connect(target_kw)
    pushed = 0
    try:
        for tbl in [r["tbl"] for r in fetch_all(conn, "SELECT DISTINCT tbl FROM steep_repl.reconcile_push ORDER BY 1")]:
            for attempt in range(attempts):
                try:
                    pushed += fetch_value(conn, "SELECT steep_repl.reconcile_push_table(%s)", (tbl,))
                    break
                except (psycopg2.errors.DeadlockDetected, psycopg2.errors.SerializationFailure):
                    if attempt == attempts - 1:
                        raise
                    time.sleep(0.2)
    finally:
        conn.close()
    return pushed


def ensure_origin(conn, name):
    """Create replication origin ``name`` if missing (inside the caller's transaction)."""
    if not fetch_value(conn, "SELECT count(*) FROM pg_catalog.pg_replication_origin WHERE roname = %s", (name,)):
        with conn.cursor() as cur:
            cur.execute("SELECT pg_catalog.pg_replication_origin_create(%s)", (name,))


class ProgressTable:
    """Writes steep_repl.init_progress on the target (autocommit, its own connection)."""

    def __init__(self, target_kw, target_node, source_node):
        self.conn = connect(target_kw)
        self.target = target_node
        self.source = source_node
        self.lock = threading.Lock()

    def start(self, tables, keep_done=False):
        with self.lock, self.conn.cursor() as cur:
            cur.execute("DELETE FROM steep_repl.init_progress WHERE target_node = %s"
                        + (" AND status <> 'done'" if keep_done else ""), (self.target,))
            for schema, name, est_rows, size in tables:
                cur.execute("INSERT INTO steep_repl.init_progress (target_node, source_node, table_schema, "
                            "table_name, rows_total, bytes_total) VALUES (%s, %s, %s, %s, %s, %s)",
                            (self.target, self.source, schema, name, est_rows, size))

    def update(self, schema, name, **cols):
        sets = ", ".join("%s = %%s" % k for k in cols)
        with self.lock, self.conn.cursor() as cur:
            cur.execute("UPDATE steep_repl.init_progress SET %s WHERE target_node = %%s AND table_schema = %%s "
                        "AND table_name = %%s" % sets, list(cols.values()) + [self.target, schema, name])

    def status(self):
        with self.lock:
            rows = fetch_all(self.conn, "SELECT * FROM steep_repl.init_status WHERE target_node = %s",
                             (self.target,))
        return rows[0] if rows else None

    def close(self):
        self.conn.close()


def copy_tables(source_kw, target_kw, tables, target_node, source_node,
                parallel_workers=4, report=None, replace=False, keep_done=False, reconcile=False):
    """Copy ``tables`` ([(schema, name, est_rows, bytes)]) and their row versions.

    Returns {"tables": n, "rows": total, "seconds": s, "per_table": {...}}. ``report``
    is called with the init_status row about once a second.
    """
    if parallel_workers < 1:
        raise SteepError("parallel_workers must be at least 1 (got %s)" % parallel_workers)
    progress = ProgressTable(target_kw, target_node, source_node)
    started = time.monotonic()
    results = {}
    reconciled = {}
    failures = []
    queue = list(tables)
    qlock = threading.Lock()
    last_report = [0.0]

    def maybe_report():
        if report and time.monotonic() - last_report[0] >= 1.0:
            last_report[0] = time.monotonic()
            report(progress.status())

    def worker():
        while True:
            with qlock:
                if not queue or failures:
                    return
                schema, name, _est, _size = queue.pop(0)
            progress.update(schema, name, status="copying", started_at="now")
            try:
                def on_progress(rows, schema=schema, name=name):
                    progress.update(schema, name, rows_copied=rows)
                    maybe_report()
                if reconcile:
                    rows, reconciled["%s.%s" % (schema, name)] = reconcile_copy_table(
                        source_kw, target_kw, schema, name, source_node, on_progress)
                else:
                    rows = copy_table(source_kw, target_kw, schema, name, on_progress, replace=replace)
                progress.update(schema, name, status="done", rows_copied=rows, rows_total=rows, finished_at="now")
                results["%s.%s" % (schema, name)] = rows
            except Exception as exc:
                failures.append("%s.%s: %s" % (schema, name, str(exc).strip()))
                try:
                    progress.update(schema, name, status="failed", error_message=str(exc)[:1000])
                except Exception:  # the target itself may be gone
                    pass

    try:
        progress.start(tables, keep_done)
        threads = [threading.Thread(target=worker, daemon=True) for _worker in range(min(parallel_workers, max(len(tables), 1)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise SteepError("copy failed: %s" % "; ".join(failures))
        status = progress.status()
    finally:
        progress.close()
    out = {"tables": len(results), "rows": sum(results.values()), "per_table": results,
           "seconds": round(time.monotonic() - started, 3), "status": status}
    if reconcile:
        out["reconciled"] = reconciled
    return out


# --------------------------------------------------------------------------- the protocol
def set_state_everywhere(members, node_id, state, reason=None):
    """Record ``node_id``'s init state on every reachable member.

    Returns the members that could not be reached (site.yml brings them up to date)."""
    unreachable = []
    for m in members:
        own = m.conn is None
        try:
            conn = connect(m.conn_kw()) if own else m.conn
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT steep_repl.set_init_state(%s, %s, %s)", (node_id, state, reason))
            finally:
                if own:
                    conn.close()
        except Exception as exc:  # a peer down must not hide the state on the others
            unreachable.append("%s: %s" % (m.node_id, str(exc).strip().splitlines()[0]))
    return unreachable


def init_state(conn, node_id):
    return fetch_value(conn, "SELECT init_state FROM steep_repl.nodes WHERE node_id = %s", (node_id,))


def emit_and_wait_flushed(publisher_conn, publisher_id, slot, timeout=120):
    """Write a WAL marker on the publisher and wait until ``slot`` confirmed it: everything
    the publisher committed before is applied by that slot's subscriber. Waits as long as the slot
    moves; ``timeout`` seconds without progress raise."""
    from ansible_collections.steep.repl.plugins.module_utils.replication import wait_slot_confirmed
    lsn = fetch_value(publisher_conn, "SELECT pg_catalog.pg_logical_emit_message(false, 'steep_repl', 'sync')::text")

    def error(at):
        if at is None:
            return SteepError("slot %s does not exist on %s, so the source does not replicate from it. Fix: run "
                              "playbooks/site.yml on the existing mesh first." % (slot, publisher_id))
        return SteepError("%s: slot %s did not confirm %s: it has not moved for %ss (confirmed up to %s; replication "
                          "to the source lags or is broken). Fix: check pg_stat_subscription on the source, then "
                          "re-run." % (publisher_id, slot, lsn, timeout, at))

    if fetch_value(publisher_conn, "SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
                   (slot,)) == 0:
        raise error(None)
    wait_slot_confirmed(publisher_conn, slot, lsn, timeout, error)
    return lsn


def create_slot(conn, name, recreate=False):
    """Create logical slot ``name`` (pgoutput); returns (created, lsn)."""
    exists = fetch_value(conn, "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots "
                               "WHERE slot_name = %s", (name,))
    if exists and not recreate:
        return False, exists
    if exists:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_catalog.pg_drop_replication_slot(%s)", (name,))
    lsn = fetch_value(conn, "SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    return True, lsn


# --------------------------------------------------------------------------- steps
RESUMABLE = ("PREPARING", "COPYING", "FAILED", "REINITIALIZING")


def _members(specs, target, source, verb="initialise"):
    from ansible_collections.steep.repl.plugins.module_utils.replication import build_members
    members = build_members(specs)
    by_id = {m.node_id: m for m in members}
    for role, node in (("target", target), ("source", source)):
        if node not in by_id:
            raise SteepError("%s node %r is not in the mesh inventory (nodes: %s). Fix: add it to steep_nodes "
                             "and pass its steep_node_id." % (role, node, ", ".join(sorted(by_id))))
    if target == source:
        raise SteepError("target and source are both %r. Fix: %s a node FROM another node." % (target, verb))
    return members, by_id


def _fingerprints(conn, tables):
    with conn.cursor() as cur:
        cur.execute("SELECT steep_repl.capture_fingerprints(%s)", (list(tables),))
    return fetch_all(conn, "SELECT table_schema, table_name, fingerprint, column_count "
                           "FROM steep_repl.schema_fingerprints WHERE table_schema || '.' || table_name = ANY (%s)",
                     (list(tables),))


def _store_peer_fingerprints(conn, node_id, rows):
    with conn.cursor() as cur:
        cur.execute("DELETE FROM steep_repl.peer_fingerprints WHERE node_id = %s", (node_id,))
        for r in rows:
            cur.execute("INSERT INTO steep_repl.peer_fingerprints (node_id, table_schema, table_name, fingerprint, "
                        "column_count) VALUES (%s, %s, %s, %s, %s)",
                        (node_id, r["table_schema"], r["table_name"], r["fingerprint"], r["column_count"]))


def compare(source, target, tables):
    """Schema differences of the replicated tables: [{table, status, difference}] (not 'match')."""
    src_fp = _fingerprints(source.conn, tables)
    tgt_fp = _fingerprints(target.conn, tables)
    _store_peer_fingerprints(source.conn, target.node_id, tgt_fp)
    _store_peer_fingerprints(target.conn, source.node_id, src_fp)
    rows = fetch_all(source.conn, "SELECT * FROM steep_repl.compare_schemas(%s, %s)", (source.node_id, target.node_id))
    return [r for r in rows if r["table_name"] in tables and r["status"] != "match"]


def prepare(specs, target, source, tables=None, schemas=None, excluded=None, schema_sync="strict",
            method="snapshot", check_mode=False, existing_data="fail"):
    """Step 1 (see module docstring). Returns a result dict; raises SteepError (state FAILED)."""
    from ansible_collections.steep.repl.plugins.module_utils.replication import (
        PUBLICATION, Mesh, candidate_catalog, candidate_schemas, resolve_tables, slot_name, subscription_name,
        versions_publication)
    members, by_id = _members(specs, target, source)
    src, tgt = by_id[source], by_id[target]
    others = [m for m in members if m.node_id not in (source, target)]
    warnings = []
    with Mesh(members, check_mode=check_mode) as mesh:
        states = mesh.observe()
        missing = [m.node_id for m in others if subscription_name(m.node_id) not in states[source]["subscriptions"]]
        if missing:
            raise SteepError("source %s is not in the mesh: it has no subscription from %s. Fix: choose a "
                             "SYNCHRONIZED node as steep_init_source, or run playbooks/site.yml on the existing "
                             "mesh first." % (source, ", ".join(missing)))
        # the target's slots are created now: a versions publication created later (by the migration of a
        # mesh wired by an earlier build) would be newer than the WAL they decode (replication.md)
        vpub = versions_publication(PUBLICATION)
        unmigrated = sorted(m.node_id for m in [src] + others if not states[m.node_id]["ver_publication"] or any(
            vpub not in sub["publications"] for name, sub in states[m.node_id]["subscriptions"].items()
            if name != subscription_name(target)))
        if unmigrated:
            raise SteepError("the mesh is wired by an earlier steep.repl build on %s (no publication %s, or "
                             "subscriptions that do not read it). Nothing was changed. Fix: run playbooks/site.yml "
                             "(or steep_replication.yml) once to migrate the mesh, then run init_node.yml again."
                             % (", ".join(unmigrated), vpub))
        src_state = init_state(src.conn, source)
        if src_state not in ("SYNCHRONIZED", "UNINITIALIZED"):
            raise SteepError("source %s is %s, not SYNCHRONIZED. Fix: choose a SYNCHRONIZED node as "
                             "steep_init_source." % (source, src_state))
        tgt_state = init_state(tgt.conn, target)
        if tgt_state is None:
            raise SteepError("target %s is not registered on itself. Fix: run playbooks/steep_foundation.yml "
                             "(init_node.yml does) first." % target)
        if tgt_state == "SYNCHRONIZED" and states[target]["subscriptions"]:
            return {"changed": False, "state": tgt_state, "tables": [], "warnings": warnings,
                    "msg": "%s is already initialised and in the mesh" % target}
        desired = resolve_tables({source: candidate_catalog(src.conn, candidate_schemas(tables, schemas))},
                                 tables, schemas, excluded)
        sync = schemasync.sync(src.conn, tgt.conn, desired, schema_sync, check_mode, target_id=target, source_id=source)
        warnings.extend(sync["warnings"])
        if sync["failed"]:
            if not check_mode:
                set_state_everywhere(members, target, "FAILED", sync["failed"])
            raise SteepError(sync["failed"])
        if not check_mode:
            compare(src, tgt, desired)  # fingerprints of both nodes as they are now (peer_fingerprints, compare_schemas)
        absent = [t for t in desired if fetch_value(tgt.conn, "SELECT pg_catalog.to_regclass(%s) IS NULL", (t,))]
        nonempty = nonempty_tables(tgt.conn, [t for t in desired if t not in absent])
        progress = fetch_all(tgt.conn, "SELECT table_schema || '.' || table_name AS t, status FROM "
                                       "steep_repl.init_progress WHERE target_node = %s", (target,))
        resumable = tgt_state in RESUMABLE and progress
        if method == "snapshot" and nonempty and not resumable and existing_data != "reconcile":
            reason = ("target %s is not empty (%s hold rows): a snapshot init copies into empty tables. Fix: empty "
                      "them (TRUNCATE), merge them with -e steep_init_existing_data=reconcile, or use the manual "
                      "method for a restored backup." % (target, ", ".join(nonempty)))
            if not check_mode:
                set_state_everywhere(members, target, "FAILED", reason)
            raise SteepError(reason)
        slots = [(m, slot_name(target)) for m in [src] + others]
        queries = ["/* %s */ SELECT pg_catalog.pg_create_logical_replication_slot('%s', 'pgoutput')" % (m.node_id, s)
                   for m, s in slots if s not in states[m.node_id]["slots"]]
        if check_mode:
            return {"changed": True, "state": tgt_state, "tables": desired, "queries": queries, "warnings": warnings}
        set_state_everywhere(members, target, "PREPARING")
        created_any = False
        lsns = {}
        for m, s in slots:
            created, lsn = create_slot(m.conn, s)
            created_any = created_any or created
            lsns[m.node_id] = lsn
        for p in others:
            emit_and_wait_flushed(p.conn, p.node_id, slot_name(source))
        if created_any or not resumable:
            with tgt.conn.cursor() as cur:  # a new slot invalidates any earlier partial copy
                cur.execute("DELETE FROM steep_repl.init_progress WHERE target_node = %s", (target,))
        set_state_everywhere(members, target, "COPYING" if method == "snapshot" else "PREPARING")
        return {"changed": True, "state": "COPYING" if method == "snapshot" else "PREPARING", "tables": desired,
                "queries": queries, "warnings": warnings, "slot_lsns": lsns, "source_slot_lsn": lsns[source]}


def copy(specs, target, source, tables, parallel_workers=4, report=None, existing_data="fail"):
    """Step 2: copy the tables not yet done (resumable)."""
    members, by_id = _members(specs, target, source)
    src, tgt = by_id[source], by_id[target]
    tconn = connect(tgt.conn_kw())
    sconn = connect(src.conn_kw())
    try:
        state = init_state(tconn, target)
        if state not in ("COPYING", "REINITIALIZING"):
            raise SteepError("target %s is %s, not COPYING. Fix: run the prepare step first (playbooks/init_node.yml "
                             "does)." % (target, state))
        done = {r["t"] for r in fetch_all(tconn, "SELECT table_schema || '.' || table_name AS t FROM "
                                                 "steep_repl.init_progress WHERE target_node = %s AND status = 'done'",
                                          (target,))}
        todo = [t for t in table_sizes(sconn, tables) if "%s.%s" % (t[0], t[1]) not in done]
    finally:
        tconn.close()
        sconn.close()
    try:
        result = copy_tables(src.conn_kw(), tgt.conn_kw(), todo, target, source, parallel_workers, report,
                             replace=True, keep_done=True, reconcile=existing_data == "reconcile")
    except Exception as exc:
        reason = "copy from %s failed: %s. Fix the cause and run playbooks/init_node.yml again (it resumes)." % (
            source, str(exc).strip())
        set_state_everywhere(members, target, "FAILED", reason)
        raise SteepError(reason)
    result["skipped_done"] = sorted(done)
    result["changed"] = bool(todo)
    return result


def finish(specs, target, source, tables=None, schemas=None, excluded=None, timeout=600):
    """Step 3: subscriptions on the prepared slots, catch-up, SYNCHRONIZED everywhere."""
    from ansible_collections.steep.repl.plugins.module_utils.replication import ensure_mesh, slot_name
    members, by_id = _members(specs, target, source)
    tconn = connect(by_id[target].conn_kw())
    try:
        state = init_state(tconn, target)
    finally:
        tconn.close()
    if state == "SYNCHRONIZED":
        return {"changed": False, "state": state}
    if state not in ("COPYING", "CATCHING_UP", "PREPARING", "REINITIALIZING"):
        raise SteepError("target %s is %s; finish needs a prepared and copied node. Fix: run "
                         "playbooks/init_node.yml from the start." % (target, state))
    set_state_everywhere(members, target, "CATCHING_UP")
    mesh = ensure_mesh(specs, tables, schemas, excluded)
    for m in members:
        if m.node_id == target:
            continue
        conn = connect(m.conn_kw())
        try:
            emit_and_wait_flushed(conn, m.node_id, slot_name(target), timeout)
        finally:
            conn.close()
    pushed = 0
    tconn = connect(by_id[target].conn_kw())
    try:
        if fetch_value(tconn, "SELECT pg_catalog.to_regclass('steep_repl.reconcile_push') IS NOT NULL "
                              "AND EXISTS (SELECT 1 FROM steep_repl.reconcile_push)"):
            # existing_data=reconcile: the target's own rows reach every node now
            try:
                pushed = push_reconciled(by_id[target].conn_kw())
                for m in members:
                    if m.node_id != target:
                        emit_and_wait_flushed(tconn, target, slot_name(m.node_id), timeout)
            except Exception as exc:
                reason = ("%s joined, but writing its reconciled rows to the mesh failed: %s. Fix the cause and run "
                          "playbooks/init_node.yml again (it resumes here)." % (target, str(exc).strip()))
                set_state_everywhere(members, target, "FAILED", reason)
                raise SteepError(reason)
    finally:
        tconn.close()
    set_state_everywhere(members, target, "SYNCHRONIZED")
    return {"changed": True, "state": "SYNCHRONIZED", "queries": mesh["queries"], "tables": mesh["tables"],
            "reconciled_rows_pushed": pushed}


LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


def advance_source_slot(specs, target, source, source_lsn):
    """Manual init: the backup contains everything up to ``source_lsn``; skip it in the slot.

    Refused, nothing changed: not an LSN; ahead of the source's WAL (the slot would skip changes
    the backup cannot hold); before the slot's start while the target is still PREPARING (the
    backup predates the prepare step: what was committed in between is in neither)."""
    from ansible_collections.steep.repl.plugins.module_utils.replication import slot_name
    if not LSN_RE.match(str(source_lsn or "")):
        raise SteepError("source_lsn %r is not an LSN (like 0/1A2B3C4D). Fix: pass the LSN read on %s with "
                         "SELECT pg_current_wal_lsn() just before the backup started." % (source_lsn, source))
    _members_list, by_id = _members(specs, target, source)
    slot = slot_name(target)
    conn = connect(by_id[source].conn_kw())
    try:
        row = fetch_one(conn, "SELECT confirmed_flush_lsn::text AS slot_lsn, pg_catalog.pg_current_wal_lsn()::text AS wal, "
                              "%s::pg_lsn > pg_catalog.pg_current_wal_lsn() AS ahead, %s::pg_lsn < confirmed_flush_lsn AS before, "
                              "confirmed_flush_lsn < %s::pg_lsn AS behind FROM pg_catalog.pg_replication_slots "
                              "WHERE slot_name = %s", (source_lsn, source_lsn, source_lsn, slot))
        if not row:
            raise SteepError("no slot %s on %s: run the prepare step first (playbooks/init_manual_prepare.yml)." % (slot, source))
        if row["ahead"]:
            raise SteepError("source_lsn %s is ahead of %s's WAL (now at %s): no backup can be consistent there, and the "
                             "slot would skip changes the backup does not hold. Fix: pass the LSN read on %s with "
                             "SELECT pg_current_wal_lsn() just before the backup started." % (source_lsn, source, row["wal"], source))
        if row["before"] and init_state(conn, target) == "PREPARING":
            raise SteepError("source_lsn %s is before the start of slot %s on %s (%s): the backup was taken before the "
                             "prepare step, so what was committed in between is in neither. Fix: take a new backup after "
                             "init_manual_prepare.yml (LSN at or after %s), restore it on %s and run this again."
                             % (source_lsn, slot, source, row["slot_lsn"], row["slot_lsn"], target))
        if row["behind"]:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_catalog.pg_replication_slot_advance(%s, %s::pg_lsn)", (slot, source_lsn))
            return True
        return False
    finally:
        conn.close()


def status(conn, target=None):
    rows = fetch_all(conn, "SELECT * FROM steep_repl.init_status" + (" WHERE target_node = %s" if target else ""),
                     (target,) if target else None)
    return rows


# --------------------------------------------------------------------------- reinit (seed 6.4)
REINIT_ORIGIN = "steep_reinit"
REINIT_FROM = ("SYNCHRONIZED", "UNINITIALIZED", "DIVERGED", "FAILED", "REINITIALIZING")


def reinit_selection(desired, reinit_tables=None, reinit_schema=None, full=False):
    """The replicated tables a reinit replaces: exactly one of tables / schema / full."""
    from ansible_collections.steep.repl.plugins.module_utils.replication import normalize_table
    given = [bool(reinit_tables), bool(reinit_schema), bool(full)]
    if sum(given) != 1:
        raise SteepError("choose exactly one of steep_reinit_tables (a list), steep_reinit_schema or "
                         "steep_reinit_full=true (got %s). Fix: pass one of them."
                         % (", ".join(n for n, g in zip(("tables", "schema", "full"), given) if g) or "none"))
    if full:
        if not desired:
            raise SteepError("no table is replicated, nothing to reinitialise. Fix: set steep_replicated_tables.")
        return list(desired)
    if reinit_schema:
        chosen = [t for t in desired if t.split(".", 1)[0] == reinit_schema]
        if not chosen:
            raise SteepError("schema %s holds no replicated table (replicated: %s). Fix: name a schema of "
                             "steep_replicated_tables / steep_replicated_schemas." % (reinit_schema, ", ".join(desired)))
        return chosen
    chosen = sorted(set(normalize_table(t, "steep_reinit_tables") for t in reinit_tables))
    unknown = [t for t in chosen if t not in desired]
    if unknown:
        raise SteepError("%s %s not replicated (replicated: %s). Fix: reinitialise replicated tables only, or add "
                         "them to steep_replicated_tables and run playbooks/site.yml first."
                         % (", ".join(unknown), "is" if len(unknown) == 1 else "are", ", ".join(desired)))
    return chosen


def _subscription_workers(conn):
    return fetch_value(conn, r"SELECT count(*) FROM pg_catalog.pg_stat_subscription WHERE subname LIKE 'steep\_from\_%%' "
                             "AND pid IS NOT NULL")


def pause_subscriptions(conn, names, timeout=60):
    """Disable the target's incoming subscriptions and wait until their apply workers are gone."""
    with conn.cursor() as cur:
        for n in names:
            cur.execute("ALTER SUBSCRIPTION %s DISABLE" % quote_ident(n))
    deadline = time.monotonic() + timeout
    while _subscription_workers(conn):
        if time.monotonic() > deadline:
            raise SteepError("the apply workers of the target did not stop within %ss after ALTER SUBSCRIPTION "
                             "DISABLE. Fix: check pg_stat_subscription on the target, then re-run." % timeout)
        time.sleep(0.1)


def resume_subscriptions(conn, names):
    with conn.cursor() as cur:
        for n in names:
            cur.execute("ALTER SUBSCRIPTION %s ENABLE" % quote_ident(n))


def reinit_table(source_kw, target_kw, schema, name, marker, on_progress=None, lock_timeout=120):
    """Replace one table's rows and versions on a live target with the source's, in ONE source
    snapshot and ONE target transaction (all or nothing).

    On the target: the table is locked EXCLUSIVE (its local writers wait, readers go on), then
    ``marker()`` makes sure the source has applied every earlier write of the target, then the
    source's rows and versions are staged in temp tables and swapped in by
    ``steep_repl._reinit_swap`` under the replication origin ``steep_reinit`` (peers subscribed with
    origin = none never receive the rewrite). Returns the number of rows copied.
    """
    with _copy_transaction(source_kw, target_kw) as (scur, dcur):
        qual = "%s.%s" % (quote_ident(schema), quote_ident(name))
        dcur.execute("SET LOCAL lock_timeout = %s", ("%ds" % lock_timeout,))
        dcur.execute("LOCK TABLE %s IN EXCLUSIVE MODE" % qual)
        dcur.execute("SET LOCAL lock_timeout = 0")
        marker()
        scur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")     # snapshot after the marker
        rows, qual, cols, vcols = _stage(scur, dcur, "steep_reinit", schema, name, on_progress)
        dcur.execute("CREATE TEMP TABLE steep_reinit_go (tbl text, qual text, cols text, vcols text) ON COMMIT DROP")
        dcur.execute("CREATE TRIGGER steep_reinit_go AFTER INSERT ON pg_temp.steep_reinit_go FOR EACH ROW "
                     "EXECUTE FUNCTION steep_repl._reinit_swap()")
        dcur.execute("ALTER TABLE pg_temp.steep_reinit_go ENABLE ALWAYS TRIGGER steep_reinit_go")
        dcur.execute("SELECT pg_catalog.pg_replication_origin_session_setup(%s)", (REINIT_ORIGIN,))
        dcur.execute("INSERT INTO pg_temp.steep_reinit_go VALUES (%s, %s, %s, %s)",
                     ("%s.%s" % (schema, name), qual, cols, vcols))
    return rows


def reinit(specs, target, source, tables=None, schemas=None, excluded=None, reinit_tables=None,
           reinit_schema=None, full=False, check_mode=False, timeout=600):
    """Reinitialise chosen tables of a live member from another member (docs/node-init.md).

    Returns a result dict; bad input raises SteepError before anything is written; a failure
    during the copy leaves the target FAILED with the reason (a re-run recovers)."""
    from ansible_collections.steep.repl.plugins.module_utils.replication import (
        Mesh, candidate_catalog, candidate_schemas, resolve_tables, slot_name, subscription_name)
    members, by_id = _members(specs, target, source, verb="reinitialise")
    src, tgt = by_id[source], by_id[target]
    others = [m for m in members if m.node_id not in (source, target)]
    with Mesh(members, check_mode=check_mode) as mesh:
        states = mesh.observe()
        for role, node in (("target", target), ("source", source)):
            missing = [m.node_id for m in members
                       if m.node_id != node and subscription_name(m.node_id) not in states[node]["subscriptions"]]
            if missing:
                raise SteepError("%s %s is not in the mesh (no subscription from %s), so it cannot be %s. Fix: %s"
                                 % (role, node, ", ".join(missing),
                                    "reinitialised" if role == "target" else "a reinit source",
                                    "add it with playbooks/init_node.yml." if role == "target" else
                                    "choose a SYNCHRONIZED member as steep_reinit_source."))
        src_state = init_state(src.conn, source)
        if src_state not in ("SYNCHRONIZED", "UNINITIALIZED"):
            raise SteepError("source %s is %s, not SYNCHRONIZED: its data is not a trustworthy copy. Fix: choose a "
                             "SYNCHRONIZED member as steep_reinit_source." % (source, src_state))
        tgt_state = init_state(tgt.conn, target)
        if tgt_state not in REINIT_FROM:
            raise SteepError("target %s is %s (an initialisation is running or unfinished). Fix: finish it with "
                             "playbooks/init_node.yml first." % (target, tgt_state))
        desired = resolve_tables({source: candidate_catalog(src.conn, candidate_schemas(tables, schemas))},
                                 tables, schemas, excluded)
        chosen = reinit_selection(desired, reinit_tables, reinit_schema, full)
        diffs = compare(src, tgt, chosen)
        if diffs:
            raise SteepError("schema of %s differs from %s: %s. Nothing was changed. Fix: make the tables identical "
                             "(same columns, types, defaults, nullability), then re-run."
                             % (target, source, "; ".join("%s: %s" % (d["table_name"], d["difference"]) for d in diffs)))
        subs = sorted(subscription_name(m.node_id) for m in members if m.node_id != target)
        queries = ["/* %s */ ALTER SUBSCRIPTION %s DISABLE" % (target, s) for s in subs]
        queries += ["/* %s */ LOCK TABLE %s IN EXCLUSIVE MODE; -- replaced by the rows and versions of %s"
                    % (target, t, source) for t in chosen]
        queries += ["/* %s */ ALTER SUBSCRIPTION %s ENABLE" % (target, s) for s in subs]
        result = {"changed": True, "state": tgt_state, "tables": chosen, "queries": queries}
        if check_mode:
            return result
        sizes = table_sizes(src.conn, chosen)
        set_state_everywhere(members, target, "REINITIALIZING",
                             "reinit of %s from %s" % (", ".join(chosen), source))
        ensure_origin(tgt.conn, REINIT_ORIGIN)
        progress = ProgressTable(tgt.conn_kw(), target, source)
        copied, failure, resume_error = {}, None, None
        try:
            progress.start(sizes)
            pause_subscriptions(tgt.conn, subs)
            for p in others:  # the source holds everything the target received from p
                emit_and_wait_flushed(p.conn, p.node_id, slot_name(source), timeout)
            for schema, name, _est, _size in sizes:
                t = "%s.%s" % (schema, name)
                progress.update(schema, name, status="copying", started_at="now")

                def on_progress(rows, schema=schema, name=name):
                    progress.update(schema, name, rows_copied=rows)

                try:
                    copied[t] = reinit_table(src.conn_kw(), tgt.conn_kw(), schema, name,
                                             lambda: emit_and_wait_flushed(tgt.conn, target, slot_name(source), timeout),
                                             on_progress)
                except Exception as exc:
                    try:
                        progress.update(schema, name, status="failed", error_message=str(exc)[:1000])
                    except Exception:  # the target itself may be gone
                        pass
                    raise
                progress.update(schema, name, status="done", rows_copied=copied[t], rows_total=copied[t],
                                finished_at="now")
        except Exception as exc:
            failure = exc
        finally:
            try:
                resume_subscriptions(tgt.conn, subs)
            except Exception as exc:  # the target itself is gone
                resume_error = exc
            try:
                status_row = progress.status()
                progress.close()
            except Exception:
                status_row = None
        if failure is not None or resume_error is not None:
            reason = "reinit of %s from %s failed: %s%s Fix the cause and run playbooks/reinit_node.yml again." % (
                ", ".join(chosen), source, str(failure or resume_error).strip().rstrip("."),
                ". The subscriptions of %s stay disabled until then (or playbooks/site.yml re-enables them)." % target
                if resume_error is not None else ".")
            set_state_everywhere(members, target, "FAILED", reason)
            raise SteepError(reason)
        set_state_everywhere(members, target, "CATCHING_UP")
        try:
            for p in others + [src]:
                emit_and_wait_flushed(p.conn, p.node_id, slot_name(target), timeout)
        except Exception as exc:
            reason = ("reinit of %s from %s: the copy is done but %s did not catch up: %s Fix the cause and run "
                      "playbooks/reinit_node.yml again." % (", ".join(chosen), source, target, str(exc).strip()))
            set_state_everywhere(members, target, "FAILED", reason)
            raise SteepError(reason)
        set_state_everywhere(members, target, "SYNCHRONIZED")
        try:  # tidy: the sessions that used the origin are closed
            with tgt.conn.cursor() as cur:
                cur.execute("SELECT pg_catalog.pg_replication_origin_drop(%s)", (REINIT_ORIGIN,))
        except Exception:
            pass
        result.update(state="SYNCHRONIZED", rows=sum(copied.values()), per_table=copied, progress=status_row)
        return result
