# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Schema sync of a node being initialised (``schema_sync``: strict | auto | manual).

Native logical replication matches columns BY NAME, in both directions of an
active-active mesh. So, per replicated table, the target must have exactly the
source's columns (order does not matter):

* a column missing on the target breaks source -> target (the apply worker stops with
  "missing replicated column");
* an extra column on the target breaks target -> every peer the same way (and the init
  copy, which selects the target's columns from the source);
* a different type, default or nullability replicates (values travel as text) but
  lets the nodes disagree (a row the source accepts may fail on the target).

``plan()`` is pure: from the catalog rows of both sides it derives the DDL that makes
the target match, and what cannot be fixed safely (with the DDL to run by hand).
``apply()`` reads the catalogs, creates missing tables from the source's definition
(``pg_dump --schema-only``, without the source's triggers and publication entries:
the mesh module installs those), and runs the DDL on the target in ONE transaction:
all or nothing. ``sync()`` implements the three modes on top of them.

No Ansible imports: the modules and the agent both use this file.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os
import re
import shutil
import subprocess
import tempfile

from ansible_collections.steep.repl.plugins.module_utils.db import (
    SteepError, fetch_all, fetch_value, quote_ident, quote_qualified,
)

MODES = ("strict", "auto", "manual")

COLUMNS_SQL = """
SELECT n.nspname || '.' || c.relname AS tbl, a.attnum, a.attname AS name,
       pg_catalog.format_type(a.atttypid, a.atttypmod) AS type,
       CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
            THEN pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname) END AS collation,
       CASE WHEN a.attgenerated = '' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END AS "default",
       a.attnotnull AS not_null, a.attidentity::text AS identity, a.attgenerated::text AS generated,
       CASE WHEN a.attgenerated <> '' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END AS generation
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
  LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
  LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
 WHERE c.relkind IN ('r', 'p') AND (n.nspname || '.' || c.relname) = ANY (%s)
 ORDER BY 1, a.attnum"""

# Type changes that keep every existing value (safe on a table that holds rows).
_WIDER = {
    "smallint": ("integer", "bigint", "numeric", "real", "double precision"),
    "integer": ("bigint", "numeric"),
    "bigint": ("numeric",),
    "real": ("double precision",),
    "character varying": ("text",),
    "character": ("text", "character varying"),
}
_TYPMOD = re.compile(r"^(?P<base>[a-z ]+?)(?:\((?P<mod>[0-9, ]+)\))?(?P<arr>(\[\])*)$")


# --------------------------------------------------------------------------- pure planning
def _qual(table):
    return quote_qualified(table)


def column_sql(col):
    """The column definition of ``col`` (a COLUMNS_SQL row) for ADD COLUMN / CREATE TABLE."""
    parts = [quote_ident(col["name"]), col["type"]]
    if col.get("collation"):
        parts.append("COLLATE %s" % col["collation"])
    if col.get("generated"):
        parts.append("GENERATED ALWAYS AS (%s) %s" % (col["generation"], "VIRTUAL" if col["generated"] == "v" else "STORED"))
    elif col.get("identity"):
        parts.append("GENERATED %s AS IDENTITY" % ("ALWAYS" if col["identity"] == "a" else "BY DEFAULT"))
    elif col.get("default") is not None:
        parts.append("DEFAULT %s" % col["default"])
    if col.get("not_null") and not col.get("identity"):
        parts.append("NOT NULL")
    return " ".join(parts)


def widens(old, new):
    """True when every value of type ``old`` converts to ``new`` unchanged (format_type spellings)."""
    if old == new:
        return True
    mo, mn = _TYPMOD.match(old or ""), _TYPMOD.match(new or "")
    if not mo or not mn or mo.group("arr") != mn.group("arr"):
        return False
    bo, bn = mo.group("base").strip(), mn.group("base").strip()
    if bo == bn:
        if bo in ("character varying", "character", "bit varying"):  # longer (or unlimited) length
            return mn.group("mod") is None or (mo.group("mod") is not None and int(mn.group("mod")) >= int(mo.group("mod")))
        if bo == "numeric":
            if mn.group("mod") is None:
                return True
            if mo.group("mod") is None:
                return False
            po, so = ([int(x) for x in mo.group("mod").split(",")] + [0])[:2]
            pn, sn = ([int(x) for x in mn.group("mod").split(",")] + [0])[:2]
            return sn >= so and pn - sn >= po - so
        return False
    return bn in _WIDER.get(bo, ())


def plan_table(table, source_columns, target_columns, target_empty=True):
    """DDL that makes ``table`` on the target match the source, and what cannot be fixed.

    ``source_columns`` / ``target_columns``: lists of dicts with keys name, type, collation,
    default, not_null, identity ('' | 'a' | 'd'), generated ('' | 's' | 'v'), generation
    (the rows of COLUMNS_SQL). ``target_empty``: the target table holds no row (then every
    change is safe; otherwise only changes that keep the existing rows are planned).

    Returns ``(ddl, unfixable, differences)``: statements to run on the target in order;
    messages naming the statement(s) to run by hand; every difference found, in words.
    Column order is ignored: replication matches columns by name.
    """
    q = _qual(table)
    src = {c["name"]: c for c in source_columns}
    tgt = {c["name"]: c for c in target_columns}
    ddl, unfixable, diffs = [], [], []
    for col in source_columns:
        name = col["name"]
        qc = quote_ident(name)
        if name not in tgt:
            diffs.append("%s: column %s (%s) is missing on the target" % (table, name, col["type"]))
            add = "ALTER TABLE %s ADD COLUMN %s" % (q, column_sql(col))
            if col["not_null"] and col.get("default") is None and not col.get("identity") and not col.get("generated") \
                    and not target_empty:
                unfixable.append(
                    "%s: column %s is NOT NULL without a default on the source, and the target's table holds rows, "
                    "so it cannot be added automatically. Run by hand on the target: ALTER TABLE %s ADD COLUMN %s; "
                    "UPDATE %s SET %s = <value>; ALTER TABLE %s ALTER COLUMN %s SET NOT NULL; (or empty the table)"
                    % (table, name, q, column_sql(dict(col, not_null=False)), q, qc, q, qc))
            else:
                ddl.append(add)
            continue
        cur = tgt[name]
        if (col.get("generated") or "") != (cur.get("generated") or "") or \
                (col.get("generated") and col.get("generation") != cur.get("generation")):
            diffs.append("%s: column %s is %s on the source, %s on the target" % (
                table, name, _gen_words(col), _gen_words(cur)))
            unfixable.append("%s: column %s differs in its generation expression, which is not changed "
                             "automatically. Run by hand on the target: ALTER TABLE %s DROP COLUMN %s; "
                             "ALTER TABLE %s ADD COLUMN %s;" % (table, name, q, qc, q, column_sql(col)))
            continue
        if (col["type"], col.get("collation")) != (cur["type"], cur.get("collation")):
            diffs.append("%s: column %s is %s on the source, %s on the target" % (
                table, name, _type_words(col), _type_words(cur)))
            alter = "ALTER TABLE %s ALTER COLUMN %s TYPE %s%s USING %s::%s" % (
                q, qc, col["type"], " COLLATE %s" % col["collation"] if col.get("collation") else "", qc, col["type"])
            if target_empty or (col.get("collation") == cur.get("collation") and widens(cur["type"], col["type"])):
                ddl.append(alter)
            else:
                unfixable.append("%s: column %s cannot change from %s to %s automatically while the target's table "
                                 "holds rows (values could be lost or rejected). Run by hand on the target after "
                                 "checking the data: %s; (or empty the table)" % (table, name, cur["type"], col["type"], alter))
        if (col.get("identity") or "") != (cur.get("identity") or ""):
            diffs.append("%s: column %s identity is %r on the source, %r on the target" % (
                table, name, col.get("identity") or "none", cur.get("identity") or "none"))
            if not cur.get("identity"):
                if cur.get("default") is not None:
                    ddl.append("ALTER TABLE %s ALTER COLUMN %s DROP DEFAULT" % (q, qc))
                if not cur["not_null"]:
                    ddl.append("ALTER TABLE %s ALTER COLUMN %s SET NOT NULL" % (q, qc))
                ddl.append("ALTER TABLE %s ALTER COLUMN %s ADD GENERATED %s AS IDENTITY" % (
                    q, qc, "ALWAYS" if col["identity"] == "a" else "BY DEFAULT"))
                continue
            if not col.get("identity"):
                ddl.append("ALTER TABLE %s ALTER COLUMN %s DROP IDENTITY" % (q, qc))
                cur = dict(cur, identity="", default=None)
            else:
                ddl.append("ALTER TABLE %s ALTER COLUMN %s SET GENERATED %s" % (
                    q, qc, "ALWAYS" if col["identity"] == "a" else "BY DEFAULT"))
                continue
        if not col.get("identity") and not col.get("generated") and col.get("default") != cur.get("default"):
            diffs.append("%s: column %s default is %s on the source, %s on the target" % (
                table, name, col.get("default") or "none", cur.get("default") or "none"))
            if col.get("default") is None:
                ddl.append("ALTER TABLE %s ALTER COLUMN %s DROP DEFAULT" % (q, qc))
            else:
                ddl.append("ALTER TABLE %s ALTER COLUMN %s SET DEFAULT %s" % (q, qc, col["default"]))
        if bool(col["not_null"]) != bool(cur["not_null"]) and not col.get("identity"):
            diffs.append("%s: column %s is %s on the source, %s on the target" % (
                table, name, "NOT NULL" if col["not_null"] else "nullable", "NOT NULL" if cur["not_null"] else "nullable"))
            # SET NOT NULL on a table with rows fails cleanly (whole transaction) if a NULL is there
            ddl.append("ALTER TABLE %s ALTER COLUMN %s %s NOT NULL" % (q, qc, "SET" if col["not_null"] else "DROP"))
    for col in target_columns:
        name = col["name"]
        if name in src:
            continue
        diffs.append("%s: column %s (%s) exists only on the target" % (table, name, col["type"]))
        drop = "ALTER TABLE %s DROP COLUMN %s" % (q, quote_ident(name))
        if target_empty:
            ddl.append(drop)  # nothing to lose: the table is empty
        else:
            unfixable.append("%s: column %s exists only on the target, whose table holds rows; the target's changes "
                             "would fail to apply on every peer (missing replicated column) and the copy cannot fill "
                             "it. Run by hand on the target: %s; (or add the column on every node of the mesh first)"
                             % (table, name, drop))
    return ddl, unfixable, diffs


def _type_words(col):
    return col["type"] + (" COLLATE %s" % col["collation"] if col.get("collation") else "")


def _gen_words(col):
    if not col.get("generated"):
        return "a plain column"
    return "generated (%s) %s" % (col.get("generation"), "VIRTUAL" if col["generated"] == "v" else "STORED")


def plan(source, target, tables=None, nonempty=()):
    """Plan every table. ``source`` / ``target``: {table: [columns]} (see plan_table);
    a table absent from ``target`` is to be created. ``nonempty``: target tables holding rows.

    Returns {"create": [tables], "ddl": [...], "unfixable": [...], "differences": [...]}.
    """
    out = {"create": [], "ddl": [], "unfixable": [], "differences": []}
    for table in sorted(tables if tables is not None else source):
        if table not in source:
            out["unfixable"].append("%s: missing on the source. Fix: create it there or remove it from the "
                                    "replicated tables." % table)
            continue
        if table not in target:
            out["create"].append(table)
            out["differences"].append("%s: table absent on the target" % table)
            continue
        ddl, unfixable, diffs = plan_table(table, source[table], target[table], table not in nonempty)
        out["ddl"] += ddl
        out["unfixable"] += unfixable
        out["differences"] += diffs
    return out


# --------------------------------------------------------------------------- catalogs and DDL
def read_columns(conn, tables):
    """{table: [columns]} for the ``schema.table`` names that exist (COLUMNS_SQL rows, in attnum order)."""
    out = {}
    for r in fetch_all(conn, COLUMNS_SQL, (list(tables),)):
        r["identity"] = r["identity"] or ""
        r["generated"] = r["generated"] or ""
        out.setdefault(r.pop("tbl"), []).append(r)
    return out


def nonempty_tables(conn, tables):
    return [t for t in tables if fetch_value(conn, "SELECT EXISTS (SELECT 1 FROM %s)" % _qual(t))]


def _pg_tool(conn, name):
    bindir = fetch_value(conn, "SELECT setting FROM pg_catalog.pg_config() WHERE name = 'BINDIR'")
    path = os.path.join(bindir or "", name)
    if bindir and os.access(path, os.X_OK):
        return path
    return shutil.which(name)


def create_table_sql(source_conn, tables):
    """CREATE TABLE (with keys, indexes, constraints, owned sequences) of ``tables`` from the source,
    via ``pg_dump --schema-only``; without triggers and publication entries (the source's conflict
    triggers call per-node functions; steep.repl.replication installs both on the target)."""
    pg_dump, pg_restore = _pg_tool(source_conn, "pg_dump"), _pg_tool(source_conn, "pg_restore")
    if not pg_dump or not pg_restore:
        raise SteepError("schema_sync=auto needs pg_dump and pg_restore (next to the source server or on PATH) to "
                         "create %s on the target. Fix: create the tables on the target by hand, or install the "
                         "PostgreSQL client tools on the controller." % ", ".join(tables))
    params = source_conn.get_dsn_parameters()
    env = dict(os.environ)
    password = getattr(getattr(source_conn, "info", None), "password", None)
    if password:
        env["PGPASSWORD"] = password
    cmd = [pg_dump, "--schema-only", "--no-owner", "--no-privileges", "-Fc",
           "-h", params.get("host", "127.0.0.1"), "-p", str(params.get("port", 5432)),
           "-U", params.get("user", "postgres"), "-d", params.get("dbname", "postgres")]
    for t in tables:
        cmd += ["-t", quote_qualified(t)]
    dump = subprocess.run(cmd, capture_output=True, env=env, check=False)
    if dump.returncode != 0:
        raise SteepError("pg_dump --schema-only of %s on the source failed: %s" % (
            ", ".join(tables), dump.stderr.decode(errors="replace").strip()))
    listing = subprocess.run([pg_restore, "-l"], input=dump.stdout, capture_output=True, check=False)
    skip = re.compile(r"\d+; \d+ \d+ (TRIGGER|PUBLICATION TABLE|EVENT TRIGGER|POLICY|ROW SECURITY|STATISTICS DATA) ")
    keep = [line for line in listing.stdout.decode().splitlines()
            if line and not line.startswith(";") and not skip.match(line)]
    with tempfile.NamedTemporaryFile("w", suffix=".list", delete=False) as fh:
        fh.write("\n".join(keep) + "\n")
        listfile = fh.name
    try:
        sql = subprocess.run([pg_restore, "--no-owner", "--no-privileges", "-L", listfile, "-f", "-"], input=dump.stdout, capture_output=True, check=False)
    finally:
        os.unlink(listfile)
    if sql.returncode != 0:
        raise SteepError("pg_restore of the schema of %s failed: %s" % (", ".join(tables), sql.stderr.decode().strip()))
    # session settings and psql meta-commands (\restrict) are not statements: every name is qualified
    lines = [line for line in sql.stdout.decode().splitlines()
             if line.strip() and not line.startswith(("SET ", "\\", "--", "SELECT pg_catalog.set_config('search_path'"))]
    return "\n".join(lines).strip()


def apply(source_conn, target_conn, tables, check_mode=False, plan_only=False):
    """Make the target's ``tables`` match the source's: create the missing ones, alter the others.

    Nothing is changed when anything is unfixable (or in ``check_mode`` / ``plan_only``); otherwise
    every statement runs in ONE target transaction (all or nothing).
    Returns {"changed", "ddl" (all statements), "alter" (the ALTERs only), "unfixable", "differences",
    "created" (tables to create), "altered" (tables to alter)}.
    """
    tables = list(tables)
    src_cols = read_columns(source_conn, tables)
    tgt_cols = read_columns(target_conn, tables)
    nonempty = nonempty_tables(target_conn, [t for t in tables if t in tgt_cols])
    p = plan(src_cols, tgt_cols, tables, nonempty)
    ddl = list(p["ddl"])
    if p["create"] and not p["unfixable"] and not plan_only:  # pg_dump only reads: fine in check mode
        ddl = [create_table_sql(source_conn, p["create"])] + ddl
    result = {"changed": bool(ddl) and not p["unfixable"], "ddl": ddl, "alter": p["ddl"], "unfixable": p["unfixable"],
              "differences": p["differences"], "created": p["create"],
              "altered": sorted({d.split(": ", 1)[0] for d in p["differences"]} - set(p["create"]))}
    if p["unfixable"] or check_mode or plan_only or not ddl:
        if p["unfixable"]:
            result["changed"] = False
        return result
    _run_in_transaction(target_conn, ddl)
    return result


def _run_in_transaction(conn, statements):
    own = conn.autocommit
    with conn.cursor() as cur:
        cur.execute("BEGIN" if own else "SAVEPOINT steep_schemasync")
        for stmt in statements:
            try:
                cur.execute(stmt)
            except Exception as exc:
                cur.execute("ROLLBACK" if own else "ROLLBACK TO SAVEPOINT steep_schemasync")
                raise SteepError("schema sync failed on the target (nothing was changed) at: %s -- %s. Fix: run the "
                                 "statement by hand after fixing the cause, or make the table identical yourself."
                                 % (" ".join(stmt.split())[:300], str(exc).strip().splitlines()[0]))
        cur.execute("COMMIT" if own else "RELEASE SAVEPOINT steep_schemasync")


def sync(source_conn, target_conn, tables, mode="strict", check_mode=False, target_id="target", source_id="source"):
    """The ``schema_sync`` modes for a node being initialised.

    * strict: any difference -> ``failed`` (a reason listing them); nothing changed.
    * auto: the target is made to match (``apply``); anything unfixable -> ``failed`` with the
      statements to run by hand; nothing changed then.
    * manual: differences -> ``warnings``; nothing changed.

    Returns {"failed": reason or None, "warnings": [...], "created": [...], "ddl": [...],
    "unfixable": [...], "differences": [...], "changed": bool}.
    """
    if mode not in MODES:
        raise SteepError("schema_sync must be one of %s, got %r" % (", ".join(MODES), mode))
    res = apply(source_conn, target_conn, tables, check_mode=check_mode, plan_only=(mode != "auto"))
    res.update(failed=None, warnings=[])
    if not res["differences"] and not res["unfixable"]:
        return res
    listing = "; ".join(res["differences"] or res["unfixable"]).replace("on the target", "on %s" % target_id)
    todo = ["CREATE TABLE %s (as on %s)" % (t, source_id) for t in res["created"]] + res["alter"]
    if mode == "manual":
        res["warnings"].append("schemas of %s and %s differ (schema_sync=manual, continuing; replication stops "
                               "on a missing or extra column): %s" % (target_id, source_id, listing))
        res.update(changed=False, ddl=[], created=[])
    elif mode == "strict":
        fix = "; ".join(res["unfixable"]) if res["unfixable"] else "run on %s: %s" % (target_id, "; ".join(todo))
        res["failed"] = ("schema of %s differs from %s: %s. Fix: make the target's tables identical (%s), or re-run "
                         "with steep_init_schema_sync=auto." % (target_id, source_id, listing, fix))
        res.update(changed=False, ddl=[], created=[])
    elif res["unfixable"]:
        res["failed"] = ("schema of %s differs from %s and schema_sync=auto cannot fix everything safely, so nothing "
                         "was changed: %s The rest it would do: %s"
                         % (target_id, source_id, " ".join(res["unfixable"]), "; ".join(todo) or "nothing"))
    elif res["ddl"]:
        res["warnings"].append("schema_sync=auto %s on %s: %s" % ("would run" if check_mode else "ran", target_id,
                                                                  "; ".join(todo)))
    return res
