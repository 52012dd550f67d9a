# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Database access shared by the steep.repl modules and the agent.

One home for: connection parameters (the inventory contract), connecting with
errors that name the fix, server prerequisite checks, identifier quoting, and
the ``SqlState`` recorder that runs or (in check mode) only records SQL.
Nothing here imports Ansible, so the agent uses it as is.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re

try:
    import psycopg2
    import psycopg2.extras
    HAS_PSYCOPG2 = True
    PSYCOPG2_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - reported by the modules
    psycopg2 = None
    HAS_PSYCOPG2 = False
    PSYCOPG2_IMPORT_ERROR = exc

SUPPORTED_MAJORS = (17, 18)
NODE_ID_RE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
PASSWORD_ENV = "STEEP_PG_PASSWORD"


class SteepError(Exception):
    """An error whose message names the problem and the fix."""


def connection_argument_spec():
    """The connection options every database module takes (inventory contract)."""
    return dict(
        login_host=dict(type="str", default="127.0.0.1", aliases=["steep_pg_host", "host"]),
        login_port=dict(type="int", default=5432, aliases=["steep_pg_port", "port"]),
        login_user=dict(type="str", default="postgres", aliases=["steep_pg_user", "user"]),
        login_password=dict(type="str", no_log=True, aliases=["steep_pg_password", "password"]),
        login_db=dict(type="str", default="postgres", aliases=["steep_pg_database", "db", "database"]),
        connect_timeout=dict(type="int", default=10),
        ssl_mode=dict(type="str", default="prefer",
                      choices=["allow", "disable", "prefer", "require", "verify-ca", "verify-full"]),
        ca_cert=dict(type="path", aliases=["ssl_rootcert"]),
    )


def conn_params_from(params):
    """Connection keyword arguments from module params (password also from env)."""
    password = params.get("login_password")
    if password is None:
        password = os.environ.get(PASSWORD_ENV)
    kw = dict(host=params.get("login_host") or "127.0.0.1",
              port=int(params.get("login_port") or 5432),
              user=params.get("login_user") or "postgres",
              dbname=params.get("login_db") or "postgres",
              connect_timeout=int(params.get("connect_timeout") or 10),
              sslmode=params.get("ssl_mode") or "prefer",
              application_name="steep.repl")
    if password:
        kw["password"] = password
    if params.get("ca_cert"):
        kw["sslrootcert"] = params["ca_cert"]
    return kw


def describe(kw):
    """Where a connection goes, without the password (safe to log or return)."""
    return "%s@%s:%s/%s" % (kw.get("user"), kw.get("host"), kw.get("port"), kw.get("dbname"))


def connect(kw, autocommit=True):
    """Connect; translate libpq failures into messages that name the fix."""
    if not HAS_PSYCOPG2:
        raise SteepError("psycopg2 is required on the host that runs this task; "
                         "install it with: pip install psycopg2-binary")
    try:
        conn = psycopg2.connect(**kw)
    except psycopg2.OperationalError as exc:
        raise SteepError(explain_connect_error(str(exc), kw))
    conn.autocommit = autocommit
    return conn


def explain_connect_error(message, kw):
    where = describe(kw)
    low = message.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        return ("cannot log in to %s: password authentication failed for user %s. Fix: set "
                "steep_pg_password (or the %s environment variable) to the role's password."
                % (where, kw.get("user"), PASSWORD_ENV))
    if "does not exist" in low and "database" in low:
        return ("cannot connect to %s: database %r does not exist. Fix: create it or set "
                "steep_pg_database to an existing database." % (where, kw.get("dbname")))
    if "role" in low and "does not exist" in low:
        return ("cannot connect to %s: role %r does not exist. Fix: set steep_pg_user to an "
                "existing superuser." % (where, kw.get("user")))
    if ("could not connect" in low or "connection refused" in low or "timeout" in low
            or "could not translate host name" in low or "no route to host" in low):
        return ("PostgreSQL at %s:%s is unreachable (%s). Fix: check that the server runs, "
                "listens on that address (listen_addresses, port) and that steep_pg_host/"
                "steep_pg_port are right."
                % (kw.get("host"), kw.get("port"), message.strip().splitlines()[0]))
    return "cannot connect to %s: %s" % (where, message.strip())


def quote_ident(name):
    """Quote one SQL identifier."""
    return '"' + str(name).replace('"', '""') + '"'


def quote_qualified(name):
    """Quote ``schema.table`` (split on the first dot) as two identifiers."""
    schema, _dot, table = split_qualified(name)
    return "%s.%s" % (quote_ident(schema), quote_ident(table))


def split_qualified(name, default_schema="public"):
    if "." in name:
        schema, table = name.split(".", 1)
    else:
        schema, table = default_schema, name
    return schema, ".", table


def validate_node_id(node_id):
    if not isinstance(node_id, str) or not NODE_ID_RE.match(node_id):
        raise SteepError("node id %r is not a valid identifier. Fix: use 1-40 characters, "
                         "lower-case letters, digits and '_', starting with a letter or '_' "
                         "(e.g. node_a)." % (node_id,))
    return node_id


def fetch_all(conn, query, args=None):
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(query, args)
        return [dict(r) for r in cur.fetchall()] if cur.description else []


def fetch_one(conn, query, args=None):
    rows = fetch_all(conn, query, args)
    return rows[0] if rows else None


def fetch_value(conn, query, args=None):
    with conn.cursor() as cur:
        cur.execute(query, args)
        row = cur.fetchone()
        return row[0] if row else None


def server_major(conn):
    return int(fetch_value(conn, "SHOW server_version_num")) // 10000


def check_server(conn, require_logical=True, require_commit_ts=True):
    """Raise SteepError naming the fix when the server cannot run steep.repl."""
    major = server_major(conn)
    if major not in SUPPORTED_MAJORS:
        raise SteepError("PostgreSQL %s is not supported: steep.repl needs PostgreSQL %s. "
                         "Fix: upgrade the server." % (
                             fetch_value(conn, "SHOW server_version"),
                             " or ".join(str(m) for m in SUPPORTED_MAJORS)))
    if require_logical:
        wal_level = fetch_value(conn, "SHOW wal_level")
        if wal_level != "logical":
            raise SteepError("wal_level is %r: logical replication needs 'logical'. Fix: "
                             "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL."
                             % (wal_level,))
    if require_commit_ts:
        if fetch_value(conn, "SHOW track_commit_timestamp") != "on":
            raise SteepError("track_commit_timestamp is off: conflict resolution needs commit "
                             "timestamps. Fix: ALTER SYSTEM SET track_commit_timestamp = on; then "
                             "restart PostgreSQL.")
    return major


def extension_version(conn):
    """Installed steep_repl version, or None."""
    return fetch_value(conn, "SELECT extversion FROM pg_catalog.pg_extension "
                             "WHERE extname = 'steep_repl'")


class SqlState:
    """Runs SQL, or in check mode only records it; ``queries`` is returned to the user.

    ``changed`` is never set here: modules compute it from real before/after state.
    """

    def __init__(self, conn, check_mode=False):
        self.conn = conn
        self.check_mode = check_mode
        self.queries = []

    def execute(self, query, args=None):
        text = query
        if args is not None:
            with self.conn.cursor() as cur:
                text = cur.mogrify(query, args).decode()
        self.queries.append(text)
        if self.check_mode:
            return []
        with self.conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(query, args)
            return [dict(r) for r in cur.fetchall()] if cur.description else []
