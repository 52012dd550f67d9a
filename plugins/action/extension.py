# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of steep.repl.extension: sends the collection's extension files to the managed host."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import os

from ansible.errors import AnsibleActionFail
from ansible.module_utils.parsing.convert_bool import boolean
from ansible.plugins.action import ActionBase

EXTENSION = "steep_repl"


def collection_extension_dir():
    """``extension/`` of this collection on the controller (plugins/action/ -> ../../extension)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "extension"))


def shipped_files(src):
    if not os.path.isdir(src):
        raise AnsibleActionFail("the steep_repl extension files are not at %s. Fix: reinstall the steep.repl "
                                "collection (its extension/ directory is missing)." % src)
    names = sorted(n for n in os.listdir(src)
                   if n.startswith(EXTENSION) and (n.endswith(".sql") or n.endswith(".control")))
    if EXTENSION + ".control" not in names:
        raise AnsibleActionFail("%s has no %s.control. Fix: reinstall the steep.repl collection." % (src, EXTENSION))
    return [os.path.join(src, n) for n in names]


class ActionModule(ActionBase):
    TRANSFERS_FILES = True

    def run(self, tmp=None, task_vars=None):
        if task_vars is None:
            task_vars = dict()
        result = super(ActionModule, self).run(tmp, task_vars)
        del tmp
        args = self._task.args.copy()
        send = (boolean(args.get("install_files", True), strict=False)
                and args.get("state", "present") != "absent" and not args.get("src"))
        try:
            if send:
                remote_dir = self._connection._shell.tmpdir
                remote = []
                for path in shipped_files(collection_extension_dir()):
                    target = self._connection._shell.join_path(remote_dir, os.path.basename(path))
                    self._transfer_file(path, target)
                    remote.append(target)
                self._fixup_perms2([remote_dir] + remote)
                args["src"] = remote_dir
            result.update(self._execute_module(module_args=args, task_vars=task_vars))
            return result
        finally:
            self._remove_tmp_path(self._connection._shell.tmpdir)
