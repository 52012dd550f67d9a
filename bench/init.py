"""Benchmark: node initialisation (playbooks/init_node.yml, snapshot method) vs pg_dump | pg_restore.

One run, one PostgreSQL 18 lab: node1 + node2 are a running steep mesh holding the data (written on node1
through the conflict triggers, so every row has its steep_repl.row_version); node3 is the new, empty node.

* steep init: ``init_node.yml -e steep_init_target=node3 -e steep_init_source=node1`` (parallel_workers
  default 4). Timed: the copy step (first table started -> last table done, from steep_repl.init_progress)
  and the whole playbook.
* baselines, into fresh databases on node3 (same server, same empty start):
  - ``pg_dump -Fc --data-only | pg_restore --data-only`` of the same tables AND steep_repl.row_version into
    a database that already has the tables and the extension (what init moves, into what init copies into);
  - ``pg_dump -Fc | pg_restore`` of the user tables (schema + data, indexes built after the load);
  - ``pg_dump -Fd -j N`` + ``pg_restore -j N`` of the user tables.

Rates use the same basis for every method: user rows, and MB = on-disk size of the user tables on node1.
Ratio = baseline time / init copy time (>= 1.0: init is at least as fast).
``--breakdown`` (default on) re-times one table's copy (nodeinit.copy_table) with parts switched off to show
where the time goes. Writes the "Node initialisation" section of docs/benchmarks.md (between its markers).

    python bench/init.py [--rows 400000] [--tables 4] [--jobs 4] [--no-write]
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / ".collections"))
sys.path.insert(0, str(ROOT / "tests"))

from steeplab import make_lab  # noqa: E402
from _report import publish  # noqa: E402
import mesh  # noqa: E402


def tables_sql(n):
    return ["CREATE TABLE IF NOT EXISTS public.t%d (id bigint PRIMARY KEY, customer integer NOT NULL, "
            "amount numeric(12,2) NOT NULL, status text NOT NULL, note text, created timestamptz NOT NULL DEFAULT now())"
            % i for i in range(n)] + ["CREATE INDEX IF NOT EXISTS t%d_customer ON public.t%d (customer)" % (i, i)
                                      for i in range(n)]


def populate(node, tables, rows):
    per = rows // len(tables)
    for t in tables:
        node.sql("INSERT INTO %s (id, customer, amount, status, note) SELECT g, g %% 5000, (g %% 10000) / 100.0, "
                 "(ARRAY['new','paid','shipped','closed'])[1 + g %% 4], md5(g::text) || md5((g * 7)::text) "
                 "FROM generate_series(1, %d) g" % (t, per))
    node.sql("ANALYZE")
    return per * len(tables)


def kw(node, dbname=None):
    return dict(host=node.host, port=node.port, user=node.user, password=node.password,
                dbname=dbname or node.database, connect_timeout=10)


def env_for(node):
    return dict(os.environ, PGPASSWORD=node.password)


def conn_args(node, dbname=None):
    return ["-h", node.host, "-p", str(node.port), "-U", node.user, "-d", dbname or node.database]


def timed_shell(cmd, env):
    t0 = time.monotonic()
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=env, executable="/bin/bash", check=False)
    if res.returncode != 0:
        raise RuntimeError("%s failed: %s" % (cmd, res.stderr[-2000:]))
    return time.monotonic() - t0


def q(args):
    return " ".join("'%s'" % a.replace("'", "'\\''") for a in args)


def baselines(lab, src, dst, tables, jobs, tmp, tag=0):
    """[(label, seconds)] of the pg_dump / pg_restore variants into fresh databases on dst."""
    env = dict(os.environ, PGPASSWORD=src.password)
    out = []
    tflags = []
    for t in tables:
        tflags += ["-t", t]

    # 1. the same data as init (tables + row versions), into pre-created tables + extension
    lab.create_database(dst, "bench_same_%d" % tag)
    dst.sql("CREATE EXTENSION steep_repl", dbname="bench_same_%d" % tag)
    for stmt in tables_sql(len(tables)):
        dst.sql(stmt, dbname="bench_same_%d" % tag)
    cmd = "%s -Fc --data-only %s %s | %s --data-only %s" % (
        q([src.tool("pg_dump")]), q(conn_args(src)), q(tflags + ["-t", "steep_repl.row_version"]),
        q([dst.tool("pg_restore")]), q(conn_args(dst, "bench_same_%d" % tag)))
    out.append(("pg_dump -Fc --data-only \\| pg_restore --data-only (tables + steep_repl.row_version, into existing "
                "tables)", timed_shell(cmd, env)))
    check_counts(src, dst, tables, "bench_same_%d" % tag)

    # 2. plain user-table dump/restore into an empty database (schema + data, indexes after the load); the
    # source's conflict triggers are left out (-L list without TRIGGER entries): they need the extension
    lab.create_database(dst, "bench_plain_%d" % tag)
    f = Path(tmp) / ("dump%d.fc" % tag)
    lst = Path(tmp) / "notriggers.list"
    nolist = "%s -l %s | grep -v ' TRIGGER ' > %s" % (q([dst.tool("pg_restore")]), q([str(f)]), q([str(lst)]))
    cmd = "%s -Fc -f %s %s %s && %s && %s -L %s %s %s" % (
        q([src.tool("pg_dump")]), q([str(f)]), q(conn_args(src)), q(tflags), nolist,
        q([dst.tool("pg_restore")]), q([str(lst)]), q(conn_args(dst, "bench_plain_%d" % tag)), q([str(f)]))
    out.append(("pg_dump -Fc + pg_restore (user tables, schema + data)", timed_shell(cmd, env)))
    check_counts(src, dst, tables, "bench_plain_%d" % tag)

    # 3. directory format, N jobs each side
    lab.create_database(dst, "bench_dir_%d" % tag)
    d = Path(tmp) / ("dump%d.dir" % tag)
    nolist = "%s -l %s | grep -v ' TRIGGER ' > %s" % (q([dst.tool("pg_restore")]), q([str(d)]), q([str(lst)]))
    cmd = "%s -Fd -j %d -f %s %s %s && %s && %s -j %d -L %s %s %s" % (
        q([src.tool("pg_dump")]), jobs, q([str(d)]), q(conn_args(src)), q(tflags), nolist,
        q([dst.tool("pg_restore")]), jobs, q([str(lst)]), q(conn_args(dst, "bench_dir_%d" % tag)), q([str(d)]))
    out.append(("pg_dump -Fd -j %d + pg_restore -j %d (user tables, schema + data)" % (jobs, jobs), timed_shell(cmd, env)))
    check_counts(src, dst, tables, "bench_dir_%d" % tag)
    return out


def rerun_init_copy(src, dst, tables, workers):
    """The init copy step again (nodeinit.copy_tables, as nodeinit.copy calls it) into emptied tables on node3."""
    from ansible_collections.steep.repl.plugins.module_utils import nodeinit
    conn = dst.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("TRUNCATE %s" % ", ".join(tables))
            cur.execute("DELETE FROM steep_repl.row_version WHERE tbl = ANY (%s)", (tables,))
            cur.execute("CHECKPOINT")
    finally:
        conn.close()
    sconn = nodeinit.connect(kw(src))
    try:
        todo = nodeinit.table_sizes(sconn, tables)
    finally:
        sconn.close()
    t0 = time.monotonic()
    nodeinit.copy_tables(kw(src), kw(dst), todo, "node3", "node1", workers, replace=True)
    took = time.monotonic() - t0
    check_counts(src, dst, tables)
    return took


def check_counts(src, dst, tables, dbname=None):
    for t in tables:
        a = src.sql("SELECT count(*) FROM %s" % t)[0][0]
        b = dst.sql("SELECT count(*) FROM %s" % t, dbname=dbname)[0][0]
        assert a == b, "%s: %s rows on the source, %s copied" % (t, a, b)


def breakdown(src, dst, table, reps=2):
    """Re-time nodeinit.copy_table of one table on the initialised node3 with parts switched off."""
    from ansible_collections.steep.repl.plugins.module_utils import nodeinit
    schema, name = table.split(".")
    triggers = dst.sql("SELECT pg_catalog.format('%%I.%%I', c.relnamespace::regnamespace, c.relname), t.tgname, t.tgenabled "
                       "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal "
                       "AND t.tgrelid IN (%s::regclass, 'steep_repl.row_version'::regclass) ORDER BY 1, 2", (table,))
    out = []

    def record(label, secs, rows):  # best of the repetitions, in first-seen order
        for i, (lab, old, _r) in enumerate(out):
            if lab == label:
                out[i] = (label, min(old, secs), rows)
                return
        out.append((label, secs, rows))

    def run(label):
        for _rep in range(reps):
            dst.sql("TRUNCATE %s" % table)  # empty, as at init time (not timed)
            dst.sql("DELETE FROM steep_repl.row_version WHERE tbl = %s", (table,))
            dst.sql("VACUUM steep_repl.row_version")
            dst.sql("CHECKPOINT")
            t0 = time.monotonic()
            rows = nodeinit.copy_table(kw(src), kw(dst), schema, name, replace=True)
            record(label, time.monotonic() - t0, rows)

    run("copy_table as in init (rows + versions into the emptied table)")
    dst.sql("ALTER TABLE steep_repl.row_version DISABLE TRIGGER USER")
    try:
        run("... with steep_repl.row_version's triggers disabled")
        has_user_trigger = any(t[0] == table and t[1] == "steep_repl_apply" for t in triggers)
        if has_user_trigger:
            dst.sql("ALTER TABLE %s DISABLE TRIGGER steep_repl_apply" % table)
            try:
                run("... and %s's steep_repl_apply trigger disabled too" % table)
            finally:
                dst.sql("ALTER TABLE %s ENABLE REPLICA TRIGGER steep_repl_apply" % table)
    finally:
        for t in triggers:
            if t[0] == "steep_repl.row_version":
                dst.sql("ALTER TABLE steep_repl.row_version ENABLE %sTRIGGER %s"
                        % ({"R": "REPLICA ", "A": "ALWAYS "}.get(t[2], ""), t[1]))
    # the bare data path: nodeinit's own streaming COPY, no triggers, each variant in its own (rolled back)
    # transaction into the emptied table
    vcols = [r[0] for r in dst.sql("SELECT attname FROM pg_attribute WHERE attrelid = 'steep_repl.row_version'::regclass "
                                   "AND attnum > 0 AND NOT attisdropped ORDER BY attnum")]
    noimg = ", ".join(c for c in vcols if c != "img")
    variants = [
        ("bare COPY of the rows only (no versions, no triggers)", "SELECT * FROM %s" % table, "%s" % table, None),
        ("bare COPY of the table's row versions only, its REPLICA trigger firing (as in copy_table)",
         "SELECT * FROM steep_repl.row_version WHERE tbl = %s", "steep_repl.row_version", "REPLICA"),
        ("bare COPY of the table's row versions only (no triggers)",
         "SELECT * FROM steep_repl.row_version WHERE tbl = %s", "steep_repl.row_version", None),
        ("... the same without the img column (the row image)",
         "SELECT %s FROM steep_repl.row_version WHERE tbl = %%s" % noimg, "steep_repl.row_version (%s)" % noimg, None),
        ("... all columns, without the (tbl, pk) primary-key index to maintain",
         "SELECT * FROM steep_repl.row_version WHERE tbl = %s", "steep_repl.row_version",
         "ALTER TABLE steep_repl.row_version DROP CONSTRAINT row_version_pkey"),
    ]
    for _rep in range(reps):
        for label, select, target, pre in variants:
            dst.sql("TRUNCATE %s" % table)
            dst.sql("DELETE FROM steep_repl.row_version WHERE tbl = %s", (table,))
            dst.sql("VACUUM steep_repl.row_version")
            conn_s, conn_d = nodeinit.connect(kw(src), autocommit=False), nodeinit.connect(kw(dst), autocommit=False)
            try:
                with conn_s.cursor() as s, conn_d.cursor() as d:
                    d.execute("SET LOCAL session_replication_role = replica")
                    d.execute("ALTER TABLE %s DISABLE TRIGGER ALL" % table)
                    if pre != "REPLICA":
                        d.execute("ALTER TABLE steep_repl.row_version DISABLE TRIGGER USER")
                    if pre and pre != "REPLICA":
                        d.execute(pre)
                    sel = s.mogrify(select, (table,)).decode() if "%s" in select else select
                    t0 = time.monotonic()
                    rows = nodeinit._stream(s, d, sel, "COPY %s FROM STDIN" % target)
                    record(label, time.monotonic() - t0, rows)
                conn_d.rollback()  # the DDL above too
            finally:
                conn_s.close()
                conn_d.close()
    return out, triggers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400000)
    ap.add_argument("--tables", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-breakdown", action="store_true")
    args, _unknown = ap.parse_known_args()  # bench/run.py passes its arguments to every script

    tmp = tempfile.mkdtemp(prefix="steep-bench-init-")
    os.chmod(tmp, 0o755)  # the lab servers run as the postgres user
    lab = make_lab(Path(tmp) / "lab", 3, (18,))
    tables = ["public.t%d" % i for i in range(args.tables)]
    try:
        src, peer, dst = lab.nodes
        group_vars = {"steep_replicated_tables": tables}
        mesh.build_mesh(lab, tables_sql(args.tables), group_vars, nodes=["node1", "node2"],
                        inventory=Path(tmp) / "inventory.yml")
        t0 = time.monotonic()
        rows = populate(src, tables, args.rows)
        load_s = time.monotonic() - t0
        mesh.wait_converged(lab, "SELECT count(*) FROM steep_repl.row_version", timeout=1800, nodes=["node1", "node2"])
        versions = src.sql("SELECT count(*) FROM steep_repl.row_version")[0][0]
        vsize, imgsize = src.sql("SELECT avg(pg_column_size(v.*))::int, avg(pg_column_size(v.img))::int FROM steep_repl.row_version v")[0]
        rsize = src.sql("SELECT avg(pg_column_size(t.*))::int FROM %s t" % tables[0])[0][0]
        user_bytes = src.sql("SELECT sum(pg_total_relation_size(t::regclass)) FROM unnest(%s::text[]) t", (tables,))[0][0]
        ver_bytes = src.sql("SELECT pg_total_relation_size('steep_repl.row_version')")[0][0]
        for stmt in tables_sql(args.tables):
            dst.sql(stmt)
        inventory = lab.write_inventory(Path(tmp) / "inventory.yml", group_vars=group_vars)

        t0 = time.monotonic()
        res = mesh.run_playbook("init_node.yml", inventory,
                                extra_vars={"steep_init_target": "node3", "steep_init_source": "node1"})
        playbook_s = time.monotonic() - t0
        assert res.rc == 0, res.failure_messages() or res.stdout[-3000:]
        copy_s = float(dst.sql("SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM steep_repl.init_progress "
                               "WHERE target_node = 'node3'")[0][0])
        check_counts(src, dst, tables)
        assert dst.sql("SELECT count(*) FROM steep_repl.row_version")[0][0] == versions
        for n in (src, peer):  # from here on, node3's writes must not travel to the peers (load while timed)
            n.sql("ALTER SUBSCRIPTION steep_from_node3 DISABLE")
        # every figure is the best of --repeat runs (the machine is shared: the best run is the least disturbed)
        init_runs, base_runs = [copy_s], []
        for r in range(args.repeat):
            base_runs.append(baselines(lab, src, dst, tables, args.jobs, tmp, r))
            if r < args.repeat - 1:
                init_runs.append(rerun_init_copy(src, dst, tables, 4))
        copy_s = min(init_runs)
        base = [(label, min(run[i][1] for run in base_runs)) for i, (label, _s) in enumerate(base_runs[0])]
        parts, triggers = ([], []) if args.no_breakdown else breakdown(src, dst, tables[0], args.repeat)
    finally:
        lab.destroy()
        shutil.rmtree(tmp, ignore_errors=True)

    mb = float(user_bytes) / 1048576.0

    def line(label, secs, ref):
        return "| %s | %.2f | %.0f | %.1f | %.2fx |" % (label, secs, rows / secs, mb / secs, ref)

    table = ["| method | seconds | rows/s | MB/s | init speed vs this |", "|---|---|---|---|---|",
             line("**steep init copy step** (init_node.yml, parallel_workers 4; rows + versions)", copy_s, 1.0),
             line("steep init, whole playbook (foundation, conflicts, prepare, copy, finish, ranges)", playbook_s,
                  copy_s / playbook_s)]
    table += [line(label, secs, secs / copy_s) for label, secs in base]
    text = """## Node initialisation

