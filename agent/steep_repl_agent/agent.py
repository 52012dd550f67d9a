"""The agent: one loop; every cycle checks the local node and the peers, runs
the coordinator election, evaluates alerts, publishes a snapshot (HTTP, IPC)
and logs exactly one structured JSON line of what it did. It never crashes on
a fault: a failing check is reported in /health and in the log line."""
import concurrent.futures
import datetime
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.request

from ansible_collections.steep.repl.plugins.module_utils import db

from . import __version__, alerts, collect, election
from .config import all_nodes, conn_kwargs
from .maintenance import Maintenance

LEVEL_ORDER = {"debug": 0, "info": 1, "warn": 2, "error": 3}
STATUS_OF = {"ok": "healthy", "warning": "degraded", "critical": "unhealthy"}


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


class JsonLog:
    """Seed 8.6: one JSON object per line: level, ts, msg, then fields."""

    def __init__(self, level="info", path=None, stream=None):
        self.threshold = LEVEL_ORDER[level]
        self.path = path
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()

    def log(self, level, msg, **fields):
        if LEVEL_ORDER[level] < self.threshold:
            return
        line = json.dumps(dict([("level", level), ("ts", utcnow()), ("msg", msg)] + list(fields.items())),
                          default=str, separators=(",", ":"))
        with self.lock:
            try:
                if self.path:
                    with open(self.path, "a") as fh:
                        fh.write(line + "\n")
                else:
                    self.stream.write(line + "\n")
                    self.stream.flush()
            except (OSError, ValueError):
                pass


