"""A real network partition (network namespaces, a bridge, veth pairs; private addresses only inside our own
namespaces): the isolated coordinator steps down, the majority elects a new one, never two at once; healing brings
the highest-priority node back. The test talks to the agents over their Unix sockets (IPC works across namespaces)."""
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import pytest
import yaml

from agent_support import AgentProc, make_configs, wait_for
from steeplab import LAB_PASSWORD, Lab

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "agent"))
from steep_repl_agent.server import AgentUnavailable, ipc_call  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2")
SUBNET = "10.213.77."


def sh(*args):
    subprocess.run(list(args), check=True, capture_output=True, text=True)


def sock_sql(node, query, params=None, dbname=None):
    """SQL over the node's Unix socket (reachable from the host namespace)."""
    conn = psycopg2.connect(host=node.sockdir, port=node.port, user=node.user, password=LAB_PASSWORD,
                            dbname=dbname or node.database)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def status(path):
    try:
        r = ipc_call(str(path), "status", timeout=3)
        return r.get("data") if r.get("ok") else None
    except AgentUnavailable:
        return None


@pytest.fixture
def netns():
    tag = "stp" + uuid.uuid4().hex[:6]
    names = {"br": tag + "br", 1: tag + "n1", 2: tag + "n2", 3: tag + "n3"}
    try:
        sh("ip", "netns", "add", names["br"])
        sh("ip", "netns", "exec", names["br"], "ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "netns", "exec", names["br"], "ip", "link", "set", "br0", "up")
        for i in (1, 2, 3):
            ns = names[i]
            sh("ip", "netns", "add", ns)
            sh("ip", "netns", "exec", names["br"], "ip", "link", "add", "vb%d" % i, "type", "veth", "peer", "name", "ve0", "netns", ns)
            sh("ip", "netns", "exec", names["br"], "ip", "link", "set", "vb%d" % i, "master", "br0")
            sh("ip", "netns", "exec", names["br"], "ip", "link", "set", "vb%d" % i, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", "%s%d/24" % (SUBNET, i), "dev", "ve0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "ve0", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield names
    finally:
        for key in ("br", 1, 2, 3):
            subprocess.run(["ip", "netns", "del", names[key]], capture_output=True, check=False)


def test_partition_isolated_coordinator_steps_down(netns, tmp_path):
    root = Path("/tmp/steep-tests") / ("part-" + uuid.uuid4().hex[:8])
    lab = Lab(root)
    agents = {}
    try:
        for i in (1, 2, 3):
            lab.add_node("node%d" % i, major=18, priority=100 - 10 * i, host="%s%d" % (SUBNET, i), netns=netns[i],
                         create_db=False)
        from ansible_collections.steep.repl.plugins.module_utils import extfiles
        extfiles.install_files(lab.nodes[0].pg_config)
        for n in lab.nodes:
            sock_sql(n, 'CREATE DATABASE "steep"', dbname="postgres")
            sock_sql(n, "CREATE EXTENSION steep_repl")
            for m in lab.nodes:
                sock_sql(n, "INSERT INTO steep_repl.nodes (node_id, node_name, host, port, priority, is_local) VALUES "
                            "(%s, %s, %s, %s, %s, %s)", (m.name, m.name, m.host, m.port, m.priority, m.name == n.name))
        cfgs = make_configs(tmp_path, lab, interval="0.5s", timeout="1.5s", threshold=2)
        socks = {}
        for n in lab.nodes:
            path, port = cfgs[n.name]
            doc = yaml.safe_load(path.read_text())
            doc["replication"]["agent"]["http_host"] = n.host
            for p in doc["replication"]["topology"]["nodes"]:
                p["agent_host"] = p["host"]
            path.write_text(yaml.safe_dump(doc))
            socks[n.name] = doc["replication"]["agent"]["ipc_path"]
            agents[n.name] = AgentProc(path, port, tmp_path / ("%s.log" % n.name)).start(netns=netns[int(n.name[-1])])

        def roles():
            return {n: (status(p) or {}).get("role") for n, p in socks.items()}

        assert wait_for(lambda: roles() == {"node1": "coordinator", "node2": "follower", "node3": "follower"}, 40), roles()
        samples = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                samples.append(sorted(n for n, r in roles().items() if r == "coordinator"))
                time.sleep(0.1)

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        try:
            # partition: node1 (the coordinator) loses its link; node2 + node3 are the majority
            sh("ip", "netns", "exec", netns["br"], "ip", "link", "set", "vb1", "down")
            assert wait_for(lambda: roles() == {"node1": "follower", "node2": "coordinator", "node3": "follower"}, 30), roles()
            s1 = status(socks["node1"])
            assert s1["checks"]["peer_connectivity"] == "critical" or s1["coordinator"] is None
            assert agents["node1"].proc.poll() is None
            # heal: the highest-priority node is back as the only coordinator
            sh("ip", "netns", "exec", netns["br"], "ip", "link", "set", "vb1", "up")
            assert wait_for(lambda: roles() == {"node1": "coordinator", "node2": "follower", "node3": "follower"}, 30), roles()
        finally:
            stop.set()
            w.join(5)
        assert samples and max(len(s) for s in samples) <= 1, [s for s in samples if len(s) > 1][:3]
        assert any(s == ["node2"] for s in samples)
    finally:
        for a in agents.values():
            a.stop()
        lab.destroy()