`python bench/init.py --rows {rows} --tables {nt} --jobs {jobs} --repeat {rep}` ({date}, {cpus} CPUs, Python {py}, PostgreSQL 18,
3-node lab). {rows} rows in {nt} tables ({mb:.0f} MB on disk incl. indexes; {versions} row versions, {vmb:.0f} MB)
copied from a running steep node to a new empty node by `playbooks/init_node.yml`, and the same data by
`pg_dump | pg_restore` into fresh databases of the same server, in the same run. Rates: user rows and user-table
MB per second of each method; "init speed vs this" = that method's time / init's copy time (>= 1.0: init is
at least as fast). Every time is the best of {rep} runs (init: the playbook's copy step, then re-runs of the same
`nodeinit.copy_tables` into the emptied tables): the machine is shared, the best run is the least disturbed.
Loading the source through the conflict triggers took {load:.1f} s.

{table}
""".format(rows=rows, nt=args.tables, jobs=args.jobs, date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(),
           py=platform.python_version(), mb=mb, rep=args.repeat, versions=versions, vmb=float(ver_bytes) / 1048576.0, load=load_s,
           table="\n".join(table))
    if parts:
        text += """
Where the copy time goes (one table, `nodeinit.copy_table` re-run on the initialised node, best of {rep}; triggers on
the target: {trg}):

