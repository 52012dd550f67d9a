# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one way a steep.repl module talks to its database(s) and turns errors into task failures.

Modules only build their argument spec and a ``run`` function; this file connects, maps every
database error to a message that names the server (never the password) and the server's hint,
commits or rolls back, closes, and adds the ``diff`` in diff mode. Ansible-only (the agent does
not import it).
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.steep.repl.plugins.module_utils import db
from ansible_collections.steep.repl.plugins.module_utils.db import SteepError


def require_psycopg2(module):
    if not db.HAS_PSYCOPG2:
        module.fail_json(msg=missing_required_lib("psycopg2-binary"), exception=str(db.PSYCOPG2_IMPORT_ERROR))


def db_error_text(exc):
    """First line of a server error plus its hint (``Fix: ...``), as the task message shows it."""
    diag = getattr(exc, "diag", None)
    hint = getattr(diag, "message_hint", None) if diag else None
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else exc.__class__.__name__
    if hint and hint not in text:
        text += ". " + (hint if hint.startswith("Fix") else "Fix: " + hint)
    return text


def run_on_node(module, run, what, transactional=False, readonly=False, explain=None, diff=None):
    """Connect with the module's connection options, ``result = run(module, conn)``, exit.

    ``what`` names the task in failure messages ("steep.repl.node node1"). ``transactional``: one
    transaction, committed (rolled back in check mode). ``readonly``: a read-only session.
    ``explain(exc)`` turns a psycopg2 error into text (default: first line + hint). ``diff(result)``
    returns the before/after dict shown with --diff (or a ``diff`` key of the result is used).
    """
    require_psycopg2(module)
    kw = db.conn_params_from(module.params)
    conn = None
    result = None
    try:
        conn = db.connect(kw, autocommit=not transactional)
        if readonly:
            conn.set_session(readonly=True, autocommit=True)
        result = run(module, conn)
        if transactional:
            if module.check_mode:
                conn.rollback()
            else:
                conn.commit()
    except SteepError as exc:
        module.fail_json(msg=str(exc), changed=False)
    except db.psycopg2.Error as exc:
        module.fail_json(msg="%s failed on %s, nothing was changed: %s" % (
            what, db.describe(kw), (explain or db_error_text)(exc)), changed=False)
    finally:
        if conn is not None:
            conn.close()
    finish(module, result, diff)


def finish(module, result, diff=None, warnings=False):
    """Attach the diff in diff mode (with ``warnings``: emit and drop the result's warnings), exit."""
    if warnings:
        for w in result.pop("warnings", None) or []:
            module.warn(w)
    d = diff(result) if diff else result.pop("diff", None)
    if module._diff and d is not None:
        result["diff"] = d
    module.exit_json(**result)


def run_on_mesh(module, run, secrets_of="nodes"):
    """``result = run(module)`` for modules that reach several nodes themselves (a ``nodes`` list).

    Failures never show a node's password: every password of ``module.params[secrets_of]`` is redacted
    from the message. The result's ``warnings`` become task warnings and ``diff`` shows in diff mode.
    """
    from ansible_collections.steep.repl.plugins.module_utils.replication import redact
    require_psycopg2(module)
    secrets = [n.get("password") for n in module.params.get(secrets_of) or [] if n.get("password")]
    try:
        result = run(module)
    except SteepError as exc:
        module.fail_json(msg=redact(str(exc), secrets), changed=False, queries=getattr(exc, "queries", []))
    except db.psycopg2.Error as exc:
        module.fail_json(msg=redact(db_error_text(exc), secrets), changed=False)
    finish(module, result, warnings=True)
