"""Conflict-engine benchmark (issue #3): apply throughput of steep vs native logical replication on
the same workloads, and conflict-resolution throughput, side by side in ONE run on a real 2-node lab
(mesh built by the real site.yml).

Workloads, each written by node1 three times: to a steep table (``public.st``: versions + conflict
triggers, replicated by the steep mesh), to a native table (``public.nat``: plain publication /
subscription ``bench_nat``, no steep objects) and to two native tables at once (``public.np`` and
``public.np2``, the pair: every change twice -- what a second row change per change costs at best):

* ``bulk insert``  -- N rows in B big transactions
* ``bulk update``  -- every row updated, B big transactions
* ``pgbench-style`` -- M single-row transactions: random UPDATE by key (90 %) or INSERT of a new key
* ``bulk delete``  -- every row deleted, B big transactions

Method (per workload, per side): node2's subscriptions are disabled, every slot is settled (its
restart_lsn moved up to now: a walsender decodes from restart_lsn), node1 writes the workload, the
OTHER subscription's slot is moved past it (so no walsender decodes the other side's WAL while timed),
the subscription is enabled and the apply is timed from the start of its apply worker
(``pg_stat_activity.backend_start``) until node2's replication origin of that subscription has passed the
last transaction (``pg_replication_origin_status.remote_lsn``, polled every 10 ms: a shared-memory read;
polling the tables' fingerprints took CPU from the apply worker on this 2-core machine). The rows are
compared once afterwards.
Rate = changed rows / time. The apply worker's and the walsender's CPU are read from /proc.

Conflicts: both nodes update the same keys of ``public.cf`` while paused; node2's subscription from
node1 is enabled and timed until every change was decided (one conflict_log row per key).

Writes the "Conflicts" section of docs/benchmarks.md (between its markers; other sections untouched).
"""
import argparse
import datetime
import os
import platform
import random
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / ".collections"))

from steeplab import make_lab  # noqa: E402
from _report import publish  # noqa: E402
import mesh  # noqa: E402

STEEP_SUB, STEEP_SLOT = "steep_from_node1", "steep_to_node2"
NAT_SUB = NAT_SLOT = "bench_nat"
FINGERPRINT = ("SELECT count(*), coalesce(sum(v), 0), coalesce(sum(id::bigint), 0), "
               "pg_catalog.md5(coalesce(string_agg(t::text, ',' ORDER BY id), '')) FROM public.%s t")


class Conn:
    """One persistent autocommit connection (polling with a new connection per query is too slow)."""

    def __init__(self, node):
        self.conn = node.connect(autocommit=True)

    def q(self, query, params=None):
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def close(self):
        self.conn.close()


def set_enabled(c, subname, enabled):
    c.q('ALTER SUBSCRIPTION "%s" %s' % (subname, "ENABLE" if enabled else "DISABLE"))
    if not enabled:
        while c.q("SELECT count(*) FROM pg_catalog.pg_stat_subscription WHERE subname = %s AND pid IS NOT NULL",
                  (subname,))[0][0]:
            time.sleep(0.02)


def advance(pub, slot):
    """Skip the WAL written so far for this (inactive) slot: its subscriber must not apply it."""
    while pub.q("SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = %s", (slot,))[0][0]:
        time.sleep(0.02)
    pub.q("SELECT pg_catalog.pg_replication_slot_advance(%s, pg_catalog.pg_current_wal_lsn())", (slot,))


def settle(pub, slots):
    """Move the (inactive, caught-up) slots' restart_lsn up to now: a walsender starts decoding at its
    slot's restart_lsn, and one left behind would decode (and discard) the other side's workload again
    while it is timed. A running-xacts record followed by an advance past it moves restart_lsn there."""
    for _round in range(2):
        pub.q("SELECT pg_catalog.pg_log_standby_snapshot()")
        for slot in slots:
            advance(pub, slot)


def cpu_seconds(pid):
    """user + system CPU of a local server process (None when /proc is not readable)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def walsender_pid(pub, subname):
    """The publisher's walsender serving a subscription (None until it runs)."""
    r = pub.q("SELECT pid FROM pg_catalog.pg_stat_replication WHERE application_name = %s", (subname,))
    return r[0][0] if r else None


