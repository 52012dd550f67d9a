#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: init
short_description: Initialise a new steep.repl node from a node of the running mesh
description:
  - Brings a new, empty node into an existing mesh while the other nodes keep taking writes, in three resumable steps
    that C(playbooks/init_node.yml) runs in order (docs/node-init.md).
  - C(prepare) checks the source (in the mesh, SYNCHRONIZED), the target (registered, empty for a snapshot init unless
    O(existing_data=reconcile)) and the schemas (fingerprints, O(schema_sync)), then creates the target's replication slot on EVERY other node before anything
    is copied and waits until the source has applied what each peer committed before its slot existed.
  - C(copy) streams every replicated table with its row versions from the source (O(parallel_workers) tables at a time),
    recording progress in C(steep_repl.init_progress) (view C(steep_repl.init_status)); tables already copied by an
    interrupted run are skipped.
  - C(finish) wires the target into the mesh on the prepared slots (via the replication logic of M(steep.repl.replication)),
    waits until it has caught up and marks it SYNCHRONIZED on every node.
  - C(complete) is the manual method's last step. After the user restored a backup of the source taken at O(source_lsn),
    the source's slot skips what the backup holds, then C(finish) runs.
  - C(status) only reads C(steep_repl.init_status) on the target.
  - C(reinit) replaces the rows and row versions of chosen tables (O(reinit_tables), O(reinit_schema) or O(reinit_full))
    of a member of the running mesh with the source's, while every node keeps taking writes
    (C(playbooks/reinit_node.yml)). The target goes REINITIALIZING, its incoming subscriptions pause during the copy (the
    slots keep every change), each table is swapped in one transaction under a replication origin that peers ignore, then
    the target catches up and is SYNCHRONIZED again. A reinit is an action, so it always reports C(changed).
  - C(verify) compares every member with the O(source) member (the reference, C(playbooks/verify_mesh.yml)), safely
    while writes run (a key is compared only where both nodes hold the same version of it), marks members whose rows
    differ DIVERGED (the reason names the tables, keys and the reinit to run) and a DIVERGED member that no longer
    differs SYNCHRONIZED again. It reports C(changed) only when a state changes; check mode reports without marking.
  - Every state change (UNINITIALIZED, PREPARING, COPYING, CATCHING_UP, SYNCHRONIZED, FAILED, ...) is written to
    C(steep_repl.nodes) and C(audit_log) on every reachable node; a failure leaves the target FAILED with the reason, and a
    re-run resumes.
version_added: "1.1.0"
author:
  - steep.repl contributors (@steep-repl)
extends_documentation_fragment:
  - steep.repl.mesh_nodes
options:
  target:
    description: Node id of the node to initialise (C(steep_init_target)).
    type: str
  source:
    description: Node id of the SYNCHRONIZED node to copy from (C(steep_init_source)); for C(verify), the reference member.
    type: str
  step:
    description: Which step to run.
    type: str
    default: prepare
    choices: [prepare, copy, finish, complete, status, reinit, verify]
  method:
    description:
      - C(snapshot) copies the data; C(manual) expects the user to restore a backup between C(prepare) and C(complete).
    type: str
    default: snapshot
    choices: [snapshot, manual]
  tables:
    description: Replicated tables (C(steep_replicated_tables)).
    type: list
    elements: str
    default: []
  schemas:
    description: Replicated schemas (C(steep_replicated_schemas)).
    type: list
    elements: str
    default: []
  exclude:
    description: Excluded tables, fnmatch globs (C(steep_excluded_tables)).
    type: list
    elements: str
    default: []
  schema_sync:
    description:
      - C(strict) fails before copying when a replicated table differs between source and target.
      - C(auto) makes the target match in one transaction (missing tables created from the source's definition with
        pg_dump, missing columns added, defaults, nullability and identity aligned, safe type changes); what cannot be
        done safely fails with the statements to run by hand, and nothing is changed.
      - C(manual) warns and continues (replication stops on a missing or extra column).
    type: str
    default: strict
    choices: [strict, auto, manual]
  parallel_workers:
    description: Tables copied at the same time.
    type: int
    default: 4
  source_lsn:
    description: With O(step=complete), the LSN up to which the restored backup contains the source's data.
    type: str
  timeout:
    description:
      - Seconds the catch-up in C(finish) and C(reinit) may go without progress (a replication slot that
        does not move) before the step fails; a catch-up that keeps moving is waited for.
    type: int
    default: 600
  reinit_tables:
    description:
      - With O(step=reinit), the replicated tables to reinitialise (C(schema.table), C(public) when no schema is given).
      - Exactly one of O(reinit_tables), O(reinit_schema) and O(reinit_full) is needed.
    type: list
    elements: str
    default: []
  reinit_schema:
    description: With O(step=reinit), reinitialise every replicated table of this schema.
    type: str
  reinit_full:
    description: With O(step=reinit), reinitialise every replicated table.
    type: bool
    default: false
  existing_data:
    description:
      - What C(prepare) and C(copy) do with rows the target already holds.
      - C(fail) refuses a target that is not empty (nothing is changed, the target becomes FAILED with the reason).
      - C(reconcile) merges them. Rows only on the source are copied, identical rows are kept as they are, differing rows are
        decided by the table's conflict strategy and logged in C(steep_repl.conflict_log), and rows only on the target are
        written again once the target is in the mesh so that they reach every node (docs/node-init.md).
    type: str
    default: fail
    choices: [fail, reconcile]
