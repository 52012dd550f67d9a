"""Housekeeping the agent does next to its health checks (``replication.maintenance``; both off unless set).

* Conflict-log retention, on every node, for its own log: decided entries detected more than
  ``conflict_log_retention`` ago are deleted (``steep_repl.purge_conflict_log``; PENDING entries and unfinished
  revert chains stay), one batch per cycle while there is more, then again after ``LOG_PURGE_PAUSE``.
* Tombstone purging, on the coordinator only, for the whole mesh, every ``tombstone_purge_interval``: the same
  run as ``playbooks/purge_tombstones.yml`` (``module_utils/tombstones.py``: two rounds over every node, then the
  horizons, then the purge). It waits for transactions and slots, so it runs in a thread of its own and never
  holds up a cycle; the mesh lock keeps it apart from a playbook run. Its outcome is written to every node's
  ``steep_repl.coordinator_state`` (key ``tombstone_purge``): the next coordinator, or a restarted agent, waits
  the interval from there (after a failure at most ``RETRY_AFTER_FAILURE``).

The cycle calls ``step`` once; it returns the events of the cycle's log line.
"""
import json
import threading
import time

from ansible_collections.steep.repl.plugins.module_utils import db

from . import collect
from .config import all_nodes, conn_kwargs, interval_text

LOG_PURGE_PAUSE = 600.0     # seconds between conflict-log purges once a purge found less than a batch
RETRY_AFTER_FAILURE = 900.0  # a failed tombstone purge is tried again after this (or the interval, if shorter)
STATE_KEY = "tombstone_purge"


def _now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _first_line(exc):
    """The first line of an error's message (its class name when it has none), for /status and the log line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def mesh_specs(cfg, environ=None):
    """Connection specs of every node of the agent's topology, as module_utils/tombstones.py takes them."""
    specs = []
    for node in all_nodes(cfg):
        kw = conn_kwargs(cfg, node, environ)
        specs.append(dict(node_id=node["name"], host=kw["host"], port=kw["port"], user=kw["user"],
                          password=kw.get("password"), database=kw["dbname"], ssl_mode=kw["sslmode"],
                          connect_timeout=kw["connect_timeout"]))
    return specs


