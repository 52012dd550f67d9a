"""Agent configuration: the seed's ``replication:`` YAML, validated at start.

Every error names the key (``replication.topology.health_check.interval``) and
the fix. Passwords are never stored in the config: they come from an
environment variable (``password_env``) or a command (``password_command``).
"""
import os
import re
import shlex
import subprocess
import sys
import tempfile

import yaml

NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
DEFAULT_PASSWORD_ENV = "STEEP_PG_PASSWORD"
DEFAULT_HTTP_PORT = 5433

# Seed 8.1 / 8.3 thresholds. direction "above": alert when value >= threshold;
# "below": alert when value <= threshold (e.g. WAL a slot may still retain).
DEFAULT_RULES = [
    dict(name="replication_lag_bytes", metric="replication_lag_bytes", warning=52428800, critical=104857600),
    dict(name="replication_lag_time", metric="replication_lag_seconds", warning=30, critical=60),
    dict(name="high_conflict_rate", metric="steep_repl_conflicts_per_minute", warning=5, critical=20),
    dict(name="pending_conflicts", metric="steep_repl_pending_conflicts", warning=1, critical=100),
    dict(name="ddl_queue_depth", metric="steep_repl_ddl_queue_depth", warning=5, critical=20),
    dict(name="range_exhaustion_warning", metric="steep_repl_range_utilization_pct", warning=80, critical=95),
    dict(name="slot_wal_retention", metric="steep_repl_slot_safe_wal_size_bytes", warning=1073741824,
         critical=268435456, direction="below"),
]
METRICS = sorted(set(r["metric"] for r in DEFAULT_RULES))


class ConfigError(Exception):
    """Bad configuration; the message names the key and the fix."""


def parse_duration(value, key):
    """Seconds (float) from ``5s``, ``500ms``, ``1m``, ``2h``, ``90d`` or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError("%s: %r is not a duration. Fix: use e.g. 5s, 500ms, 1m, 2h, 90d or a number of seconds." % (key, value))
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = DURATION_RE.match(str(value))
        if not m:
            raise ConfigError("%s: %r is not a duration. Fix: use e.g. 5s, 500ms, 1m, 2h, 90d or a number of seconds."
                              % (key, value))
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]
    if seconds <= 0:
        raise ConfigError("%s: must be greater than 0 (got %r)." % (key, value))
    return seconds


def interval_text(seconds):
    """A PostgreSQL interval for a number of seconds (a parsed duration)."""
    return "%s seconds" % (int(seconds) if float(seconds).is_integer() else seconds)


def _optional_duration(value, key):
    """A duration, or None when the feature is off (unset, empty, ``off`` or false)."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "off")):
        return None
    return parse_duration(value, key)


def _mapping(value, key, required=False):
    if value is None:
        if required:
            raise ConfigError("%s: missing. Fix: add the %s section (see docs/agent.md)." % (key, key))
        return {}
    if not isinstance(value, dict):
        raise ConfigError("%s: must be a mapping, got %s." % (key, type(value).__name__))
    return value


def _unknown(section, allowed, key):
    extra = sorted(set(section) - set(allowed))
    if extra:
        raise ConfigError("%s.%s: unknown key. Fix: remove it or use one of: %s."
                          % (key, extra[0], ", ".join(sorted(allowed))))


def _int(value, key, minimum=None, maximum=None, default=None):
    if value is None:
        if default is None:
            raise ConfigError("%s: missing. Fix: set it to an integer." % key)
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, bool):
                raise ValueError
            value = int(str(value))
        except ValueError:
            raise ConfigError("%s: %r is not an integer." % (key, value))
    if minimum is not None and value < minimum:
        raise ConfigError("%s: %s is below the minimum %s." % (key, value, minimum))
    if maximum is not None and value > maximum:
        raise ConfigError("%s: %s is above the maximum %s." % (key, value, maximum))
    return value


def _str(value, key, default=None, required=False):
    if value is None:
        if required:
            raise ConfigError("%s: missing. Fix: set it." % key)
        return default
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ConfigError("%s: must be a string, got %s." % (key, type(value).__name__))
    return str(value)


