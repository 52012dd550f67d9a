"""Conflict-engine benchmark (issue #3): apply throughput of steep vs native logical replication on
the same workloads, and conflict-resolution throughput, side by side in ONE run on a real 2-node lab
(mesh built by the real site.yml).

Workloads, each written by node1 once to a steep table (``public.st``: versions + conflict triggers,
replicated by the steep mesh) and once to a native table (``public.nat``: plain publication /
subscription ``bench_nat``, no steep objects):

* ``bulk insert``  -- N rows in B big transactions
* ``bulk update``  -- every row updated, B big transactions
* ``pgbench-style`` -- M single-row transactions: random UPDATE by key (90 %) or INSERT of a new key
* ``bulk delete``  -- every row deleted, B big transactions

Method (per workload, per side): node2's subscription is disabled, node1 writes the workload, the
OTHER side's slot is advanced past it (so neither walsender decodes the other side's WAL while timed),
the subscription is enabled and the apply is timed from the start of its apply worker
(``pg_stat_activity.backend_start``) until node2 holds node1's rows (fingerprint polled every 10 ms).
Rate = changed rows / time.

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
from _report import write_section  # noqa: E402
import mesh  # noqa: E402

STEEP_SUB, STEEP_SLOT = "steep_from_node1", "steep_to_node2"
NAT_SUB = NAT_SLOT = "bench_nat"
FINGERPRINT = "SELECT count(*), coalesce(sum(v), 0), coalesce(sum(id::bigint), 0) FROM public.%s"


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


def cpu_seconds(pid):
    """user + system CPU of a local server process (None when /proc is not readable)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def timed_apply(pub, sub, subname, table, timeout=900):
    """Enable the subscription; (seconds from its apply worker's start until sub's table matches pub's,
    CPU seconds the apply worker used)."""
    want = pub.q(FINGERPRINT % table)
    set_enabled(sub, subname, True)
    t0 = time.monotonic()
    start = pid = None
    while True:
        if start is None:
            r = sub.q("SELECT a.backend_start, a.pid FROM pg_catalog.pg_stat_subscription s "
                      "JOIN pg_catalog.pg_stat_activity a ON a.pid = s.pid "
                      "WHERE s.subname = %s AND s.relid IS NULL", (subname,))
            start, pid = r[0] if r else (None, None)
        got = sub.q(FINGERPRINT % table)
        if start is not None and got == want:
            now = sub.q("SELECT pg_catalog.clock_timestamp()")[0][0]
            cpu = cpu_seconds(pid)
            set_enabled(sub, subname, False)
            return (now - start).total_seconds(), cpu
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("subscription %s did not catch up on %s" % (subname, table))
        time.sleep(0.01)


def run_sql(node, stmts):
    """Each item of stmts is one transaction (a list of (sql, params))."""
    conn = node.connect(autocommit=False)
    try:
        with conn.cursor() as cur:
            for tx in stmts:
                for q, p in tx:
                    cur.execute(q, p)
                conn.commit()
    finally:
        conn.close()


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


