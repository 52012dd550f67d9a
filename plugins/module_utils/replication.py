# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Full-mesh logical replication: publications, slots, subscriptions, clock check.

Shared by the ``steep.repl.replication`` / ``steep.repl.clock_check`` modules and the agent
(no Ansible imports here).

Naming (one slot per ordered pair, deterministic, <= 63 characters for 40-character node ids):

* publication ``steep_pub`` on every node (the replicated tables), and ``steep_pub_versions``
  (``<publication>_versions``) with ``steep_repl.row_version`` only and ``publish = 'insert'``: an
  origin replaces a version by DELETE + INSERT and receivers need (and decide on) the INSERT alone, so
  the DELETE half is not decoded, sent or looked up at all (docs/conflicts.md, Performance). Every
  subscription subscribes to both;
* on subscriber X, the subscription receiving from publisher Y is ``steep_from_<Y>``;
* on publisher Y, the logical slot feeding subscriber X is ``steep_to_<X>``.

A ``steep_from_*`` subscription or ``steep_to_*`` slot whose node id is not a current member is
stale (the node left the inventory) and is dropped.

Deadlock-free ordering: every slot is created first (``pg_create_logical_replication_slot`` in
autocommit, no transaction open on any node), then every subscription with
``create_slot = false``, so no CREATE SUBSCRIPTION ever waits for a peer's transaction.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import fnmatch
import time

from ansible_collections.steep.repl.plugins.module_utils.db import (
    SteepError, connect, describe, fetch_all, fetch_one, fetch_value, quote_ident, quote_qualified,
    validate_node_id, check_server, extension_version)

try:
    import psycopg2
    import psycopg2.extensions
except ImportError:  # pragma: no cover - reported by db.connect
    psycopg2 = None

PUBLICATION = "steep_pub"
VERSIONS_SUFFIX = "_versions"
MAX_IDENT = 63
SUB_PREFIX = "steep_from_"
SLOT_PREFIX = "steep_to_"
ROW_VERSION = "steep_repl.row_version"
CAPTURE_TRIGGER = "steep_repl_capture"
LOCK_KEY = "steep_repl.mesh"
REDACTED = "********"
# where a publisher stands once the publications are in place: every transaction id below xmax has started
WAL_MARK = ("SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text AS xmax, "
            "pg_catalog.clock_timestamp() AS at")
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "steep_repl", "pg_toast")


def versions_publication(publication):
    """Name of the publication carrying the version rows next to ``publication``."""
    return publication + VERSIONS_SUFFIX


def check_publication_name(publication):
    """Refuses a publication name that leaves no room for its versions publication."""
    longest = MAX_IDENT - len(VERSIONS_SUFFIX)
    if not isinstance(publication, str) or not publication.strip():
        raise SteepError("publication name is empty. Fix: leave 'publication' at its default (steep_pub) or "
                         "give a name.")
    if len(publication.encode("utf-8")) > longest:
        raise SteepError("publication name %r is longer than %d bytes: steep.repl also creates %r next to it and "
                         "PostgreSQL names are at most %d bytes. Nothing was changed. Fix: choose a shorter name."
                         % (publication, longest, versions_publication(publication), MAX_IDENT))
    return publication


def subscription_name(publisher_id):
    """Name of the subscription, on a subscriber, that receives from ``publisher_id``."""
    return SUB_PREFIX + publisher_id


def slot_name(subscriber_id):
    """Name of the slot, on a publisher, that feeds ``subscriber_id``."""
    return SLOT_PREFIX + subscriber_id


def peer_of(name, prefix):
    """Node id encoded in a steep subscription/slot name, or None when not ours."""
    if name and name.startswith(prefix) and len(name) > len(prefix):
        return name[len(prefix):]
    return None