def _number(value, key):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError("%s: %r is not a number." % (key, value))
    return float(value)


def _node(entry, key, default_port=5432):
    entry = _mapping(entry, key, required=True)
    _unknown(entry, ["name", "host", "port", "priority", "database", "user", "agent_host", "agent_port",
                     "agent_scheme", "sslmode"], key)
    name = _str(entry.get("name"), key + ".name", required=True)
    if not NAME_RE.match(name):
        raise ConfigError("%s.name: %r is not a valid node id. Fix: 1-40 characters, lower-case letters, digits "
                          "and '_', starting with a letter or '_' (e.g. node_a)." % (key, name))
    node = dict(
        name=name,
        host=_str(entry.get("host"), key + ".host", default="127.0.0.1"),
        port=_int(entry.get("port"), key + ".port", 1, 65535, default=default_port),
        priority=_int(entry.get("priority"), key + ".priority", 0, 1000000, default=50),
        database=_str(entry.get("database"), key + ".database"),
        user=_str(entry.get("user"), key + ".user"),
        agent_host=_str(entry.get("agent_host"), key + ".agent_host"),
        agent_port=None if entry.get("agent_port") is None else _int(entry.get("agent_port"), key + ".agent_port", 1, 65535),
        agent_scheme=_str(entry.get("agent_scheme"), key + ".agent_scheme"),
        sslmode=_str(entry.get("sslmode"), key + ".sslmode", default="prefer"),
    )
    if node["agent_scheme"] not in (None, "http", "https"):
        raise ConfigError("%s.agent_scheme: %r is not one of http, https." % (key, node["agent_scheme"]))
    node["agent_host"] = node["agent_host"] or node["host"]
    return node


def _rules(alerts, key):
    alerts = _mapping(alerts, key)
    _unknown(alerts, ["rules"], key)
    rules = {r["name"]: dict(r, direction=r.get("direction", "above")) for r in DEFAULT_RULES}
    given = alerts.get("rules") or []
    if not isinstance(given, list):
        raise ConfigError("%s.rules: must be a list of rules (name, metric, warning, critical)." % key)
    for i, rule in enumerate(given):
        rk = "%s.rules[%d]" % (key, i)
        rule = _mapping(rule, rk, required=True)
        _unknown(rule, ["name", "metric", "warning", "critical", "direction"], rk)
        metric = _str(rule.get("metric"), rk + ".metric", required=True)
        if metric not in METRICS:
            raise ConfigError("%s.metric: %r is not a known metric. Fix: use one of: %s." % (rk, metric, ", ".join(METRICS)))
        name = _str(rule.get("name"), rk + ".name", default=metric)
        direction = _str(rule.get("direction"), rk + ".direction", default="below" if "safe_wal" in metric else "above")
        if direction not in ("above", "below"):
            raise ConfigError("%s.direction: %r is not one of above, below." % (rk, direction))
        warning = _number(rule.get("warning"), rk + ".warning")
        critical = _number(rule.get("critical"), rk + ".critical")
        if warning is None and critical is None:
            raise ConfigError("%s: set warning and/or critical." % rk)
        if warning is not None and critical is not None:
            if (direction == "above" and warning > critical) or (direction == "below" and warning < critical):
                raise ConfigError("%s.warning: %s is past the critical threshold %s. Fix: the warning threshold must "
                                  "be reached before the critical one." % (rk, warning, critical))
        # A rule for a metric replaces the default rule for that metric.
        for old in [n for n, r in rules.items() if r["metric"] == metric]:
            del rules[old]
        rules[name] = dict(name=name, metric=metric, warning=warning, critical=critical, direction=direction)
    return list(rules.values())


