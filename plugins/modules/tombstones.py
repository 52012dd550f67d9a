#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: tombstones
short_description: Purge the settled tombstones of deleted rows from every steep.repl node
description:
  - Every deleted key leaves a tombstone in C(steep_repl.row_version) on every node; it decides a concurrent update or
    re-insert of the key that arrives later. This module removes the tombstones no such write can still meet.
  - Runs B(once for the whole mesh) (C(run_once=true), delegated to the controller) and connects to every node over TCP.
    Takes the mesh lock of C(steep.repl.replication), so it never runs beside a change of the mesh.
  - Proves which tombstones are settled with two rounds over every node. In each round, on every node, it notes the
    clock and the open transactions, waits until those transactions ended, and waits until every slot on the node
    has confirmed the node's current WAL position, that is, until every other node has applied it. After the
    rounds, a tombstone written by a node before that node's first mark was applied everywhere. Every version written
    concurrently with it, before some node applied it, has also reached every node.
  - Then records these horizons on every node (C(steep_repl.set_tombstone_horizon)). From then on, a version that
    meets a settled tombstone descends from it and applies, even from a node that already purged the tombstone and
    so re-inserts the key at epoch 0. Only when every node has them does each node delete its settled tombstones,
    in batches of O(batch_size), in separate transactions (C(steep_repl.purge_tombstones)).
  - First sends, from every node, the tombstones of rows that lost a unique-key conflict
    (C(steep_repl.settle_unique_conflicts), what the agent does every cycle), so a node that never held both rows of
    a C(UNIQUE_VIOLATION) drops the loser. A mesh without agents gets it from this module; run it on a schedule.
  - Only tables whose strategy is an order (C(last_write_wins), C(first_write_wins), C(node_priority)) are purged.
    Under C(keep_local), C(apply_remote) and C(manual), nodes may keep different versions of a key on purpose, so
    their tombstones stay.
  - Derived tombstones (the losers of unique-key conflicts, pseudo node C(steep_repl)) that every node holds before
    the first round and no node still has to send are settled by the same rounds
    (C(steep_repl.settle_derived_tombstones)).
  - Tombstones written by a node that has left the mesh (no node of O(nodes) replicates with it any more) are
    settled by the same rounds, with the run's earliest mark as that node's horizon (RV(departed)).
  - Refuses, changing nothing, when a node is not C(SYNCHRONIZED) (initialisation, reinit, divergence), lacks a
    subscription or slot of the mesh, has a disabled subscription, still replicates with a node left out of
    O(nodes), or runs an extension without tombstone purging.
    A node or slot that stops moving for O(stall_timeout) seconds, or a transaction open since before the round,
    fails the run before anything is purged. No horizon is recorded either, unless the failure is in the last
    two steps.
  - Idempotent. When no tombstone of an ordered table exists and no unique-key tombstone is queued, it connects,
    checks and returns C(changed=false) without any round.
version_added: "1.1.0"
author:
  - steep.repl contributors (@steep-repl)
extends_documentation_fragment:
  - steep.repl.mesh_nodes
options:
  batch_size:
    description: Tombstones deleted per transaction on a node.
    type: int
    default: 10000
  stall_timeout:
    description:
      - Seconds a node may take to end the transactions open at a mark, and seconds a slot may stand still while it
        has not confirmed the mark, before the run fails. A slot that moves is waited for.
    type: int
    default: 60
  lock_timeout:
    description: Seconds to wait for another run's mesh lock before failing.
    type: int
    default: 300
notes:
  - Supports C(check_mode). It checks the mesh as a run does and reports in RV(would_purge) the tombstones of ordered
    tables written until now (what a run purges unless a round fails), in RV(would_settle_unique) the queued
    unique-key tombstones, and the SQL in RV(queries). It writes nothing, not even a WAL mark.
  - Supports C(diff). The per-node counts of tombstones before and after, and how many were settled.
  - Needs C(psycopg2) on the controller.
seealso:
  - module: steep.repl.replication
"""

EXAMPLES = r"""
- name: Purge settled tombstones
  steep.repl.tombstones:
    nodes:
      - {node_id: node_a, host: 10.0.0.1, password: "{{ vault_pg_password }}", database: app}
      - {node_id: node_b, host: 10.0.0.2, password: "{{ vault_pg_password }}", database: app}
    batch_size: 10000
  run_once: true
  delegate_to: localhost
"""

RETURN = r"""
purged:
  description: Tombstones deleted per node.
  returned: success
  type: dict
  sample: {node_a: 1200, node_b: 1200}
horizons:
  description: The horizon recorded for each origin node (tombstones it wrote up to this time are settled).
  returned: success, when a purge ran
  type: dict
  sample: {node_a: "2026-12-05T14:02:11.120931+00:00"}
departed:
  description: Nodes outside O(nodes) whose tombstones some node still holds (they left the mesh); a run settles them too.
  returned: success
  type: list
  elements: str
  sample: [node_c]
unique_settled:
  description: Tombstones of unique-key conflict losers sent to the other nodes, per node.
  returned: success, not in check mode
  type: dict
  sample: {node_a: 1, node_b: 0}
would_settle_unique:
  description: In check mode, per node, the queued tombstones of unique-key conflict losers a run would send.
  returned: check mode
  type: dict
  sample: {node_a: 1, node_b: 0}
would_purge:
  description: In check mode, per node, the tombstones of ordered tables written until now.
  returned: check mode, when there is something to purge
  type: dict
  sample: {node_a: 1200, node_b: 1200}
nodes:
  description: Node ids of the mesh.
  returned: success
  type: list
  elements: str
queries:
  description: SQL run (or, in check mode, to run) that changes something, each prefixed with the node as a comment.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.steep.repl.plugins.module_utils.mesh_spec import mesh_nodes_spec
from ansible_collections.steep.repl.plugins.module_utils.runner import run_on_mesh
from ansible_collections.steep.repl.plugins.module_utils.tombstones import purge


def main():
    module = AnsibleModule(
        argument_spec=dict(
            nodes=dict(type="list", elements="dict", required=True, options=mesh_nodes_spec()),
            batch_size=dict(type="int", default=10000),
            stall_timeout=dict(type="int", default=60),
            lock_timeout=dict(type="int", default=300),
        ),
        supports_check_mode=True,
    )
    run_on_mesh(module, lambda m: purge(m.params["nodes"], check_mode=m.check_mode, stall=m.params["stall_timeout"],
                                        batch=m.params["batch_size"], lock_timeout=m.params["lock_timeout"]))


if __name__ == "__main__":
    main()