# --------------------------------------------------------------------------- conninfo
def _conn_value(value):
    """A libpq conninfo value, quoted only when it needs to be."""
    value = str(value)
    if value and not any(c.isspace() or c in "'\\=" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render_conninfo(params, hide_password=False):
    """libpq conninfo string for a subscription; ``redact`` hides the password."""
    parts = []
    for key in ("host", "port", "user", "password", "dbname", "sslmode", "sslrootcert", "connect_timeout"):
        value = params.get(key)
        if value is None or value == "":
            continue
        if key == "password" and hide_password:
            value = REDACTED
        parts.append("%s=%s" % (key, _conn_value(value)))
    return " ".join(parts)


def parse_conninfo(conninfo):
    """dict of a conninfo string (empty dict when it cannot be parsed)."""
    if not conninfo:
        return {}
    try:
        return dict(psycopg2.extensions.parse_dsn(conninfo))
    except Exception:  # malformed: treat as different from anything we want
        return {}


def conninfo_matches(existing, wanted):
    """True when the existing conninfo string connects like ``wanted`` (a params dict)."""
    have = parse_conninfo(existing)
    for key in ("host", "port", "user", "password", "dbname", "sslmode", "sslrootcert"):
        want = wanted.get(key)
        want = None if want in (None, "") else str(want)
        got = have.get(key)
        if key == "sslmode" and want == "prefer" and got is None:
            continue
        if got != want:
            return False
    return True


def redact(text, secrets):
    """``text`` with every secret replaced."""
    text = str(text)
    for secret in secrets:
        if secret:
            text = text.replace(str(secret), REDACTED)
    return text


# --------------------------------------------------------------------------- members
class Member:
    """One mesh node: how the controller reaches it and how peers reach it."""

    def __init__(self, spec):
        self.node_id = validate_node_id(spec.get("node_id"))
        self.host = spec.get("host") or "127.0.0.1"
        self.port = int(spec.get("port") or 5432)
        self.user = spec.get("user") or "postgres"
        self.password = spec.get("password")
        self.database = spec.get("database") or "postgres"
        self.ssl_mode = spec.get("ssl_mode") or "prefer"
        self.ca_cert = spec.get("ca_cert")
        self.connect_timeout = int(spec.get("connect_timeout") or 10)
        self.replication_host = spec.get("replication_host") or self.host
        self.replication_port = int(spec.get("replication_port") or self.port)
        self.conn = None

    def conn_kw(self):
        kw = dict(host=self.host, port=self.port, user=self.user, dbname=self.database,
                  connect_timeout=self.connect_timeout, sslmode=self.ssl_mode,
                  application_name="steep.repl")
        if self.password:
            kw["password"] = self.password
        if self.ca_cert:
            kw["sslrootcert"] = self.ca_cert
        return kw

    def peer_conninfo(self):
        """Params a PEER uses to subscribe to this node (as seen from the peer)."""
        params = dict(host=self.replication_host, port=self.replication_port, user=self.user,
                      password=self.password, dbname=self.database)
        if self.ssl_mode != "prefer":
            params["sslmode"] = self.ssl_mode
        if self.ca_cert:
            params["sslrootcert"] = self.ca_cert
        return params

    def where(self):
        return "%s (%s)" % (self.node_id, describe(self.conn_kw()))


def build_members(specs):
    members = [Member(s) for s in specs or []]
    if len(members) < 2:
        raise SteepError("a mesh needs at least 2 nodes, got %d. Fix: list every node of the "
                         "steep_nodes group in 'nodes'." % len(members))
    seen = {}
    for m in members:
        if m.node_id in seen:
            raise SteepError("node id %r is used twice. Fix: give every host a unique "
                             "steep_node_id." % m.node_id)
        seen[m.node_id] = m
    return sorted(members, key=lambda m: m.node_id)


# --------------------------------------------------------------------------- table selection
def normalize_table(name, field="steep_replicated_tables"):
    """'schema.table' (schema defaults to public); refuses malformed names."""
    if not isinstance(name, str) or not name.strip():
        raise SteepError("%s contains an empty or non-string entry %r. Fix: use 'schema.table'."
                         % (field, name))
    name = name.strip()
    parts = name.split(".")
    if len(parts) == 1:
        parts = ["public", parts[0]]
    if len(parts) != 2 or not all(parts):
        raise SteepError("%s entry %r is not 'schema.table'. Fix: write it as schema.table "
                         "(e.g. public.orders)." % (field, name))
    return "%s.%s" % (parts[0], parts[1])


def resolve_tables(catalogs, tables, schemas, excluded, schemas_present=None):
    """The replicated set from the configuration and each node's catalog.

    ``catalogs``: {node_id: {'schema.table': {'kind': 'r', 'has_pk': bool}}} (candidate
    schemas only). ``tables``: explicit 'schema.table' list; ``schemas``: whole schemas;
    ``excluded``: fnmatch globs over 'schema.table' (exclusion wins over both lists).
    ``schemas_present``: optional {node_id: set of existing schema names}.
    Returns the sorted list; raises SteepError (naming the table, the nodes and the fix) for
    unknown/missing tables, non-tables and tables without a primary key.
    """
    excluded = [e.strip() for e in (excluded or []) if isinstance(e, str) and e.strip()]
    nodes = sorted(catalogs)

    def is_excluded(t):
        return any(fnmatch.fnmatchcase(t, pat) for pat in excluded)

    wanted = {}
    for t in tables or []:
        t = normalize_table(t)
        if t.split(".", 1)[0] in SYSTEM_SCHEMAS:
            raise SteepError("table %s is in the reserved schema %s and cannot be replicated "
                             "explicitly (steep_repl.row_version is added automatically). Fix: "
                             "remove it from steep_replicated_tables." % (t, t.split(".", 1)[0]))
        wanted.setdefault(t, "steep_replicated_tables")
    for s in schemas or []:
        if not isinstance(s, str) or not s.strip() or "." in s:
            raise SteepError("steep_replicated_schemas entry %r is not a schema name. Fix: list "
                             "plain schema names (e.g. sales)." % (s,))
        s = s.strip()
        if s in SYSTEM_SCHEMAS:
            raise SteepError("schema %s is reserved and cannot be replicated. Fix: remove it "
                             "from steep_replicated_schemas." % s)
        found = set()
        for n in nodes:
            found.update(t for t, info in catalogs[n].items()
                         if t.split(".", 1)[0] == s and info["kind"] in ("r", "p") and not info.get("partition"))
        if schemas_present is not None and not any(s in schemas_present.get(n, ()) for n in nodes):
            raise SteepError("schema %s (steep_replicated_schemas) does not exist on any node. Fix: "
                             "create it or correct the name." % s)
        for t in sorted(found):
            wanted.setdefault(t, "steep_replicated_schemas")
    selected = sorted(t for t in wanted if not is_excluded(t))

    missing, not_table, no_pk = {}, {}, {}
    for t in selected:
        for n in nodes:
            info = catalogs[n].get(t)
            if info is None:
                missing.setdefault(t, []).append(n)
            elif info["kind"] != "r":
                not_table.setdefault(t, []).append("%s (%s)" % (n, KIND_NAMES.get(info["kind"], info["kind"])))
            elif not info["has_pk"]:
                no_pk.setdefault(t, []).append(n)
    errors = []
    for t, where in sorted(missing.items()):
        present = [n for n in nodes if n not in where]
        if present:
            errors.append("table %s is missing on node(s) %s (present on %s). Fix: create it on every "
                          "node with the same definition, or remove it from %s."
                          % (t, ", ".join(where), ", ".join(present), wanted[t]))
        else:
            errors.append("table %s does not exist on any node. Fix: create it on every node, or "
                          "remove it from %s (check the spelling: schema.table)." % (t, wanted[t]))
    for t, where in sorted(not_table.items()):
        errors.append("%s is not an ordinary table on %s; only ordinary tables can be replicated. "
                      "Fix: remove it from %s or exclude it with steep_excluded_tables."
                      % (t, ", ".join(where), wanted[t]))
    for t, where in sorted(no_pk.items()):
        errors.append("table %s has no primary key (on %s); steep.repl needs one to identify rows "
                      "and resolve conflicts. Fix: ALTER TABLE %s ADD PRIMARY KEY (<columns>); on "
                      "every node, or add %s to steep_excluded_tables." % (t, ", ".join(where), t, t))
    if errors:
        raise SteepError("cannot set up replication, nothing was changed: " + " ".join(errors))
    return selected


KIND_NAMES = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view",
              "f": "foreign table", "S": "sequence", "i": "index"}


# --------------------------------------------------------------------------- clock
def best_offset(samples):
    """Offset of a server clock from (t_sent, server_time, t_received) samples, in ms.

    Keeps the sample with the smallest round trip; the offset is
    ``server_time - (t_sent + t_received) / 2`` (RTT/2 compensation).
    Returns {'offset_ms': float, 'rtt_ms': float}.
    """
    best = None
    for t0, server_ms, t1 in samples:
        rtt_ms = t1 - t0
        if best is None or rtt_ms < best[0]:
            best = (rtt_ms, server_ms - (t0 + t1) / 2.0)
    if best is None:
        raise SteepError("no clock sample taken")
    return {"offset_ms": round(best[1], 3), "rtt_ms": round(best[0], 3)}