def validate(raw, environ=None):
    """The normalised configuration from the parsed YAML, or ConfigError naming the key."""
    environ = os.environ if environ is None else environ
    raw = _mapping(raw, "(top level)", required=True)
    _unknown(raw, ["replication"], "(top level)")
    rep = _mapping(raw.get("replication"), "replication", required=True)
    _unknown(rep, ["topology", "credentials", "tls", "alerts", "agent", "identity_ranges", "networking", "maintenance"],
             "replication")
    topo = _mapping(rep.get("topology"), "replication.topology", required=True)
    _unknown(topo, ["mode", "hub", "this_node", "nodes", "health_check", "election_timeout"], "replication.topology")
    mode = _str(topo.get("mode"), "replication.topology.mode", default="mesh")
    if mode not in ("star", "mesh"):
        raise ConfigError("replication.topology.mode: %r is not one of star, mesh." % mode)
    this = _node(topo.get("this_node"), "replication.topology.this_node")
    nodes_raw = topo.get("nodes") or []
    if not isinstance(nodes_raw, list):
        raise ConfigError("replication.topology.nodes: must be a list of nodes (name, host, port, priority).")
    peers = [_node(n, "replication.topology.nodes[%d]" % i) for i, n in enumerate(nodes_raw)]
    names = [this["name"]]
    for i, p in enumerate(peers):
        if p["name"] in names:
            raise ConfigError("replication.topology.nodes[%d].name: %r is listed twice (this_node or another entry). "
                              "Fix: every node appears once." % (i, p["name"]))
        names.append(p["name"])
    if len(names) > 2:
        for i, p in enumerate(peers):
            if p["agent_port"] is None:
                raise ConfigError("replication.topology.nodes[%d].agent_port: required with more than 2 nodes (the "
                                  "coordinator election needs a majority of agents' votes over their HTTP API). Fix: "
                                  "set it to that node's steep_agent_http_port." % i)
    hub = _str(topo.get("hub"), "replication.topology.hub")
    if mode == "star":
        if hub is None:
            hub = sorted([this] + peers, key=lambda n: (-n["priority"], n["name"]))[0]["name"]
        elif hub not in names:
            raise ConfigError("replication.topology.hub: %r is not a node of the topology (%s)." % (hub, ", ".join(names)))
    elif hub is not None:
        raise ConfigError("replication.topology.hub: only valid with mode: star.")
    hc = _mapping(topo.get("health_check"), "replication.topology.health_check")
    _unknown(hc, ["interval", "timeout", "unhealthy_threshold"], "replication.topology.health_check")
    health = dict(
        interval=parse_duration(hc.get("interval", "5s"), "replication.topology.health_check.interval"),
        timeout=parse_duration(hc.get("timeout", "10s"), "replication.topology.health_check.timeout"),
        unhealthy_threshold=_int(hc.get("unhealthy_threshold"), "replication.topology.health_check.unhealthy_threshold",
                                 1, 1000, default=3),
    )

    creds_raw = _mapping(rep.get("credentials"), "replication.credentials")
    creds = {}
    for name, c in creds_raw.items():
        ck = "replication.credentials.%s" % name
        if name not in names:
            raise ConfigError("%s: %r is not a node of the topology (%s)." % (ck, name, ", ".join(names)))
        c = _mapping(c, ck, required=True)
        if "password" in c:
            raise ConfigError("%s.password: passwords are never stored in the config. Fix: use password_env (an "
                              "environment variable) or password_command (e.g. \"pass show postgres/%s\")." % (ck, name))
        _unknown(c, ["user", "user_env", "password_env", "password_command"], ck)
        if c.get("password_env") and c.get("password_command"):
            raise ConfigError("%s: set password_env or password_command, not both." % ck)
        creds[name] = dict((k, _str(c.get(k), "%s.%s" % (ck, k))) for k in ("user", "user_env", "password_env", "password_command"))

    tls_raw = _mapping(rep.get("tls"), "replication.tls")
    net = _mapping(rep.get("networking"), "replication.networking")
    if not tls_raw and net.get("tls"):
        tls_raw = _mapping(net.get("tls"), "replication.networking.tls")
    _unknown(tls_raw, ["enabled", "cert_file", "key_file", "ca_file", "verify"], "replication.tls")
    tls = dict(cert_file=_str(tls_raw.get("cert_file"), "replication.tls.cert_file"),
               key_file=_str(tls_raw.get("key_file"), "replication.tls.key_file"),
               ca_file=_str(tls_raw.get("ca_file"), "replication.tls.ca_file"),
               verify=bool(tls_raw.get("verify", True)))
    if tls_raw.get("enabled") is False:
        tls["cert_file"] = tls["key_file"] = None
    if bool(tls["cert_file"]) != bool(tls["key_file"]):
        missing = "key_file" if tls["cert_file"] else "cert_file"
        raise ConfigError("replication.tls.%s: missing. Fix: set both cert_file and key_file (or neither)." % missing)
    for k in ("cert_file", "key_file", "ca_file"):
        if tls[k] and not os.path.isfile(tls[k]):
            raise ConfigError("replication.tls.%s: %s does not exist or is not a file." % (k, tls[k]))
    tls["enabled"] = bool(tls["cert_file"])

    agent_raw = _mapping(rep.get("agent"), "replication.agent")
    _unknown(agent_raw, ["http_host", "http_port", "ipc_path", "log_file", "log_level"], "replication.agent")
    default_ipc = (r"\\.\pipe\steep-repl-%s" % this["name"]) if sys.platform == "win32" else \
        os.path.join(tempfile.gettempdir(), "steep-repl-%s.sock" % this["name"])
    agent = dict(
        http_host=_str(agent_raw.get("http_host"), "replication.agent.http_host", default="0.0.0.0"),
        http_port=_int(agent_raw.get("http_port"), "replication.agent.http_port", 0, 65535,
                       default=this["agent_port"] or DEFAULT_HTTP_PORT),
        ipc_path=_str(agent_raw.get("ipc_path"), "replication.agent.ipc_path", default=default_ipc),
        log_file=_str(agent_raw.get("log_file"), "replication.agent.log_file"),
        log_level=_str(agent_raw.get("log_level"), "replication.agent.log_level", default="info"),
    )
    if agent["log_level"] not in ("debug", "info", "warn", "error"):
        raise ConfigError("replication.agent.log_level: %r is not one of debug, info, warn, error." % agent["log_level"])
    this["agent_port"] = this["agent_port"] or agent["http_port"]

    ir = _mapping(rep.get("identity_ranges"), "replication.identity_ranges")
    ranges = dict(threshold_percent=_int(ir.get("threshold_percent"), "replication.identity_ranges.threshold_percent",
                                         1, 100, default=80),
                  preallocate=bool(ir.get("preallocate", True)))
    mt = _mapping(rep.get("maintenance"), "replication.maintenance")
    _unknown(mt, ["conflict_log_retention", "tombstone_purge_interval", "batch_size", "stall_timeout"],
             "replication.maintenance")
    maintenance = dict(
        conflict_log_retention=_optional_duration(mt.get("conflict_log_retention"),
                                                  "replication.maintenance.conflict_log_retention"),
        tombstone_purge_interval=_optional_duration(mt.get("tombstone_purge_interval"),
                                                    "replication.maintenance.tombstone_purge_interval"),
        batch_size=_int(mt.get("batch_size"), "replication.maintenance.batch_size", 1, 1000000, default=10000),
        stall_timeout=parse_duration(mt.get("stall_timeout", "60s"), "replication.maintenance.stall_timeout"),
    )
    if maintenance["tombstone_purge_interval"] is not None and not peers:
        raise ConfigError("replication.maintenance.tombstone_purge_interval: the purge settles tombstones on the whole "
                          "mesh, and replication.topology.nodes lists no other node. Fix: list every other node of the "
                          "mesh there, or remove the setting.")
    cfg = dict(mode=mode, hub=hub, this_node=this, peers=peers, health=health, credentials=creds, tls=tls,
               agent=agent, rules=_rules(rep.get("alerts"), "replication.alerts"), ranges=ranges,
               maintenance=maintenance, election_timeout=None)
    # A coordinator's decision holds for one worst-case cycle (interval + check timeout + 1 s margin); a node that
    # lost sight of a claiming coordinator waits that lease plus one of its own check rounds before taking over.
    cfg["lease"] = health["interval"] + health["timeout"] + 1.0
    cfg["takeover_grace"] = 2 * cfg["lease"]
    et = topo.get("election_timeout")
    cfg["election_timeout"] = parse_duration(et, "replication.topology.election_timeout") if et is not None else \
        max(health["interval"] * health["unhealthy_threshold"] + health["timeout"], cfg["takeover_grace"]) + health["interval"]
    for node in [this] + peers:
        resolve_user(cfg, node, environ)  # fail at start when a user_env is missing
    return cfg


