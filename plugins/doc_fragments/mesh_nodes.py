# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # The `nodes` option of the modules that act on the whole mesh at once.
    DOCUMENTATION = r"""
options:
  nodes:
    description:
      - Every member of the mesh (build it from C(groups['steep_nodes']) and C(hostvars); C(playbooks/vars/mesh.yml)
        does).
    type: list
    elements: dict
    required: true
    suboptions:
      node_id:
        description: Node id (C(steep_node_id)); lower-case letters, digits and C(_), at most 40 characters.
        type: str
        required: true
      host:
        description: Address the controller uses to reach the node (C(steep_pg_host)).
        type: str
        default: 127.0.0.1
      port:
        description: PostgreSQL port (C(steep_pg_port)).
        type: int
        default: 5432
      user:
        description: Superuser name, also used by the peers' subscriptions (C(steep_pg_user)).
        type: str
        default: postgres
      password:
        description: Password of O(nodes[].user) (C(steep_pg_password)). Never returned or logged.
        type: str
      database:
        description: Database that is replicated (C(steep_pg_database)).
        type: str
        default: postgres
      replication_host:
        description:
          - Address the PEERS use to reach this node (C(steep_pg_replication_host)); defaults to O(nodes[].host).
        type: str
      replication_port:
        description: Port the peers use; defaults to O(nodes[].port).
        type: int
      ssl_mode:
        description: libpq sslmode for the controller's and the peers' connections.
        type: str
        default: prefer
        choices: [allow, disable, prefer, require, verify-ca, verify-full]
      ca_cert:
        description: CA certificate file (sslrootcert).
        type: path
      connect_timeout:
        description: Connection timeout in seconds.
        type: int
        default: 10
"""