notes:
  - Supports C(check_mode) for C(prepare) (validates and reports the slots it would create), C(reinit) (validates and reports
    what it would do) and C(status).
  - Run it once for the mesh (C(run_once=true)), delegated to the controller; it connects to every node over TCP.
"""

EXAMPLES = r"""
- name: Prepare node_c from node_a
  steep.repl.init:
    nodes: "{{ steep_mesh_nodes }}"
    target: node_c
    source: node_a
    tables: [public.orders]
    step: prepare
  run_once: true
  delegate_to: localhost

- name: Which members differ from node_a (they become DIVERGED)
  steep.repl.init:
    nodes: "{{ steep_mesh_nodes }}"
    source: node_a
    tables: [public.orders]
    step: verify
  run_once: true
  delegate_to: localhost

- name: Reinitialise two tables of node_b from node_a
  steep.repl.init:
    nodes: "{{ steep_mesh_nodes }}"
    target: node_b
    source: node_a
    tables: [public.orders, public.line_items, public.notes]
    step: reinit
    reinit_tables: [public.orders, public.line_items]
  run_once: true
  delegate_to: localhost
"""

RETURN = r"""
state:
  description: Init state of the target after the step.
  returned: success
  type: str
  sample: SYNCHRONIZED
tables:
  description: Replicated tables handled.
  returned: success
  type: list
  elements: str
reconciled:
  description: With O(existing_data=reconcile), per table the counts of rows only on the source, identical, won by the
    source, won by the target and only on the target.
  returned: when step is copy and existing_data is reconcile
  type: dict
reconciled_rows_pushed:
  description: Target rows written again by C(finish) so that they reach every node (existing_data=reconcile).
  returned: when step is finish or complete
  type: int
rows:
  description: Rows copied by a C(copy) step.
  returned: when step is copy or reinit
  type: int
progress:
  description: The target's C(steep_repl.init_status) row (tables/rows done and %, rows/s, ETA, current table).
  returned: when step is copy, reinit or status
  type: dict
diverged:
  description: Per member that differs from the reference, one line per table with the number of differing rows and keys.
  returned: when step is verify
  type: dict
  sample: {node_b: ["public.orders: 2 row(s) differ (keys [17], [42])"]}
marked:
  description: Members marked DIVERGED by this run (cleared lists those back to SYNCHRONIZED).
  returned: when step is verify
  type: list
  elements: str
cleared:
  description: DIVERGED members found identical again and marked SYNCHRONIZED.
  returned: when step is verify
  type: list
  elements: str
queries:
  description: SQL of the step (slots created, subscriptions), without passwords.
  returned: when available
  type: list
  elements: str
