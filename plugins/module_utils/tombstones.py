# -*- coding: utf-8 -*-
# Copyright: steep.repl contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Purging settled tombstones of ``steep_repl.row_version`` on every node (docs/conflicts.md, Tombstones).

A tombstone (the version of a deleted key) is what lets a node decide a concurrent update or re-insert
of that key that arrives later. It is settled once every node has applied it and every version that some
node wrote before it applied the tombstone has reached every node: then every version of the key that can
still arrive was written after its origin saw the tombstone, and descends from it. The proof, for every
origin P at once, is two rounds over the whole mesh:

1. on every node P: note P's clock H(P) and the transactions with an id (WAL_MARK); wait until those that
   can write as P have ended (sessions and prepared transactions, not apply workers): every version of P with
   ``ver_ts <= H(P)`` is committed, as a version is stamped no earlier than the clock of its write; then
   wait until every slot on P has confirmed P's current WAL position: every node has applied them. So when
   round 1 ends, every tombstone of P up to H(P) is on every node.
2. the same again. A version that some node Q wrote before it applied such a tombstone was written before
   round 1 ended, so it is committed and confirmed by every slot of Q when round 2 ends.

Then every node records the horizons H (``steep_repl.set_tombstone_horizon``; from then on a version that
meets a settled tombstone descends from it), and only after every node has them, each node deletes its
settled tombstones in batches (``steep_repl.purge_tombstones``): a node that purged first may re-insert the
key at epoch 0, and the others must already know that this beats their tombstone.

A derived tombstone (pseudo node ``steep_repl``, the loser of a unique-key conflict) carries the losing version's
time, not the time it was made, so no horizon covers it. One that every node holds before round 1, and that no node
still has to send, is settled by the same rounds (every version written before some node held it was written before
round 1): every node records it (``steep_repl.settle_derived_tombstones``) with the horizons, before any purge.

