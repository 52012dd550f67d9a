"""What other unique keys cost (docs/conflicts.md, Other unique keys): apply throughput of a table with a
UNIQUE column beside its primary key, native vs steep, and steep on the same table without the unique
constraint, side by side in ONE run on a real 2-node lab (mesh built by the real site.yml).

Three tables of one shape (id PRIMARY KEY, v, pad, email filled from a sequence on node1):

* ``public.nu`` -- ``email UNIQUE``, native publication / subscription ``bench_nat``: the baseline;
* ``public.st`` -- a plain (non-unique) index on ``email``, steep: steep without the unique check;
* ``public.su`` -- ``email UNIQUE``, steep: every applied row goes through ``steep_repl.uniq_<h>`` (one
  index probe and one advisory lock per value), every local write takes the advisory lock.

Same index count on every side, so the difference between ``st`` and ``su`` is the unique check alone.
Workloads and method are those of bench/conflicts.py (``time_sides``): bulk insert, bulk update (``v``),
bulk update of the unique column, pgbench-style, bulk delete. Also reported: node1's write time per row
of the steep sides (the capture trigger's lock per value).

Writes the "Other unique keys" section of docs/benchmarks.md (between its markers).
"""
import datetime
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conflicts import (  # noqa: E402
    NAT_SLOT, NAT_SUB, STEEP_SLOT, STEEP_SUB, Conn, bulk, lab_dir, pgbench_style, prepare, time_sides,
    workload_arguments)
from steeplab import make_lab  # noqa: E402
from _report import publish  # noqa: E402
import mesh  # noqa: E402

SIDES = (("native", "nu", NAT_SUB, STEEP_SLOT), ("steep", "st", STEEP_SUB, NAT_SLOT),
         ("steep+unique", "su", STEEP_SUB, NAT_SLOT))
VACUUM = "public.nu, public.st, public.su, steep_repl.row_version"
HEAD = ("| workload | rows changed | transactions | native rows/s | steep rows/s | steep+unique rows/s "
        "| unique check (steep+unique / steep) | steep / native | steep+unique / native "
        "| apply-worker CPU µs/row native / steep / steep+unique | node1 write µs/row native / steep / steep+unique |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|")
SHAPE = "(id int PRIMARY KEY, v int NOT NULL, pad text, email text NOT NULL DEFAULT 'u' || nextval('public.em')%s)"


def unique_update(table, rows, batches):
    """Every row's unique value changed, B big transactions."""
    per = (rows + batches - 1) // batches
    return [[("UPDATE public.%s SET email = email || '.x' WHERE id BETWEEN %%s AND %%s" % table,
              (1 + b * per, min(rows, (b + 1) * per)))] for b in range(batches)]


def main():
    args = workload_arguments().parse_args()
    lab = make_lab(lab_dir("bu"), 2, (18,))
    try:
        setup = ["CREATE SEQUENCE public.em",
                 "CREATE TABLE public.nu " + SHAPE % " UNIQUE",
                 "CREATE TABLE public.su " + SHAPE % " UNIQUE",
                 "CREATE TABLE public.st " + SHAPE % "",
                 "CREATE INDEX st_email ON public.st (email)"]
        mesh.build_mesh(lab, setup, {"steep_replicated_tables": ["public.st", "public.su"]})
        n1, n2 = lab.nodes
        p1, p2 = Conn(n1), Conn(n2)
        prepare(n1, p1, p2, ("public.st", "public.su"), ("public.nu",))
        r, b = args.rows, args.batches
        rows = []

        def run(name, workload, changes):
            out, ntx = time_sides(n1, p1, p2, workload, SIDES, VACUUM)
            if name is None:
                return
            rate = dict((k, changes / v[0]) for k, v in out.items())
            cpu = dict((k, "-" if v[1] is None else "%.0f" % (v[1] * 1e6 / changes)) for k, v in out.items())
            write = dict((k, "%.0f" % (v[3] * 1e6 / changes)) for k, v in out.items())
            rows.append("| %s | %d | %d | %.0f | %.0f | %.0f | **%.2fx** | %.2fx | %.2fx | %s / %s / %s | %s / %s / %s |" % (
                name, changes, ntx, rate["native"], rate["steep"], rate["steep+unique"],
                rate["steep+unique"] / rate["steep"], rate["steep"] / rate["native"],
                rate["steep+unique"] / rate["native"], cpu["native"], cpu["steep"], cpu["steep+unique"],
                write["native"], write["steep"], write["steep+unique"]))
            print(rows[-1], flush=True)

        run(None, lambda t: [[("INSERT INTO public.%s (id, v, pad) SELECT g, 0, 'w' FROM generate_series(-1000, -1) g"
                               % t, None)]], 1000)      # warm-up, dropped; keys no workload touches
        run("bulk insert", lambda t: bulk("insert", t, r, b), r)
        run("bulk update (v)", lambda t: bulk("update", t, r, b), r)
        run("bulk update (unique column)", lambda t: unique_update(t, r, b), r)
        run("pgbench-style", lambda t: pgbench_style(t, r, args.txs, 7), args.txs)
        rows_now = p1.q("SELECT count(*) FROM public.su WHERE id > 0")[0][0]
        run("bulk delete", lambda t: bulk("delete", t, r + args.txs, b), rows_now)
        errors = sum(n.sql("SELECT coalesce(sum(apply_error_count), 0) FROM pg_catalog.pg_stat_subscription_stats")[0][0]
                     for n in lab.nodes)
        conflicts = sum(n.sql("SELECT count(*) FROM steep_repl.conflict_log")[0][0] for n in lab.nodes)
        text = """## Other unique keys

`python bench/unique.py --rows %d --batches %d --txs %d` (%s, %d CPUs, Python %s, PostgreSQL 18, 2-node lab).
What a UNIQUE column beside the primary key costs ([conflicts.md, Other unique keys](conflicts.md#other-unique-keys)):
three tables of one shape (`id` primary key, `v`, `pad`, `email` from a sequence), each with one index on
`email`: **native** (`UNIQUE`, plain publication/subscription), **steep** (a non-unique index: no unique
check) and **steep+unique** (`UNIQUE`: every applied row is checked by `uniq_<h>`, one index probe and one
advisory lock per value; every local write takes the lock). Method of the [Conflicts](#conflicts) section:
node2 catches up on the workload node1 wrote, timed from its apply worker's start; the rows are compared
afterwards. The **unique check** column is steep+unique / steep: what the check costs on top of steep.
Node1 write µs/row is the time of the workload's own transactions on node1 (capture trigger included).

%s
%s

No workload makes a conflict (conflict_log rows after the run: %d); apply_error_count after the run: %d.

An `INSERT` and an `UPDATE` that changes a unique value run the check (a PL/pgSQL call, one index probe,
one advisory lock: the apply-worker CPU column shows it per row). An `UPDATE` that keeps its unique values
and a `DELETE` run none (their triggers' `WHEN` clauses are false). What is left in their ratio is what the
unique index costs PostgreSQL itself (an index insertion of a non-HOT update checks uniqueness: the native
side pays it too, the steep side here has a plain index) and the noise of this shared machine, about 0.1
between runs. Before the `WHEN` clauses (a table with
other unique keys fired the apply function for every row), a 20000-row run measured 0.64x for the bulk
update of `v`.
""" % (r, b, args.txs, datetime.date.today().isoformat(), os.cpu_count(), platform.python_version(),
            HEAD, "\n".join(rows), conflicts, errors)
        publish("unique", text, not args.no_write)
        p1.close()
        p2.close()
    finally:
        lab.destroy()


if __name__ == "__main__":
    main()