"""

import datetime
import decimal

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.steep.repl.plugins.module_utils.db import SteepError, connect
from ansible_collections.steep.repl.plugins.module_utils import nodeinit
from ansible_collections.steep.repl.plugins.module_utils import verify
from ansible_collections.steep.repl.plugins.module_utils.mesh_spec import mesh_nodes_spec
from ansible_collections.steep.repl.plugins.module_utils.runner import run_on_mesh


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (datetime.datetime, datetime.timedelta)):
        return str(value)
    return value


def run(module):
    p = module.params
    specs = p["nodes"]
    if p["parallel_workers"] < 1:
        raise SteepError("parallel_workers must be at least 1, got %s." % p["parallel_workers"])
    if p["step"] == "status":
        spec = [s for s in specs if s.get("node_id") == p["target"]]
        if not spec:
            raise SteepError("target %r is not in nodes" % p["target"])
        from ansible_collections.steep.repl.plugins.module_utils.replication import Member
        conn = connect(Member(spec[0]).conn_kw())
        try:
            rows = nodeinit.status(conn, p["target"])
            state = nodeinit.init_state(conn, p["target"])
        finally:
            conn.close()
        return dict(changed=False, state=state, progress=_plain(rows[0]) if rows else None)
    if p["step"] == "verify":
        return verify.verify(specs, p["source"], p["tables"], p["schemas"], p["exclude"], module.check_mode)
    if p["step"] == "reinit":
        res = nodeinit.reinit(specs, p["target"], p["source"], p["tables"], p["schemas"], p["exclude"],
                              p["reinit_tables"], p["reinit_schema"], p["reinit_full"], module.check_mode,
                              p["timeout"])
        res["tables"] = res.get("tables", [])
        res.pop("per_table", None)
        return _plain(res)
    if module.check_mode and p["step"] != "prepare":
        return dict(changed=True, msg="check mode: step %s would run" % p["step"])
    if p["step"] == "prepare":
        res = nodeinit.prepare(specs, p["target"], p["source"], p["tables"], p["schemas"], p["exclude"],
                               p["schema_sync"], p["method"], module.check_mode, p["existing_data"])
    elif p["step"] == "copy":
        if p["method"] != "snapshot":
            raise SteepError("the copy step belongs to the snapshot method; with method=manual restore your "
                             "backup and run step=complete with source_lsn.")
        res = nodeinit.copy(specs, p["target"], p["source"], p["tables"] or [], p["parallel_workers"],
                            existing_data=p["existing_data"])
        res["progress"] = res.pop("status", None)
        res["tables"] = sorted(res.pop("per_table", {}))
    else:
        if p["step"] == "complete":
            nodeinit.advance_source_slot(specs, p["target"], p["source"], p["source_lsn"])
        res = nodeinit.finish(specs, p["target"], p["source"], p["tables"], p["schemas"], p["exclude"],
                              p["timeout"])
    return _plain(res)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            nodes=dict(type="list", elements="dict", required=True, options=mesh_nodes_spec()),
            target=dict(type="str"),
            source=dict(type="str"),
            step=dict(type="str", default="prepare", choices=["prepare", "copy", "finish", "complete", "status", "reinit", "verify"]),
            method=dict(type="str", default="snapshot", choices=["snapshot", "manual"]),
            tables=dict(type="list", elements="str", default=[]),
            schemas=dict(type="list", elements="str", default=[]),
            exclude=dict(type="list", elements="str", default=[]),
            schema_sync=dict(type="str", default="strict", choices=["strict", "auto", "manual"]),
            parallel_workers=dict(type="int", default=4),
            source_lsn=dict(type="str"),
            timeout=dict(type="int", default=600),
            reinit_tables=dict(type="list", elements="str", default=[]),
            reinit_schema=dict(type="str"),
            reinit_full=dict(type="bool", default=False),
            existing_data=dict(type="str", default="fail", choices=["fail", "reconcile"]),
        ),
        required_if=[("step", "prepare", ("target", "source")), ("step", "copy", ("target", "source")),
                     ("step", "finish", ("target", "source")), ("step", "complete", ("target", "source", "source_lsn")),
                     ("step", "status", ("target",)), ("step", "reinit", ("target", "source")), ("step", "verify", ("source",))],
        supports_check_mode=True,
    )
    run_on_mesh(module, run)


if __name__ == "__main__":
    main()