def measure_offset(conn, samples=5):
    """Offset (ms) of the server clock against this host's clock (see best_offset)."""
    taken = []
    with conn.cursor() as cur:
        for _i in range(max(1, samples)):
            t0 = time.time() * 1000.0
            cur.execute("SELECT extract(epoch FROM pg_catalog.clock_timestamp())::float8 * 1000")
            server_ms = cur.fetchone()[0]
            t1 = time.time() * 1000.0
            taken.append((t0, server_ms, t1))
    return best_offset(taken)


def evaluate_drift(measurements, warn_ms=100, max_ms=1000):
    """Pairwise clock drift between nodes from per-node offsets against one reference clock.

    ``measurements``: {node_id: {'offset_ms': x, 'rtt_ms': y}}. The drift of a pair is the
    difference of their offsets; its uncertainty is the sum of their half RTTs.
    Returns {'status': 'ok'|'warn'|'fail', 'drift_ms', 'uncertainty_ms', 'pair', 'message'}.
    Fails when the largest pairwise drift exceeds ``max_ms``, warns above ``warn_ms``.
    """
    if max_ms is None or warn_ms is None or max_ms < 0 or warn_ms < 0:
        raise SteepError("steep_max_drift_ms and steep_warn_drift_ms must be >= 0. Fix: set them "
                         "to milliseconds (defaults 1000 and 100).")
    if warn_ms > max_ms:
        raise SteepError("steep_warn_drift_ms (%s) is above steep_max_drift_ms (%s). Fix: keep "
                         "warn <= max." % (warn_ms, max_ms))
    items = sorted(measurements.items())
    if len(items) < 2:
        return {"status": "ok", "drift_ms": 0.0, "uncertainty_ms": 0.0, "pair": [],
                "message": "fewer than 2 nodes: nothing to compare"}
    lo = min(items, key=lambda kv: kv[1]["offset_ms"])
    hi = max(items, key=lambda kv: kv[1]["offset_ms"])
    drift = round(hi[1]["offset_ms"] - lo[1]["offset_ms"], 3)
    unc = round((hi[1].get("rtt_ms", 0.0) + lo[1].get("rtt_ms", 0.0)) / 2.0, 3)
    pair = [lo[0], hi[0]] if lo[0] != hi[0] else []
    detail = ("largest clock drift %.1f ms (+/- %.1f ms) between %s and %s"
              % (drift, unc, lo[0], hi[0]))
    if drift > max_ms:
        return {"status": "fail", "drift_ms": drift, "uncertainty_ms": unc, "pair": pair,
                "message": "%s exceeds steep_max_drift_ms=%s: last-write-wins conflict resolution "
                           "would pick wrong winners. Fix: synchronise the clocks with NTP (chrony: "
                           "'chronyc tracking'; Windows: 'w32tm /query /status') and re-run."
                           % (detail, max_ms)}
    if drift > warn_ms:
        return {"status": "warn", "drift_ms": drift, "uncertainty_ms": unc, "pair": pair,
                "message": "%s is above steep_warn_drift_ms=%s. Fix: check NTP on these nodes."
                           % (detail, warn_ms)}
    return {"status": "ok", "drift_ms": drift, "uncertainty_ms": unc, "pair": pair,
            "message": detail + " (within steep_warn_drift_ms=%s)" % warn_ms}


def check_clocks(members, samples=5, warn_ms=100, max_ms=1000):
    """Connect to every member, measure offsets, evaluate. Returns (measurements, verdict)."""
    measurements = {}
    for m in members:
        conn = connect(m.conn_kw())
        try:
            measurements[m.node_id] = measure_offset(conn, samples)
        finally:
            conn.close()
    return measurements, evaluate_drift(measurements, warn_ms, max_ms)


# --------------------------------------------------------------------------- observation
def candidate_catalog(conn, schemas):
    """{'schema.table': {'kind', 'has_pk', 'partition', 'uncovered_unique'}} for the given schemas.
    ``uncovered_unique``: the table's unique indexes on expressions, on generated columns or with a WHERE
    clause, which the conflict engine does not decide (steep_repl.enable_table covers unique keys on
    plain columns)."""
    rows = fetch_all(conn, """
        SELECT n.nspname || '.' || c.relname AS name, c.relkind::text AS kind,
               c.relispartition AS partition,
               EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k
                       WHERE k.conrelid = c.oid AND k.contype = 'p') AS has_pk,
               ARRAY(SELECT n.nspname || '.' || ic.relname FROM pg_catalog.pg_index i
                      JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
                      WHERE i.indrelid = c.oid AND i.indisunique AND NOT i.indisprimary
                        AND (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL
                             OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                                         WHERE a.attrelid = c.oid AND a.attnum = ANY(i.indkey::int2[])
                                           AND a.attgenerated <> ''))
                      ORDER BY 1) AS uncovered_unique
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')""", (sorted(schemas),))
    return {r["name"]: {"kind": r["kind"], "has_pk": r["has_pk"], "partition": r["partition"],
                        "uncovered_unique": list(r["uncovered_unique"] or [])}
            for r in rows}


def uncovered_unique_warnings(catalogs, desired):
    """Warnings for replicated tables with unique indexes the conflict engine does not decide (on an
    expression or a generated column, or partial): two nodes writing one value there concurrently stop a subscription as
    native replication does. Pure."""
    found = {}
    for node in sorted(catalogs):
        for t in desired:
            for idx in (catalogs[node].get(t) or {}).get("uncovered_unique", ()):
                found.setdefault((t, idx), []).append(node)
    return ["table %s has the unique index %s (on %s) on an expression or a generated column, or with a WHERE "
            "clause: steep decides unique values of plain columns only, so two nodes writing one value of it concurrently stop a "
            "subscription (insert_exists), as native replication does. Fix: make it a unique constraint on "
            "plain columns (store the normalised value, e.g. lower(email), in the column itself), or write "
            "those values on one node only." % (t, idx, ", ".join(nodes)) for (t, idx), nodes in sorted(found.items())]


