#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: clock_check
short_description: Measure the clock drift between steep.repl nodes and fail above a limit
description:
  - Runs once for the whole mesh on the controller (C(run_once=true), C(delegate_to=localhost)).
  - For every node takes O(samples) round trips of C(SELECT clock_timestamp()) and keeps the one with the smallest round-trip
    time; the node's offset against the controller clock is C(server_time - (t_sent + t_received) / 2).
  - The drift of a pair of nodes is the difference of their offsets (the controller's own clock cancels out); its uncertainty
    is the sum of the two half round-trip times.
  - Fails when the largest pairwise drift is above O(max_drift_ms) (last-write-wins would pick wrong winners), warns above
    O(warn_drift_ms).
  - Read-only; C(changed) is always false. Supports check mode (it measures in check mode too).
version_added: "1.1.0"
author:
  - steep.repl contributors (@steep-repl)
extends_documentation_fragment:
  - steep.repl.mesh_nodes
options:
  max_drift_ms:
    description: Fail above this pairwise drift (C(steep_max_drift_ms)).
    type: int
    default: 1000
  warn_drift_ms:
    description: Warn above this pairwise drift (C(steep_warn_drift_ms)).
    type: int
    default: 100
  samples:
    description: Round trips per node.
    type: int
    default: 5
"""

EXAMPLES = r"""
- name: Check the clocks of the mesh
  steep.repl.clock_check:
    nodes:
      - {node_id: node_a, host: 10.0.0.1, password: "{{ vault_pg_password }}"}
      - {node_id: node_b, host: 10.0.0.2, password: "{{ vault_pg_password }}"}
    max_drift_ms: 1000
    warn_drift_ms: 100
  run_once: true
  delegate_to: localhost
"""

RETURN = r"""
drift_ms:
  description: Largest pairwise clock drift in milliseconds.
  returned: always
  type: float
  sample: 3.2
uncertainty_ms:
  description: Measurement uncertainty of RV(drift_ms) (sum of the two half round-trip times).
  returned: always
  type: float
pair:
  description: The two nodes with the largest drift.
  returned: always
  type: list
  elements: str
status:
  description: C(ok), C(warn) or C(fail).
  returned: always
  type: str
offsets:
  description: Per node offset against the controller clock and round-trip time, in milliseconds.
  returned: always
  type: dict
  sample: {node_a: {offset_ms: 0.4, rtt_ms: 0.3}}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.steep.repl.plugins.module_utils.mesh_spec import mesh_nodes_spec
from ansible_collections.steep.repl.plugins.module_utils.replication import Member, check_clocks
from ansible_collections.steep.repl.plugins.module_utils.runner import run_on_mesh


def run(module):
    p = module.params
    offsets, verdict = check_clocks([Member(n) for n in p["nodes"]], samples=p["samples"], warn_ms=p["warn_drift_ms"],
                                    max_ms=p["max_drift_ms"])
    result = dict(changed=False, offsets=offsets, drift_ms=verdict["drift_ms"],
                  uncertainty_ms=verdict["uncertainty_ms"], pair=verdict["pair"], status=verdict["status"])
    if verdict["status"] == "fail":
        module.fail_json(msg=verdict["message"], **result)
    result["warnings"] = [verdict["message"]] if verdict["status"] == "warn" else []
    result["msg"] = verdict["message"]
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            nodes=dict(type="list", elements="dict", required=True, options=mesh_nodes_spec()),
            max_drift_ms=dict(type="int", default=1000),
            warn_drift_ms=dict(type="int", default=100),
            samples=dict(type="int", default=5),
        ),
        supports_check_mode=True,
    )
    run_on_mesh(module, run)


if __name__ == "__main__":
    main()
