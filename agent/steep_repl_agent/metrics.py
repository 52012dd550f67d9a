"""Prometheus text exposition (format 0.0.4) of an agent snapshot. No dependency."""

LEVEL_VALUE = {"healthy": 0, "degraded": 1, "unhealthy": 2, "starting": 2}


def _esc(v):
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(d):
    if not d:
        return ""
    return "{" + ",".join('%s="%s"' % (k, _esc(v)) for k, v in sorted(d.items()) if v is not None) + "}"


def _num(v):
    if v is True:
        return "1"
    if v is False:
        return "0"
    f = float(v)
    return repr(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)


class _Out:
    def __init__(self):
        self.lines = []

    def family(self, name, mtype, help_text, samples):
        self.lines.append("# HELP %s %s" % (name, help_text))
        self.lines.append("# TYPE %s %s" % (name, mtype))
        for labels, value in samples:
            if value is None:
                continue
            self.lines.append("%s%s %s" % (name, _labels(labels), _num(value)))


def render(snap):
    node = snap.get("node")
    base = {"node": node}
    o = _Out()
    pg = snap.get("postgresql") or {}
    o.family("steep_repl_up", "gauge", "1 when the local PostgreSQL answers the agent.", [(base, bool(pg.get("ok")))])
    o.family("steep_repl_extension_installed", "gauge", "1 when the steep_repl extension is installed.",
             [(dict(base, version=pg.get("extension")), bool(pg.get("extension")))])
    o.family("steep_repl_health_status", "gauge", "Overall health: 0 healthy, 1 degraded, 2 unhealthy.",
             [(base, LEVEL_VALUE.get(snap.get("status"), 2))])
    subs = snap.get("subscriptions") or []
    o.family("steep_repl_replication_lag_bytes", "gauge", "Replication lag in bytes per subscription (incoming) or slot (outgoing).",
             [(dict(base, subscription=s["name"], direction=s["direction"], peer=s.get("peer")), s.get("lag_bytes")) for s in subs])
    o.family("steep_repl_replication_lag_seconds", "gauge", "Replication lag in seconds per subscription (incoming) or slot (outgoing).",
             [(dict(base, subscription=s["name"], direction=s["direction"], peer=s.get("peer")), s.get("lag_seconds")) for s in subs])
    o.family("steep_repl_subscription_running", "gauge", "1 when the subscription's apply worker runs.",
             [(dict(base, subscription=s["name"]), bool(s.get("running"))) for s in subs if s["direction"] == "incoming"])
    slots = [s for s in subs if s["direction"] == "outgoing"]
    o.family("steep_repl_slot_safe_wal_size_bytes", "gauge", "WAL a slot may still retain before max_slot_wal_keep_size invalidates it.",
             [(dict(base, slot=s["name"]), s.get("safe_wal_size")) for s in slots])
    o.family("steep_repl_slot_wal_status", "gauge", "pg_replication_slots.wal_status of each slot (1 for the current status).",
             [(dict(base, slot=s["name"], wal_status=s.get("wal_status") or "unknown"), 1) for s in slots])
    c = snap.get("conflicts") or {}
    o.family("steep_repl_conflicts_per_minute", "gauge", "Conflicts detected in the last minute.", [(base, c.get("per_minute"))])
    o.family("steep_repl_pending_conflicts", "gauge", "Conflicts waiting for manual resolution.", [(base, c.get("pending"))])
    o.family("steep_repl_conflicts_resolved_24h", "gauge", "Conflicts resolved in the last 24 hours.", [(base, c.get("resolved_24h"))])
    o.family("steep_repl_ddl_queue_depth", "gauge", "DDL commands pending or approved but not applied.", [(base, snap.get("ddl_queue"))])
    o.family("steep_repl_range_utilization_pct", "gauge", "Identity range utilisation of this node per table (percent).",
             [(dict(base, table="%s.%s" % (r["table_schema"], r["table_name"])), r["utilization_pct"]) for r in snap.get("ranges") or []])
    peers = snap.get("peers") or {}
    o.family("steep_repl_peer_up", "gauge", "1 when the peer passes its health check (PostgreSQL and agent).",
             [(dict(base, peer=n), bool(v.get("healthy"))) for n, v in sorted(peers.items())])
    o.family("steep_repl_node_state", "gauge", "Initialisation state of each registered node (1 for the current state).",
             [(dict(base, node_id=n.get("node_id"), state=n.get("init_state") or n.get("status") or "unknown"), 1)
              for n in snap.get("nodes") or []])
    o.family("steep_repl_is_coordinator", "gauge", "1 when this node is the coordinator.", [(base, snap.get("role") == "coordinator")])
    o.family("steep_repl_coordinator_info", "gauge", "The coordinator this node believes in.",
             [(dict(base, coordinator=snap.get("coordinator") or ""), 1)])
    o.family("steep_repl_coordinator_term", "gauge", "Local election term (increments on every coordinator change seen).",
             [(base, snap.get("term", 0))])
    mt = snap.get("maintenance") or {}
    cl, tb = mt.get("conflict_log") or {}, mt.get("tombstones") or {}
    o.family("steep_repl_conflict_log_purged_total", "counter",
             "Conflict-log entries this agent deleted for replication.maintenance.conflict_log_retention.",
             [(base, cl.get("purged_total"))] if cl.get("enabled") else [])
    o.family("steep_repl_maintenance_failing", "gauge", "1 when the last run of a maintenance task failed (enabled tasks).",
             [(dict(base, task=name), bool(st.get("error"))) for name, st in (("conflict_log", cl), ("tombstones", tb))
              if st.get("enabled")])
    o.family("steep_repl_tombstone_purge_last_success_timestamp_seconds", "gauge",
             "When this agent last finished a tombstone purge of the mesh (coordinator only).",
             [(base, tb.get("last_success_epoch"))])
    levels = {"warning": 0, "critical": 0}
    for a in snap.get("alerts") or []:
        levels[a["level"]] = levels.get(a["level"], 0) + 1
    o.family("steep_repl_alerts_firing", "gauge", "Alerts currently firing by level.", [(dict(base, level=k), v) for k, v in sorted(levels.items())])
    o.family("steep_repl_cycle_duration_seconds", "gauge", "Duration of the last agent cycle.", [(base, snap.get("cycle_duration_seconds"))])
    o.family("steep_repl_agent_cycles_total", "counter", "Agent cycles completed.", [(base, snap.get("cycles", 0))])
    return "\n".join(o.lines) + "\n"
