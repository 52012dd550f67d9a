#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: info
short_description: Report the steep.repl state of one PostgreSQL database
description:
  - Read-only; never changes anything (C(changed) is always false) and runs the same in check mode.
  - Returns the server version and settings, the C(steep_repl) extension version, the node registry and the local node,
    publications, subscriptions (with C(pg_stat_subscription) and C(pg_stat_subscription_stats), e.g.
    C(apply_error_count)), replication slots and, when the extension provides them, identity ranges, conflict counts
    and the DDL queue depth.
  - Subscription connection strings are never returned (they may hold a password); C(peer) has the
    host, port, database and user only.
version_added: "1.1.0"
author:
  - steep.repl contributors (@steep-repl)
extends_documentation_fragment:
  - steep.repl.connection
options: {}
"""

EXAMPLES = r"""
- name: Read the steep.repl state of every node
  steep.repl.info:
    login_host: "{{ steep_pg_host }}"
    login_port: "{{ steep_pg_port }}"
    login_password: "{{ steep_pg_password }}"
    login_db: "{{ steep_pg_database }}"
  delegate_to: localhost
  register: steep_info

- name: Fail when a subscription has apply errors
  ansible.builtin.assert:
    that: steep_info.subscriptions | map(attribute='apply_error_count') | select('gt', 0) | list | length == 0
"""

RETURN = r"""
server:
  description: C(version), C(major), C(wal_level), C(track_commit_timestamp) of the server.
  returned: always
  type: dict
  sample: {version: "18.1", major: 18, wal_level: logical, track_commit_timestamp: "on"}
