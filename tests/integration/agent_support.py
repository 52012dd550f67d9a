"""Helpers for the agent tests: extension set-up on lab nodes, agent configs, real agent processes."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from steeplab import free_port

ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join([str(ROOT / "agent"), str(ROOT / ".collections")])


def agent_cmd():
    """How tests start the agent: ``python -m steep_repl_agent``, under ``coverage run`` when `make test`
    collects coverage (STEEP_MODULE_COVERAGE); the agent stops gracefully on SIGTERM, so the data is saved."""
    out = os.environ.get("STEEP_MODULE_COVERAGE")
    if not out:
        return [sys.executable, "-m", "steep_repl_agent"]
    rc = Path(out) / "agent.coveragerc"
    if not rc.exists():
        Path(out).mkdir(parents=True, exist_ok=True)
        rc.write_text("[run]\nparallel = True\nsigterm = True\ndata_file = %s\ninclude =\n    */steep_repl_agent/*\n"
                      "    */ansible_collections/steep/repl/plugins/*\n" % (Path(out) / ".coverage.agent"))
    return [sys.executable, "-m", "coverage", "run", "--rcfile", str(rc), "-m", "steep_repl_agent"]


def agent_env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHONPATH + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["STEEP_LAB_PASSWORD"] = "steep-lab-secret"
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


def setup_extension(lab):
    """steep_repl installed and the local node registered on every lab node (what the foundation play does)."""
    from ansible_collections.steep.repl.plugins.module_utils import extfiles
    for pgc in sorted(set(n.pg_config for n in lab.nodes)):
        extfiles.install_files(pgc)
    for n in lab.nodes:
        n.sql("CREATE EXTENSION IF NOT EXISTS steep_repl")
        for m in lab.nodes:
            n.sql("INSERT INTO steep_repl.nodes (node_id, node_name, host, port, priority, is_local, init_state) "
                  "VALUES (%s, %s, %s, %s, %s, %s, 'SYNCHRONIZED') ON CONFLICT (node_id) DO NOTHING",
                  (m.name, m.name, m.host, m.port, m.priority, m.name == n.name))


def make_configs(tmp, lab, interval="0.5s", timeout="2s", threshold=2, mode="mesh", extra=None, ports=None, names=None,
                 hub=None):
    """One config per node (every node lists every other with its agent port). Returns {name: (path, http_port)}."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    names = names or [n.name for n in lab.nodes]
    ports = ports or {n: free_port() for n in names}
    out = {}
    for n in lab.nodes:
        if n.name not in names:
            continue
        peers = [dict(name=m.name, host=m.host, port=m.port, priority=m.priority, database=m.database,
                      agent_port=ports[m.name], agent_host="127.0.0.1") for m in lab.nodes if m.name != n.name and m.name in names]
        cfg = {"replication": {
            "topology": {"mode": mode,
                         "this_node": dict(name=n.name, host=n.host, port=n.port, priority=n.priority, database=n.database,
                                           user=n.user),
                         "nodes": peers,
                         "health_check": dict(interval=interval, timeout=timeout, unhealthy_threshold=threshold)},
            "credentials": dict((m, dict(password_env="STEEP_LAB_PASSWORD")) for m in names),
            "agent": dict(http_host="127.0.0.1", http_port=ports[n.name], ipc_path=str(tmp / ("%s.sock" % n.name)),
                          log_level="info"),
        }}
        if hub:
            cfg["replication"]["topology"]["hub"] = hub
        for k, v in (extra or {}).items():
            cfg["replication"][k] = v
        path = tmp / ("%s.yml" % n.name)
        path.write_text(yaml.safe_dump(cfg))
        out[n.name] = (path, ports[n.name])
    return out


def cli(config, *args, env=None, timeout=60):
    return subprocess.run(agent_cmd() + ["--config", str(config)] + list(args),
                          capture_output=True, text=True, env=agent_env(env), timeout=timeout, check=False)


class AgentProc:
    def __init__(self, config, port, log_path, env=None, scheme="http", ctx=None):
        self.config = config
        self.port = port
        self.log_path = Path(log_path)
        self.env = env
        self.scheme = scheme
        self.ctx = ctx
        self.proc = None

    def start(self, netns=None):
        self.log = open(self.log_path, "a")
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen(prefix + agent_cmd() + ["--config", str(self.config), "agent", "run"],
                                     stdout=self.log, stderr=self.log, env=agent_env(self.env))
        return self

    def get(self, path, timeout=5):
        """(code, body) of GET path; body parsed as JSON unless /metrics. (None, None) when unreachable."""
        url = "%s://127.0.0.1:%s%s" % (self.scheme, self.port, path)
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=self.ctx) as r:
                code, raw = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            code, raw = e.code, e.read().decode()
        except (OSError, ValueError):
            return None, None
        return code, (raw if path == "/metrics" else json.loads(raw))

    def wait_status(self, pred, timeout=30, path="/status"):
        """The first body of GET path (default /status) that pred accepts, or None after timeout."""
        def probe():
            code, body = self.get(path)
            try:
                return body if body and pred(body) else None
            except (KeyError, TypeError, IndexError):  # the first snapshot (before cycle 1) is sparse
                return None
        return wait_for(probe, timeout)

    def lines(self):
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def stop(self, timeout=15):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()
        return self.proc.returncode if self.proc else None


def wait_for(fn, timeout=30, step=0.2):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = fn()
        if last:
            return last
        time.sleep(step)
    return last
