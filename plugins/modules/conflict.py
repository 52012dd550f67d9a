#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: conflict
short_description: Configure conflict strategies, resolve, revert and purge conflicts of steep.repl
description:
  - Conflicts are detected and decided inside PostgreSQL while changes are applied (docs/conflicts.md); this module
    configures the rules on one node and resolves what the rules left PENDING.
  - O(state=configured) sets the default strategy (C(steep_conflict_default_strategy)) and the per-table strategies
    (C(steep_conflict_strategies)) of the node it connects to. Tables configured earlier but no longer listed fall
    back to the default when O(purge=true). Warns when a configuration cannot converge on its own
    (C(keep_local), C(apply_remote), C(manual)).
  - O(state=resolved) resolves one PENDING conflict (O(conflict_id) with O(resolution) C(local), C(remote) or
    C(merge) with O(merged)) or, without O(conflict_id), every PENDING conflict matching O(xid), O(table),
    O(time_start) and O(time_end). A resolution is a forced local write. It replicates to every node, which then
    hold the same row and mark their own PENDING conflicts of that key resolved.
  - O(state=reverted) undoes the resolution of O(conflict_id) (the other side's row is written back, forced); the
    original entry becomes C(REVERTED) and a new entry records the revert.
  - O(state=purged) is the retention of the node's C(steep_repl.conflict_log) (each node keeps its own); it deletes the
    decided entries detected more than O(older_than) ago, in batches of O(batch_size). C(PENDING) entries stay, and
    so does an entry whose revert partner (C(reverts), C(reverted_by)) is C(PENDING) or younger. Run it on every node,
    on a schedule. Idempotent (C(changed=false) when nothing is old enough); in check mode RV(purged) is exact.
  - Every change is written to C(steep_repl.audit_log) by the database functions. Check mode changes nothing.
version_added: "1.1.0"
author:
  - steep.repl contributors (@steep-repl)
extends_documentation_fragment:
  - steep.repl.connection
options:
  state:
    description: What to do (see the description).
    type: str
    default: configured
    choices: [configured, resolved, reverted, purged]
  default_strategy:
    description:
      - Default strategy of the node (C(steep_conflict_default_strategy)). Omit to leave it unchanged.
    type: str
    choices: [last_write_wins, first_write_wins, node_priority, keep_local, apply_remote, manual]
  strategies:
    description:
      - Per-table strategies (C(steep_conflict_strategies)), keyed by C(schema.table).
      - "A value is a strategy name or a mapping C({strategy: node_priority, priority: [node_a, node_b]}) (strongest
        first; every node must be registered in C(steep_repl.nodes))."
    type: dict
  purge:
    description: With O(state=configured), remove the strategy of tables not listed in O(strategies).
    type: bool
    default: true
  conflict_id:
    description: The conflict (C(steep_repl.conflict_log.id)) to resolve or revert.
    type: int
  resolution:
    description: C(local) keeps this node's row, C(remote) takes the recorded remote row, C(merge) writes O(merged).
    type: str
    choices: [local, remote, merge]
  merged:
    description: Columns of the merged row (with O(resolution=merge)); columns not given keep their local value.
    type: dict
  xid:
    description: Bulk resolution - only conflicts of this origin transaction id.
    type: int
  table:
    description: Bulk resolution - only conflicts of this table (C(schema.table)).
    type: str
  time_start:
    description: Bulk resolution - only conflicts detected at or after this timestamp (ISO 8601).
    type: str
  time_end:
    description: Bulk resolution - only conflicts detected at or before this timestamp (ISO 8601).
    type: str
  reason:
    description: Why a resolution is reverted (recorded in the conflict log and the audit log).
    type: str
    default: Manual revert
  older_than:
    description:
      - With O(state=purged), how long a decided conflict is kept, as a PostgreSQL interval (C(90 days), C(12 hours)).
    type: str
  batch_size:
    description: With O(state=purged), entries deleted per statement.
    type: int
    default: 10000
"""

EXAMPLES = r"""
- name: Strategies of every node (what playbooks/steep_conflicts.yml does)
  steep.repl.conflict:
    login_host: "{{ steep_pg_host }}"
    login_port: "{{ steep_pg_port }}"
    login_password: "{{ steep_pg_password }}"
    login_db: "{{ steep_pg_database }}"
    default_strategy: last_write_wins
    strategies:
      public.orders: manual
      public.customer_preferences: {strategy: node_priority, priority: [node_a, node_b]}
  delegate_to: localhost

- name: Keep the remote row of conflict 42
  steep.repl.conflict:
    login_db: app
    state: resolved
    conflict_id: 42
    resolution: remote

