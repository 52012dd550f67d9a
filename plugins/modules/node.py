#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: node
short_description: Register, update or remove a node in the steep.repl node registry
description:
  - Manages one row of C(steep_repl.nodes) (O(node_id), O(node_name), O(node_host), O(node_port), O(priority),
    O(is_local)) in the
    database it connects to. The play C(playbooks/steep_foundation.yml) registers EVERY node on EVERY node, with
    O(is_local=true) only for the node itself.
  - Writes go through C(steep_repl.register_node) / C(steep_repl.remove_node), which write the C(steep_repl.audit_log)
    row (C(node_added), C(node_updated), C(node_removed)) in the same transaction.
  - Columns managed by other features (C(init_state), C(range_slot), C(last_seen), C(status), C(is_coordinator)) are
    never touched.
  - C(changed) compares the row before with the wanted row; check mode changes nothing; RV(diff) shows the row.
  - Refuses (naming the fix) an invalid node id, a second local node in one database, removing the local node and
    removing a node still referenced by identity ranges.
version_added: "1.1.0"
author:
  - steep.repl contributors (@steep-repl)
extends_documentation_fragment:
  - steep.repl.connection
options:
  node_id:
    description: Node id (C(steep_node_id)); 1-40 lower-case letters, digits and C(_), starting with a letter or C(_).
    type: str
    required: true
  node_name:
    description: Display name (column C(node_name)); defaults to O(node_id).
    type: str
  node_host:
    description:
      - Address the peers use to reach this node's PostgreSQL (column C(host); C(steep_pg_replication_host), else
        C(steep_pg_host)).
      - Required with O(state=present). (Not C(host), which is an alias of O(login_host), the database to connect to.)
    type: str
  node_port:
    description: Port the peers use (column C(port); C(steep_pg_replication_port), else C(steep_pg_port)).
    type: int
    default: 5432
  priority:
    description: Coordinator election priority (C(steep_node_priority)), 0-1000; higher wins.
    type: int
    default: 50
  is_local:
    description: This row describes the database the module connects to (exactly one per database).
    type: bool
    default: false
  state:
    description: C(present) registers or updates the row, C(absent) removes it.
    type: str
    default: present
    choices: [present, absent]
"""

EXAMPLES = r"""
- name: Register every node on every node (is_local only for the node itself)
  steep.repl.node:
    login_host: "{{ steep_pg_host }}"
    login_port: "{{ steep_pg_port }}"
    login_password: "{{ steep_pg_password }}"
    login_db: "{{ steep_pg_database }}"
    node_id: "{{ hostvars[item].steep_node_id }}"
    node_host: "{{ hostvars[item].steep_pg_host }}"
    node_port: "{{ hostvars[item].steep_pg_port }}"
    priority: "{{ hostvars[item].steep_node_priority | default(50) }}"
    is_local: "{{ item == inventory_hostname }}"
  loop: "{{ groups['steep_nodes'] }}"
  delegate_to: localhost

- name: Remove a node that left the mesh
  steep.repl.node:
    login_db: app
    node_id: node_c
    state: absent
"""

RETURN = r"""
node:
  description: The managed columns of the row after the task (what they would be in check mode); null when absent.
  returned: always
  type: dict
  sample: {node_id: node_a, node_name: node_a, host: 10.0.0.1, port: 5432, priority: 100, is_local: true}
before:
  description: The managed columns before the task (null when the row did not exist).
  returned: always
  type: dict
changed_columns:
  description: Columns that changed (or would change).
  returned: always
  type: list
  elements: str
queries:
  description: SQL run (or that would run in check mode).
  returned: always
  type: list
  elements: str
diff:
  description: The row before/after (with C(--diff)).
  returned: when diff mode
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.steep.repl.plugins.module_utils import db
from ansible_collections.steep.repl.plugins.module_utils import nodes
from ansible_collections.steep.repl.plugins.module_utils.db import SteepError
from ansible_collections.steep.repl.plugins.module_utils.runner import run_on_node


def argument_spec():
    spec = db.connection_argument_spec()
    spec.update(
        node_id=dict(type="str", required=True),
        node_name=dict(type="str"),
        node_host=dict(type="str"),
        node_port=dict(type="int", default=5432),
        priority=dict(type="int", default=50),
        is_local=dict(type="bool", default=False),
        state=dict(type="str", default="present", choices=["present", "absent"]),
    )
    return spec


def run(module, conn):
    p = module.params
    sql = db.SqlState(conn, module.check_mode)
    if p["state"] == "present":
        wanted = nodes.wanted_node(p["node_id"], p["node_name"], p["node_host"], p["node_port"], p["priority"],
                                   p["is_local"])
    else:
        db.validate_node_id(p["node_id"])
        wanted = None
    if module.check_mode and not (db.extension_version(conn) and nodes.has_registry(conn)):
        # --check before the extension task installed/updated it (it would have, in a real run).
        return dict(changed=p["state"] == "present", node=wanted, before=None,
                    changed_columns=list(nodes.MANAGED) if wanted else [], queries=[],
                    msg="steep_repl 1.1 is not installed yet; the node would be registered after it is")
    nodes.require_registry(conn)
    if p["state"] == "present":
        changed, before, after = nodes.register(sql, conn, wanted)
        cols = nodes.changed_columns(before, wanted) if changed else []
    else:
        changed, before = nodes.remove(sql, conn, p["node_id"])
        after = None
        cols = list(nodes.MANAGED) if changed else []
    return dict(changed=changed, node=after, before=before, changed_columns=cols, queries=sql.queries)


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True,
                           required_if=[("state", "present", ["node_host"])])
    try:
        db.validate_node_id(module.params["node_id"])
    except SteepError as exc:
        module.fail_json(msg=str(exc))
    run_on_node(module, run, "steep.repl.node %s" % module.params["node_id"],
                diff=lambda r: dict(before=r["before"] or {}, after=r["node"] or {}))


if __name__ == "__main__":
    main()