def sd_notify(message):
    """systemd notification without a dependency (no-op when NOTIFY_SOCKET is unset)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not hasattr(socket, "AF_UNIX"):
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


def short_error(exc):
    text = str(exc).strip().splitlines()
    return (exc.__class__.__name__ + ": " + text[0]) if text else exc.__class__.__name__


def client_ssl_context(cfg):
    tls = cfg["tls"]
    if tls.get("ca_file"):
        return ssl.create_default_context(cafile=tls["ca_file"])
    ctx = ssl.create_default_context()
    if not tls.get("verify", True):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def fetch_agent(cfg, node, path="/status", timeout=5.0):
    scheme = node.get("agent_scheme") or ("https" if cfg["tls"]["enabled"] else "http")
    url = "%s://%s:%s%s" % (scheme, node["agent_host"], node["agent_port"], path)
    ctx = client_ssl_context(cfg) if scheme == "https" else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
            return json.loads(resp.read().decode())
    except urllib.error.HTTPError as exc:  # 503 still carries the JSON body
        return json.loads(exc.read().decode())


class Agent:
    def __init__(self, cfg, log=None):
        self.cfg = cfg
        self.me = cfg["this_node"]
        self.log = log or JsonLog(cfg["agent"]["log_level"], cfg["agent"]["log_file"])
        self.stop_event = threading.Event()
        self.interval = cfg["health"]["interval"]
        self.timeout = cfg["health"]["timeout"]
        thr = cfg["health"]["unhealthy_threshold"]
        self.pg_health = {p["name"]: election.PeerHealth(thr) for p in cfg["peers"]}
        self.agent_health = {p["name"]: election.PeerHealth(thr) for p in cfg["peers"]}
        self.peer_last = {p["name"]: {} for p in cfg["peers"]}
        self.peer_conns = {}
        self.inflight = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(cfg["peers"]))),
                                                          thread_name_prefix="peer") if cfg["peers"] else None
        self.local_conn = None
        self.term = 0
        self.coordinator = None
        self.is_coordinator = False
        # A coordinator decision is a lease: it expires unless renewed by the next cycle (a hung loop stops claiming).
        self.lease = cfg["lease"]
        self.grace = cfg["takeover_grace"]
        self.claim_until = 0.0
        self.peer_claim_seen = {}  # peer -> monotonic time its agent last reported role coordinator
        self.written_state = None
        self.cycles = 0
        self.started = time.time()
        self.started_mono = time.monotonic()  # the startup hold (election.startup_eligible) runs for one takeover grace
        self.last_cycle_end = None
        self.snapshot = dict(node=self.me["name"], status="starting", role="follower", vote=None, checks={},
                             peers={}, coordinator=None, ts=utcnow(), version=__version__)
        self.health = dict(status="unhealthy", node=self.me["name"], checks={"agent": "starting"})
        self.servers = []
        self.readonly = False  # the CLI's one-shot fallback never writes
        self.maintenance = Maintenance(cfg)

    # ----------------------------------------------------------------- local node
    def _local(self):
        """(ok, error, data) for the local PostgreSQL; reconnects as needed."""
        try:
            if self.local_conn is None or self.local_conn.closed:
                self.local_conn = db.connect(conn_kwargs(self.cfg, self.me, statement_timeout=True))
                prev = collect.read_coordinator(self.local_conn) if db.extension_version(self.local_conn) else None
                if prev and isinstance(prev, dict):
                    self.term = max(self.term, int(prev.get("term") or 0))
                self.written_state = None
            data = collect.local_snapshot(self.local_conn, self.me["name"])
            if data["extension"] and not self.readonly:
                if collect.heartbeat(self.local_conn, self.me, "online"):
                    data["registered"] = True
            return True, None, data
        except Exception as exc:  # the agent never crashes on a database fault
            self._close_local()
            return False, short_error(exc), {}

    def _close_local(self):
        if self.local_conn is not None:
            try:
                self.local_conn.close()
            except Exception:
                pass
        self.local_conn = None

    # ----------------------------------------------------------------- peers
    def _check_peer(self, peer):
        name = peer["name"]
        res = dict(name=name, pg_ok=False, agent_ok=None, checked_at=utcnow())
        try:
            conn = self.peer_conns.get(name)
            if conn is None or conn.closed:
                conn = db.connect(conn_kwargs(self.cfg, peer, statement_timeout=True))
                self.peer_conns[name] = conn
            row = collect.peer_probe(conn)
            res.update(pg_ok=True, lsn=row["lsn"], extension=row["extension"])
        except Exception as exc:
            res["pg_error"] = short_error(exc)
            conn = self.peer_conns.pop(name, None)
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass
        if peer.get("agent_port"):
            try:
                st = fetch_agent(self.cfg, peer, "/status", self.timeout)
                res["agent_ok"] = True
                res["agent"] = dict((k, st.get(k)) for k in ("vote", "role", "coordinator", "term", "status", "age_seconds"))
                res["agent"]["postgresql"] = (st.get("checks") or {}).get("postgresql")
            except Exception as exc:
                res.update(agent_ok=False, agent_error=short_error(exc))
        return res

    def _check_peers(self):
        if not self.pool:
            return {}
        futures = {}
        results = {}
        for peer in self.cfg["peers"]:
            prev = self.inflight.get(peer["name"])
            if prev is not None and not prev.done():
                results[peer["name"]] = dict(name=peer["name"], pg_ok=False, agent_ok=False if peer.get("agent_port") else None,
                                             pg_error="previous check still running (timeout)")
                continue
            futures[peer["name"]] = self.inflight[peer["name"]] = self.pool.submit(self._check_peer, peer)
        deadline = time.time() + self.timeout + 1.0
        for name, fut in futures.items():
            try:
                results[name] = fut.result(timeout=max(0.0, deadline - time.time()))
            except concurrent.futures.TimeoutError:
                results[name] = dict(name=name, pg_ok=False, agent_ok=False, pg_error="timed out after %.1fs" % self.timeout)
            except Exception as exc:
                results[name] = dict(name=name, pg_ok=False, agent_ok=False, pg_error=short_error(exc))
        return results

    # ----------------------------------------------------------------- one cycle
    def cycle(self):
        t0 = time.time()
        m0 = time.monotonic()  # the lease runs from before the votes it rests on were read, not from the cycle's end
        events = []
        ok, err, data = self._local()
        if data.get("registered"):
            events.append("registered node %s in steep_repl.nodes" % self.me["name"])
        peers = self._check_peers()
        peer_view = {}
        eligible = {}
        if ok:
            eligible[self.me["name"]] = self.me["priority"]
        peer_votes = {}
        for p in self.cfg["peers"]:
            r = peers.get(p["name"], {})
            pg_h = self.pg_health[p["name"]].record(bool(r.get("pg_ok")))
            ag = r.get("agent") or {}
            if p.get("agent_port"):
                ag_h = self.agent_health[p["name"]].record(bool(r.get("agent_ok")))
                fresh = r.get("agent_ok") and (ag.get("age_seconds") is None or ag["age_seconds"] <= self.lease)
                if fresh:
                    peer_votes[p["name"]] = ag.get("vote")
                if r.get("agent_ok"):
                    if ag.get("role") == "coordinator":
                        self.peer_claim_seen[p["name"]] = time.monotonic()
                    else:
                        self.peer_claim_seen.pop(p["name"], None)  # it says it is not (or no longer) coordinator
            else:
                ag_h = None
            own_pg = ag.get("postgresql") if r.get("agent_ok") else None
            eligible_p = pg_h and (ag_h is None or (ag_h and own_pg in (None, "ok")))
            if eligible_p:
                eligible[p["name"]] = p["priority"]
            self.peer_last[p["name"]] = r
            peer_view[p["name"]] = dict(
                postgresql="ok" if r.get("pg_ok") else "down", agent=None if ag_h is None else ("ok" if r.get("agent_ok") else "down"),
                healthy=bool(eligible_p), pg_failures=self.pg_health[p["name"]].failures,
                error=r.get("pg_error") or r.get("agent_error"), vote=ag.get("vote") if r.get("agent_ok") else None,
                role=ag.get("role") if r.get("agent_ok") else None, lsn=r.get("lsn"), priority=p["priority"])
        total = len(all_nodes(self.cfg))
        priorities = dict((n["name"], n["priority"]) for n in all_nodes(self.cfg))
        claims = [n for n, v in peer_view.items() if v["role"] == "coordinator"]
        hold_left = self.grace - (time.monotonic() - self.started_mono)
        unanswered = sorted(p["name"] for p in self.cfg["peers"]
                            if p.get("agent_port") and not peers.get(p["name"], {}).get("agent_ok"))
        held = election.startup_eligible(eligible, claims, unanswered, hold_left > 0)
        # what the hold does this cycle, for /status (None when it does not restrict the vote)
        hold = (dict(seconds_left=round(hold_left, 1), unanswered=unanswered, candidates=sorted(held))
                if held != eligible else None)
        if held != eligible:
            events.append("startup hold: agent(s) of %s not answering, voting only for a visible coordinator "
                          "(%s) for %.1fs more" % (", ".join(unanswered), ", ".join(claims) or "none", hold_left))
            eligible = held
        dec = election.decide(self.me["name"], eligible, peer_votes, total, priorities, self.cfg["mode"], self.cfg["hub"])
        if dec["vote"] and dec["vote"] != self.me["name"]:
            # The peer we vote for may hold a coordinator lease that rests on this vote even if we never saw it
            # claim the role (cut off right after its election): waited for like a claim seen now. Dropped
            # above as soon as its agent answers that it is not coordinator.
            self.peer_claim_seen[dec["vote"]] = time.monotonic()
        coordinator = dec["coordinator"]
        if coordinator is None:
            coordinator = claims[0] if len(claims) == 1 else None
        if dec["is_coordinator"] and not self.is_coordinator:
            # Take over only when no other node may still hold a coordinator lease: a peer that claimed the role (or
            # that we voted for) and was then lost from sight is waited for (takeover grace = its lease + one of our
            # check rounds).
            waiting = sorted(n for n, t in self.peer_claim_seen.items() if time.monotonic() - t < self.grace)
            if waiting:
                dec = dict(dec, is_coordinator=False, coordinator=None)
                events.append("deferring takeover: %s claimed the coordinator role or had our vote %.1fs ago (grace %.1fs)"
                              % (waiting[0], time.monotonic() - self.peer_claim_seen[waiting[0]], self.grace))
                coordinator = None
        if dec["is_coordinator"] != self.is_coordinator:
            events.append("became coordinator" if dec["is_coordinator"] else "stepped down as coordinator")
        if coordinator != self.coordinator:
            self.term += 1
            events.append("coordinator %s -> %s (term %d)" % (self.coordinator, coordinator, self.term))
        self.is_coordinator = dec["is_coordinator"]
        self.coordinator = coordinator
        self.claim_until = m0 + self.lease if self.is_coordinator else 0.0

        # Pre-allocation of identity ranges (ranges module_utils, when present).
        if ok and data.get("extension") and self.cfg["ranges"]["preallocate"] and not self.readonly:
            try:
                res = collect.expand_ranges(self.local_conn, self.cfg["ranges"]["threshold_percent"])
                if res:
                    events.append("identity ranges expanded: %s" % (res,))
            except Exception as exc:
                events.append("identity range expansion failed: %s" % short_error(exc))

        # Rows that lost a UNIQUE_VIOLATION here: their tombstones go to the other nodes (docs/conflicts.md).
        if ok and data.get("extension") and not self.readonly:
            try:
                sent = collect.settle_unique(self.local_conn)
                if sent:
                    events.append("sent %d unique-conflict tombstone(s)" % sent)
            except Exception as exc:
                events.append("sending unique-conflict tombstones failed: %s" % short_error(exc))

        # Conflict-log retention and tombstone purging, when configured (maintenance.py).
        if ok and data.get("extension") and not self.readonly:
            try:
                events.extend(self.maintenance.step(self.local_conn, self.is_coordinator))
            except Exception as exc:
                events.append("maintenance failed: %s" % short_error(exc))

        if ok and data.get("extension") and not self.readonly:
            state = dict(node=coordinator, term=self.term, decided_by=self.me["name"], voters=dec["voters"],
                         quorum=dec["quorum"], total=total, mode=self.cfg["mode"])
            key = (coordinator, self.term, tuple(dec["voters"]))
            if key != self.written_state:
                try:
                    collect.write_coordinator(self.local_conn, self.me["name"], dict(state, at=utcnow()))
                    if any(e.startswith("coordinator ") for e in events) and self.is_coordinator:
                        collect.audit(self.local_conn, "coordinator_elected", "node", self.me["name"], None, state)
                    self.written_state = key
                except Exception as exc:
                    events.append("writing coordinator_state failed: %s" % short_error(exc))

        subs = self._lag(data, peers)
        samples = self._samples(data, subs)
        fired = alerts.evaluate(self.cfg["rules"], samples)
        checks = self._checks(ok, err, data, peer_view, subs, fired, dec, total)
        status = STATUS_OF[alerts.worst(c if isinstance(c, str) else c["status"] for c in checks.values())]
        now = utcnow()
        self.health = dict(status=status, node=self.me["name"], ts=now, role="coordinator" if self.is_coordinator else "follower",
                           coordinator=coordinator, checks=checks,
                           alerts=[dict(name=a["name"], level=a["level"], value=a["value"], labels=a["labels"],
                                        threshold=a["threshold"]) for a in fired])
        duration = time.time() - t0
        self.cycles += 1
        self.snapshot = dict(
            node=self.me["name"], ts=now, version=__version__, status=status, mode=self.cfg["mode"], hub=self.cfg["hub"],
            role=self.health["role"], coordinator=coordinator, term=self.term, vote=dec["vote"], voters=dec["voters"],
            quorum=dec["quorum"], total_nodes=total, eligible=sorted(eligible), startup_hold=hold, peers=peer_view, checks=checks,
            alerts=self.health["alerts"],
            postgresql=dict(ok=ok, error=err, version=data.get("server_version"), extension=data.get("extension"),
                            lsn=data.get("current_lsn")),
            subscriptions=subs, conflicts=data.get("conflicts"), ddl_queue=data.get("ddl_queue"),
            ranges=data.get("ranges") or [], nodes=data.get("nodes") or [], maintenance=self.maintenance.view(),
            cycles=self.cycles,
            cycle_duration_seconds=round(duration, 4), interval_seconds=self.interval, lease_seconds=self.lease,
            election_timeout_seconds=self.cfg["election_timeout"],
            uptime_seconds=round(time.time() - self.started, 1))
        self.last_cycle_end = time.time()
        level = {"healthy": "info", "degraded": "warn", "unhealthy": "error"}[status]
        lags = [s["lag_bytes"] for s in subs if s.get("lag_bytes") is not None]
        self.log.log(level, "cycle", node=self.me["name"], cycle=self.cycles, status=status, role=self.health["role"],
                     coordinator=coordinator, term=self.term, vote=dec["vote"], voters=dec["voters"],
                     postgresql="ok" if ok else err,
                     peers=dict((n, "ok" if v["healthy"] else (v["error"] or "unhealthy")) for n, v in peer_view.items()),
                     lag_bytes=max(lags) if lags else None,
                     conflicts_per_minute=(data.get("conflicts") or {}).get("per_minute"),
                     pending_conflicts=(data.get("conflicts") or {}).get("pending"), ddl_queue=data.get("ddl_queue"),
                     alerts=["%s:%s" % (a["name"], a["level"]) for a in fired], events=events,
                     duration_ms=int(duration * 1000))
        sd_notify("WATCHDOG=1\nSTATUS=%s, %s, coordinator=%s" % (status, self.health["role"], coordinator))
        return self.snapshot

    def _lag(self, data, peers):
        out = []
        by_addr = {}
        for p in self.cfg["peers"]:
            by_addr[(p["host"], str(p["port"]))] = p["name"]
        for s in data.get("subscriptions") or []:
            info = dict(kv.split("=", 1) for kv in (s.get("subconninfo") or "").split() if "=" in kv)
            peer = by_addr.get((info.get("host", "").strip("'"), info.get("port", "5432").strip("'")))
            lag_bytes = None
            if peer and peers.get(peer, {}).get("lsn") and s.get("received_lsn"):
                lag_bytes = max(0, collect.lsn_int(peers[peer]["lsn"]) - collect.lsn_int(s["received_lsn"]))
            out.append(dict(name=s["subname"], direction="incoming", peer=peer, enabled=s["subenabled"],
                            running=s.get("pid") is not None, lag_bytes=lag_bytes, lag_seconds=s.get("lag_seconds")))
        for s in data.get("slots") or []:
            out.append(dict(name=s["slot_name"], direction="outgoing", active=s["active"], lag_bytes=s.get("lag_bytes"),
                            lag_seconds=s.get("lag_seconds"), wal_status=s.get("wal_status"),
                            safe_wal_size=s.get("safe_wal_size")))
        return out

    def _samples(self, data, subs):
        c = data.get("conflicts") or {}
        samples = {
            "replication_lag_bytes": [(dict(subscription=s["name"], direction=s["direction"]), s["lag_bytes"]) for s in subs],
            "replication_lag_seconds": [(dict(subscription=s["name"], direction=s["direction"]), s["lag_seconds"]) for s in subs],
            "steep_repl_conflicts_per_minute": [({}, c.get("per_minute"))],
            "steep_repl_pending_conflicts": [({}, c.get("pending"))],
            "steep_repl_ddl_queue_depth": [({}, data.get("ddl_queue"))],
            "steep_repl_range_utilization_pct": [(dict(table="%s.%s" % (r["table_schema"], r["table_name"])), r["utilization_pct"])
                                                 for r in data.get("ranges") or []],
            "steep_repl_slot_safe_wal_size_bytes": [(dict(slot=s["name"]), s.get("safe_wal_size")) for s in subs
                                                    if s["direction"] == "outgoing"],
        }
        return samples

    def _checks(self, ok, err, data, peer_view, subs, fired, dec, total):
        def lvl(metric):
            return alerts.worst(a["level"] for a in fired if a["metric"] == metric)

        checks = {"postgresql": "ok" if ok else "critical"}
        checks["extension"] = "ok" if data.get("extension") else "critical"
        down = sorted(n for n, v in peer_view.items() if not v["healthy"])
        visible = 1 + len(peer_view) - len(down)
        if not down:
            checks["peer_connectivity"] = "ok"
        else:
            checks["peer_connectivity"] = "critical" if (total > 2 and visible < election.quorum_size(total)) else "warning"
        lag_b = [s["lag_bytes"] for s in subs if s.get("lag_bytes") is not None]
        lag_s = [s["lag_seconds"] for s in subs if s.get("lag_seconds") is not None]
        checks["replication_lag"] = dict(status=alerts.worst([lvl("replication_lag_bytes"), lvl("replication_lag_seconds")]),
                                         lag_bytes=int(max(lag_b)) if lag_b else 0,
                                         lag_seconds=round(max(lag_s), 3) if lag_s else 0.0)
        c = data.get("conflicts") or {}
        checks["conflict_rate"] = dict(status=lvl("steep_repl_conflicts_per_minute"), per_minute=c.get("per_minute", 0.0))
        checks["pending_conflicts"] = dict(status=lvl("steep_repl_pending_conflicts"), count=c.get("pending", 0))
        checks["ddl_queue"] = dict(status=lvl("steep_repl_ddl_queue_depth"), depth=data.get("ddl_queue") or 0)
        rr = [r for r in self.cfg["rules"] if r["metric"] == "steep_repl_range_utilization_pct"]
        warn_at = rr[0]["warning"] if rr and rr[0]["warning"] is not None else 80
        ranges = data.get("ranges") or []
        checks["range_utilization"] = {
            "status": lvl("steep_repl_range_utilization_pct"),
            "tables_above_%dpct" % int(warn_at): sorted(
                ("%s.%s" % (r["table_schema"], r["table_name"])) if r["table_schema"] != "public" else r["table_name"]
                for r in ranges if r["utilization_pct"] >= warn_at),
            "max_pct": max([r["utilization_pct"] for r in ranges] or [0.0]),
        }
        slots = [s for s in subs if s["direction"] == "outgoing"]
        lost = [s["name"] for s in slots if s.get("wal_status") in ("unreserved", "lost")]
        slot_level = alerts.worst([lvl("steep_repl_slot_safe_wal_size_bytes"), "critical" if lost else "ok",
                                   "warning" if any(s.get("wal_status") == "extended" for s in slots) else "ok"])
        checks["slot_wal_retention"] = dict(status=slot_level, at_risk=sorted(lost),
                                            slots=[dict(slot=s["name"], wal_status=s.get("wal_status"),
                                                        safe_wal_size=s.get("safe_wal_size")) for s in slots])
        not_sync = sorted(n.get("node_id") for n in data.get("nodes") or []
                          if n.get("init_state") not in (None, "SYNCHRONIZED"))
        checks["node_states"] = dict(status="warning" if not_sync else "ok", not_synchronized=not_sync)
        checks["coordinator"] = dict(status="ok" if self.coordinator else "warning", node=self.coordinator,
                                     this_node=self.is_coordinator, vote=dec["vote"], voters=dec["voters"], quorum=dec["quorum"])
        return checks

    # ----------------------------------------------------------------- published views
    def claims(self):
        """True while this node's coordinator lease is valid (renewed every cycle)."""
        return self.is_coordinator and time.monotonic() < self.claim_until

    def _expire(self, d):
        d = dict(d)
        if d.get("role") == "coordinator" and not self.claims():
            d["role"] = "follower"
            d["lease_expired"] = True
        return d

    def view(self):
        """The snapshot as served: age of the data, role only while the lease holds."""
        d = self._expire(self.snapshot)
        if self.last_cycle_end is not None:
            d["age_seconds"] = round(time.time() - self.last_cycle_end, 3)
        return d

    def health_view(self):
        return self._expire(self.health)

    # ----------------------------------------------------------------- service
    def alive(self):
        if self.last_cycle_end is None:
            return time.time() - self.started < 3 * self.interval + 2 * self.timeout + 5
        return time.time() - self.last_cycle_end < 3 * self.interval + 2 * self.timeout + 5

    def ready(self):
        pg = self.snapshot.get("postgresql") or {}
        return bool(pg.get("ok") and pg.get("extension"))

    def request_stop(self, *_args):
        self.stop_event.set()

    def run(self):
        from . import server
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self.request_stop)
            except (ValueError, OSError):
                pass
        self.log.log("info", "agent starting", node=self.me["name"], version=__version__, pid=os.getpid(),
                     mode=self.cfg["mode"], peers=[p["name"] for p in self.cfg["peers"]],
                     http_port=self.cfg["agent"]["http_port"], ipc=self.cfg["agent"]["ipc_path"],
                     tls=self.cfg["tls"]["enabled"], interval=self.interval, config=self.cfg.get("path"))
        try:
            self.servers = [server.HttpApi(self), server.IpcServer(self)]
            for s in self.servers:
                s.start()
        except Exception as exc:
            self.log.log("error", "agent cannot start", error=short_error(exc))
            self.shutdown()
            return 2
        sd_notify("READY=1\nSTATUS=starting")
        while not self.stop_event.is_set():
            t0 = time.time()
            try:
                self.cycle()
            except Exception as exc:  # never crash: report and keep looping
                self.log.log("error", "cycle failed", node=self.me["name"], error=short_error(exc))
            self.stop_event.wait(max(0.05, self.interval - (time.time() - t0)))
        sd_notify("STOPPING=1")
        self.shutdown()
        self.log.log("info", "agent stopped", node=self.me["name"], cycles=self.cycles)
        return 0

    def shutdown(self):
        for s in self.servers:
            try:
                s.stop()
            except Exception:
                pass
        if self.pool:
            self.pool.shutdown(wait=False)
        self._close_local()
        for conn in list(self.peer_conns.values()):
            try:
                conn.close()
            except Exception:
                pass
