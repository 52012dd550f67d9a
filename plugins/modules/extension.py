#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: extension
short_description: Install, update or drop the steep_repl PostgreSQL extension
description:
  - Copies the C(steep_repl) extension files (control file and SQL scripts) into C(<sharedir>/extension) of the
    PostgreSQL install that O(pg_config) belongs to, then runs C(CREATE EXTENSION), C(ALTER EXTENSION ... UPDATE)
    or C(DROP EXTENSION) in O(login_db).
  - Before changing anything it checks that the server runs PostgreSQL 17 or 18, that the major of O(pg_config) is the
    server's major (files copied into another install would never be seen), that C(wal_level=logical) and
    C(track_commit_timestamp=on) (see O(check_server)); each failure names the fix.
  - The files this collection ships are sent by the action plugin to the managed host (see O(src)); with
    O(install_files=false) no file is touched (the C(steep.repl.extension) role copies them with
    C(ansible.windows.win_copy) on Windows and runs this module delegated to the controller).
  - C(changed) comes from the real state (files that differ, extension version before and after); check mode runs
    nothing and reports what would change; RV(diff) shows the version and the files.
version_added: "1.1.0"
author:
  - steep.repl contributors (@steep-repl)
extends_documentation_fragment:
  - steep.repl.connection
options:
  state:
    description:
      - C(present) installs the extension when missing (at O(version) or the default version) and updates it to
        O(version) when given; an installed extension is otherwise left at its version.
      - C(latest) installs or updates to the default version of the files (the newest this collection ships).
      - C(absent) drops the extension (its tables and their data too; the files stay).
    type: str
    default: present
    choices: [present, absent, latest]
  version:
    description: Version to install or update to (e.g. C(1.0), C(1.1)); not with O(state=latest) or O(state=absent).
    type: str
  pg_config:
    description:
      - The C(pg_config) of the PostgreSQL install that runs the server (C(steep_pg_config)); its C(--sharedir) receives
        the files. Defaults to the C(pg_config) on C(PATH).
    type: path
    aliases: [steep_pg_config]
  install_files:
    description: Copy the extension files into the sharedir. C(false) when they are put there another way.
    type: bool
    default: true
  src:
    description:
      - Directory on the managed host holding C(steep_repl.control) and C(steep_repl--*.sql). Set by the action plugin
        (it sends the collection's C(extension/) files) unless given.
    type: path
  cascade:
    description: With O(state=absent), C(DROP EXTENSION ... CASCADE) (also drops objects that depend on it).
    type: bool
    default: false
  check_server:
    description:
      - Check C(wal_level=logical) and C(track_commit_timestamp=on) before installing (the PostgreSQL major is always
        checked).
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Install or update steep_repl to the newest version the collection ships
  steep.repl.extension:
    login_host: "{{ steep_pg_host }}"
    login_port: "{{ steep_pg_port }}"
    login_password: "{{ steep_pg_password }}"
    login_db: "{{ steep_pg_database }}"
    pg_config: "{{ steep_pg_config }}"
    state: latest

- name: Install exactly version 1.0
  steep.repl.extension:
    login_db: app
    version: "1.0"

- name: Files already in place (Windows, copied by win_copy) - only the database part, from the controller
  steep.repl.extension:
    login_host: "{{ steep_pg_host }}"
    login_db: app
    install_files: false
    state: latest
  delegate_to: localhost
"""

RETURN = r"""
version_before:
  description: Installed extension version before the task (null when not installed).
  returned: always
  type: str
  sample: "1.0"
version_after:
  description: Installed extension version after the task (what it would be in check mode).
  returned: always
  type: str
  sample: "1.1"
files:
  description: Extension files written to the sharedir (or that would be, in check mode).
  returned: always
  type: list
  elements: str
sharedir:
  description: C(pg_config --sharedir) of the target install (null with O(install_files=false)).
  returned: always
  type: str
server_major:
  description: Major version of the running server.
  returned: always
  type: int
  sample: 18
queries:
  description: SQL run (or that would run in check mode).
  returned: always
  type: list
  elements: str
  sample: ["CREATE EXTENSION steep_repl VERSION '1.1'"]
diff:
  description: Version and files before/after (with C(--diff)).
  returned: when diff mode
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.steep.repl.plugins.module_utils import db
from ansible_collections.steep.repl.plugins.module_utils import extfiles
from ansible_collections.steep.repl.plugins.module_utils.db import SteepError
from ansible_collections.steep.repl.plugins.module_utils.runner import run_on_node


def argument_spec():
    spec = db.connection_argument_spec()
    spec.update(
        state=dict(type="str", default="present", choices=["present", "absent", "latest"]),
        version=dict(type="str"),
        pg_config=dict(type="path", aliases=["steep_pg_config"]),
        install_files=dict(type="bool", default=True),
        src=dict(type="path"),
        cascade=dict(type="bool", default=False),
        check_server=dict(type="bool", default=True),
    )
    return spec


def available_versions(conn):
    return [r["version"] for r in db.fetch_all(
        conn, "SELECT version FROM pg_catalog.pg_available_extension_versions WHERE name = 'steep_repl' "
              "ORDER BY version")]


def has_update_path(conn, source, target):
    return bool(db.fetch_value(
        conn, "SELECT count(*) FROM pg_catalog.pg_extension_update_paths('steep_repl') "
              "WHERE source = %s AND target = %s AND path IS NOT NULL", (source, target)))


def version_key(v):
    out = []
    for part in str(v).split("."):
        out.append(int(part) if part.isdigit() else -1)
    return out


def run(module, conn):
    p = module.params
    state = p["state"]
    where = "the server at %s:%s" % (p["login_host"], p["login_port"])
    if p["version"] and state != "present":
        raise SteepError("version=%s only goes with state=present. Fix: drop version, or use state=present."
                         % p["version"])
    server_major = db.server_major(conn)
    result = dict(changed=False, version_before=None, version_after=None, files=[], sharedir=None,
                  server_major=server_major, queries=[])
    before = db.extension_version(conn)
    result["version_before"] = result["version_after"] = before

    if state == "absent":
        sql = db.SqlState(conn, module.check_mode)
        if before:
            sql.execute("DROP EXTENSION steep_repl" + (" CASCADE" if p["cascade"] else ""))
            result.update(changed=True, version_after=None)
        result["queries"] = sql.queries
        return result

    # ---- validate everything before changing anything
    if server_major not in db.SUPPORTED_MAJORS:
        raise SteepError("%s runs PostgreSQL %s: major %s not supported, steep.repl needs PostgreSQL %s. Fix: upgrade "
                         "the server." % (where, server_major, server_major,
                                          " or ".join(str(m) for m in db.SUPPORTED_MAJORS)))
    files_pending = []
    src = p["src"]
    if p["install_files"]:
        pg_config = extfiles.resolve_pg_config(p["pg_config"])
        pg_major, sharedir = extfiles.pg_config_facts(pg_config)
        extfiles.check_majors(pg_major, server_major, "pg_config %s" % pg_config, where)
        result["sharedir"] = sharedir
        extfiles.extension_files(src)  # raises naming the fix when src is wrong
        shipped = extfiles.default_version(src)
        _dest, todo = extfiles.plan_copy(pg_config, src, sharedir)
        files_pending = [t for _s, t in todo]
    else:
        shipped = None
    if p["check_server"]:
        db.check_server(conn)

    # ---- the wanted version
    if files_pending and module.check_mode:
        known = set(available_versions(conn))
        if shipped:
            known.add(shipped)
        default = shipped
    else:
        known = set(available_versions(conn))
        default = db.fetch_value(conn, "SELECT default_version FROM pg_catalog.pg_available_extensions "
                                       "WHERE name = 'steep_repl'")
        if files_pending:
            default = shipped
            known.add(shipped)
    if not known and not files_pending:
        raise SteepError("the steep_repl extension files are not installed in the sharedir of %s. Fix: run with "
                         "install_files=true (and the right pg_config), or copy extension/* into its "
                         "share/extension directory." % where)
    if state == "latest":
        target = default
    elif p["version"]:
        target = p["version"]
    else:
        target = before or default
    if target not in known:
        raise SteepError("steep_repl version %s is not available on %s (available: %s). Fix: use one of those "
                         "versions, or install the files that provide it." % (
                             target, where, ", ".join(sorted(known, key=version_key)) or "none"))
    if before and target != before and version_key(target) < version_key(before):
        raise SteepError("steep_repl %s is installed; going back to %s is not supported (no downgrade scripts). "
                         "Fix: keep %s, or drop the extension (state=absent, loses its data) and install %s."
                         % (before, target, before, target))

    # ---- files
    if p["install_files"]:
        result["files"] = extfiles.install_files(pg_config, src, module.check_mode, result["sharedir"])
        if result["files"]:
            result["changed"] = True

    # ---- database
    sql = db.SqlState(conn, module.check_mode)
    if before is None:
        sql.execute("CREATE EXTENSION steep_repl VERSION %s", (target,))
    elif target != before:
        if not module.check_mode and not has_update_path(conn, before, target):
            raise SteepError("there is no update path for steep_repl from %s to %s on %s. Fix: install the files "
                             "that ship steep_repl--%s--%s.sql." % (before, target, where, before, target))
        sql.execute("ALTER EXTENSION steep_repl UPDATE TO %s", (target,))
    if sql.queries:
        result["changed"] = True
    result["queries"] = sql.queries
    result["version_after"] = target if module.check_mode else db.extension_version(conn)
    return result


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    run_on_node(module, run, "steep_repl extension task", diff=lambda r: dict(
        before=dict(version=r["version_before"], outdated_files=r["files"]),
        after=dict(version=r["version_after"], outdated_files=[])))


if __name__ == "__main__":
    main()
