# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ``nodes`` option of the mesh-wide modules (documented by the steep.repl.mesh_nodes fragment)."""
from __future__ import absolute_import, division, print_function

__metaclass__ = type


def mesh_nodes_spec():
    """Suboptions of one ``nodes`` entry (see plugins/doc_fragments/mesh_nodes.py)."""
    return dict(
        node_id=dict(type="str", required=True),
        host=dict(type="str", default="127.0.0.1"),
        port=dict(type="int", default=5432),
        user=dict(type="str", default="postgres"),
        password=dict(type="str", no_log=True),
        database=dict(type="str", default="postgres"),
        replication_host=dict(type="str"),
        replication_port=dict(type="int"),
        ssl_mode=dict(type="str", default="prefer",
                      choices=["allow", "disable", "prefer", "require", "verify-ca", "verify-full"]),
        ca_cert=dict(type="path"),
        connect_timeout=dict(type="int", default=10),
    )
