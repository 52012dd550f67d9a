"""Coordinator election with real agents on a real 3-node lab: failover within the timeout, exactly one
coordinator, and no coordinator without a majority."""
import signal
import threading
import time

import pytest

from agent_support import AgentProc, make_configs, setup_extension, wait_for

INTERVAL, TIMEOUT, THRESHOLD = 0.5, 2.0, 2
ELECTION_TIMEOUT = INTERVAL * THRESHOLD + TIMEOUT  # the config's default election_timeout


class Watcher:
    """Polls every agent's /status and records the set of self-declared coordinators over time."""

    def __init__(self, agents):
        self.agents = agents
        self.samples = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            coords = set()
            for name, a in self.agents.items():
                code, body = a.get("/status", timeout=2)
                if body and body.get("role") == "coordinator":
                    coords.add(name)
            self.samples.append((time.time(), coords))
            time.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


def roles(agents):
    return {n: (a.get("/status")[1] or {}).get("role") for n, a in agents.items()}


@pytest.mark.parametrize("mode,hub,first,second,third", [
    ("mesh", None, "node1", "node2", "node3"),
    ("star", "node3", "node3", "node1", "node2"),  # the hub coordinates whatever its priority
])
def test_three_node_failover_and_quorum(lab_factory, tmp_path, mode, hub, first, second, third):
    lab = lab_factory(count=3, majors=(17, 18))
    setup_extension(lab)
    cfgs = make_configs(tmp_path, lab, interval="%ss" % INTERVAL, timeout="%ss" % TIMEOUT, threshold=THRESHOLD, mode=mode,
                        hub=hub)
    agents = {n: AgentProc(p, port, tmp_path / ("%s.log" % n)).start() for n, (p, port) in cfgs.items()}
    try:
        assert wait_for(lambda: roles(agents) == {first: "coordinator", second: "follower", third: "follower"}, 30), \
            roles(agents)
        assert wait_for(lambda: all(a.get("/status")[1]["coordinator"] == first for a in agents.values()), 10)
        with Watcher(agents) as w:
            # kill the coordinator's node (its PostgreSQL): a new coordinator within the election timeout
            t0 = time.time()
            lab.node(first).kill()
            took = wait_for(lambda: roles(agents).get(second) == "coordinator" and time.time() - t0, 30, step=0.1)
            assert took, roles(agents)
            assert took <= ELECTION_TIMEOUT + 2 * INTERVAL + 1.0, took
            assert wait_for(lambda: all(a.get("/status")[1]["coordinator"] == second for a in agents.values()), 10), \
                {n: {k: (a.get("/status")[1] or {}).get(k) for k in ("role", "coordinator", "vote", "voters", "peers")}
                 for n, a in agents.items()}
            # the dead node's agent keeps running and votes for the new coordinator
            assert agents[first].get("/status")[1]["vote"] == second
            assert lab.node(second).sql("SELECT value->>'node', (value->>'quorum')::int FROM steep_repl.coordinator_state") \
                == [(second, 2)]
            assert lab.node(third).sql("SELECT node_id FROM steep_repl.nodes WHERE is_coordinator") == [(second,)]

            # lose the majority: only node2's own vote is left -> it must step down
            for n in (third, first):
                agents[n].proc.send_signal(signal.SIGKILL)
                agents[n].proc.wait()
            assert wait_for(lambda: roles({second: agents[second]})[second] == "follower", 15)

            def quorum_lost():
                body = agents[second].get("/health")[1]
                return body if body and body["checks"]["peer_connectivity"] == "critical" else None

            h = wait_for(quorum_lost, 10)
            assert h and h["checks"]["coordinator"]["status"] == "warning" and h["status"] == "unhealthy"
            assert agents[second].get("/coordinator")[0] == 503
        # never more than one coordinator at any sample
        assert w.samples and max(len(s[1]) for s in w.samples) <= 1, [s[1] for s in w.samples if len(s[1]) > 1][:3]
        assert agents[second].proc.poll() is None
    finally:
        for a in agents.values():
            a.stop()


def test_restarted_agent_holds_its_vote(lab_factory, tmp_path):
    """docs/agent.md, Startup hold: an agent restarted while a peer's agent does not answer votes for one
    takeover grace only for a coordinator it can see (none here: it abstains), then the election goes on;
    never two coordinators."""
    lab = lab_factory(count=3, majors=(17, 18))
    setup_extension(lab)
    cfgs = make_configs(tmp_path, lab, interval="%ss" % INTERVAL, timeout="%ss" % TIMEOUT, threshold=THRESHOLD)
    agents = {n: AgentProc(p, port, tmp_path / ("%s.log" % n)).start() for n, (p, port) in cfgs.items()}
    try:
        assert wait_for(lambda: roles(agents) == {"node1": "coordinator", "node2": "follower", "node3": "follower"}, 30), \
            roles(agents)
        with Watcher(agents) as w:
            agents["node1"].proc.send_signal(signal.SIGKILL)   # its PostgreSQL stays up, its agent is gone
            agents["node1"].proc.wait()
            agents["node3"].stop()
            seen = len(agents["node3"].lines())
            agents["node3"].start()

            def cycles():
                return [ln for ln in agents["node3"].lines()[seen:] if ln.get("msg") == "cycle"]

            def held(ln):
                return any(e.startswith("startup hold") for e in ln.get("events") or [])

            assert wait_for(lambda: any(held(ln) for ln in cycles()), 15), cycles()[:3]
            assert all(ln["vote"] is None for ln in cycles() if held(ln)), [ln for ln in cycles() if held(ln)][:3]
            assert "node1" in next(e for ln in cycles() if held(ln) for e in ln["events"] if e.startswith("startup hold"))
            # /status tells the same: the hold, whom it waits for, and no candidate (eligible is what the vote saw)
            during = agents["node3"].wait_status(lambda b: b["startup_hold"] is not None, 10)
            assert during and "node1" in during["startup_hold"]["unanswered"] and during["eligible"] == [] \
                and during["startup_hold"]["candidates"] == [] and during["startup_hold"]["seconds_left"] > 0 \
                and during["vote"] is None, during
            live = {n: agents[n] for n in ("node2", "node3")}
            assert wait_for(lambda: roles(live) == {"node2": "coordinator", "node3": "follower"}, 40), roles(live)
            last = cycles()[-1]
            assert last["vote"] == "node2" and not held(last)
            assert agents["node3"].wait_status(lambda b: b["startup_hold"] is None and b["vote"] == "node2", 10)
        assert w.samples and max(len(s[1]) for s in w.samples) <= 1, [s[1] for s in w.samples if len(s[1]) > 1][:3]
    finally:
        for a in agents.values():
            a.stop()