def observe(conn, publication=PUBLICATION, node_id=None):
    """Replication state of one node (only steep-named objects)."""
    state = {}
    state["extension"] = extension_version(conn)
    state["init_state"] = None
    if state["extension"] and node_id and fetch_value(
            conn, "SELECT count(*) FROM pg_catalog.pg_attribute WHERE attrelid = 'steep_repl.nodes'::pg_catalog.regclass "
                  "AND attname = 'init_state' AND NOT attisdropped"):
        state["init_state"] = fetch_value(conn, "SELECT init_state FROM steep_repl.nodes WHERE node_id = %s", (node_id,))
    state["has_row_version"] = fetch_value(conn, "SELECT pg_catalog.to_regclass(%s) IS NOT NULL",
                                           (ROW_VERSION,))
    state["has_enable"] = bool(state["extension"]) and fetch_value(
        conn, "SELECT pg_catalog.to_regprocedure('steep_repl.enable_table(regclass)') IS NOT NULL")
    state["has_disable"] = bool(state["extension"]) and fetch_value(
        conn, "SELECT pg_catalog.to_regprocedure('steep_repl.disable_table(regclass)') IS NOT NULL")
    # the engine that replaces versions by DELETE + INSERT (so INSERTs alone carry them) has _version_wait
    state["insert_versions"] = bool(state["extension"]) and fetch_value(
        conn, "SELECT pg_catalog.to_regprocedure('steep_repl._version_wait(text, text, text)') IS NOT NULL")
    for key, name in (("pub", publication), ("ver_pub", versions_publication(publication))):
        pub = fetch_all(conn, "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate "
                              "FROM pg_catalog.pg_publication WHERE pubname = %s", (name,))
        state[key.replace("pub", "publication")] = bool(pub)
        state[key + "_all_tables"] = bool(pub and pub[0]["puballtables"])
        state[key + "_publish"] = sorted(a for a in ("insert", "update", "delete", "truncate")
                                         if pub and pub[0]["pub" + a])
        state[key + "_tables"] = sorted(r["t"] for r in fetch_all(
            conn, "SELECT schemaname || '.' || tablename AS t FROM pg_catalog.pg_publication_tables "
                  "WHERE pubname = %s", (name,))) if pub else []
    state["enabled_tables"] = sorted(r["t"] for r in fetch_all(conn, """
        SELECT DISTINCT n.nspname || '.' || c.relname AS t
        FROM pg_catalog.pg_trigger g
        JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE g.tgname = %s""", (CAPTURE_TRIGGER,)))
    # tables whose generated functions come from another build of enable_table() (an extension update
    # changed the templates): enable_table() runs again for them
    state["outdated_tables"] = sorted(r["tbl"] for r in fetch_all(conn, """
        SELECT ct.tbl FROM steep_repl.conflict_tables ct
        WHERE ct.generator IS DISTINCT FROM steep_repl._generator()
          AND pg_catalog.to_regclass(pg_catalog.format('%I.%I', ct.table_schema, ct.table_name)) IS NOT NULL""")) if state["has_enable"] and fetch_value(
        conn, "SELECT pg_catalog.to_regprocedure('steep_repl._generator()') IS NOT NULL") else []
    subs = fetch_all(conn, r"""
        SELECT s.oid, s.subname, s.subenabled, s.subconninfo, s.subslotname, s.suborigin,
               s.subpublications
        FROM pg_catalog.pg_subscription s
        JOIN pg_catalog.pg_database d ON d.oid = s.subdbid
        WHERE d.datname = pg_catalog.current_database() AND s.subname LIKE 'steep\_from\_%%'""")
    state["subscriptions"] = {}
    for s in subs:
        rels = fetch_all(conn, """
            SELECT n.nspname || '.' || c.relname AS t FROM pg_catalog.pg_subscription_rel r
            JOIN pg_catalog.pg_class c ON c.oid = r.srrelid
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE r.srsubid = %s""", (s["oid"],))
        state["subscriptions"][s["subname"]] = {
            "enabled": s["subenabled"], "conninfo": s["subconninfo"], "slot": s["subslotname"],
            "origin": s["suborigin"], "publications": list(s["subpublications"] or []),
            "tables": sorted(r["t"] for r in rels)}
    slots = fetch_all(conn, r"""
        SELECT slot_name, plugin, slot_type, database, active, active_pid
        FROM pg_catalog.pg_replication_slots WHERE slot_name LIKE 'steep\_to\_%%'""")
    state["slots"] = {s["slot_name"]: s for s in slots}
    state["database"] = fetch_value(conn, "SELECT pg_catalog.current_database()")
    return state


def summary(state):
    """The part of a node's state shown in --diff (``publication``: the tables of both publications)."""
    published = state["publication"] or state.get("ver_publication")
    return {"publication": sorted(set(state["pub_tables"]) | set(state.get("ver_pub_tables", ())))
            if published else None,
            "subscriptions": sorted(state["subscriptions"]),
            "slots": sorted(state["slots"]),
            "enabled_tables": list(state["enabled_tables"]),
            "outdated_tables": list(state.get("outdated_tables", ()))}


# --------------------------------------------------------------------------- planning
WIRED_STATES = ("CATCHING_UP", "SYNCHRONIZED")


def uninitialised_newcomers(members, states):
    """{node_id: init_state} of members that would join an already running mesh without
    having been initialised (node-init.md): they are left alone.

    The mesh runs when some member has a steep subscription from another member. A member
    without any is a newcomer; it is wired in only when its own steep_repl.nodes row says
    CATCHING_UP or SYNCHRONIZED (set by steep.repl.init). A fresh mesh wires everyone.
    """
    ids = set(m.node_id for m in members)
    running = set(m.node_id for m in members
                  if any(peer_of(n, SUB_PREFIX) in ids - {m.node_id} for n in states[m.node_id]["subscriptions"]))
    if not running:
        return {}
    return dict((m.node_id, states[m.node_id].get("init_state")) for m in members
                if m.node_id not in running and states[m.node_id].get("init_state") not in WIRED_STATES)


class Action:
    """One SQL step on one node. ``display`` is the password-free text shown to users."""

    def __init__(self, node, phase, query, args=None, display_args=None, kind="sql", note=None):
        self.node = node
        self.phase = phase
        self.query = query
        self.args = args
        self.display_args = display_args
        self.kind = kind
        self.note = note


