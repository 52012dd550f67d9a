#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: identity_range
short_description: Give a steep.repl node non-overlapping identity ranges for its replicated tables
description:
  - Runs once per node (connects to that node's database) and manages the B(local) node's identity ranges
    (SQL Server merge replication style ranges, allocated without consensus; see C(docs/identity-ranges.md)).
  - For every table of O(tables) whose primary key is one integer column fed by a sequence or identity column
    it records the table in C(steep_repl.range_tables), allocates the node's first range with
    C(steep_repl.allocate_range), reseeds the sequence into it (never backwards), and adds the CHECK constraint
    C(steep_range_<table>) (C(NOT VALID), calling C(steep_repl.check_id_range)) plus the C(BEFORE INSERT) trigger that
    moves the sequence into the next range when the current one runs out.
  - When the current range passed its threshold and no next range exists, the next range is allocated ahead of time.
  - Tables whose composite key contains a column referencing a ranged parent are reported as C(inherits);
    UUID/text keys, tables without a primary key and integer keys without a sequence are reported as C(skipped)
    (an integer key without a sequence listed explicitly in O(settings) is an error).
  - The node's range slot comes from O(nodes) and O(known_slots) (see RV(slot)); a node keeps its slot for ever once it
    owns ranges.
  - Validates everything before changing anything; all changes of one run happen in one transaction.
  - With O(state=query) only reports the recorded slots and the utilisation; it never changes anything.
version_added: "1.1.0"
author:
  - steep.repl contributors (@steep-repl)
extends_documentation_fragment:
  - steep.repl.connection
options:
  node_id:
    description: Id of the node this task manages (C(steep_node_id)); must be the node registered as local in its database.
    type: str
    required: true
  state:
    description:
      - C(present) allocates, reseeds and constrains; C(query) only returns RV(slots) and RV(tables) utilisation.
    type: str
    default: present
    choices: [present, query]
  tables:
    description: Replicated tables as C(schema.table) (C(steep_replicated_tables)); a bare name means C(public).
    type: list
    elements: str
    default: []
  settings:
    description:
      - The C(steep_identity_ranges) group var, C({default_range_size, threshold_percent, max_nodes, tables})
        where C(tables) maps C(schema.table) to C({range_size, threshold_percent, enabled}).
      - Tables listed here but not in O(tables) are handled too; C(enabled=false) leaves a table alone.
      - C(range_size) and C(max_nodes) are fixed per table once it has ranges.
    type: dict
    default: {}
  nodes:
    description:
      - Every node of the mesh as dicts with keys C(node_id), C(priority) and C(slot) (C(slot) from the host var
        C(steep_range_slot), optional).
      - Nodes without a configured or recorded slot get the lowest free slot in (priority desc, node_id) order.
      - When empty, O(slot) must be given or the node must already have a slot.
    type: list
    elements: dict
    default: []
  known_slots:
    description:
      - Slots recorded by earlier runs, one dict mapping node id to slot per reachable node (RV(slots) of O(state=query)).
    type: list
    elements: dict
    default: []
  slot:
    description: The slot of this node, overriding the computed one.
    type: int
  expand_threshold:
    description:
      - Pre-allocate the next range when the current one is at least this many percent used (by default each table's
        C(threshold_percent)). Not stored; C(playbooks/expand_ranges.yml) uses it to expand early.
    type: int
notes:
  - Supports C(check_mode) (RV(queries) shows the SQL it would run, RV(tables) the predicted ranges) and C(diff)
    (per table ranges, sequence position, constraint and trigger, before and after).
  - Safety never depends on reaching the peers; the arithmetic alone keeps ranges of different slots disjoint.
  - Needs C(psycopg2) on the host that runs the task.
seealso:
  - module: steep.repl.replication
"""

EXAMPLES = r"""
- name: Identity ranges of this node
  steep.repl.identity_range:
    node_id: "{{ steep_node_id }}"
    login_host: "{{ steep_pg_host }}"
    login_port: "{{ steep_pg_port }}"
    login_password: "{{ steep_pg_password }}"
    login_db: "{{ steep_pg_database }}"
    tables: [public.orders, public.order_lines, public.customers]
    settings:
      default_range_size: 10000
      threshold_percent: 80
      tables:
        public.orders: {range_size: 100000}
        public.audit: {enabled: false}
    nodes:
      - {node_id: node_a, priority: 100}
      - {node_id: node_b, priority: 90}
"""

RETURN = r"""
changed:
  description: Whether a range, a sequence, a constraint, a trigger, a slot or a table setting changed.
  returned: always
  type: bool
node_id:
  description: The local node.
  returned: always
  type: str
slot:
  description: Range slot of the local node (its n-th range of a table is block C(n * max_nodes + slot)).
  returned: always
  type: int
slots:
  description: Every node's slot known here (after the run).
  returned: always
  type: dict
  sample: {"node_a": 0, "node_b": 1}
tables:
  description:
    - Per table C(status) (C(ranged), C(inherits), C(skipped), C(disabled)), C(reason), and for ranged tables C(ranges),
      C(current_range), C(current_value), C(percent_used), C(next_range), C(allocated) (ranges allocated by this run).
  returned: always
  type: dict
  sample: {"public.orders": {"status": "ranged", "current_range": [1, 10000], "percent_used": 12.5,
           "next_range": null, "allocated": []}}
queries:
  description: The SQL executed (or, in check mode, that would be executed).
  returned: always
  type: list
  elements: str
diff:
  description: Before/after per table when run with C(--diff).
  returned: when diff mode
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.steep.repl.plugins.module_utils import db
from ansible_collections.steep.repl.plugins.module_utils import ranges as rg
from ansible_collections.steep.repl.plugins.module_utils.db import SteepError
from ansible_collections.steep.repl.plugins.module_utils.runner import run_on_node


def argument_spec():
    spec = db.connection_argument_spec()
    spec.update(
        node_id=dict(type="str", required=True),
        state=dict(type="str", default="present", choices=["present", "query"]),
        tables=dict(type="list", elements="str", default=[]),
        settings=dict(type="dict", default={}),
        nodes=dict(type="list", elements="dict", default=[]),
        known_slots=dict(type="list", elements="dict", default=[]),
        slot=dict(type="int"),
        expand_threshold=dict(type="int"),
    )
    return spec


def _diff_view(plan):
    def fmt(rs):
        return ["%s-%s (%s)" % (r["range_start"], r["range_end"], r["status"]) for r in rs]
    st = plan["before"]
    kinds = [step[0] for step in plan["steps"]]
    return (dict(ranges=fmt(plan["ranges_before"]), sequence_position=plan["position_before"],
                 constraint=st["constraint"], trigger=st["trigger"]),
            dict(ranges=fmt(plan["ranges_after"]), sequence_position=plan["position_after"],
                 constraint=st["constraint"] or "constraint" in kinds, trigger=st["trigger"] or "constraint" in kinds))


def run(module, conn):
    p = module.params
    node_id = db.validate_node_id(p["node_id"])
    has_api = bool(db.extension_version(conn)) and bool(db.fetch_value(
        conn, "SELECT count(*) FROM pg_catalog.pg_proc WHERE proname = 'allocate_range' "
              "AND pronamespace = 'steep_repl'::regnamespace"))
    has_local = has_api and bool(db.fetch_value(conn, "SELECT count(*) FROM steep_repl.nodes WHERE is_local"))
    if not has_local and (p["state"] == "query" or module.check_mode):
        # Nothing recorded yet (e.g. --check of a first run, before the foundation installed anything).
        would = p["state"] == "present" and bool(p["tables"] or (p["settings"] or {}).get("tables"))
        return dict(changed=would, node_id=node_id, slot=None, slots={}, tables={}, queries=[],
                    msg="steep_repl 1.1 is not installed or the node is not registered yet; ranges would be "
                        "allocated after that")
    if not db.extension_version(conn):
        raise SteepError("the steep_repl extension is not installed in %s. Fix: run playbooks/site.yml "
                         "(steep_foundation.yml installs it) first." % p["login_db"])
    if not has_api:
        raise SteepError("steep_repl in %s is older than 1.1 (no allocate_range). Fix: ALTER EXTENSION steep_repl UPDATE "
                         "(playbooks/site.yml does it)." % p["login_db"])
    local = rg.local_node(conn)
    if local["node_id"] != node_id:
        raise SteepError("the database %s is registered as node %s, not %s. Fix: point steep_pg_* of %s at its own "
                         "database." % (p["login_db"], local["node_id"], node_id, node_id))
    settings = p["settings"] or {}
    slot_count = settings.get("max_nodes", rg.DEFAULT_SLOTS)
    if not isinstance(slot_count, int) or isinstance(slot_count, bool) or not 1 <= slot_count <= rg.MAX_SLOTS:
        raise SteepError("steep_identity_ranges.max_nodes %r is invalid. Fix: use 1..%s (default %s)."
                         % (slot_count, rg.MAX_SLOTS, rg.DEFAULT_SLOTS))
    recorded = rg.recorded_slots(conn)
    result = dict(changed=False, node_id=node_id, tables={}, queries=[])

    if p["state"] == "query":
        result.update(slot=recorded.get(node_id), slots=recorded,
                      tables={u["table"]: u for u in rg.utilization(conn, node_id)})
        return result

    # ---- slots (validated before any change)
    known = list(p["known_slots"] or []) + [recorded]
    if p["nodes"]:
        for n in p["nodes"]:
            if "node_id" not in n:
                raise SteepError("every entry of nodes needs a node_id (got %r)." % (n,))
        slots = rg.assign_slots(p["nodes"], known, slot_count)
    else:
        slots = rg.assign_slots([dict(node_id=node_id, slot=p["slot"])] if p["slot"] is not None else [], known, slot_count)
    if p["slot"] is not None:
        if recorded.get(node_id) not in (None, p["slot"]):
            raise SteepError("node %s already uses range slot %s; slot %s cannot be applied. Fix: set steep_range_slot: %s."
                             % (node_id, recorded[node_id], p["slot"], recorded[node_id]))
        for other, s in slots.items():
            if other != node_id and s == p["slot"]:
                raise SteepError("range slot %s is already used by node %s. Fix: give %s another steep_range_slot."
                                 % (s, other, node_id))
        slots[node_id] = p["slot"]
    if node_id not in slots:
        raise SteepError("node %s has no range slot. Fix: pass nodes (playbooks/steep_ranges.yml does) or slot." % node_id)
    my_slot = slots[node_id]
    registered = set(r["node_id"] for r in db.fetch_all(conn, "SELECT node_id FROM steep_repl.nodes"))
    slot_changes = [(n, s) for n, s in sorted(slots.items()) if n in registered and recorded.get(n) != s]

    # ---- tables (validated before any change)
    wanted = rg.table_settings(p["tables"], settings)
    ranged_names = set()
    infos = {}
    for name in sorted(wanted):
        st = wanted[name]
        if not st["enabled"]:
            infos[name] = dict(kind="disabled", reason="enabled: false in steep_identity_ranges")
            continue
        info = rg.classify(conn, name, set())
        if info["kind"] == "missing":
            raise SteepError("table %s does not exist in %s on node %s. Fix: create it, or remove it from "
                             "steep_replicated_tables / steep_identity_ranges.tables." % (name, p["login_db"], node_id))
        if info["kind"] == "no_sequence" and st["explicit"]:
            raise SteepError("%s cannot get identity ranges: its %s. Fix: make the key GENERATED BY DEFAULT AS IDENTITY "
                             "(or serial), or set enabled: false for it in steep_identity_ranges.tables."
                             % (name, info["reason"]))
        if info["kind"] == "skipped" and st["explicit"]:
            raise SteepError("%s cannot get identity ranges: %s. Fix: set enabled: false for it in "
                             "steep_identity_ranges.tables (UUID/text keys need no range)." % (name, info["reason"]))
        if info["kind"] == "ranged":
            ranged_names.add(name)
        infos[name] = info
    for name, info in infos.items():  # composite keys: now that the ranged set is known
        if info["kind"] == "skipped" and "composite" in info.get("reason", ""):
            infos[name] = rg.classify(conn, name, ranged_names)
    plans = {}
    for name in sorted(ranged_names):
        plans[name] = rg.plan_table(conn, name, infos[name], wanted[name], node_id, my_slot, slot_count,
                                    p["expand_threshold"])

    # ---- apply (one transaction)
    state = db.SqlState(conn, module.check_mode)
    changed = bool(slot_changes) or any(pl["steps"] for pl in plans.values())
    if changed and not module.check_mode:
        conn.autocommit = False
    try:
        for n, s in slot_changes:
            state.execute("SELECT steep_repl.set_range_slot(%s, %s)", (n, s))
        for name in sorted(plans):
            rg.apply_plan(state, plans[name])
        if changed and not module.check_mode:
            conn.commit()
    except Exception:
        if not conn.autocommit:
            conn.rollback()
        raise
    finally:
        conn.autocommit = True

    # ---- report (real state after the run; predicted in check mode)
    diff_before, diff_after = {}, {}
    for name in sorted(infos):
        info = infos[name]
        if info["kind"] != "ranged":
            status = {"inherits": "inherits", "disabled": "disabled"}.get(info["kind"], "skipped")
            result["tables"][name] = dict(status=status, reason=info.get("reason"), parent=info.get("parent"))
            continue
        pl = plans[name]
        if module.check_mode:
            u = rg.usage(pl["ranges_after"], pl["position_after"])
        else:
            schema, table = rg.split_name(name)
            rows = db.fetch_all(conn, "SELECT range_start, range_end, status FROM steep_repl.identity_ranges WHERE "
                                      "table_schema = %s AND table_name = %s AND node_id = %s ORDER BY range_start",
                                (schema, table, node_id))
            u = rg.usage(rows, rg.sequence_position(conn, info["sequence"]))
        u.update(status="ranged", column=info["column"], sequence=info["sequence"], range_size=wanted[name]["range_size"],
                 allocated=[[a["range_start"], a["range_end"]] for a in pl["allocated"]], changes=[step[0] for step in pl["steps"]])
        result["tables"][name] = u
        diff_before[name], diff_after[name] = _diff_view(pl)
    result.update(changed=changed, slot=my_slot, slots=dict(recorded, **slots), queries=state.queries)
    if module._diff:
        result["diff"] = dict(before=dict(slot=recorded.get(node_id), tables=diff_before),
                              after=dict(slot=my_slot, tables=diff_after))
    return result


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    run_on_node(module, run, "identity ranges (steep.repl.identity_range)")


if __name__ == "__main__":
    main()