def timed_apply(pub, sub, subname, done, what, timeout=900):
    """Enable the subscription; (seconds from its apply worker's start until done() holds, CPU seconds
    its apply worker and its walsender used). The subscription is disabled again afterwards."""
    set_enabled(sub, subname, True)
    t0 = time.monotonic()
    start = pid = wpid = None
    while True:
        if start is None:
            r = sub.q("SELECT a.backend_start, a.pid FROM pg_catalog.pg_stat_subscription s "
                      "JOIN pg_catalog.pg_stat_activity a ON a.pid = s.pid "
                      "WHERE s.subname = %s AND s.relid IS NULL", (subname,))
            start, pid = r[0] if r else (None, None)
        if wpid is None:
            wpid = walsender_pid(pub, subname)
        if start is not None and done():
            now = sub.q("SELECT pg_catalog.clock_timestamp()")[0][0]
            cpu, wcpu = cpu_seconds(pid), (cpu_seconds(wpid) if wpid else None)
            set_enabled(sub, subname, False)
            return (now - start).total_seconds(), cpu, wcpu
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("subscription %s did not catch up on %s" % (subname, what))
        time.sleep(0.01)


def caught_up(sub, subname, lsn):
    """A done() for timed_apply: the subscription has applied the publisher's WAL up to lsn (its
    replication origin's remote_lsn, a shared-memory read; polling the tables themselves would take a
    core of this 2-core machine away from the apply worker while it is timed)."""
    query = ("SELECT s.remote_lsn >= %s::pg_lsn FROM pg_catalog.pg_replication_origin_status s "
             "JOIN pg_catalog.pg_subscription u ON s.external_id = 'pg_' || u.oid WHERE u.subname = %s")
    # no row until the apply worker has set its origin up
    return lambda: any(r[0] for r in sub.q(query, (lsn, subname)))


def same_rows(pub, sub, table):
    """node2's copy of table holds node1's rows (checked once, after the timed apply)."""
    mine, theirs = pub.q(FINGERPRINT % table), sub.q(FINGERPRINT % table)
    if mine != theirs:
        raise RuntimeError("%s differs after the apply: %s on the publisher, %s on the subscriber"
                           % (table, mine, theirs))


def run_sql(node, stmts):
    """Each item of stmts is one transaction (a list of (sql, params)). Returns a WAL position inside
    the last transaction that changed rows, before its commit: a subscriber that applied past it
    applied every one."""
    conn = node.connect(autocommit=False)
    lsn = None
    try:
        with conn.cursor() as cur:
            for tx in stmts:
                changed = 0
                for q, p in tx:
                    cur.execute(q, p)
                    changed += max(cur.rowcount, 0)
                if changed:     # a transaction that changes nothing is not replicated at all
                    cur.execute("SELECT pg_catalog.pg_current_wal_insert_lsn()::text")
                    lsn = cur.fetchone()[0]
                conn.commit()
    finally:
        conn.close()
    return lsn


def bulk(kind, table, rows, batches):
    per = (rows + batches - 1) // batches
    out = []
    for b in range(batches):
        lo, hi = 1 + b * per, min(rows, (b + 1) * per)
        if kind == "insert":
            q = "INSERT INTO public.%s SELECT g, 0, repeat('x', 40) FROM generate_series(%%s, %%s) g" % table
        elif kind == "update":
            q = "UPDATE public.%s SET v = v + 1 WHERE id BETWEEN %%s AND %%s" % table
        else:
            q = "DELETE FROM public.%s WHERE id BETWEEN %%s AND %%s" % table
        out.append([(q, (lo, hi))])
    return out


def pgbench_style(table, rows, txs, seed):
    rnd = random.Random(seed)
    out, nxt = [], rows + 1
    for _tx in range(txs):
        if rnd.random() < 0.1:
            out.append([("INSERT INTO public.%s VALUES (%%s, 0, repeat('y', 40))" % table, (nxt,))])
            nxt += 1
        else:
            out.append([("UPDATE public.%s SET v = v + 1 WHERE id = %%s" % table, (rnd.randint(1, rows),))])
    return out