def plan(members, states, desired, publication=PUBLICATION):
    """Ordered actions that bring every member to the desired mesh.

    Pure (no I/O): ``states`` = {node_id: observe()}, ``desired`` = sorted table list.
    Phases: 1 enable_table, 2 publications, 3 drop stale subscriptions, 4 drop stale slots,
    5 create slots, 6 create/alter subscriptions, 7 refresh, 8 row_version leaves the main
    publication (after every subscription reads the versions publication, see Mesh.run),
    9 disable_table.
    Versions travel in ``<publication>_versions`` (INSERTs only) when every node's engine writes them
    as INSERTs (``insert_versions``); with an older engine anywhere they stay in the main publication
    (every operation), and the versions publication is kept empty.
    Returns (actions, warnings, info) where info has 'removed_nodes' and 'leaving_tables'.
    """
    vpub = versions_publication(publication)
    ids = [m.node_id for m in members]
    actions, warnings = [], []
    newcomers = uninitialised_newcomers(members, states)
    for node_id, init_state in sorted(newcomers.items()):
        source = [m.node_id for m in members if m.node_id not in newcomers][0]
        warnings.append("node %s joins a running mesh but is not initialised (init_state %s): it was left alone "
                        "(no publication, slot or subscription for it). Fix: ansible-playbook -i <inventory> "
                        "playbooks/init_node.yml -e steep_init_target=%s -e steep_init_source=%s"
                        % (node_id, init_state or "unknown", node_id, source))
    members = [m for m in members if m.node_id not in newcomers]
    removed = set()
    leaving = set()
    active = [m.node_id for m in members]
    row_version = [ROW_VERSION] if all(states[i]["has_row_version"] for i in active) else []
    if not row_version:
        if any(states[i]["has_row_version"] for i in active):
            raise SteepError("%s exists on %s but not on %s: the nodes run different steep_repl "
                             "versions. Fix: run the foundation play (ALTER EXTENSION steep_repl "
                             "UPDATE) on every node first." % (
                                 ROW_VERSION, ", ".join(i for i in active if states[i]["has_row_version"]),
                                 ", ".join(i for i in active if not states[i]["has_row_version"])))
        warnings.append("%s does not exist yet (conflict engine not installed): the publication "
                        "carries the user tables only." % ROW_VERSION)
    pub_wanted = sorted(set(desired) | set(row_version))
    insert_only = bool(row_version) and all(states[i].get("insert_versions") for i in active)
    if row_version and not insert_only:
        warnings.append("%s: the conflict engine on %s replaces versions in place (an earlier build): versions "
                        "stay in publication %s with every operation. Fix: update the extension on those nodes "
                        "(foundation play), then re-run to move them to %s (INSERTs only)."
                        % (ROW_VERSION, ", ".join(i for i in active if not states[i].get("insert_versions")),
                           publication, vpub))
    main_wanted = sorted(set(desired) | (set() if insert_only else set(row_version)))
    ver_wanted = list(row_version) if insert_only else []

    # 1. conflict triggers on every table BEFORE anything is applied
    for m in members:
        st = states[m.node_id]
        # every table whose functions an earlier build generated is regenerated, in the set or not:
        # its capture trigger fires for local writes whatever the mesh replicates
        todo = sorted(set(t for t in desired if t not in st["enabled_tables"]) | set(st.get("outdated_tables", ())))
        if todo and not st["has_enable"]:
            warnings.append("steep_repl.enable_table(regclass) is missing on %s: conflict triggers "
                            "were NOT installed on %s (install the conflict engine, then re-run)."
                            % (m.node_id, ", ".join(todo)))
            continue
        for t in todo:
            actions.append(Action(m.node_id, 1, "SELECT steep_repl.enable_table(%s::regclass)",
                                  (quote_qualified(t),)))
    # 2. publications: the main one with the tables, the versions one with row_version, INSERTs only.
    # row_version leaves the main publication in phase 8 (not here), after the subscriptions read both.
    moving = []
    for m in members:
        st = states[m.node_id]
        for name, flag in ((publication, "pub"), (vpub, "ver_pub")):
            if st.get(flag + "_all_tables"):
                raise SteepError("publication %s on %s is FOR ALL TABLES; steep.repl manages its table "
                                 "list. Nothing was changed. Fix: DROP PUBLICATION %s; on that node and re-run."
                                 % (name, m.node_id, name))
        for name, flag, wanted, exists, have, publish in (
                (publication, "pub", main_wanted, st["publication"], st["pub_tables"], None),
                (vpub, "ver_pub", ver_wanted, st.get("ver_publication"), st.get("ver_pub_tables", []), "insert")):
            qp = quote_ident(name)
            with_ = " WITH (publish = '%s')" % publish if publish else ""
            if not exists:
                if wanted:
                    q = "CREATE PUBLICATION %s FOR TABLE %s%s" % (qp, ", ".join(quote_qualified(t) for t in wanted), with_)
                else:
                    q = "CREATE PUBLICATION %s%s" % (qp, with_)
                actions.append(Action(m.node_id, 2, q))
                continue
            if publish and st.get(flag + "_publish") != [publish]:
                actions.append(Action(m.node_id, 2, "ALTER PUBLICATION %s SET (publish = '%s')" % (qp, publish)))
            add = [t for t in wanted if t not in have]
            drop = [t for t in have if t not in wanted]
            if flag == "pub" and ROW_VERSION in drop:
                drop.remove(ROW_VERSION)
                moving.append(m.node_id)
            leaving.update(t for t in drop if t != ROW_VERSION and t not in desired)
            if add:
                actions.append(Action(m.node_id, 2, "ALTER PUBLICATION %s ADD TABLE %s" % (
                    qp, ", ".join(quote_qualified(t) for t in add))))
            if drop:
                actions.append(Action(m.node_id, 2, "ALTER PUBLICATION %s DROP TABLE %s" % (
                    qp, ", ".join(quote_qualified(t) for t in drop))))
    # 3. stale subscriptions (publisher left the mesh): keep the remote slot alone
    for m in members:
        for name in sorted(states[m.node_id]["subscriptions"]):
            peer = peer_of(name, SUB_PREFIX)
            if peer in ids and peer != m.node_id:
                continue
            removed.add(peer)
            sub = states[m.node_id]["subscriptions"][name]
            qn = quote_ident(name)
            if sub["enabled"]:
                actions.append(Action(m.node_id, 3, "ALTER SUBSCRIPTION %s DISABLE" % qn))
            if sub["slot"] is not None:
                actions.append(Action(m.node_id, 3, "ALTER SUBSCRIPTION %s SET (slot_name = NONE)" % qn))
            actions.append(Action(m.node_id, 3, "DROP SUBSCRIPTION %s" % qn))
    # 4. stale slots (subscriber left the mesh)
    for m in members:
        for name in sorted(states[m.node_id]["slots"]):
            peer = peer_of(name, SLOT_PREFIX)
            if peer in ids and peer != m.node_id:
                continue
            removed.add(peer)
            actions.append(Action(m.node_id, 4, "SELECT pg_catalog.pg_drop_replication_slot(%s)",
                                  (name,), kind="drop_slot"))
    # 5. every slot first (autocommit, no open transaction anywhere)
    for pub in members:
        st = states[pub.node_id]
        for sub in members:
            if sub is pub:
                continue
            name = slot_name(sub.node_id)
            have = st["slots"].get(name)
            if have is not None:
                if have["database"] != st["database"] or have["plugin"] != "pgoutput":
                    raise SteepError("replication slot %s on %s belongs to database %s with plugin %s, "
                                     "not to %s/pgoutput. Fix: drop it (SELECT pg_drop_replication_slot("
                                     "'%s')) if it is unused, then re-run." % (
                                         name, pub.node_id, have["database"], have["plugin"],
                                         st["database"], name))
                continue
            actions.append(Action(pub.node_id, 5, "SELECT pg_catalog.pg_create_logical_replication_slot(%s, 'pgoutput')",
                                  (name,), kind="create_slot", note=name))
    # 6. subscriptions, then 7. refresh
    sub_pubs = ", ".join(quote_ident(p) for p in sorted((publication, vpub)))
    for sub in members:
        st = states[sub.node_id]
        for pub in members:
            if pub is sub:
                continue
            name = subscription_name(pub.node_id)
            qn = quote_ident(name)
            params = pub.peer_conninfo()
            have = st["subscriptions"].get(name)
            if have is None:
                q = ("CREATE SUBSCRIPTION %s CONNECTION %%s PUBLICATION %s WITH (create_slot = false, "
                     "slot_name = %s, copy_data = false, origin = none, enabled = true)"
                     % (qn, sub_pubs, quote_ident(slot_name(sub.node_id))))
                actions.append(Action(sub.node_id, 6, q, (render_conninfo(params),),
                                      (render_conninfo(params, hide_password=True),), kind="create_sub", note=name))
                continue
            if not conninfo_matches(have["conninfo"], params):
                actions.append(Action(sub.node_id, 6, "ALTER SUBSCRIPTION %s CONNECTION %%s" % qn,
                                      (render_conninfo(params),), (render_conninfo(params, hide_password=True),)))
            if have["slot"] != slot_name(sub.node_id):
                raise SteepError("subscription %s on %s uses slot %s instead of %s. Fix: DROP "
                                 "SUBSCRIPTION %s; on %s and re-run." % (
                                     name, sub.node_id, have["slot"], slot_name(sub.node_id), name, sub.node_id))
            if (have["origin"] or "any") != "none":
                actions.append(Action(sub.node_id, 6, "ALTER SUBSCRIPTION %s SET (origin = none)" % qn))
            if not have["enabled"]:  # first: Mesh.run waits for this subscription's slot before a switch
                actions.append(Action(sub.node_id, 6, "ALTER SUBSCRIPTION %s ENABLE" % qn))
            if sorted(have["publications"]) != sorted((publication, vpub)):
                # the apply worker restarts to read the new list; Mesh.run waits for that before phase 8
                actions.append(Action(sub.node_id, 6, "ALTER SUBSCRIPTION %s SET PUBLICATION %s WITH "
                                      "(refresh = false)" % (qn, sub_pubs), kind="set_publication", note=name))
            if sorted(have["tables"]) != pub_wanted:
                actions.append(Action(sub.node_id, 7, "ALTER SUBSCRIPTION %s REFRESH PUBLICATION WITH "
                                      "(copy_data = false)" % qn))
    # 8. row_version leaves the main publication: every subscription reads the versions one by now
    for node_id in moving:
        actions.append(Action(node_id, 8, "ALTER PUBLICATION %s DROP TABLE %s" % (
            quote_ident(publication), quote_qualified(ROW_VERSION))))
    # 9. conflict triggers off for tables that left the set (after no one applies them)
    for m in members:
        st = states[m.node_id]
        todo = sorted(t for t in leaving if t in st["enabled_tables"])
        if todo and not st["has_disable"]:
            warnings.append("steep_repl.disable_table(regclass) is missing on %s: conflict triggers "
                            "stay on %s." % (m.node_id, ", ".join(todo)))
            continue
        for t in todo:
            actions.append(Action(m.node_id, 9, "SELECT steep_repl.disable_table(%s::regclass)",
                                  (quote_qualified(t),)))
    actions.sort(key=lambda a: a.phase)  # stable: keeps node order inside a phase
    removed.discard(None)
    return actions, warnings, {"removed_nodes": sorted(removed), "leaving_tables": sorted(leaving),
                               "publication_tables": pub_wanted, "skipped_nodes": sorted(newcomers)}