| variant | seconds | rows |
|---|---|---|
{rows}

A row version averages {vsize} bytes ({imgsize} of them the `img` row image) against {rsize} bytes for the user
row itself, so init moves about {ratio:.1f}x the bytes of a dump of the user tables, and maintains the
`(tbl, pk)` text index of `steep_repl.row_version` while loading (pg_restore builds a restored table's indexes
after the load). {trg_effect}
""".format(rep=args.repeat, vsize=vsize, imgsize=imgsize, rsize=rsize, ratio=(rsize + vsize) / float(rsize),
           trg=", ".join("%s.%s (%s)" % tuple(t) for t in triggers) or "none",
           rows="\n".join("| %s | %.2f | %d |" % p for p in parts), trg_effect=trigger_effect(parts))
    publish("init", text, not args.no_write)
    return 0


def trigger_effect(parts):
    full, no_trg = parts[0][1], parts[1][1]
    if no_trg >= 0.9 * full:
        return ("The target's triggers cost nothing measurable here (the copy with them disabled took %.2f s vs %.2f s)."
                % (no_trg, full))
    return "The target's triggers cost %.0f %% of the copy (%.2f s with them disabled vs %.2f s)." % (
        100.0 * (full - no_trg) / full, no_trg, full)


if __name__ == "__main__":
    sys.exit(main())