- name: Merge by hand
  steep.repl.conflict:
    login_db: app
    state: resolved
    conflict_id: 43
    resolution: merge
    merged: {status: shipped, updated_by: alice}

- name: Every pending conflict of one large transaction keeps the local rows
  steep.repl.conflict:
    login_db: app
    state: resolved
    xid: 1234567
    resolution: local

- name: Keep 90 days of decided conflicts (run on every node, e.g. weekly)
  steep.repl.conflict:
    login_db: app
    state: purged
    older_than: 90 days

- name: That was wrong - undo it
  steep.repl.conflict:
    login_db: app
    state: reverted
    conflict_id: 42
    reason: customer called back
"""

RETURN = r"""
before:
  description: The strategies (O(state=configured)), the conflict entry, or the number of log entries (O(state=purged)) before the task.
  returned: always
  type: dict
after:
  description: The strategies, or the number of log entries (O(state=purged)), after the task (what they would be in check mode).
  returned: when state=configured or state=purged
  type: dict
  sample: {default_strategy: last_write_wins, tables: {public.orders: {strategy: manual, priority: null}}}
conflict:
  description: The conflict entry after the task (single resolution or revert).
  returned: when conflict_id is given
  type: dict
resolved:
  description: Number of conflicts resolved (or that would be).
  returned: when state=resolved
  type: int
purged:
  description: Conflict log entries deleted (in check mode, that would be).
  returned: when state=purged
  type: int
new_conflict_id:
  description: Id of the entry that records the revert.
  returned: when state=reverted
  type: int
warnings:
  description: Why this configuration does not converge on its own (also emitted as task warnings).
  returned: when state=configured
  type: list
  elements: str
queries:
  description: SQL run (or that would run in check mode).
  returned: always
  type: list
  elements: str
diff:
  description: Before/after (with C(--diff)).
  returned: when diff mode
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.steep.repl.plugins.module_utils import db
from ansible_collections.steep.repl.plugins.module_utils import conflicts
from ansible_collections.steep.repl.plugins.module_utils.runner import run_on_node


def argument_spec():
    spec = db.connection_argument_spec()
    spec.update(
        state=dict(type="str", default="configured", choices=["configured", "resolved", "reverted", "purged"]),
        default_strategy=dict(type="str", choices=list(conflicts.STRATEGIES)),
        strategies=dict(type="dict"),
        purge=dict(type="bool", default=True),
        conflict_id=dict(type="int"),
        resolution=dict(type="str", choices=list(conflicts.RESOLUTIONS)),
        merged=dict(type="dict"),
        xid=dict(type="int"),
        table=dict(type="str"),
        time_start=dict(type="str"),
        time_end=dict(type="str"),
        reason=dict(type="str", default="Manual revert"),
        older_than=dict(type="str"),
        batch_size=dict(type="int", default=10000),
    )
    return spec


def run(module, conn):
    p = module.params
    sql = db.SqlState(conn, module.check_mode)
    if p["state"] == "configured":
        if module.check_mode and not conflicts.engine_installed(conn):
            # First --check run: the foundation play would have installed the extension before this task.
            return {"changed": True, "before": {}, "after": {}, "queries": [], "warnings": [], "diff": {},
                    "msg": "steep_repl is not installed yet; the strategies would be configured after it is"}
        res = conflicts.configure(sql, conn, p["default_strategy"], p["strategies"] or {}, p["purge"])
        for w in res["warnings"]:
            module.warn(w)
        res["diff"] = {"before": res["before"], "after": res["after"]}
        return res
    if p["state"] == "resolved":
        if p["conflict_id"] is not None:
            res = conflicts.resolve(sql, conn, p["conflict_id"], p["resolution"], p["merged"])
            res["diff"] = {"before": res["before"], "after": res["conflict"]}
        else:
            res = conflicts.resolve_bulk(sql, conn, p["resolution"], p["xid"], p["table"], p["time_start"], p["time_end"])
            res["before"] = {}
            res["diff"] = {"before": {}, "after": {"resolved": res["resolved"]}}
        return res
    if p["state"] == "purged":
        res = conflicts.purge_log(conn, p["older_than"], p["batch_size"])
        res.pop("complete", None)
        res["diff"] = {"before": res["before"], "after": res["after"]}
        return res
    res = conflicts.revert(sql, conn, p["conflict_id"], p["reason"])
    res["diff"] = {"before": res["before"], "after": res["conflict"]}
    return res


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True,
                           required_if=[("state", "resolved", ["resolution"]),
                                        ("state", "reverted", ["conflict_id"]),
                                        ("state", "purged", ["older_than"])])
    run_on_node(module, run, "steep.repl.conflict (%s)" % module.params["state"], transactional=True,
                explain=conflicts.explain_db_error)


if __name__ == "__main__":
    main()
