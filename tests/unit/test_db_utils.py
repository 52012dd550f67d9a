"""Pure functions of module_utils (db, extfiles, nodes) and the extension module: plain unit tests."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / ".collections"))

from ansible_collections.steep.repl.plugins.module_utils import db, extfiles, nodes  # noqa: E402
from ansible_collections.steep.repl.plugins.module_utils.db import SteepError  # noqa: E402


@pytest.mark.parametrize("good", ["node_a", "_x", "n1", "a" * 40])
def test_validate_node_id_accepts(good):
    assert db.validate_node_id(good) == good


@pytest.mark.parametrize("bad", ["Node-1", "", "1abc", "a" * 41, "a b", None, 7, "node;drop"])
def test_validate_node_id_refuses_naming_the_fix(bad):
    with pytest.raises(SteepError) as exc:
        db.validate_node_id(bad)
    assert "not a valid identifier" in str(exc.value) and "Fix:" in str(exc.value)


def test_quote_ident_and_qualified():
    assert db.quote_ident('we"ird') == '"we""ird"'
    assert db.quote_qualified("s.t") == '"s"."t"'
    assert db.quote_qualified("t") == '"public"."t"'


def test_conn_params_never_describe_the_password(monkeypatch):
    monkeypatch.delenv(db.PASSWORD_ENV, raising=False)
    kw = db.conn_params_from(dict(login_host="h", login_port=5433, login_user="u", login_password="s3cret",
                                  login_db="d"))
    assert kw["password"] == "s3cret" and kw["port"] == 5433
    assert "s3cret" not in db.describe(kw)
    monkeypatch.setenv(db.PASSWORD_ENV, "fromenv")
    assert db.conn_params_from(dict(login_host="h"))["password"] == "fromenv"


@pytest.mark.parametrize("message, expect", [
    ('FATAL:  password authentication failed for user "postgres"', "Fix: set steep_pg_password"),
    ('connection to server at "127.0.0.1", port 1 failed: Connection refused', "unreachable"),
    ('FATAL:  database "nope" does not exist', "does not exist. Fix: create it"),
    ('FATAL:  role "bob" does not exist', "Fix: set steep_pg_user"),
])
def test_explain_connect_error(message, expect):
    kw = dict(host="127.0.0.1", port=1, user="postgres", dbname="nope", password="pw")
    text = db.explain_connect_error(message, kw)
    assert expect in text and "pw" not in text.replace("password", "")


@pytest.mark.parametrize("text, major", [("PostgreSQL 17.5", 17), ("PostgreSQL 18devel", 18), ("15.13 (Debian)", 15)])
def test_parse_major(text, major):
    assert extfiles.parse_major(text) == major


def test_check_majors():
    assert extfiles.check_majors(18, 18) == 18
    with pytest.raises(SteepError, match="major 15 not supported.*Fix: set steep_pg_config"):
        extfiles.check_majors(15, 18, "pg_config /usr/bin/pg_config")
    with pytest.raises(SteepError, match="major 16 not supported.*Fix: upgrade the server"):
        extfiles.check_majors(17, 16)
    with pytest.raises(SteepError, match="belongs to PostgreSQL 17 but .* runs PostgreSQL 18.*Fix"):
        extfiles.check_majors(17, 18)


def test_default_version_matches_control_file():
    assert extfiles.default_version() == "1.1"
    with pytest.raises(SteepError, match="Fix"):
        extfiles.default_version("/nonexistent")


def test_wanted_node_and_changes():
    w = nodes.wanted_node("node_a", None, "10.0.0.1", "5433", "90", 1)
    assert w == dict(node_id="node_a", node_name="node_a", host="10.0.0.1", port=5433, priority=90, is_local=True)
    assert nodes.changed_columns(None, w) == list(nodes.MANAGED)
    assert nodes.changed_columns(dict(w), w) == []
    assert nodes.changed_columns(dict(w, priority=10, host="x"), w) == ["host", "priority"]
    with pytest.raises(SteepError, match="no host.*Fix"):
        nodes.wanted_node("node_a", host="")
    with pytest.raises(SteepError, match="port 70000 is out of range"):
        nodes.wanted_node("node_a", host="h", port=70000)
    with pytest.raises(SteepError, match="not a valid identifier"):
        nodes.wanted_node("Bad", host="h")


def test_version_key_orders_numerically():
    from ansible_collections.steep.repl.plugins.modules.extension import version_key
    assert sorted(["1.10", "1.2", "1.0"], key=version_key) == ["1.0", "1.2", "1.10"]