def load(path, environ=None):
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError("config file %s cannot be read: %s. Fix: pass --config with the path of the agent's "
                          "YAML config (the role writes it to <prefix>/steep-repl.yml)." % (path, exc.strerror))
    except yaml.YAMLError as exc:
        raise ConfigError("config file %s is not valid YAML: %s" % (path, exc))
    cfg = validate(raw, environ)
    cfg["path"] = os.path.abspath(path)
    return cfg


def resolve_user(cfg, node, environ=None):
    environ = os.environ if environ is None else environ
    c = cfg["credentials"].get(node["name"], {})
    if c.get("user_env"):
        if c["user_env"] not in environ:
            raise ConfigError("replication.credentials.%s.user_env: environment variable %s is not set. Fix: export it "
                              "in the agent's environment (the service unit's Environment/EnvironmentFile)."
                              % (node["name"], c["user_env"]))
        return environ[c["user_env"]]
    return c.get("user") or node.get("user") or cfg["this_node"].get("user") or "postgres"


def resolve_password(cfg, node, environ=None):
    """The node's password (env var or command); never logged. None when none is configured."""
    environ = os.environ if environ is None else environ
    c = cfg["credentials"].get(node["name"], {})
    if c.get("password_command"):
        try:
            out = subprocess.run(shlex.split(c["password_command"]), capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError("replication.credentials.%s.password_command failed to run: %s"
                              % (node["name"], exc.__class__.__name__ + (": " + exc.strerror if getattr(exc, "strerror", None) else "")))
        if out.returncode != 0:
            raise ConfigError("replication.credentials.%s.password_command exited with %d. Fix: run it by hand as the "
                              "agent's user and check its output." % (node["name"], out.returncode))
        return out.stdout.rstrip("\r\n")
    var = c.get("password_env") or DEFAULT_PASSWORD_ENV
    if c.get("password_env") and var not in environ:
        raise ConfigError("replication.credentials.%s.password_env: environment variable %s is not set. Fix: export "
                          "it in the agent's environment." % (node["name"], var))
    return environ.get(var)


def conn_kwargs(cfg, node, environ=None, timeout=None, statement_timeout=False):
    """psycopg2 keyword arguments for a node (contains the password: never log it)."""
    timeout = timeout or cfg["health"]["timeout"]
    kw = dict(host=node["host"], port=node["port"], user=resolve_user(cfg, node, environ),
              dbname=node.get("database") or cfg["this_node"].get("database") or "postgres",
              connect_timeout=max(2, int(round(timeout))), application_name="steep-repl-agent",
              sslmode=node.get("sslmode") or "prefer",
              keepalives=1, keepalives_idle=max(1, int(timeout)), keepalives_interval=1, keepalives_count=3,
              tcp_user_timeout=int(timeout * 1000))
    if statement_timeout:  # the agent's own checks never wait longer than the health check timeout
        kw["options"] = "-c statement_timeout=%d" % int(timeout * 1000)
    pw = resolve_password(cfg, node, environ)
    if pw:
        kw["password"] = pw
    return kw


def all_nodes(cfg):
    return [cfg["this_node"]] + cfg["peers"]


def default_config_path():
    env = os.environ.get("STEEP_REPL_CONFIG")
    if env:
        return env
    if sys.platform == "win32":
        return os.path.join(os.environ.get("APPDATA", "C:\\ProgramData"), "steep", "steep-repl.yml")
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Application Support/steep/steep-repl.yml")
    return os.path.expanduser("~/.config/steep/steep-repl.yml")