Shared by the ``steep.repl.tombstones`` module and the agent; no Ansible imports.
"""
from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

from ansible_collections.steep.repl.plugins.module_utils.conflicts import settle_unique
from ansible_collections.steep.repl.plugins.module_utils.db import SteepError, fetch_all, fetch_one, fetch_value
from ansible_collections.steep.repl.plugins.module_utils.replication import (
    SLOT_PREFIX, SUB_PREFIX, WAL_MARK, Mesh, build_members, peer_of, slot_name, subscription_name, wait_slot_confirmed,
    wait_transactions_ended)

ORDERED = ("last_write_wins", "first_write_wins", "node_priority")
COUNTS = ("SELECT count(*) FILTER (WHERE v.deleted) AS tombstones, "
          "count(*) FILTER (WHERE v.deleted AND steep_repl._settled(v)) AS settled "
          "FROM steep_repl.row_version v")
# origins of tombstones that are not nodes of the run: departed nodes (_check_ready has made sure that no member
# replicates with them any more), not the pseudo node of derived tombstones
DEPARTED = ("SELECT DISTINCT v.ver_node FROM steep_repl.row_version v "
            "WHERE v.deleted AND v.ver_node <> ALL(%s) AND v.ver_node <> 'steep_repl'")
# derived tombstones (pseudo node steep_repl, module docstring) a node holds, not queued for sending, not yet
# recorded as settled; the version time as exact epoch seconds
DERIVED = ("SELECT v.tbl, v.pk, EXTRACT(EPOCH FROM v.ver_ts)::text AS ts FROM steep_repl.row_version v "
           "JOIN steep_repl.conflict_tables ct ON ct.tbl = v.tbl, "
           "LATERAL steep_repl.table_strategy(ct.table_schema, ct.table_name) s "
           "WHERE v.deleted AND v.ver_node = 'steep_repl' AND s.strategy = ANY(%s) AND NOT steep_repl._settled(v) "
           "AND NOT EXISTS (SELECT 1 FROM steep_repl.unique_settle u WHERE u.tbl = v.tbl AND u.pk = v.pk)")
SET_HORIZONS = ("SELECT steep_repl.set_tombstone_horizon((SELECT pg_catalog.jsonb_object_agg(e.key, e.value) "
                "FROM pg_catalog.jsonb_each(%s::jsonb) e WHERE e.key = ANY(%s) OR EXISTS (SELECT 1 FROM "
                "steep_repl.row_version v WHERE v.ver_node = e.key AND v.deleted)))")
CANDIDATES = ("SELECT count(*) FROM steep_repl.row_version v JOIN steep_repl.conflict_tables ct ON ct.tbl = v.tbl, "
              "LATERAL steep_repl.table_strategy(ct.table_schema, ct.table_name) s "
              "WHERE v.deleted AND s.strategy = ANY(%s) AND v.ver_node = ANY(%s) AND v.ver_ts <= pg_catalog.clock_timestamp()")


def _check_ready(mesh):
    """Refuse (naming the fix) unless every node runs an engine with tombstone horizons, is initialised, and
    receives from every other node through an enabled subscription whose slot exists."""
    ids = [m.node_id for m in mesh.members]
    for m in mesh.members:
        if not fetch_value(m.conn, "SELECT pg_catalog.to_regprocedure('steep_repl.purge_tombstones(integer)') IS NOT NULL "
                                   "AND pg_catalog.to_regprocedure('steep_repl.settle_derived_tombstones(jsonb)') IS NOT NULL"):
            raise SteepError("%s runs a steep_repl extension without tombstone purging. Fix: run the foundation play "
                             "(playbooks/steep_foundation.yml) to update the extension on every node, then re-run."
                             % m.node_id)
        known = set(r["node_id"] for r in fetch_all(m.conn, "SELECT node_id FROM steep_repl.nodes"))
        if set(ids) - known:
            raise SteepError("%s does not know node(s) %s. Fix: run the foundation play (playbooks/steep_foundation.yml) "
                             "on the whole mesh, then re-run." % (m.node_id, ", ".join(sorted(set(ids) - known))))
        state = fetch_value(m.conn, "SELECT init_state FROM steep_repl.nodes WHERE node_id = %s", (m.node_id,))
        if state not in ("SYNCHRONIZED", "UNINITIALIZED"):
            raise SteepError("%s is %s, not SYNCHRONIZED: tombstones are not purged while a node is initialised or "
                             "diverged (it may still copy or need them). Fix: finish playbooks/init_node.yml or "
                             "reinit_node.yml for it, then re-run." % (m.node_id, state))
        subs = dict((r["subname"], r["subenabled"]) for r in fetch_all(
            m.conn, "SELECT subname, subenabled FROM pg_catalog.pg_subscription "
                    "WHERE subdbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())"))
        slots = set(r["slot_name"] for r in fetch_all(m.conn, "SELECT slot_name FROM pg_catalog.pg_replication_slots"))
        # the rounds prove a tombstone settled only for the nodes they cover: a steep subscription or slot of a
        # node outside the run means versions (or a receiver) the proof does not see
        outside = sorted((set(peer_of(n, SUB_PREFIX) for n in subs if n.startswith(SUB_PREFIX)) |
                          set(peer_of(n, SLOT_PREFIX) for n in slots if n.startswith(SLOT_PREFIX))) - set(ids))
        if outside:
            raise SteepError("%s replicates with node(s) %s, which this run does not include, so no tombstone can be "
                             "proven settled. Fix: list every node of the mesh (the whole steep_nodes group, or every "
                             "node in the agent's replication.topology.nodes), or remove the departed node with "
                             "playbooks/steep_replication.yml, then re-run." % (m.node_id, ", ".join(outside)))
        for peer in ids:
            if peer == m.node_id:
                continue
            sub = subscription_name(peer)
            if sub not in subs:
                raise SteepError("%s has no subscription %s, so it does not receive %s's changes. Fix: run "
                                 "playbooks/steep_replication.yml (or site.yml), then re-run." % (m.node_id, sub, peer))
            if not subs[sub]:
                raise SteepError("subscription %s on %s is disabled, so it does not receive %s's changes and "
                                 "nothing can be proven settled. Fix: ALTER SUBSCRIPTION %s ENABLE on %s (see its "
                                 "server log for why it stopped), then re-run." % (sub, m.node_id, peer, sub, m.node_id))
            if slot_name(peer) not in slots:
                raise SteepError("%s has no slot %s, so %s does not receive its changes. Fix: run "
                                 "playbooks/steep_replication.yml (or site.yml), then re-run." % (
                                     m.node_id, slot_name(peer), peer))


def _round(mesh, stall):
    """One round: every node's clock and transactions noted, ended, and its WAL confirmed by every slot.
    Returns {node_id: clock at the mark}."""
    marks = {m.node_id: fetch_one(m.conn, WAL_MARK) for m in mesh.members}
    for m in mesh.members:
        wait_transactions_ended(m.conn, marks[m.node_id], stall, lambda old, m=m: SteepError(
            "transactions on %s that began before this run are still running after %ss (%s); their versions may "
            "not have reached every node, so no tombstone was purged. Fix: let them finish, or end them, and "
            "re-run." % (m.node_id, stall, old or "see pg_stat_activity")), local_writers=True)
    for m in mesh.members:
        target = fetch_value(m.conn, "SELECT pg_catalog.pg_current_wal_lsn()::text")
        for peer in mesh.members:
            if peer is m:
                continue
            slot = slot_name(peer.node_id)
            wait_slot_confirmed(m.conn, slot, target, stall, lambda at, m=m, peer=peer, slot=slot: SteepError(
                "slot %s on %s has not moved for %ss (confirmed up to %s, needed %s): %s has not applied %s's "
                "changes, so no tombstone was purged. Fix: check subscription %s on %s (pg_stat_subscription, "
                "the server log), then re-run." % (slot, m.node_id, stall, at, target, peer.node_id, m.node_id,
                                                   subscription_name(m.node_id), peer.node_id)))
    return dict((i, mark["at"]) for i, mark in marks.items())


def _derived(mesh):
    """The derived tombstones every node holds now, not queued anywhere: settled once the rounds have carried every
    version written before they arrived (their ver_ts is the losing version's, so no horizon covers them).
    Returns the JSON array text for steep_repl.settle_derived_tombstones and how many there are."""
    common = None
    for m in mesh.members:
        held = set((r["tbl"], r["pk"], r["ts"]) for r in fetch_all(m.conn, DERIVED, (list(ORDERED),)))
        common = held if common is None else common & held
    keys = sorted(common or ())
    return "[%s]" % ", ".join("[%s, %s, %s]" % (json.dumps(t), json.dumps(k), ts) for t, k, ts in keys), len(keys)


def _counts(mesh):
    return dict((m.node_id, dict(fetch_one(m.conn, COUNTS))) for m in mesh.members)


def _settle_unique(mesh, batch, check_mode, queries):
    """Send every node's queued unique-conflict tombstones (what the agent does every cycle), in batches:
    a node that never saw both rows of a UNIQUE_VIOLATION drops the loser, and the rounds then carry them.
    Returns {node_id: sent} (in check mode: queued)."""
    done = {}
    for m in mesh.members:
        done[m.node_id] = n = settle_unique(m.conn, batch, check_mode)
        while not check_mode and n == batch:
            n = settle_unique(m.conn, batch)
            done[m.node_id] += n
        if done[m.node_id]:
            queries.append("/* %s */ SELECT steep_repl.settle_unique_conflicts(%d)" % (m.node_id, batch))
    return done


def purge(specs, check_mode=False, stall=60, batch=10000, lock_timeout=300):
    """Settle and purge tombstones on the whole mesh. Returns a result dict."""
    if batch < 1:
        raise SteepError("batch_size must be 1 or more, got %s. Fix: pass a positive batch size (default 10000)."
                         % batch)
    if stall < 1:
        raise SteepError("stall_timeout must be 1 second or more, got %s. Fix: pass a positive number of seconds."
                         % stall)
    members = build_members(specs)
    with Mesh(members, check_mode=check_mode, lock_timeout=lock_timeout) as mesh:
        mesh.observe()          # the extension is installed everywhere (or a clear error)
        _check_ready(mesh)
        before = _counts(mesh)
        # tombstones a run settles: of ordered tables, written until now by a node of the mesh or by a departed node
        # (nothing receives from it any more, so its tombstones are settled like the others once the rounds
        # have carried every version written before them)
        ids = [m.node_id for m in mesh.members]
        departed = sorted(set(r["ver_node"] for m in mesh.members for r in fetch_all(m.conn, DEPARTED, (ids,))))
        candidates = dict((m.node_id, fetch_value(m.conn, CANDIDATES, (list(ORDERED), ids + departed)))
                          for m in mesh.members)
        result = {"nodes": [m.node_id for m in members], "queries": [], "horizons": {}, "departed": departed,
                  "purged": dict((i, 0) for i in before)}
        unique = _settle_unique(mesh, batch, check_mode, result["queries"])
        result["would_settle_unique" if check_mode else "unique_settled"] = unique
        derived, n_derived = _derived(mesh)     # held everywhere before the rounds
        candidates = dict((i, n + n_derived) for i, n in candidates.items())
        if not any(candidates.values()) and not any(c["settled"] for c in before.values()):
            result.update(changed=any(unique.values()), diff={"before": before, "after": _counts(mesh)})
            return result
        if check_mode:
            # what a run would purge at most: the tombstones of ordered tables written until now
            after = dict((i, dict(tombstones=c["tombstones"] - candidates[i], settled=0)) for i, c in before.items())
            result["queries"] += ["/* %s */ SELECT steep_repl.set_tombstone_horizon(...)" % i for i in sorted(before)] + [
                "/* %s */ SELECT steep_repl.purge_tombstones(%d)" % (i, batch) for i in sorted(before)]
            result.update(changed=True, would_purge=candidates, diff={"before": before, "after": after})
            return result
        horizons = _round(mesh, stall)
        _round(mesh, stall)
        for gone in departed:   # a departed node's clock is not read: the earliest mark of the run stands for it
            horizons[gone] = min(horizons[i] for i in ids)
        text = json.dumps(dict((i, h.isoformat()) for i, h in horizons.items()), sort_keys=True)
        for m in mesh.members:     # every node knows the horizons (and the settled derived tombstones) before any purges
            # a departed node's horizon only where it still left tombstones (elsewhere it may be unknown)
            fetch_value(m.conn, SET_HORIZONS, (text, ids))
            result["queries"].append("/* %s */ SELECT steep_repl.set_tombstone_horizon('%s')" % (m.node_id, text))
            if n_derived:
                fetch_value(m.conn, "SELECT steep_repl.settle_derived_tombstones(%s::jsonb)", (derived,))
                result["queries"].append("/* %s */ SELECT steep_repl.settle_derived_tombstones(<%d keys>)"
                                         % (m.node_id, n_derived))
        for m in mesh.members:
            while True:
                n = fetch_value(m.conn, "SELECT steep_repl.purge_tombstones(%s)", (batch,))
                result["purged"][m.node_id] += n
                if n < batch:
                    break
            result["queries"].append("/* %s */ SELECT steep_repl.purge_tombstones(%d)" % (m.node_id, batch))
        after = _counts(mesh)
        result["horizons"] = dict((i, h.isoformat()) for i, h in horizons.items())
        result.update(changed=any(result["purged"].values()) or any(unique.values()),
                      diff={"before": before, "after": after})
        return result
