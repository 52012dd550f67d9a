"""Benchmark: steep-repl agent RSS and CPU at idle and with 10 peers' worth of checks (5 s interval).

Goal: < 60 MB RSS and < 2 % of one core. Baseline in the same run: a bare Python interpreter that
imported the same libraries (psycopg2, yaml) and sleeps -- the floor any Python agent pays.
Writes the "Agent" section of docs/benchmarks.md (between its markers; other sections untouched).

    python bench/agent.py [--seconds 60] [--interval 5]
"""
import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / ".collections"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from agent_support import AgentProc, make_configs, setup_extension, wait_for  # noqa: E402
from steeplab import make_lab  # noqa: E402
from _report import publish  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid):
    m = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/%d/status" % pid).read_text())
    return int(m.group(1)) / 1024.0


def measure(pid, seconds):
    c0, t0 = cpu_seconds(pid), time.time()
    peak = 0.0
    while time.time() - t0 < seconds:
        peak = max(peak, rss_mb(pid))
        time.sleep(1)
    cpu = (cpu_seconds(pid) - c0) / (time.time() - t0) * 100.0
    return dict(rss=max(peak, rss_mb(pid)), cpu=cpu)


def baseline(seconds):
    code = "import psycopg2, yaml, json, http.server, ssl, concurrent.futures, time; time.sleep(%d)" % (seconds + 30)
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(2)
        return measure(p.pid, min(seconds, 10))
    finally:
        p.kill()
        p.wait()


def run_agent(tmp, lab, interval, seconds, fake_peers):
    import yaml
    cfgs = make_configs(tmp, lab, interval="%ss" % interval, timeout="5s", threshold=3)
    path, port = cfgs["node1"]
    agents = []
    if fake_peers:
        # 10 peers' worth of checks: 10 peer entries, each a real PostgreSQL check (node2's server) and a real HTTP
        # check (node2's agent) every cycle.
        p2, port2 = cfgs["node2"]
        agents.append(AgentProc(p2, port2, Path(tmp) / "node2.log").start())
        doc = yaml.safe_load(path.read_text())
        n2 = lab.node("node2")
        doc["replication"]["topology"]["nodes"] = [
            dict(name="peer%02d" % i, host=n2.host, port=n2.port, priority=10 + i, database=n2.database,
                 agent_host="127.0.0.1", agent_port=port2) for i in range(10)]
        doc["replication"]["credentials"] = dict(
            (n, dict(password_env="STEEP_LAB_PASSWORD")) for n in ["node1"] + ["peer%02d" % i for i in range(10)])
        path.write_text(yaml.safe_dump(doc))
    else:
        doc = yaml.safe_load(path.read_text())
        doc["replication"]["topology"]["nodes"] = []
        doc["replication"]["credentials"] = {"node1": dict(password_env="STEEP_LAB_PASSWORD")}
        path.write_text(yaml.safe_dump(doc))
    a = AgentProc(path, port, Path(tmp) / "node1.log").start()
    agents.append(a)
    try:
        assert wait_for(lambda: (a.get("/status")[1] or {}).get("cycles", 0) >= 2, 60), a.log_path.read_text()[-2000:]
        r = measure(a.proc.pid, seconds)
        r["cycles"] = a.get("/status")[1]["cycles"]
        r["peers"] = len(a.get("/status")[1]["peers"])
        r["cycle_ms"] = a.get("/status")[1]["cycle_duration_seconds"] * 1000
        return r
    finally:
        for x in agents:
            x.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="steep-bench-agent-")
    os.chmod(tmp, 0o755)  # the lab servers run as the postgres user
    lab = make_lab(Path(tmp) / "lab", 2, (18,))
    try:
        setup_extension(lab)
        base = baseline(args.seconds)
        idle = run_agent(Path(tmp) / "idle", lab, args.interval, args.seconds, False)
        ten = run_agent(Path(tmp) / "ten", lab, args.interval, args.seconds, True)
    finally:
        lab.destroy()
        shutil.rmtree(tmp, ignore_errors=True)

    def ok(r):
        return "yes" if r["rss"] < 60 and r["cpu"] < 2 else "NO"

    text = """## Agent

`python bench/agent.py --seconds {s} --interval {i}` ({date}, {cpus} CPUs, Python {py}, PostgreSQL 18 lab).
The agent's RSS (peak) and CPU (user+system over the window, % of one core) at a {i:g} s interval; baseline: a
bare Python interpreter that imported the same libraries and sleeps. Goal: < 60 MB RSS, < 2 % CPU.

| case | peers checked / cycle | RSS MB | vs baseline | CPU % of one core | last cycle ms | goal met |
|---|---|---|---|---|---|---|
| baseline (python + psycopg2 + yaml, idle) | - | {b[rss]:.1f} | 1.00x | {b[cpu]:.2f} | - | - |
| agent idle (no peers) | 0 | {a[rss]:.1f} | {ra:.2f}x | {a[cpu]:.2f} | {acms:.0f} | {oka} |
| agent, 10 peers (PostgreSQL + HTTP check each) | {tpeers} | {t[rss]:.1f} | {rt:.2f}x | {t[cpu]:.2f} | {tcms:.0f} | {okt} |
""".format(s=args.seconds, i=args.interval, date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(),
           py=platform.python_version(), b=base, a=idle, t=ten, ra=idle["rss"] / base["rss"], rt=ten["rss"] / base["rss"],
           oka=ok(idle), okt=ok(ten), acms=idle["cycle_ms"], tcms=ten["cycle_ms"], tpeers=ten["peers"])
    publish("agent", text, not args.no_write)
    return 0 if ok(idle) == "yes" and ok(ten) == "yes" else 1


if __name__ == "__main__":
    sys.exit(main())
