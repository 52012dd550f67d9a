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

import os
import threading
import time

from ansible_collections.steep.repl.plugins.module_utils.db import (
    SteepError, connect, fetch_all, fetch_value, quote_ident,
)

PROGRESS_EVERY_ROWS = 5000
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
                src_cur.copy_expert("COPY (%s) TO STDOUT" % select, w)
        except Exception as exc:  # re-raised by the consumer
            errors.append(exc)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        with os.fdopen(rfd, "rb") as r:
            counter = _LineCounter(r, on_progress or (lambda rows: None))
            dst_cur.copy_expert(copy_in, counter)
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


def copy_table(source_kw, target_kw, schema, name, on_progress=None, replace=False, origin=None):
    """Copy one table and its row versions from the source, in ONE source snapshot.

    On the target: ``session_replication_role = replica`` (no capture trigger, no FK
    trigger); with ``replace`` the table's rows are deleted first in the same transaction;
    with ``origin`` (a replication origin name) the whole write is marked with it, so that
    peers subscribed with origin = none ignore it (a reinit of a live node).
    Returns the number of rows copied. Runs in one target transaction: all or nothing.
    """
    qual = "%s.%s" % (quote_ident(schema), quote_ident(name))
    src = connect(source_kw, autocommit=False)
    dst = connect(target_kw, autocommit=False)
    try:
        with src.cursor() as scur, dst.cursor() as dcur:
            scur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            dcur.execute("SET LOCAL session_replication_role = replica")
            if origin:
                ensure_origin(dst, origin)
                dcur.execute("SELECT pg_catalog.pg_replication_origin_session_setup(%s)", (origin,))
            if replace:
                dcur.execute("DELETE FROM %s" % qual)
            cols = ", ".join(quote_ident(c) for c in _columns(dst, qual))
            rows = _stream(scur, dcur, "SELECT %s FROM %s" % (cols, qual),
                           "COPY %s (%s) FROM STDIN" % (qual, cols), on_progress)
            if has_row_version(src) and has_row_version(dst):
                tbl = "%s.%s" % (schema, name)
                dcur.execute("DELETE FROM steep_repl.row_version WHERE tbl = %s", (tbl,))
                vcols = ", ".join(quote_ident(c) for c in _columns(dst, "steep_repl.row_version"))
                _stream(scur, dcur, scur.mogrify("SELECT %s FROM steep_repl.row_version WHERE tbl = %%s" % vcols,
                                                 (tbl,)).decode(),
                        "COPY steep_repl.row_version (%s) FROM STDIN" % vcols)
            if origin:
                dcur.execute("SELECT pg_catalog.pg_replication_origin_session_reset()")
        dst.commit()
        return rows
    except Exception:
        dst.rollback()
        raise
    finally:
        src.close()
        dst.close()


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
                parallel_workers=4, report=None, replace=False, keep_done=False):
    """Copy ``tables`` ([(schema, name, est_rows, bytes)]) and their row versions.

    Returns {"tables": n, "rows": total, "seconds": s, "per_table": {...}}. ``report``
    is called with the init_status row about once a second.
    """
    if parallel_workers < 1:
        raise SteepError("parallel_workers must be at least 1 (got %s)" % parallel_workers)
    progress = ProgressTable(target_kw, target_node, source_node)
    started = time.monotonic()
    results = {}
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
    return {"tables": len(results), "rows": sum(results.values()), "per_table": results,
            "seconds": round(time.monotonic() - started, 3), "status": status}


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
    the publisher committed before is applied by that slot's subscriber."""
    lsn = fetch_value(publisher_conn, "SELECT pg_catalog.pg_logical_emit_message(false, 'steep_repl', 'sync')::text")
    deadline = time.monotonic() + timeout
    while True:
        ok = fetch_value(publisher_conn, "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_catalog.pg_replication_slots "
                                         "WHERE slot_name = %s", (lsn, slot))
        if ok:
            return lsn
        if ok is None:
            raise SteepError("slot %s does not exist on %s, so the source does not replicate from it. Fix: run "
                             "playbooks/site.yml on the existing mesh first." % (slot, publisher_id))
        if time.monotonic() > deadline:
            raise SteepError("%s: slot %s did not confirm %s within %ss (replication to the source lags or is "
                             "broken). Fix: check pg_stat_subscription on the source, then re-run."
                             % (publisher_id, slot, lsn, timeout))
        time.sleep(0.2)


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