def predicted_summary(members, states, desired, info):
    """--diff 'after' in check mode: what the plan leads to."""
    out = {}
    for m in members:
        st = states[m.node_id]
        if m.node_id in info["skipped_nodes"]:
            out[m.node_id] = summary(st)
            continue
        members_in = [p for p in members if p.node_id not in info["skipped_nodes"]]
        enabled = set(st["enabled_tables"]) - (set(info["leaving_tables"]) if st["has_disable"] else set())
        if st["has_enable"]:
            enabled |= set(desired)
        out[m.node_id] = {
            "publication": list(info["publication_tables"]),
            "subscriptions": sorted(subscription_name(p.node_id) for p in members_in if p is not m),
            "slots": sorted(set(slot_name(p.node_id) for p in members_in if p is not m)
                            | set(n for n in st["slots"] if peer_of(n, SLOT_PREFIX) in info["skipped_nodes"])),
            "enabled_tables": sorted(enabled),
            "outdated_tables": [] if st["has_enable"] else list(st.get("outdated_tables", ()))}
    return out


# --------------------------------------------------------------------------- execution
APPLY_WORKERS = ("'logical replication apply worker', 'logical replication parallel worker', "
                 "'logical replication tablesync worker'")


def old_transactions(conn, since, local_writers=False):
    """Sessions and prepared transactions holding a transaction id since before ``since``, as text
    (``local_writers``: of this database, apply workers left out)."""
    extra = (" AND datname = pg_catalog.current_database() AND backend_type NOT IN (%s)" % APPLY_WORKERS
             if local_writers else "")
    old = fetch_all(conn, "SELECT 'pid ' || pid || ' (' || concat_ws(', ', backend_type, nullif(application_name, ''), "
                          "usename) || ')' AS who, xact_start::text AS since FROM pg_catalog.pg_stat_activity "
                          "WHERE backend_xid IS NOT NULL AND xact_start < %s" + extra + " ORDER BY xact_start", (since,))
    old += fetch_all(conn, "SELECT 'prepared transaction ' || gid || ' (' || owner || ')' AS who, prepared::text AS since "
                           "FROM pg_catalog.pg_prepared_xacts WHERE prepared < %s", (since,))
    return ", ".join("%s since %s" % (o["who"], o["since"]) for o in old)


