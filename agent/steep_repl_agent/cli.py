"""``steep-repl``: the agent and its CLI.

Commands talk to the local agent over IPC and fall back to the database when
the agent is down (saying so on stderr).

Exit codes: 0 ok; ``health``: 1 degraded, 2 unhealthy; 2 bad configuration;
3 the command failed (message names the fix).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

from . import __version__
from .config import ConfigError, default_config_path, load


def _print(data, as_json=True):
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _fallback_conn(cfg):
    from ansible_collections.steep.repl.plugins.module_utils import db

    from .config import conn_kwargs
    return db.connect(conn_kwargs(cfg, cfg["this_node"]))


def _oneshot(cfg):
    """A single read-only check round run by the CLI itself (agent down)."""
    from .agent import Agent, JsonLog
    agent = Agent(cfg, log=JsonLog("error", stream=open(os.devnull, "w")))
    agent.readonly = True
    for h in list(agent.pg_health.values()) + list(agent.agent_health.values()):
        h.threshold = 1
    try:
        agent.cycle()
        prev = None
        if agent.local_conn is not None:
            from . import collect
            try:
                prev = collect.read_coordinator(agent.local_conn)
            except Exception:
                prev = None
        for d in (agent.snapshot, agent.health):
            d["source"] = "database (agent not running)"
            d["last_recorded_coordinator"] = prev
        return agent
    finally:
        agent.shutdown()


# commands that change something: after the agent took one without answering, it may have run there, so it is not
# run again against the database (a range allocated twice); they may also take longer (lock waits, big purges)
WRITES = ("node_add", "node_remove", "conflicts_resolve", "conflicts_purge", "range_allocate")


def _ipc_timeout(write):
    """How long the CLI waits for the agent's answer: STEEP_REPL_IPC_TIMEOUT seconds, default 15 (reads) / 300
    (writes)."""
    env = os.environ.get("STEEP_REPL_IPC_TIMEOUT")
    if env:
        try:
            return max(0.1, float(env))
        except ValueError:
            pass
    return 300.0 if write else 15.0


def _call(cfg, cmd, args):
    """(data, via_agent) from the agent over IPC, else from the database."""
    from . import commands
    from .server import AgentNoReply, AgentUnavailable, ipc_call
    write = cmd in WRITES and not args.get("dry_run")
    try:
        reply = ipc_call(cfg["agent"]["ipc_path"], cmd, args, timeout=_ipc_timeout(write))
        if not reply.get("ok"):
            raise commands.CommandError(reply.get("error"))
        return reply["data"], True
    except AgentNoReply as exc:
        if write:
            raise commands.CommandError("the agent took the command but gave no answer (%s); it may have run, or still "
                                        "run, there, so it was not run again. Fix: check the result (steep-repl "
                                        "status, conflicts list, range status), then re-run if it is missing." % exc)
        sys.stderr.write("steep-repl: the agent did not answer (%s); answering from the database directly.\n" % exc)
    except AgentUnavailable as exc:
        sys.stderr.write("steep-repl: the agent is not running (%s); answering from the database directly.\n" % exc)
    if cmd in ("status", "health"):
        agent = _oneshot(cfg)
        return (agent.snapshot if cmd == "status" else agent.health), False
    from ansible_collections.steep.repl.plugins.module_utils import db
    try:
        conn = _fallback_conn(cfg)
    except db.SteepError as exc:
        raise commands.CommandError(str(exc))
    try:
        return commands.run(conn, cmd, args), False
    finally:
        conn.close()


def _health_text(h):
    lines = ["%s: %s (role %s, coordinator %s)" % (h.get("node"), h.get("status"), h.get("role"), h.get("coordinator"))]
    for name, c in sorted((h.get("checks") or {}).items()):
        if isinstance(c, dict):
            extra = ", ".join("%s=%s" % (k, v) for k, v in sorted(c.items()) if k != "status")
            lines.append("  %-20s %-8s %s" % (name, c.get("status"), extra))
        else:
            lines.append("  %-20s %s" % (name, c))
    for a in h.get("alerts") or []:
        lines.append("  ALERT %s %s value=%s threshold=%s %s" % (a["level"], a["name"], a["value"], a["threshold"], a.get("labels") or ""))
    return "\n".join(lines)


def supervise(args):
    """Run ``agent run`` as a child and restart it whenever it exits (no service manager)."""
    try:
        load(args.config)
    except ConfigError as exc:
        sys.stderr.write("steep-repl: invalid configuration: %s\n" % exc)
        return 2
    stop = threading.Event()
    state = {"child": None}

    def on_stop(*_):
        stop.set()
        if state["child"] and state["child"].poll() is None:
            state["child"].terminate()

    def on_hup(*_):
        if state["child"] and state["child"].poll() is None:
            state["child"].terminate()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    with open(args.pid_file, "w") as fh:
        fh.write("%d\n" % os.getpid())
    child_pid_file = args.pid_file + ".agent"
    log = open(args.log_file, "a") if args.log_file else None
    backoff = 1.0
    try:
        while not stop.is_set():
            started = time.time()
            child = subprocess.Popen([sys.executable, "-m", "steep_repl_agent", "--config", args.config, "agent", "run"],
                                     stdout=log or sys.stdout, stderr=log or sys.stderr)
            state["child"] = child
            with open(child_pid_file, "w") as fh:
                fh.write("%d\n" % child.pid)
            rc = child.wait()
            if stop.is_set():
                break
            if time.time() - started > 60:
                backoff = 1.0
            line = json.dumps(dict(level="error", ts=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   msg="agent exited; restarting", rc=rc, restart_in=backoff))
            (log or sys.stderr).write(line + "\n")
            (log or sys.stderr).flush()
            stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)
    finally:
        for p in (child_pid_file, args.pid_file):
            try:
                os.unlink(p)
            except OSError:
                pass
    return 0


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS,
                        help="agent YAML config (default: $STEEP_REPL_CONFIG or %s)" % default_config_path())
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    p = argparse.ArgumentParser(prog="steep-repl", parents=[common], description="steep.repl agent and CLI")
    p.add_argument("--version", action="version", version="steep-repl " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    ag = sub.add_parser("agent", help="run the agent").add_subparsers(dest="action", metavar="ACTION")
    ag.required = True
    ag.add_parser("run", parents=[common], help="run the agent in the foreground (the service runs this)")
    sv = ag.add_parser("supervise", parents=[common], help="run the agent as a child and restart it when it exits")
    sv.add_argument("--pid-file", required=True)
    sv.add_argument("--log-file")
    ag.add_parser("check-config", parents=[common], help="validate the config and exit")

    sub.add_parser("status", parents=[common], help="agent and node status")
    sub.add_parser("health", parents=[common], help="health checks (seed 8.2 JSON with --json)")

    node = sub.add_parser("node", help="nodes").add_subparsers(dest="action", metavar="ACTION")
    node.required = True
    na = node.add_parser("add", parents=[common], help="register a node in steep_repl.nodes")
    na.add_argument("name")
    na.add_argument("--host", default="127.0.0.1")
    na.add_argument("--port", type=int, default=5432)
    na.add_argument("--priority", type=int, default=50)
    nr = node.add_parser("remove", parents=[common], help="remove a node from steep_repl.nodes")
    nr.add_argument("name")
    node.add_parser("status", parents=[common], help="registered nodes and the agent's view of them")

    cf = sub.add_parser("conflicts", help="conflicts").add_subparsers(dest="action", metavar="ACTION")
    cf.required = True
    cl = cf.add_parser("list", parents=[common], help="recent conflicts")
    cl.add_argument("--pending", action="store_true")
    cl.add_argument("--limit", type=int, default=50)
    cr = cf.add_parser("resolve", parents=[common], help="resolve a conflict (steep_repl.resolve_conflict)")
    cr.add_argument("id", nargs="?", type=int)
    cr.add_argument("--resolution", required=True, help="local, remote or merge (or KEPT_LOCAL, APPLIED_REMOTE, MERGED)")
    cr.add_argument("--merged", help="merge: the merged row as a JSON object")
    cr.add_argument("--xid", type=int, help="resolve every conflict of one origin transaction (resolve_conflicts_bulk)")
    cp = cf.add_parser("purge", parents=[common],
                       help="delete decided conflicts older than --older-than (steep_repl.purge_conflict_log; "
                            "PENDING entries stay)")
    cp.add_argument("--older-than", required=True,
                    help="how long a decided conflict is kept: 90d, 12h or a PostgreSQL interval ('90 days')")
    cp.add_argument("--batch-size", type=int, default=10000, help="entries deleted per statement (default 10000)")
    cp.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")

    rg = sub.add_parser("range", help="identity ranges").add_subparsers(dest="action", metavar="ACTION")
    rg.required = True
    rs = rg.add_parser("status", parents=[common], help="range utilisation")
    rs.add_argument("--node")
    ra = rg.add_parser("allocate", parents=[common], help="allocate a range (steep_repl.allocate_range)")
    ra.add_argument("table")
    ra.add_argument("--size", type=int, default=10000)

    it = sub.add_parser("init", help="node initialisation").add_subparsers(dest="action", metavar="ACTION")
    it.required = True
    it.add_parser("status", parents=[common], help="init_state of every node")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None) or default_config_path()
    as_json = getattr(args, "json", False)
    if args.command == "agent" and args.action == "supervise":
        return supervise(args)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        sys.stderr.write("steep-repl: invalid configuration: %s\n" % exc)
        return 2
    if args.command == "agent":
        if args.action == "check-config":
            print("configuration %s is valid (node %s, %d peers)" % (cfg["path"], cfg["this_node"]["name"], len(cfg["peers"])))
            return 0
        from .agent import Agent
        return Agent(cfg).run()

    from .commands import CommandError
    cmd = args.command if args.command in ("status", "health") else "%s_%s" % (args.command, args.action)
    cargs = {}
    for k in ("name", "host", "port", "priority", "pending", "limit", "id", "resolution", "merged", "xid", "node", "table", "size",
              "older_than", "batch_size", "dry_run"):
        if hasattr(args, k):
            cargs[k] = getattr(args, k)
    try:
        data, _via_agent = _call(cfg, cmd, cargs)
    except CommandError as exc:
        sys.stderr.write("steep-repl: %s\n" % exc)
        return 3
    if cmd == "health":
        if as_json:
            _print(data)
        else:
            print(_health_text(data))
        return {"healthy": 0, "degraded": 1}.get(data.get("status"), 2)
    _print(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