TABLE_HEAD = ("| workload | rows changed | transactions | native rows/s | steep rows/s | steep / native | goal met "
              "| pair / native | apply-worker CPU µs/row native / steep / pair "
              "| walsender CPU µs/row native / steep |\n|---|---|---|---|---|---|---|---|---|---|")


def time_sides(n1, p1, p2, workload, sides, vacuum):
    """Time one workload on each side (label, table, subscription, slot to skip), each written by node1 while
    node2's subscriptions are off; side "pair" writes every change to public.np and public.np2. Autovacuum is
    off for the bench tables: both nodes vacuum ``vacuum`` before the workload instead. Returns
    ({label: (apply seconds, apply-worker CPU, walsender CPU, node1 write seconds)}, transactions)."""
    for p in (p1, p2):
        p.q("VACUUM ANALYZE " + vacuum)
    out = {}
    for side, table, sub, skip in sides:
        settle(p1, (STEEP_SLOT, NAT_SLOT))
        if side == "pair":      # every change twice, to two native tables: the cheapest possible carrier
            txs = [a + b for a, b in zip(workload("np"), workload("np2"))]
        else:
            txs = workload(table)
        t0 = time.monotonic()
        lsn = run_sql(n1, txs)
        wrote = time.monotonic() - t0
        settle(p1, (skip,))
        out[side] = timed_apply(p1, p2, sub, caught_up(p2, sub, lsn), table) + (wrote,)
        same_rows(p1, p2, table)
    return out, len(txs)


SIDES = (("native", "nat", NAT_SUB, STEEP_SLOT), ("steep", "st", STEEP_SUB, NAT_SLOT), ("pair", "np2", NAT_SUB, STEEP_SLOT))


def measure(n1, p1, p2, name, workload, changes, results):
    """Time one workload on three sides: native (public.nat), steep (public.st) and the pair (public.np and
    public.np2, native: every change twice -- the cheapest carrier of a second row next to each change)."""
    out, ntx = time_sides(n1, p1, p2, workload, SIDES,
                          "public.st, public.nat, public.np, public.np2, steep_repl.row_version")

    def per(cpu):
        return "-" if cpu is None else "%.0f" % (cpu * 1e6 / changes)
    (t_nat, c_nat, w_nat), (t_st, c_st, w_st) = out["native"][:3], out["steep"][:3]
    t_pr, c_pr = out["pair"][:2]
    results.append((name, changes, ntx, changes / t_nat, changes / t_st, changes / t_pr,
                    per(c_nat), per(c_st), per(c_pr), per(w_nat), per(w_st)))
    print("%-14s %7d rows %5d txs: native %8.0f rows/s, steep %8.0f (%.2fx), pair %8.0f (%.2fx); "
          "apply CPU us/row %s / %s / %s; walsender CPU us/row %s / %s"
          % (name, changes, ntx, changes / t_nat, changes / t_st, t_nat / t_st,
             changes / t_pr, t_nat / t_pr, per(c_nat), per(c_st), per(c_pr), per(w_nat), per(w_st)), flush=True)


def workload_arguments():
    """The command line shared by the benchmarks that run these workloads (add your own, then parse)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50000, help="rows of the bulk workloads")
    ap.add_argument("--batches", type=int, default=5, help="transactions of each bulk workload")
    ap.add_argument("--txs", type=int, default=5000, help="single-row transactions of the pgbench-style workload")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    return ap


def prepare(n1, p1, p2, steep_tables, native_tables):
    """Autovacuum off for the bench tables (each workload vacuums first); the native one-way pair for the
    baseline (publication, slot and disabled subscription ``bench_nat`` of native_tables); both steep
    subscriptions disabled (node2 writes nothing until it is timed: its walsender stays idle)."""
    for p in (p1, p2):
        for t in steep_tables + native_tables + ("steep_repl.row_version",):
            p.q("ALTER TABLE %s SET (autovacuum_enabled = off)" % t)
    p1.q("CREATE PUBLICATION bench_nat FOR TABLE %s" % ", ".join(native_tables))
    p1.q("SELECT pg_catalog.pg_create_logical_replication_slot('bench_nat', 'pgoutput')")
    p2.q("CREATE SUBSCRIPTION bench_nat CONNECTION %s PUBLICATION bench_nat WITH (create_slot = false, "
         "slot_name = 'bench_nat', copy_data = false, enabled = false)", (n1.dsn(),))
    set_enabled(p1, "steep_from_node2", False)
    set_enabled(p2, STEEP_SUB, False)


def lab_dir(prefix):
    """A new directory for a benchmark's lab (under $STEEP_TEST_LAB_ROOT, default /tmp/steep-tests)."""
    return Path(os.environ.get("STEEP_TEST_LAB_ROOT", "/tmp/steep-tests")) / (prefix + uuid.uuid4().hex[:6])


