"""Stress run of the conflict engine (not a benchmark, not a test): one real 3-node mesh (built by the real
site.yml), many seeded rounds of the randomised workload of the workload tests (every node's writers on the
same few hot keys: updates, upserts, deletes, inserts, multi-row transactions), optionally beside CPU-bound
processes. It looks for what the tests can only catch by luck, after every round and during it:

* a node whose committed state breaks "every row is the image of its version" (sampled every 10 ms on every
  node while the writers run: a single statement sees one committed state, which must always hold);
* apply-worker errors in any node's server log (a deadlock the apply worker lost, insert_exists, ...);
* nodes that do not converge once the writers stop (rows per node, versions and conflicts of the keys).

Exit status 0 when no round found anything. Rare failures of the 3-node workload tests were found with it
(docs/conflicts.md, Deadlocks).

    .venv/bin/python bench/stress.py --rounds 150 --keys 3 --writers 3 --majors 17,18 --load 2
"""
import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests", ROOT / "tests" / "integration", ROOT / ".collections"):
    sys.path.insert(0, str(p))

from steeplab import make_lab  # noqa: E402
import conflict_support as cs  # noqa: E402
import mesh  # noqa: E402

TABLE = "public.hot"
SETUP = "CREATE TABLE public.hot (id int PRIMARY KEY, v int, who text, n int NOT NULL DEFAULT 0)"


def burn():  # pragma: no cover - a CPU-bound child process
    while True:
        pass


def classify(blocks):
    """The kinds of apply errors in ``blocks``: 'deadlock' (a deadlock the apply worker lost) or 'other'. The
    restarted worker racing its exiting predecessor for the replication origin is noise of either, not counted."""
    kinds = set()
    for b in blocks:
        if "is already active for PID" not in b:
            kinds.add("deadlock" if "deadlock detected" in b else "other")
    return kinds


def sample(node, stop, found):
    conn = node.connect()
    query = cs.image_mismatch_query(TABLE)
    try:
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute(query, (TABLE,))
                bad = cur.fetchall()
                if bad:
                    found.append((node.name, time.time(), bad))
                time.sleep(0.01)
    finally:
        conn.close()


def one_round(lab, seed, args, offsets):
    stop = threading.Event()
    samples = []
    samplers = [threading.Thread(target=sample, args=(n, stop, samples)) for n in lab.nodes]
    for t in samplers:
        t.start()
    try:
        stats = cs.run_workload(lab, TABLE, seed=seed, seconds=args.seconds, keys=args.keys,
                                threads_per_node=args.writers)
        time.sleep(1)
    finally:
        stop.set()
        for t in samplers:
            t.join()
    problems = ["committed state on %s at %.3f: %r" % s for s in samples[:10]]
    try:
        mesh.wait_converged(lab, "SELECT id, v, who, n FROM %s ORDER BY id" % TABLE, timeout=60)
    except AssertionError as exc:
        problems.append("diverged: %s\n%s" % (exc, json.dumps(cs.divergence_report(lab, TABLE), default=str, indent=1)))
    for n in lab.nodes:
        bad = cs.image_mismatches(n, TABLE)
        if bad:
            problems.append("after the round on %s: %r" % (n.name, bad))
    blocks = []
    for n in lab.nodes:
        text = cs.server_log(n)
        blocks += ["%s: %s" % (n.name, b) for b in cs.apply_error_blocks(text[offsets.get(n.name, 0):])]
        offsets[n.name] = len(text)
    return stats, problems, blocks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--keys", type=int, default=3, help="hot keys (default 3)")
    ap.add_argument("--writers", type=int, default=3, help="writer threads per node (default 3)")
    ap.add_argument("--seconds", type=float, default=3.0, help="writing time per round (default 3)")
    ap.add_argument("--majors", default="17,18", help="PostgreSQL majors, cycled over the 3 nodes (default 17,18)")
    ap.add_argument("--strategy", default="last_write_wins")
    ap.add_argument("--load", type=int, default=0, help="CPU-bound processes beside the mesh (default 0)")
    ap.add_argument("--keep-going", action="store_true", help="go on after a round that found something")
    ap.add_argument("--root", default=os.environ.get("STEEP_TEST_LAB_ROOT", "/tmp/steep-tests"))
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.keys < 1 or args.writers < 1 or args.seconds <= 0 or args.load < 0:
        ap.error("--rounds, --keys and --writers must be at least 1, --seconds positive, --load not negative")
    majors = tuple(int(m) for m in args.majors.split(","))
    hogs = [multiprocessing.Process(target=burn, daemon=True, name="load-%d" % i) for i in range(args.load)]
    for h in hogs:
        h.start()
    lab = make_lab(Path(args.root) / ("stress" + uuid.uuid4().hex[:8]), 3, majors)
    failed = 0
    kept = False
    try:
        mesh.build_mesh(lab, SETUP, {"steep_replicated_tables": [TABLE], "steep_conflict_default_strategy": args.strategy})
        offsets = {n.name: len(cs.server_log(n)) for n in lab.nodes}
        counts = {"deadlock": 0, "other": 0}
        for r in range(args.rounds):
            t0 = time.monotonic()
            stats, problems, blocks = one_round(lab, "stress-%s-%s" % (os.getpid(), r), args, offsets)
            kinds = classify(blocks)
            for k in kinds:
                counts[k] += 1
            print("round %d: %.1fs, %d commits, %d client errors, %d problems, apply errors: %s"
                  % (r, time.monotonic() - t0, stats["commits"], stats["errors"], len(problems),
                     ",".join(sorted(kinds)) or "none"), flush=True)
            if problems or blocks:
                failed += 1
                for p in problems[:10] + blocks[:10]:
                    print(p, flush=True)
                if not args.keep_going:
                    kept = True
                    print("stopped; the lab is kept for inspection at %s" % lab.root, flush=True)
                    break
        print("rounds with findings: %d (apply-error rounds by kind: %s)" % (failed, counts), flush=True)
    finally:
        for h in hogs:
            h.terminate()
        if not kept:
            lab.destroy()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