def measure(n1, n2, p1, p2, name, steep_txs, nat_txs, changes, results):
    """Time one workload: native side, then steep side (each written while its subscription is off).
    Autovacuum is off for the bench tables; both nodes are vacuumed before each workload instead."""
    for p in (p1, p2):
        p.q("VACUUM ANALYZE public.st, public.nat, steep_repl.row_version")
    run_sql(n1, nat_txs)
    advance(p1, STEEP_SLOT)
    t_nat, cpu_nat = timed_apply(p1, p2, NAT_SUB, "nat")
    run_sql(n1, steep_txs)
    advance(p1, NAT_SLOT)
    t_steep, cpu_steep = timed_apply(p1, p2, STEEP_SUB, "st")

    def per(cpu):
        return "-" if cpu is None else "%.0f" % (cpu * 1e6 / changes)
    results.append((name, changes, len(steep_txs), changes / t_nat, changes / t_steep, per(cpu_nat), per(cpu_steep)))
    print("%-14s %7d rows %5d txs: native %8.0f rows/s, steep %8.0f rows/s, %.2fx; apply CPU us/row %s / %s"
          % (name, changes, len(steep_txs), changes / t_nat, changes / t_steep, t_nat / t_steep,
             per(cpu_nat), per(cpu_steep)), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50000, help="rows of the bulk workloads")
    ap.add_argument("--batches", type=int, default=5, help="transactions of each bulk workload")
    ap.add_argument("--txs", type=int, default=5000, help="single-row transactions of the pgbench-style workload")
    ap.add_argument("--conflicts", type=int, default=5000, help="keys updated on both nodes (conflicts)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    args = ap.parse_args()
    lab = make_lab(Path(os.environ.get("STEEP_TEST_LAB_ROOT", "/tmp/steep-tests")) / ("bc" + uuid.uuid4().hex[:6]),
                   2, (18,))
    try:
        setup = ["CREATE TABLE public.st (id int PRIMARY KEY, v int NOT NULL, pad text)",
                 "CREATE TABLE public.cf (id int PRIMARY KEY, v int NOT NULL, pad text)",
                 "CREATE TABLE public.nat (id int PRIMARY KEY, v int NOT NULL, pad text)"]
        mesh.build_mesh(lab, setup, {"steep_replicated_tables": ["public.st", "public.cf"]})
        n1, n2 = lab.nodes
        p1, p2 = Conn(n1), Conn(n2)
        for p in (p1, p2):
            for t in ("public.st", "public.nat", "steep_repl.row_version"):
                p.q("ALTER TABLE %s SET (autovacuum_enabled = off)" % t)
        # native one-way pair for the baseline
        p1.q("CREATE PUBLICATION bench_nat FOR TABLE public.nat")
        p1.q("SELECT pg_catalog.pg_create_logical_replication_slot('bench_nat', 'pgoutput')")
        p2.q("CREATE SUBSCRIPTION bench_nat CONNECTION %s PUBLICATION bench_nat WITH (create_slot = false, "
             "slot_name = 'bench_nat', copy_data = false, enabled = false)", (n1.dsn(),))
        # node2 writes nothing until the conflict case: its walsender stays idle while node2 is timed
        set_enabled(p1, "steep_from_node2", False)
        set_enabled(p2, STEEP_SUB, False)
        results = []
        r, b = args.rows, args.batches
        measure(n1, n2, p1, p2, "bulk insert", bulk("insert", "st", r, b), bulk("insert", "nat", r, b), r, results)
        measure(n1, n2, p1, p2, "bulk update", bulk("update", "st", r, b), bulk("update", "nat", r, b), r, results)
        measure(n1, n2, p1, p2, "pgbench-style", pgbench_style("st", r, args.txs, 7), pgbench_style("nat", r, args.txs, 7),
                args.txs, results)
        rows_now = p1.q("SELECT count(*) FROM public.st")[0][0]
        measure(n1, n2, p1, p2, "bulk delete", bulk("delete", "st", r + args.txs, b), bulk("delete", "nat", r + args.txs, b),
                rows_now, results)
        # conflicts: both nodes update the same keys while neither applies
        c = args.conflicts
        run_sql(n1, bulk("insert", "cf", c, 1))
        set_enabled(p2, STEEP_SUB, True)
        set_enabled(p1, "steep_from_node2", True)
        mesh.wait_converged(lab, "SELECT count(*), sum(v) FROM public.cf", timeout=300)
        set_enabled(p2, STEEP_SUB, False)
        set_enabled(p1, "steep_from_node2", False)
        before = p2.q("SELECT count(*) FROM steep_repl.conflict_log")[0][0]
        run_sql(n2, [[("UPDATE public.cf SET v = v + 1000", None)]])       # node2's own versions of every key
        run_sql(n1, [[("UPDATE public.cf SET v = v + 1 WHERE id BETWEEN %s AND %s", (lo, lo + 49))]
                     for lo in range(1, c + 1, 50)])
        set_enabled(p2, STEEP_SUB, True)
        t0 = time.monotonic()
        start = None
        while True:
            if start is None:
                rr = p2.q("SELECT a.backend_start FROM pg_catalog.pg_stat_subscription s JOIN pg_catalog.pg_stat_activity a "
                          "ON a.pid = s.pid WHERE s.subname = %s AND s.relid IS NULL", (STEEP_SUB,))
                start = rr[0][0] if rr else None
            logged = p2.q("SELECT count(*) FROM steep_repl.conflict_log")[0][0] - before
            if start is not None and logged >= c:
                t_conf = (p2.q("SELECT pg_catalog.clock_timestamp()")[0][0] - start).total_seconds()
                break
            if time.monotonic() - t0 > 900:
                raise RuntimeError("conflicts not applied")
            time.sleep(0.01)
        set_enabled(p1, "steep_from_node2", True)
        mesh.wait_converged(lab, "SELECT count(*), sum(v) FROM public.cf", timeout=300)
        for t in ("st", "nat"):
            assert p1.q(FINGERPRINT % t) == p2.q(FINGERPRINT % t), t
        errors = sum(n.sql("SELECT coalesce(sum(apply_error_count), 0) FROM pg_catalog.pg_stat_subscription_stats")[0][0]
                     for n in lab.nodes)
        conf_rate = c / t_conf
        print("conflicts      %7d keys: %.0f conflicts/s" % (c, conf_rate), flush=True)
        lines = ["| %s | %d | %d | %.0f | %.0f | **%.2fx** | %s | %s / %s |"
                 % (name, ch, tx, nat, st, st / nat, "yes" if st / nat >= 0.8 else "no", cn, cs)
                 for name, ch, tx, nat, st, cn, cs in results]
        text = """## Conflicts

`python bench/conflicts.py --rows %d --batches %d --txs %d --conflicts %d` (%s, %d CPUs, Python %s,
PostgreSQL 18, 2-node lab). Apply throughput of node2 catching up on the same workload written by node1
to a native table (plain publication/subscription, no steep objects) and to a steep table (versions +
conflict triggers, steep mesh), no conflicts; each side is written while its subscription is disabled,
the other side's slot is advanced past it, and the apply is timed from the start of the apply worker
until node2 holds node1's rows (wall clock; the machine is shared, so read ratios, and the
apply-worker CPU per row, which varies less). Goal: steep >= 0.80x native on every workload.

| workload | rows changed | transactions | native rows/s | steep rows/s | steep / native (wall) | goal met | apply-worker CPU µs/row native / steep |
|---|---|---|---|---|---|---|---|
%s

Conflict throughput: %d keys updated on node2, then on node1 (%d transactions of 50 rows); node2 applies
node1's changes, every one a conflict decided by last_write_wins in the apply worker and logged with both
tuples: **%.0f conflicts/s** (goal >= 5,000). apply_error_count after the run: %d.

Why steep stays below the goal (every user change is applied together with its version row, first
versions are claimed in PL/pgSQL, each conflict writes a conflict_log row) and what each path costs:
[conflicts.md, Performance](conflicts.md#performance-issue-3).
""" % (args.rows, args.batches, args.txs, c, datetime.date.today().isoformat(), os.cpu_count(),
            platform.python_version(), "\n".join(lines), c, (c + 49) // 50, conf_rate, errors)
        print(text)
        if not args.no_write:
            write_section("conflicts", text)
        p1.close()
        p2.close()
    finally:
        lab.destroy()


if __name__ == "__main__":
    main()
