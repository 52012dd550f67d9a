#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: replication
short_description: Set up full-mesh bidirectional logical replication between steep.repl nodes
description:
  - Runs B(once for the whole mesh) (C(run_once=true), delegated to the controller) and connects to every node over TCP.
  - On every node, creates or updates the publication (default C(steep_pub)) with the replicated tables, and the
    publication C(<publication>_versions) (C(steep_pub_versions)) with C(steep_repl.row_version) and
    C(publish = 'insert'). Origins replace a row's version by DELETE + INSERT and receivers decide on the INSERT alone,
    so the DELETE half is not sent. Every subscription subscribes to both publications.
  - A mesh set up by an earlier build (C(steep_repl.row_version) in the main publication) is moved in one run. The
    versions publication is created; each subscription is switched to both publications once every transaction that
    ran on its publisher by then has ended and its slot has confirmed the WAL written by then (a PostgreSQL 17
    walsender cannot decode a transaction older than a publication it is asked for); the run
    waits until every apply worker restarted with the new list, and only then does C(steep_repl.row_version) leave the
    main publication, so no subscriber ever reads a change without its version. While some node's conflict engine still
    replaces versions in place (an earlier build, without C(steep_repl._version_wait)), the versions stay in the main
    publication with every operation, with a warning.
  - For every ordered pair of nodes creates the logical slot C(steep_to_<subscriber>) on the publisher and the subscription
    C(steep_from_<publisher>) on the subscriber, with C(origin = none), C(copy_data = false) and C(create_slot = false).
  - Every slot is created before any subscription, each in its own autocommit statement, so creating the two subscriptions
    of a pair can never deadlock.
  - Installs the conflict triggers (C(steep_repl.enable_table)) on every replicated table of every node before any
    subscription applies it, and removes them (C(steep_repl.disable_table)) from tables that leave the set.
  - A C(steep_from_*) subscription or C(steep_to_*) slot naming a node that is not in O(nodes) belongs to a removed node and
    is dropped. The removed node itself is not contacted.
  - Adding a table and re-running adds it to every publication and refreshes every subscription with
    C(copy_data = false).
  - A node that joins an already running mesh without having been initialised (see C(playbooks/init_node.yml)) is left
    alone with a warning; a fresh mesh (no subscriptions yet) wires every node.
  - Validates everything (tables exist on every node, are ordinary tables, have a primary key) before changing anything.
  - Warns about unique indexes the conflict engine does not decide (on an expression or a generated column, or partial);
    two nodes writing one value of such an index concurrently stop a subscription, as native replication does. Unique
    constraints and indexes on plain columns are decided (a C(UNIQUE_VIOLATION) in C(steep_repl.conflict_log)).
  - Takes a session advisory lock on every node (in node id order) so two runs never interleave.
version_added: "1.1.0"
author:
  - steep.repl contributors (@steep-repl)
extends_documentation_fragment:
  - steep.repl.mesh_nodes
options:
  tables:
    description: Replicated tables as C(schema.table) (C(steep_replicated_tables)); a bare name means C(public).
    type: list
    elements: str
    default: []
  schemas:
    description: Schemas whose ordinary tables are all replicated (C(steep_replicated_schemas)).
    type: list
    elements: str
    default: []
  exclude:
    description:
      - fnmatch globs over C(schema.table) removed from the set (C(steep_excluded_tables)), e.g. C(staging.*).
      - Exclusion wins over O(tables) and O(schemas).
    type: list
    elements: str
    default: []
  publication:
    description:
      - Name of the publication on every node; the versions publication is named after it (C(<publication>_versions)),
        so it is at most 54 bytes long.
    type: str
    default: steep_pub
  lock_timeout:
    description: Seconds to wait for another run's mesh lock before failing.
    type: int
    default: 300
notes:
  - Supports C(check_mode) (reports the SQL it would run in RV(queries), changes nothing) and C(diff) (per node publication
    tables, subscriptions, slots, tables with conflict triggers and tables whose trigger functions an earlier build of the
    extension generated, before and after).
  - The initial data copy is not done here (C(copy_data = false)); rows written to a table before it joins the set are not
    sent. Add tables while nothing writes to them.
  - After an extension update that changed the templates of C(steep_repl.enable_table), every enabled table whose trigger
    functions an earlier build generated gets them regenerated (C(enable_table) runs again for it).
  - Needs C(psycopg2) on the controller.
  - One mesh node per PostgreSQL cluster (slot names are cluster-wide).
seealso:
  - module: steep.repl.clock_check
"""

EXAMPLES = r"""
- name: Set up the mesh
  steep.repl.replication:
    nodes:
      - node_id: node_a
        host: 10.0.0.1
        password: "{{ vault_pg_password }}"
        database: app
      - node_id: node_b
        host: 10.0.0.2
        password: "{{ vault_pg_password }}"
        database: app
    tables: [public.orders, public.customers]
    schemas: [sales]
    exclude: ["sales.tmp_*"]
  run_once: true
  delegate_to: localhost
"""

RETURN = r"""
queries:
  description: SQL run (or, in check mode, to run), each prefixed with the node as a comment; passwords are masked.
  returned: always
  type: list
  elements: str
  sample: ["/* node_a */ SELECT pg_catalog.pg_create_logical_replication_slot('steep_to_node_b', 'pgoutput')"]
tables:
  description: The resolved replicated tables (without C(steep_repl.row_version)).
  returned: success
  type: list
  elements: str
  sample: [public.orders]
nodes:
  description: Node ids of the mesh.
  returned: success
  type: list
  elements: str
removed_nodes:
  description: Node ids whose stale subscriptions/slots were dropped.
  returned: success
  type: list
  elements: str
skipped_nodes:
  description:
    - Nodes that join an already running mesh without having been initialised (their C(steep_repl.nodes.init_state) is
      neither C(CATCHING_UP) nor C(SYNCHRONIZED)); they are left alone, with a warning naming C(playbooks/init_node.yml).
  returned: success
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.steep.repl.plugins.module_utils.mesh_spec import mesh_nodes_spec
from ansible_collections.steep.repl.plugins.module_utils.replication import PUBLICATION, ensure_mesh
from ansible_collections.steep.repl.plugins.module_utils.runner import run_on_mesh


def main():
    module = AnsibleModule(
        argument_spec=dict(
            nodes=dict(type="list", elements="dict", required=True, options=mesh_nodes_spec()),
            tables=dict(type="list", elements="str", default=[]),
            schemas=dict(type="list", elements="str", default=[]),
            exclude=dict(type="list", elements="str", default=[]),
            publication=dict(type="str", default=PUBLICATION),
            lock_timeout=dict(type="int", default=300),
        ),
        supports_check_mode=True,
    )
    run_on_mesh(module, lambda m: ensure_mesh(
        m.params["nodes"], tables=m.params["tables"], schemas=m.params["schemas"], excluded=m.params["exclude"],
        publication=m.params["publication"], check_mode=m.check_mode, lock_timeout=m.params["lock_timeout"]))


if __name__ == "__main__":
    main()
