# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where the steep_repl extension files live and how they reach a PostgreSQL install."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import filecmp
import os
import re
import shutil
import subprocess

from ansible_collections.steep.repl.plugins.module_utils.db import SUPPORTED_MAJORS, SteepError

EXTENSION = "steep_repl"


def source_dir():
    """``extension/`` of this collection (module_utils sits at plugins/module_utils)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "extension"))


def extension_files(src=None):
    src = src or source_dir()
    if not os.path.isdir(src):
        raise SteepError("extension sources not found at %s. Fix: pass src= pointing at the "
                         "collection's extension/ directory." % src)
    names = sorted(n for n in os.listdir(src)
                   if n.startswith(EXTENSION) and (n.endswith(".sql") or n.endswith(".control")))
    if EXTENSION + ".control" not in names:
        raise SteepError("%s has no %s.control" % (src, EXTENSION))
    return [os.path.join(src, n) for n in names]


def pg_config_query(pg_config, *flags):
    if not pg_config:
        pg_config = shutil.which("pg_config")
        if not pg_config:
            raise SteepError("pg_config not found on PATH. Fix: set steep_pg_config to the "
                             "target PostgreSQL's pg_config.")
    if not os.path.isfile(pg_config) or not os.access(pg_config, os.X_OK):
        raise SteepError("steep_pg_config %r is not an executable pg_config. Fix: point it at "
                         "the bin/pg_config of the target PostgreSQL." % pg_config)
    try:
        out = subprocess.run([pg_config] + list(flags), capture_output=True, text=True,
                             check=True).stdout.splitlines()
    except subprocess.CalledProcessError as exc:
        raise SteepError("%s failed: %s" % (pg_config, exc.stderr.strip()))
    return out


def parse_major(version):
    """Major of a ``pg_config --version`` / ``server_version`` string (``PostgreSQL 17.5`` -> 17)."""
    m = re.search(r"(\d+)", version or "")
    if not m:
        raise SteepError("cannot read a PostgreSQL version from %r" % (version,))
    return int(m.group(1))


def check_majors(pg_config_major, server_major, pg_config="pg_config", where="the server"):
    """Raise SteepError naming the fix unless both majors are supported and equal."""
    supported = " or ".join(str(m) for m in SUPPORTED_MAJORS)
    if pg_config_major not in SUPPORTED_MAJORS:
        raise SteepError("%s belongs to PostgreSQL %s: major %s not supported, steep.repl needs PostgreSQL %s. "
                         "Fix: set steep_pg_config to the bin/pg_config of the PostgreSQL %s install that runs %s."
                         % (pg_config, pg_config_major, pg_config_major, supported, server_major, where))
    if server_major not in SUPPORTED_MAJORS:
        raise SteepError("%s runs PostgreSQL %s: major %s not supported, steep.repl needs PostgreSQL %s. "
                         "Fix: upgrade the server." % (where, server_major, server_major, supported))
    if pg_config_major != server_major:
        raise SteepError("%s belongs to PostgreSQL %s but %s runs PostgreSQL %s: the extension files would go "
                         "to the wrong install. Fix: set steep_pg_config to the bin/pg_config of the PostgreSQL %s "
                         "install that runs %s."
                         % (pg_config, pg_config_major, where, server_major, server_major, where))
    return server_major


def pg_config_facts(pg_config):
    """(major, sharedir) of the install ``pg_config`` belongs to."""
    sharedir, version = pg_config_query(pg_config, "--sharedir", "--version")
    return parse_major(version), sharedir


def default_version(src=None):
    """``default_version`` of the control file in ``src`` (the version these files install)."""
    control = os.path.join(src or source_dir(), EXTENSION + ".control")
    try:
        with open(control) as fh:
            text = fh.read()
    except (IOError, OSError) as exc:
        raise SteepError("cannot read %s (%s). Fix: point src at the collection's extension/ directory."
                         % (control, exc))
    m = re.search(r"^\s*default_version\s*=\s*'([^']+)'", text, re.M)
    if not m:
        raise SteepError("%s has no default_version" % control)
    return m.group(1)


def resolve_pg_config(pg_config):
    """The pg_config to use: the given one, or the one on PATH."""
    if pg_config:
        return pg_config
    found = shutil.which("pg_config")
    if not found:
        raise SteepError("pg_config not found on PATH. Fix: set steep_pg_config to the target PostgreSQL's "
                         "pg_config.")
    return found


def plan_copy(pg_config, src=None, sharedir=None):
    """Files whose copy in ``<sharedir>/extension`` is missing or different."""
    if sharedir is None:
        _major, sharedir = pg_config_facts(pg_config)
    dest = os.path.join(sharedir, "extension")
    todo = []
    for path in extension_files(src):
        target = os.path.join(dest, os.path.basename(path))
        if not os.path.exists(target) or not filecmp.cmp(path, target, shallow=False):
            todo.append((path, target))
    return dest, todo


def install_files(pg_config, src=None, check_mode=False, sharedir=None):
    """Copy the extension files; returns the list of files written (or to write)."""
    dest, todo = plan_copy(pg_config, src, sharedir)
    if not os.path.isdir(dest):
        raise SteepError("%s does not exist: is %s the pg_config of a server install?"
                         % (dest, pg_config))
    if not check_mode:
        for path, target in todo:
            tmp = target + ".steep-tmp"
            try:
                shutil.copyfile(path, tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except (IOError, OSError) as exc:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise SteepError("cannot write %s (%s). Fix: run the task as a user that may write PostgreSQL's "
                                 "share/extension directory (become: true)." % (target, exc))
    return [t for _p, t in todo]