def main():
    ap = workload_arguments()
    ap.add_argument("--conflicts", type=int, default=5000, help="keys updated on both nodes (conflicts)")
    args = ap.parse_args()
    lab = make_lab(lab_dir("bc"), 2, (18,))
    try:
        setup = ["CREATE TABLE public.st (id int PRIMARY KEY, v int NOT NULL, pad text)",
                 "CREATE TABLE public.np (id int PRIMARY KEY, v int NOT NULL, pad text)",
                 "CREATE TABLE public.np2 (id int PRIMARY KEY, v int NOT NULL, pad text)",
                 "CREATE TABLE public.cf (id int PRIMARY KEY, v int NOT NULL, pad text)",
                 "CREATE TABLE public.nat (id int PRIMARY KEY, v int NOT NULL, pad text)"]
        mesh.build_mesh(lab, setup, {"steep_replicated_tables": ["public.st", "public.cf"]})
        n1, n2 = lab.nodes
        p1, p2 = Conn(n1), Conn(n2)
        prepare(n1, p1, p2, ("public.st",), ("public.nat", "public.np", "public.np2"))
        results = []
        r, b = args.rows, args.batches
        # warm-up (caches, first apply-worker starts): the same path as a measurement, results dropped;
        # negative keys, which no workload touches
        measure(n1, p1, p2, "warm-up", lambda t: [[("INSERT INTO public.%s SELECT g, 0, repeat('x', 40) "
                                                    "FROM generate_series(-1000, -1) g" % t, None)]], 1000, [])
        measure(n1, p1, p2, "bulk insert", lambda t: bulk("insert", t, r, b), r, results)
        measure(n1, p1, p2, "bulk update", lambda t: bulk("update", t, r, b), r, results)
        measure(n1, p1, p2, "pgbench-style", lambda t: pgbench_style(t, r, args.txs, 7), args.txs, results)
        rows_now = p1.q("SELECT count(*) FROM public.st WHERE id > 0")[0][0]
        measure(n1, p1, p2, "bulk delete", lambda t: bulk("delete", t, r + args.txs, b), rows_now, results)
        # conflicts: both nodes update the same keys while neither applies
        c = args.conflicts
        run_sql(n1, bulk("insert", "cf", c, 1))
        set_enabled(p2, STEEP_SUB, True)
        set_enabled(p1, "steep_from_node2", True)
        mesh.wait_converged(lab, "SELECT count(*), sum(v) FROM public.cf", timeout=300)
        set_enabled(p2, STEEP_SUB, False)
        set_enabled(p1, "steep_from_node2", False)
        for p in (p1, p2):      # as before every workload (autovacuum is off for the bench tables)
            p.q("VACUUM ANALYZE public.cf, steep_repl.row_version, steep_repl.conflict_log")
        settle(p1, (STEEP_SLOT, NAT_SLOT))
        before = p2.q("SELECT count(*) FROM steep_repl.conflict_log")[0][0]
        run_sql(n2, [[("UPDATE public.cf SET v = v + 1000", None)]])       # node2's own versions of every key
        lsn = run_sql(n1, [[("UPDATE public.cf SET v = v + 1 WHERE id BETWEEN %s AND %s", (lo, lo + 49))]
                           for lo in range(1, c + 1, 50)])
        t_conf, conf_cpu, conf_wcpu = timed_apply(p1, p2, STEEP_SUB, caught_up(p2, STEEP_SUB, lsn), "the conflicts")
        logged = p2.q("SELECT count(*) FROM steep_repl.conflict_log")[0][0] - before
        if logged < c:
            raise RuntimeError("%d conflicts logged, %d expected" % (logged, c))
        set_enabled(p2, STEEP_SUB, True)
        set_enabled(p1, "steep_from_node2", True)
        mesh.wait_converged(lab, "SELECT count(*), sum(v) FROM public.cf", timeout=300)
        for t in ("st", "nat", "np", "np2"):
            same_rows(p1, p2, t)
        errors = sum(n.sql("SELECT coalesce(sum(apply_error_count), 0) FROM pg_catalog.pg_stat_subscription_stats")[0][0]
                     for n in lab.nodes)
        conf_rate = c / t_conf
        conf_us = "-" if conf_cpu is None else "%.0f" % (conf_cpu * 1e6 / c)
        conf_wus = "-" if conf_wcpu is None else "%.0f" % (conf_wcpu * 1e6 / c)
        print("conflicts      %7d keys: %.0f conflicts/s; apply CPU us/conflict %s; walsender CPU us/conflict %s"
              % (c, conf_rate, conf_us, conf_wus), flush=True)
        lines = ["| %s | %d | %d | %.0f | %.0f | **%.2fx** | %s | %.2fx | %s / %s / %s | %s / %s |"
                 % (name, ch, tx, nat, st, st / nat, "yes" if st / nat >= 0.8 else "no", pr / nat,
                    cn, cs, cp, wn, ws)
                 for name, ch, tx, nat, st, pr, cn, cs, cp, wn, ws in results]
        text = """## Conflicts

`python bench/conflicts.py --rows %d --batches %d --txs %d --conflicts %d` (%s, %d CPUs, Python %s,
PostgreSQL 18, 2-node lab). Apply throughput of node2 catching up on the same workload written by node1
three times: to a native table (plain publication/subscription, no steep objects); to a steep table
(versions + conflict triggers, steep mesh); and to two native tables at once, every change written to
both, the **pair**: what a second row change per user change costs when that row is as cheap as the
user row itself, the best any carrier of a version next to each change could do in the apply worker.
(Earlier runs had a fourth side, steep with node2's apply triggers disabled; since versions travel as
INSERTs only, a version cannot be applied without its trigger, which replaces the receiver's version,
so that side is gone.) Each side is written while the subscriptions are disabled; every slot is then
moved past the WAL it must not apply, restart_lsn included (a walsender decodes from restart_lsn: a slot
left behind would decode the other side's workload again while it is timed, which made earlier runs of
this benchmark flatter steep); the apply is timed from the start of the apply worker until node2's
replication origin has passed node1's last transaction, polled in shared memory (the rows are compared
afterwards). Wall clock: the machine is shared, so read the ratios and the CPU per row, which varies
less. Goal: steep >= 0.80x native on every workload.

%s
%s

Conflict throughput: %d keys updated on node2, then on node1 (%d transactions of 50 rows); node2 applies
node1's changes, every one a conflict decided by last_write_wins in the apply worker and logged with both
tuples: **%.0f conflicts/s** (goal >= 5,000; apply-worker CPU %s µs per conflict, walsender %s µs).
apply_error_count after the run: %d.

The wall clock follows the apply worker's CPU: it is the bottleneck on both sides. The pair column is
why the 0.8x goal is out of reach for this design and for any design that carries a version row next to
each change: a second row change, even one as cheap as the user row, takes the bulk workloads to about
half of native before a single trigger runs. What each path costs and what it would take:
[conflicts.md, Performance](conflicts.md#performance-issue-3); what a trigger costs at all, in PL/pgSQL and
in C, without any extra row: [Trigger ceiling](#trigger-ceiling).
""" % (args.rows, args.batches, args.txs, c, datetime.date.today().isoformat(), os.cpu_count(),
            platform.python_version(), TABLE_HEAD, "\n".join(lines), c, (c + 49) // 50, conf_rate, conf_us, conf_wus, errors)
        publish("conflicts", text, not args.no_write)
        p1.close()
        p2.close()
    finally:
        lab.destroy()


if __name__ == "__main__":
    main()
