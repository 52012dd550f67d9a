# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where the steep_repl extension files live and how they reach a PostgreSQL install."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import filecmp
import os
import shutil
import subprocess

from ansible_collections.steep.repl.plugins.module_utils.db import SteepError

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


def pg_config_facts(pg_config):
    """(major, sharedir) of the install ``pg_config`` belongs to."""
    sharedir, version = pg_config_query(pg_config, "--sharedir", "--version")
    major = int(version.split()[1].split(".")[0])
    return major, sharedir


def plan_copy(pg_config, src=None):
    """Files whose copy in ``<sharedir>/extension`` is missing or different."""
    _major, sharedir = pg_config_facts(pg_config)
    dest = os.path.join(sharedir, "extension")
    todo = []
    for path in extension_files(src):
        target = os.path.join(dest, os.path.basename(path))
        if not os.path.exists(target) or not filecmp.cmp(path, target, shallow=False):
            todo.append((path, target))
    return dest, todo


def install_files(pg_config, src=None, check_mode=False):
    """Copy the extension files; returns the list of files written (or to write)."""
    dest, todo = plan_copy(pg_config, src)
    if not os.path.isdir(dest):
        raise SteepError("%s does not exist: is %s the pg_config of a server install?"
                         % (dest, pg_config))
    if not check_mode:
        for path, target in todo:
            tmp = target + ".steep-tmp"
            shutil.copyfile(path, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
    return [t for _p, t in todo]