def _members(specs, target, source):
    from ansible_collections.steep.repl.plugins.module_utils.replication import build_members
    members = build_members(specs)
    by_id = {m.node_id: m for m in members}
    for role, node in (("target", target), ("source", source)):
        if node not in by_id:
            raise SteepError("%s node %r is not in the mesh inventory (nodes: %s). Fix: add it to steep_nodes "
                             "and pass its steep_node_id." % (role, node, ", ".join(sorted(by_id))))
    if target == source:
        raise SteepError("target and source are both %r. Fix: initialise a new node FROM another node." % target)
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
            method="snapshot", check_mode=False):
    """Step 1 (see module docstring). Returns a result dict; raises SteepError (state FAILED)."""
    from ansible_collections.steep.repl.plugins.module_utils.replication import (
        Mesh, candidate_catalog, candidate_schemas, resolve_tables, slot_name, subscription_name)
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
        diffs = compare(src, tgt, desired)
        if diffs:
            text = "; ".join("%s: %s" % (d["table_name"], d["difference"]) for d in diffs)
            if schema_sync == "manual":
                warnings.append("schemas differ (schema_sync=manual, continuing): " + text)
            else:
                reason = ("schema of %s differs from %s: %s. Fix: make the target's tables identical "
                          "(same columns, types, defaults, nullability)%s, then re-run."
                          % (target, source, text,
                             "" if schema_sync == "strict" else
                             " — schema_sync=auto creates missing tables but does not alter existing ones"))
                creatable = [d["table_name"] for d in diffs if d["status"] == "missing_on_target"]
                if schema_sync == "auto" and len(creatable) == len(diffs):
                    if not check_mode:
                        create_missing_tables(src, tgt, creatable)
                    warnings.append("schema_sync=auto created on %s: %s" % (target, ", ".join(creatable)))
                else:
                    if not check_mode:
                        set_state_everywhere(members, target, "FAILED", reason)
                    raise SteepError(reason)
        nonempty = [] if check_mode and tgt_state == "UNINITIALIZED" and diffs else nonempty_tables(tgt.conn, [
            t for t in desired if t not in [d["table_name"] for d in diffs if d["status"] == "missing_on_target"]])
        progress = fetch_all(tgt.conn, "SELECT table_schema || '.' || table_name AS t, status FROM "
                                       "steep_repl.init_progress WHERE target_node = %s", (target,))
        resumable = tgt_state in RESUMABLE and progress
        if method == "snapshot" and nonempty and not resumable:
            reason = ("target %s is not empty (%s hold rows): a snapshot init copies into empty tables. Fix: empty "
                      "them (TRUNCATE) or use the manual method for a restored backup." % (target, ", ".join(nonempty)))
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


def create_missing_tables(src, tgt, tables):
    """schema_sync=auto: create tables missing on the target from the source's definition."""
    import subprocess
    bindir = fetch_value(src.conn, "SELECT setting FROM pg_catalog.pg_config() WHERE name = 'BINDIR'")
    pg_dump = os.path.join(bindir or "", "pg_dump")
    if not os.access(pg_dump, os.X_OK):
        raise SteepError("schema_sync=auto needs pg_dump next to the source server (%s). Fix: create the tables "
                         "on the target by hand or run the init from a host with pg_dump." % pg_dump)
    kw = src.conn_kw()
    cmd = [pg_dump, "--schema-only", "--no-owner", "--no-privileges", "-h", kw["host"], "-p", str(kw["port"]),
           "-U", kw["user"], "-d", kw["dbname"]]
    for t in tables:
        cmd += ["-t", t]
    env = dict(os.environ)
    if kw.get("password"):
        env["PGPASSWORD"] = kw["password"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SteepError("pg_dump of %s failed: %s" % (", ".join(tables), res.stderr.strip()))
    ddl = "\n".join(line for line in res.stdout.splitlines()
                    if not line.startswith("SELECT pg_catalog.set_config('search_path'"))
    with tgt.conn.cursor() as cur:
        cur.execute(ddl)


def copy(specs, target, source, tables, parallel_workers=4, report=None):
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
                             replace=True, keep_done=True)
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
    set_state_everywhere(members, target, "SYNCHRONIZED")
    return {"changed": True, "state": "SYNCHRONIZED", "queries": mesh["queries"], "tables": mesh["tables"]}


def advance_source_slot(specs, target, source, source_lsn):
    """Manual init: the backup contains everything up to ``source_lsn``; skip it in the slot."""
    from ansible_collections.steep.repl.plugins.module_utils.replication import slot_name
    _members_list, by_id = _members(specs, target, source)
    conn = connect(by_id[source].conn_kw())
    try:
        row = fetch_all(conn, "SELECT confirmed_flush_lsn::text AS lsn, confirmed_flush_lsn < %s::pg_lsn AS behind "
                              "FROM pg_catalog.pg_replication_slots WHERE slot_name = %s", (source_lsn, slot_name(target)))
        if not row:
            raise SteepError("no slot %s on %s: run the prepare step first." % (slot_name(target), source))
        if row[0]["behind"]:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_catalog.pg_replication_slot_advance(%s, %s::pg_lsn)", (slot_name(target), source_lsn))
            return True
        return False
    finally:
        conn.close()


def status(conn, target=None):
    rows = fetch_all(conn, "SELECT * FROM steep_repl.init_status" + (" WHERE target_node = %s" if target else ""),
                     (target,) if target else None)
    return rows