def wait_transactions_ended(conn, mark, stall, error, local_writers=False):
    """Wait until every transaction that had an id at ``mark`` (a WAL_MARK row) has ended. With
    ``local_writers``, only those that can have written on this database as a local origin: sessions of this
    database, prepared transactions, not apply workers (they write other origins' changes). After ``stall``
    seconds raise ``error(text naming the old transactions)``."""
    if local_writers:
        query = ("SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.backend_xid IS NOT NULL "
                 "AND a.xact_start < %(at)s AND a.datname = pg_catalog.current_database() AND a.backend_type NOT IN ("
                 + APPLY_WORKERS + ")) AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_xacts p WHERE "
                 "pg_catalog.age(p.transaction) > pg_catalog.age((%(xmax)s::bigint %% 4294967296)::text::xid))")
    else:
        query = "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()) >= %(xmax)s::xid8"
    deadline = time.time() + stall
    while not fetch_value(conn, query, {"at": mark["at"], "xmax": mark["xmax"]}):
        if time.time() > deadline:
            raise error(old_transactions(conn, mark["at"], local_writers))
        time.sleep(0.1)


def wait_slot_confirmed(conn, slot, target, stall, error):
    """Wait until logical slot ``slot`` has confirmed WAL position ``target``: its subscriber has applied
    everything the publisher committed before it. Waits as long as the slot moves; ``stall`` seconds
    without progress (or no such slot) raise ``error(position confirmed, or None)``."""
    query = ("SELECT confirmed_flush_lsn >= %s::pg_lsn AS passed, confirmed_flush_lsn::text AS at "
             "FROM pg_catalog.pg_replication_slots WHERE slot_name = %s")
    seen, deadline = None, time.time() + stall
    while True:
        rows = fetch_all(conn, query, (target, slot))
        if rows and rows[0]["passed"]:
            return
        at = rows[0]["at"] if rows else None
        if at != seen:
            seen, deadline = at, time.time() + stall
        elif time.time() > deadline:
            raise error(at)
        time.sleep(0.1)


class Mesh:
    """Connections to every member, the mesh lock, observation and execution."""

    def __init__(self, members, check_mode=False, lock_timeout=300):
        self.members = members
        self.by_id = {m.node_id: m for m in members}
        self.check_mode = check_mode
        self.lock_timeout = lock_timeout
        self.queries = []
        self._wal_marks = {}
        self.secrets = [m.password for m in members if m.password]

    def __enter__(self):
        try:
            for m in self.members:  # sorted by node id: no lock-order deadlock between runs
                m.conn = connect(m.conn_kw())
                check_server(m.conn)
            for m in self.members:
                self._lock(m)
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for m in self.members:
            if m.conn is not None:
                try:
                    m.conn.close()
                except Exception:
                    pass
                m.conn = None

    def _lock(self, m):
        deadline = time.time() + self.lock_timeout
        while True:
            if fetch_value(m.conn, "SELECT pg_catalog.pg_try_advisory_lock(pg_catalog.hashtext(%s))",
                           (LOCK_KEY,)):
                return
            if time.time() > deadline:
                raise SteepError("another steep.repl replication run holds the mesh lock on %s for "
                                 "more than %ss. Fix: wait for it to finish (or end that session) and "
                                 "re-run." % (m.node_id, self.lock_timeout))
            time.sleep(0.5)

    def observe(self, publication=PUBLICATION):
        states = {}
        for m in self.members:
            st = observe(m.conn, publication, m.node_id)
            if not st["extension"]:
                raise SteepError("the steep_repl extension is not installed on %s. Fix: run the "
                                 "foundation play (playbooks/steep_foundation.yml or site.yml) first."
                                 % m.where())
            states[m.node_id] = st
        return states

    def catalogs(self, schemas):
        return {m.node_id: candidate_catalog(m.conn, schemas) for m in self.members}

    def schemas_present(self, schemas):
        return {m.node_id: set(r["nspname"] for r in fetch_all(
            m.conn, "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname = ANY(%s)", (sorted(schemas),)))
            for m in self.members}

    def display(self, action):
        conn = self.by_id[action.node].conn
        args = action.display_args if action.display_args is not None else action.args
        text = action.query
        if args is not None:
            with conn.cursor() as cur:
                text = cur.mogrify(action.query, args).decode()
        return "/* %s */ %s" % (action.node, redact(text, self.secrets))

    def run(self, actions):
        """Execute in order. A failure while wiring (slots, new subscriptions) undoes the slots and
        subscriptions this run created, so no half-wired mesh and no orphan slot retaining WAL stays."""
        created, restarting = [], []
        self._wal_marks = {}
        for action in actions:
            if action.phase >= 8 and restarting and not self.check_mode:
                self._wait_restarted(restarting)
                restarting = []
            self.queries.append(self.display(action))
            if self.check_mode:
                continue
            conn = self.by_id[action.node].conn
            if action.kind == "set_publication":    # its own errors name the cause and the fix
                self._wait_slot_passed(action.node, action.note)
            try:
                if action.kind == "set_publication":
                    restarting.append((action.node, action.note, self._worker_pid(conn, action.note)))
                if action.kind == "drop_slot":
                    self._drop_slot(conn, action.args[0])
                else:
                    with conn.cursor() as cur:
                        cur.execute(action.query, action.args)
                if action.kind in ("create_slot", "create_sub"):
                    created.append(action)
            except Exception as exc:
                msg = redact(str(exc).strip(), self.secrets)
                hint = "fix the cause and re-run (every step is idempotent)"
                if "could not connect to the publisher" in msg:
                    peer = self.by_id.get(peer_of(action.note or "", SUB_PREFIX))
                    if peer is not None:
                        hint = ("make %s reachable FROM %s at %s:%s (steep_pg_replication_host / "
                                "steep_pg_replication_port of %s, its listen_addresses and pg_hba.conf), then re-run"
                                % (peer.node_id, action.node, peer.replication_host, peer.replication_port, peer.node_id))
                undone = self._undo(created) if action.phase in (5, 6) else ""
                raise SteepError("%s failed on %s: %s. %sFix: %s." % (
                    redact(self.display(action), self.secrets), action.node, msg, undone, hint))

    @staticmethod
    def _worker_pid(conn, subname):
        """pid of a subscription's leader apply worker (None when it does not run)."""
        rows = fetch_all(conn, "SELECT pid FROM pg_catalog.pg_stat_subscription WHERE subname = %s "
                               "AND relid IS NULL AND leader_pid IS NULL AND pid IS NOT NULL", (subname,))
        return rows[0]["pid"] if rows else None

    def _wait_slot_passed(self, node, subname, stall=60):
        """Before a subscription reads a publication list that names a publication newer than the WAL its
        slot may still decode (the versions publication, created in phase 2): a walsender decodes each
        transaction with the catalog of the moment of its first change, and PostgreSQL 17 fails on a
        publication that did not exist then ("publication ... does not exist", on every restart, until
        someone moves the slot); PostgreSQL 18 skips it with a warning. So wait until every transaction
        that ran on the publisher at its first switch (after phase 2) has ended, then until the slot has confirmed the WAL
        written by then. The transactions get ``stall`` seconds; the slot waits as long as it moves, and
        ``stall`` seconds without progress fail the run (nothing is lost: the versions stay in the main
        publication)."""
        publisher = self.by_id.get(peer_of(subname, SUB_PREFIX))
        if publisher is None or publisher.conn is None:
            return
        # taken at the first switch that reads from this publisher (after phase 2), shared by the later ones
        mark = self._wal_marks.get(publisher.node_id)
        if mark is None:
            mark = self._wal_marks[publisher.node_id] = fetch_one(publisher.conn, WAL_MARK)
        wait_transactions_ended(publisher.conn, mark, stall, lambda old: SteepError(
            "transactions that began on %s before its publications changed are still running after %ss (%s); "
            "subscription %s on %s keeps its old publication list until they end, because a walsender decodes them "
            "with the catalog of their start (nothing is lost: %s stays in the main publication). Fix: let them "
            "finish, or end them, and re-run." % (publisher.node_id, stall, old or "see pg_stat_activity", subname,
                                                  node, ROW_VERSION)))
        slot = slot_name(node)
        target = fetch_value(publisher.conn, "SELECT pg_catalog.pg_current_wal_lsn()::text")
        wait_slot_confirmed(publisher.conn, slot, target, stall, lambda at: SteepError(
            "slot %s on %s has not moved for %ss (confirmed up to %s, needed %s), so subscription %s on %s still reads "
            "its old publication list (nothing is lost: %s stays in the main publication). Fix: check that this "
            "subscription is enabled and streaming (pg_stat_subscription on %s, pg_replication_slots and the server "
            "log on %s) and re-run." % (slot, publisher.node_id, stall, at, target, subname, node, ROW_VERSION, node,
                                        publisher.node_id)))

    def _wait_restarted(self, restarting, timeout=60):
        """Wait until every apply worker that ran when its subscription's publication list changed has
        exited: its successor decodes from the slot's confirmed position with the new list, so no change
        of a version is skipped by a walsender still reading the old list (row_version leaves the main
        publication next)."""
        deadline = time.time() + timeout
        for node, subname, pid in restarting:
            conn = self.by_id[node].conn
            while pid is not None and self._worker_pid(conn, subname) == pid:
                if time.time() > deadline:
                    raise SteepError("the apply worker of subscription %s on %s (pid %s) did not restart within "
                                     "%ss after its publication list changed; %s stays in the main publication as well "
                                     "(nothing is lost). Fix: check that subscription (pg_stat_subscription, the "
                                     "server log) and re-run." % (subname, node, pid, timeout, ROW_VERSION))
                time.sleep(0.1)

    def _undo(self, created):
        """Drop what this run created while wiring; returns a sentence for the error message."""
        done, failed = [], []
        for action in reversed(created):
            conn = self.by_id[action.node].conn
            try:
                if action.kind == "create_sub":
                    with conn.cursor() as cur:  # also drops its slot on the publisher
                        cur.execute("DROP SUBSCRIPTION IF EXISTS %s" % quote_ident(action.note))
                else:
                    self._drop_slot(conn, action.note, timeout=10)
                done.append("%s on %s" % (action.note, action.node))
            except Exception as exc:
                failed.append("%s on %s (%s)" % (action.note, action.node, redact(str(exc).strip(), self.secrets)))
            self.queries.append("/* %s */ -- undone: %s" % (action.node, action.note))
        out = ""
        if done:
            out += "Undone (created by this run): %s. " % ", ".join(done)
        if failed:
            out += "Could NOT undo: %s; drop them by hand. " % ", ".join(failed)
        return out

    @staticmethod
    def _drop_slot(conn, name, timeout=30):
        """Drop a slot, ending the walsender that holds it (a departed node may still stream)."""
        deadline = time.time() + timeout
        while True:
            row = fetch_all(conn, "SELECT active_pid FROM pg_catalog.pg_replication_slots "
                                  "WHERE slot_name = %s", (name,))
            if not row:
                return
            pid = row[0]["active_pid"]
            if pid:
                fetch_value(conn, "SELECT pg_catalog.pg_terminate_backend(%s)", (pid,))
                time.sleep(0.2)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_catalog.pg_drop_replication_slot(%s)", (name,))
                return
            except psycopg2.Error as exc:
                if time.time() > deadline:
                    raise SteepError("cannot drop replication slot %s: %s. Fix: stop the departed "
                                     "node's subscription that still uses it, then re-run."
                                     % (name, str(exc).strip()))
                time.sleep(0.2)


