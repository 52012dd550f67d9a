"""The agent's endpoints: a small stdlib HTTP API (Patroni-style) and the local
IPC channel for the CLI (Unix socket on Linux/macOS, named pipe on Windows).

IPC framing is ``multiprocessing.connection`` (4-byte big-endian length + bytes),
carrying one JSON request ``{"cmd": ..., "args": {...}}`` and one JSON reply
``{"ok": true, "data": ...}`` / ``{"ok": false, "error": "..."}`` per connection.
"""
import json
import os
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Client, Listener

from ansible_collections.steep.repl.plugins.module_utils import db

from . import commands, metrics
from .config import conn_kwargs

IPC_FAMILY = "AF_PIPE" if sys.platform == "win32" else "AF_UNIX"
MAX_IPC_BYTES = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    server_version = "steep-repl"
    timeout = 10

    def log_message(self, fmt, *args):  # access log off: the cycle line is the log
        pass

    def _send(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, code, obj):
        self._send(code, json.dumps(obj, default=str, indent=None))

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        agent = self.server.agent
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path in ("/health", "/"):
                h = agent.health_view()
                self._json(503 if h.get("status") == "unhealthy" else 200, h)
            elif path == "/liveness":
                alive = agent.alive()
                self._json(200 if alive else 503, dict(alive=alive, cycles=agent.cycles))
            elif path == "/readiness":
                ready = agent.ready()
                self._json(200 if ready else 503, dict(ready=ready, postgresql=agent.snapshot.get("postgresql")))
            elif path == "/status":
                self._json(200, agent.view())
            elif path == "/coordinator":
                claims = agent.claims()
                self._json(200 if claims else 503,
                           dict(node=agent.me["name"], coordinator=agent.coordinator, is_coordinator=claims))
            elif path == "/metrics":
                self._send(200, metrics.render(agent.view()), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._json(404, dict(error="unknown path %s" % path,
                                     paths=["/health", "/liveness", "/readiness", "/status", "/coordinator", "/metrics"]))
        except (BrokenPipeError, ConnectionResetError):
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, agent, ssl_ctx=None):
        self.agent = agent
        self.ssl_ctx = ssl_ctx
        host = addr[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)

    def get_request(self):
        sock, addr = super().get_request()
        if self.ssl_ctx is not None:
            sock.settimeout(10)
            # The handshake happens in the handler thread: a silent client never blocks accept().
            sock = self.ssl_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):  # a bad client never disturbs the agent
        pass


class HttpApi:
    def __init__(self, agent):
        self.agent = agent
        cfg = agent.cfg
        ctx = None
        if cfg["tls"]["enabled"]:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(cfg["tls"]["cert_file"], cfg["tls"]["key_file"])
        self.httpd = _Server((cfg["agent"]["http_host"], cfg["agent"]["http_port"]), agent, ctx)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.5),
                                       name="http", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _stale_socket(path):
    """True when ``path`` is a Unix socket nobody listens on (left by a killed agent)."""
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return False
    except OSError:
        return True
    finally:
        s.close()


class IpcServer:
    def __init__(self, agent):
        self.agent = agent
        self.path = agent.cfg["agent"]["ipc_path"]
        if IPC_FAMILY == "AF_UNIX":
            if _stale_socket(self.path):
                os.unlink(self.path)
            elif os.path.exists(self.path):
                raise RuntimeError("another agent already listens on %s. Fix: stop it or set replication.agent.ipc_path"
                                   % self.path)
            old = os.umask(0o077)  # the socket is for the agent's user (and root) only
            try:
                self.listener = Listener(self.path, IPC_FAMILY)
            finally:
                os.umask(old)
        else:
            self.listener = Listener(self.path, IPC_FAMILY)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="ipc", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopping = True
        try:
            self.listener.close()
        except OSError:
            pass
        if IPC_FAMILY == "AF_UNIX" and os.path.exists(self.path):
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _serve(self):
        while not self.stopping:
            try:
                conn = self.listener.accept()
            except Exception:
                if self.stopping:
                    return
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        try:
            if not conn.poll(10):
                return
            req = json.loads(conn.recv_bytes(MAX_IPC_BYTES).decode())
            reply = self.dispatch(req.get("cmd"), req.get("args") or {})
        except Exception as exc:
            reply = dict(ok=False, error="bad request: %s" % exc)
        try:
            conn.send_bytes(json.dumps(reply, default=str).encode())
        except Exception:
            pass
        finally:
            conn.close()

    def dispatch(self, cmd, args):
        agent = self.agent
        if cmd == "ping":
            return dict(ok=True, data=dict(node=agent.me["name"], pid=os.getpid()))
        if cmd == "status":
            return dict(ok=True, data=agent.view())
        if cmd == "health":
            return dict(ok=True, data=agent.health_view())
        if cmd not in commands.DB_COMMANDS:
            return dict(ok=False, error="unknown command %r" % cmd)
        try:
            conn = db.connect(conn_kwargs(agent.cfg, agent.me))
        except db.SteepError as exc:
            return dict(ok=False, error=str(exc))
        try:
            data = commands.run(conn, cmd, args)
            if cmd == "node_status":
                data["peers"] = agent.snapshot.get("peers")
                data["coordinator"] = agent.coordinator
            return dict(ok=True, data=data)
        except commands.CommandError as exc:
            return dict(ok=False, error=str(exc))
        except Exception as exc:
            return dict(ok=False, error="%s: %s" % (exc.__class__.__name__, str(exc).strip()))
        finally:
            conn.close()


class AgentUnavailable(Exception):
    pass


class AgentNoReply(AgentUnavailable):
    """The agent took the request but gave no answer: the command may have run (or still runs) there."""


def ipc_call(path, cmd, args=None, timeout=15.0):
    """One request to the local agent; AgentUnavailable when nobody answers (AgentNoReply once it was sent)."""
    if IPC_FAMILY == "AF_UNIX" and not os.path.exists(path):
        raise AgentUnavailable("no agent socket at %s" % path)
    try:
        conn = Client(path, IPC_FAMILY)
    except (OSError, EOFError) as exc:
        raise AgentUnavailable("agent at %s does not answer (%s)" % (path, exc.__class__.__name__))
    try:
        try:
            conn.send_bytes(json.dumps(dict(cmd=cmd, args=args or {})).encode())
        except (OSError, EOFError) as exc:
            raise AgentUnavailable("agent at %s closed the connection (%s)" % (path, exc.__class__.__name__))
        try:
            if not conn.poll(timeout):
                raise AgentNoReply("agent at %s did not answer within %ss" % (path, timeout))
            return json.loads(conn.recv_bytes(MAX_IPC_BYTES).decode())
        except (OSError, EOFError) as exc:
            raise AgentNoReply("agent at %s closed the connection before answering (%s)" % (path, exc.__class__.__name__))
    finally:
        conn.close()