class Maintenance:
    def __init__(self, cfg):
        self.cfg = cfg
        m = cfg["maintenance"]
        self.retention = m["conflict_log_retention"]
        self.interval = m["tombstone_purge_interval"]
        self.batch = m["batch_size"]
        self.stall = max(1, int(round(m["stall_timeout"])))
        self.next_log_purge = 0.0
        self.log_state = dict(enabled=self.retention is not None, retention_seconds=self.retention, last_run_at=None,
                              last_purged=None, purged_total=0, error=None)
        self.tomb_state = dict(enabled=self.interval is not None, interval_seconds=self.interval, running=False,
                               last_started_at=None, last_finished_at=None, last_result=None, error=None,
                               last_success_epoch=None)
        self.thread = None
        self.outcome = None      # set by the purge thread, taken by the next cycle
        self.lock = threading.Lock()

    # ----------------------------------------------------------------- conflict log
    def _conflict_log(self, conn, events):
        if self.retention is None or time.monotonic() < self.next_log_purge:
            return
        mod = collect.optional_module("conflicts")
        self.log_state["last_run_at"] = _now_iso()
        try:
            res = mod.purge_log(conn, interval_text(self.retention), self.batch, max_batches=1)
        except Exception as exc:
            self.log_state["error"] = _first_line(exc)
            self.next_log_purge = time.monotonic() + LOG_PURGE_PAUSE
            events.append("conflict log purge failed: %s" % self.log_state["error"])
            return
        self.log_state.update(error=None, last_purged=res["purged"])
        self.log_state["purged_total"] += res["purged"]
        if res["purged"]:
            events.append("purged %d conflict log entr%s older than %s" % (
                res["purged"], "y" if res["purged"] == 1 else "ies", interval_text(self.retention)))
        if res["complete"]:
            self.next_log_purge = time.monotonic() + LOG_PURGE_PAUSE

    # ----------------------------------------------------------------- tombstones
    def _last_purge(self, conn):
        row = db.fetch_one(conn, "SELECT value, EXTRACT(EPOCH FROM pg_catalog.now() - updated_at)::float8 AS age "
                                 "FROM steep_repl.coordinator_state WHERE key = %s", (STATE_KEY,))
        return (row["value"], row["age"]) if row else (None, None)

    def _record(self, outcome):
        """The outcome, in every node's coordinator_state: whichever agent is coordinator next knows when the
        mesh was last purged. Returns the nodes it could not be written to."""
        missed = []
        for node in all_nodes(self.cfg):
            try:
                conn = db.connect(conn_kwargs(self.cfg, node, statement_timeout=True))
            except Exception:
                missed.append(node["name"])
                continue
            try:
                with conn.cursor() as cur:
                    collect.put_state(cur, STATE_KEY, outcome)
            except Exception:
                missed.append(node["name"])
            finally:
                conn.close()
        return missed

    def _purge_thread(self):
        from ansible_collections.steep.repl.plugins.module_utils import tombstones
        try:
            res = tombstones.purge(mesh_specs(self.cfg), stall=self.stall, batch=self.batch, lock_timeout=5)
            outcome = dict(ok=True, purged=res.get("purged"), unique_settled=res.get("unique_settled"),
                           horizons=res.get("horizons"), departed=res.get("departed"), changed=res.get("changed"))
        except Exception as exc:
            outcome = dict(ok=False, error=_first_line(exc))
        outcome.update(finished_at=_now_iso(), by=self.cfg["this_node"]["name"])
        missed = self._record(outcome)
        with self.lock:
            self.outcome = dict(outcome, not_recorded_on=missed)

    def _tombstones(self, conn, is_coordinator, events):
        with self.lock:
            outcome, self.outcome = self.outcome, None
        if outcome is not None:
            self.tomb_state.update(running=False, last_finished_at=outcome["finished_at"],
                                   last_result=None if not outcome["ok"] else dict(
                                       (k, outcome.get(k)) for k in ("purged", "unique_settled", "horizons", "departed")),
                                   error=None if outcome["ok"] else outcome["error"])
            if outcome["not_recorded_on"]:
                events.append("the tombstone purge could not be recorded on %s (its agent may run it again early)"
                              % ", ".join(outcome["not_recorded_on"]))
            if outcome["ok"]:
                self.tomb_state["last_success_epoch"] = time.time()
                events.append("tombstone purge done: purged %s" % json.dumps(outcome["purged"], sort_keys=True))
            else:
                events.append("tombstone purge failed: %s" % outcome["error"])
        if self.interval is None or not is_coordinator or (self.thread is not None and self.thread.is_alive()):
            return
        last, age = self._last_purge(conn)
        wait = self.interval if not last or last.get("ok") else min(self.interval, RETRY_AFTER_FAILURE)
        if age is not None and age < wait:
            return
        self.tomb_state.update(running=True, last_started_at=_now_iso())
        self.thread = threading.Thread(target=self._purge_thread, name="tombstone-purge", daemon=True)
        self.thread.start()
        events.append("tombstone purge started (every %s)" % interval_text(self.interval))

    # ----------------------------------------------------------------- the cycle's entry point
    def step(self, conn, is_coordinator):
        """Run what is due on the local connection; returns the events for the cycle's log line."""
        events = []
        if self.retention is None and self.interval is None:
            return events
        if not db.fetch_value(conn, "SELECT pg_catalog.to_regclass('steep_repl.conflict_log') IS NOT NULL"):
            return events   # no conflict engine here (yet): nothing to keep or purge
        self._conflict_log(conn, events)
        try:
            self._tombstones(conn, is_coordinator, events)
        except Exception as exc:
            events.append("tombstone purge check failed: %s" % _first_line(exc))
        return events

    def view(self):
        return dict(conflict_log=dict(self.log_state), tombstones=dict(self.tomb_state))