def _published(state):
    """What a run can change besides summary(): publication options and subscriptions."""
    return [state["subscriptions"], state["pub_tables"], state.get("ver_publication"), state.get("ver_pub_tables"),
            state.get("ver_pub_publish")]


def candidate_schemas(tables, schemas):
    out = {"steep_repl"}
    for t in tables or []:
        out.add(normalize_table(t).split(".", 1)[0])
    for s in schemas or []:
        if isinstance(s, str) and s.strip():
            out.add(s.strip())
    return out


def ensure_mesh(specs, tables=None, schemas=None, excluded=None, publication=PUBLICATION,
                check_mode=False, lock_timeout=300):
    """Bring the whole mesh to the desired state. Returns a result dict (no secrets)."""
    check_publication_name(publication)
    members = build_members(specs)
    with Mesh(members, check_mode=check_mode, lock_timeout=lock_timeout) as mesh:
        states = mesh.observe(publication)
        wanted_schemas = candidate_schemas(tables, schemas)
        catalogs = mesh.catalogs(wanted_schemas)
        desired = resolve_tables(catalogs, tables, schemas, excluded, mesh.schemas_present(wanted_schemas))
        actions, warnings, info = plan(members, states, desired, publication)
        warnings = warnings + uncovered_unique_warnings(catalogs, desired)
        before = {i: summary(s) for i, s in states.items()}
        try:
            mesh.run(actions)
        except SteepError as exc:
            exc.queries = list(mesh.queries)  # what was already done (passwords masked)
            raise
        if check_mode:
            after = predicted_summary(members, states, desired, info)
            changed = bool(actions)
        else:
            after_states = mesh.observe(publication)
            after = {i: summary(s) for i, s in after_states.items()}
            changed = after != before or any(
                _published(after_states[i]) != _published(states[i]) for i in after_states)
        return {"changed": changed, "queries": mesh.queries, "warnings": warnings,
                "tables": desired, "nodes": [m.node_id for m in members],
                "removed_nodes": info["removed_nodes"], "skipped_nodes": info["skipped_nodes"], "diff": {"before": before, "after": after}}
