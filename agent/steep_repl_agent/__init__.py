"""steep-repl: the steep.repl node agent and CLI.

Shared database logic comes from the collection
(``ansible_collections.steep.repl.plugins.module_utils``). When the collection
is not importable (the agent installed in its own virtualenv by the
``steep.repl.agent`` role), the copy the role staged under ``_vendor`` is used.
"""
import os
import sys

__version__ = "0.1.0"


def _shared_path():
    try:
        import ansible_collections.steep.repl.plugins.module_utils.db  # noqa: F401  pylint: disable=unused-import
        return
    except ImportError:
        pass
    vendor = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_vendor")
    if os.path.isdir(vendor) and vendor not in sys.path:
        sys.path.append(vendor)


_shared_path()