extension:
  description: C(installed), C(version), C(default_version) (newest the server's files provide), C(available_versions).
  returned: always
  type: dict
  sample: {installed: true, version: "1.1", default_version: "1.1", available_versions: ["1.0", "1.1"]}
local_node_id:
  description: The node id registered as local in this database (null when none).
  returned: always
  type: str
nodes:
  description: Every row of C(steep_repl.nodes) (all columns).
  returned: always
  type: list
  elements: dict
publications:
  description: Publications of the database (C(name), C(all_tables), C(tables) as C(schema.table)).
  returned: always
  type: list
  elements: dict
subscriptions:
  description:
    - Subscriptions of the database - C(name), C(enabled), C(origin), C(slot_name), C(publications), C(peer)
      (host/port/dbname/user), C(worker_pid), C(received_lsn), C(latest_end_time), C(lag_seconds),
      C(apply_error_count), C(sync_error_count) and, on PostgreSQL 18, the C(confl_*) counters.
  returned: always
  type: list
  elements: dict
replication_slots:
  description: Replication slots of the server (C(slot_name), C(plugin), C(slot_type), C(database), C(active),
    C(confirmed_flush_lsn), C(wal_status), C(retained_bytes)).
  returned: always
  type: list
  elements: dict
identity_ranges:
  description: Rows of C(steep_repl.identity_ranges) (empty when the extension is missing).
  returned: always
  type: list
  elements: dict
conflicts:
  description: C(pending) and C(total) rows of C(steep_repl.conflict_log) (null when the extension is missing).
  returned: always
  type: dict
  sample: {pending: 0, total: 3}
ddl_queue:
  description: C(pending) rows and C(total) rows of C(steep_repl.ddl_queue) (null when the extension is missing).
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.steep.repl.plugins.module_utils import db
from ansible_collections.steep.repl.plugins.module_utils import nodes
from ansible_collections.steep.repl.plugins.module_utils.runner import run_on_node

PEER_KEYS = ("host", "hostaddr", "port", "dbname", "user")


def relation_exists(conn, name):
    return db.fetch_value(conn, "SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (name,))


def peer_of(conninfo):
    """host/port/dbname/user of a conninfo; never the password."""
    try:
        parsed = db.psycopg2.extensions.parse_dsn(conninfo or "")
    except db.psycopg2.Error:
        return {}
    return dict((k, parsed[k]) for k in PEER_KEYS if k in parsed)


def server_facts(conn):
    return dict(version=db.fetch_value(conn, "SHOW server_version"), major=db.server_major(conn),
                wal_level=db.fetch_value(conn, "SHOW wal_level"),
                track_commit_timestamp=db.fetch_value(conn, "SHOW track_commit_timestamp"))


def extension_facts(conn):
    versions = [r["version"] for r in db.fetch_all(
        conn, "SELECT version FROM pg_catalog.pg_available_extension_versions WHERE name = 'steep_repl' "
              "ORDER BY version")]
    default = db.fetch_value(conn, "SELECT default_version FROM pg_catalog.pg_available_extensions "
                                   "WHERE name = 'steep_repl'")
    version = db.extension_version(conn)
    return dict(installed=version is not None, version=version, default_version=default,
                available_versions=versions)


def publications(conn):
    rows = db.fetch_all(conn, """
        SELECT p.pubname AS name, p.puballtables AS all_tables,
               coalesce((SELECT pg_catalog.array_agg(t.schemaname || '.' || t.tablename ORDER BY 1)
                           FROM pg_catalog.pg_publication_tables t WHERE t.pubname = p.pubname), '{}') AS tables
          FROM pg_catalog.pg_publication p ORDER BY p.pubname""")
    return rows


def subscriptions(conn):
    rows = db.fetch_all(conn, """
        SELECT s.oid AS subid, s.subname AS name, s.subenabled AS enabled, s.suborigin AS origin,
               s.subslotname AS slot_name, s.subpublications AS publications, s.subconninfo AS conninfo
          FROM pg_catalog.pg_subscription s
         WHERE s.subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
         ORDER BY s.subname""")
    out = []
    for r in rows:
        sub = dict(name=r["name"], enabled=r["enabled"], origin=r["origin"], slot_name=r["slot_name"],
                   publications=list(r["publications"] or []), peer=peer_of(r.pop("conninfo")))
        st = db.fetch_one(conn, """
            SELECT st.pid AS worker_pid, st.received_lsn::text AS received_lsn,
                   st.latest_end_time::text AS latest_end_time,
                   EXTRACT(EPOCH FROM pg_catalog.now() - st.latest_end_time)::float8 AS lag_seconds
              FROM pg_catalog.pg_stat_subscription st
             WHERE st.subid = %s AND st.relid IS NULL
             ORDER BY st.pid NULLS LAST LIMIT 1""", (r["subid"],)) or {}
        sub.update(worker_pid=st.get("worker_pid"), received_lsn=st.get("received_lsn"),
                   latest_end_time=st.get("latest_end_time"), lag_seconds=st.get("lag_seconds"))
        stats = db.fetch_one(conn, "SELECT pg_catalog.to_jsonb(s) AS j FROM pg_catalog.pg_stat_subscription_stats s "
                                   "WHERE s.subid = %s", (r["subid"],))
        counters = dict((k, v) for k, v in ((stats or {}).get("j") or {}).items()
                        if k.endswith("_count") or k.startswith("confl_"))
        sub["apply_error_count"] = counters.pop("apply_error_count", 0)
        sub["sync_error_count"] = counters.pop("sync_error_count", 0)
        sub.update(counters)
        out.append(sub)
    return out


def replication_slots(conn):
    return db.fetch_all(conn, """
        SELECT slot_name, plugin, slot_type, database, active, confirmed_flush_lsn::text AS confirmed_flush_lsn,
               wal_status,
               CASE WHEN pg_catalog.pg_is_in_recovery() OR restart_lsn IS NULL THEN NULL
                    ELSE pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::bigint END
                 AS retained_bytes
          FROM pg_catalog.pg_replication_slots ORDER BY slot_name""")


def gather(conn):
    facts = dict(changed=False, server=server_facts(conn), extension=extension_facts(conn), local_node_id=None,
                 nodes=[], publications=publications(conn), subscriptions=subscriptions(conn),
                 replication_slots=replication_slots(conn), identity_ranges=[], conflicts=None, ddl_queue=None)
    if facts["extension"]["installed"]:
        facts["nodes"] = nodes.list_nodes(conn)
        facts["local_node_id"] = next((n["node_id"] for n in facts["nodes"] if n.get("is_local")), None)
        if relation_exists(conn, "steep_repl.identity_ranges"):
            facts["identity_ranges"] = [r["r"] for r in db.fetch_all(
                conn, "SELECT pg_catalog.to_jsonb(r) AS r FROM steep_repl.identity_ranges r "
                      "ORDER BY table_schema, table_name, node_id, range_start")]
        if relation_exists(conn, "steep_repl.conflict_log"):
            facts["conflicts"] = db.fetch_one(
                conn, "SELECT count(*) FILTER (WHERE resolution = 'PENDING') AS pending, count(*) AS total "
                      "FROM steep_repl.conflict_log")
        if relation_exists(conn, "steep_repl.ddl_queue"):
            facts["ddl_queue"] = db.fetch_one(
                conn, "SELECT count(*) FILTER (WHERE status = 'PENDING') AS pending, count(*) AS total "
                      "FROM steep_repl.ddl_queue")
    return facts


def main():
    module = AnsibleModule(argument_spec=db.connection_argument_spec(), supports_check_mode=True)
    # Read-only in every mode: a read-only session guards against any write.
    run_on_node(module, lambda _module, conn: gather(conn), "reading the steep.repl state (steep.repl.info)",
                readonly=True)


if __name__ == "__main__":
    main()
