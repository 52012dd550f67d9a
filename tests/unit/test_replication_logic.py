"""Unit tests of the pure parts of module_utils/replication.py (no database needed)."""
import pytest

from ansible_collections.steep.repl.plugins.module_utils.db import SteepError
from ansible_collections.steep.repl.plugins.module_utils import replication as r


def cat(**tables):
    """{'schema.table': {'kind', 'has_pk', 'partition'}} from name=(kind, has_pk)."""
    out = {}
    for name, (kind, pk) in tables.items():
        out[name.replace("__", ".")] = {"kind": kind, "has_pk": pk, "partition": False}
    return out


BOTH = {"a": cat(public__t=("r", True), public__u=("r", True), sales__o=("r", True),
                 sales__tmp_x=("r", True), sales__v=("v", False)),
        "b": cat(public__t=("r", True), public__u=("r", True), sales__o=("r", True),
                 sales__tmp_x=("r", True), sales__v=("v", False))}


# --------------------------------------------------------------------------- names
def test_names_fit_in_namedatalen_for_the_longest_node_id():
    longest = "n" * 40
    assert r.validate_node_id(longest) == longest
    assert len(r.subscription_name(longest)) <= 63
    assert len(r.slot_name(longest)) <= 63


def test_peer_of_parses_only_steep_names():
    assert r.peer_of("steep_from_node_a", r.SUB_PREFIX) == "node_a"
    assert r.peer_of("steep_to_node_b", r.SLOT_PREFIX) == "node_b"
    assert r.peer_of("other_sub", r.SUB_PREFIX) is None
    assert r.peer_of("steep_from_", r.SUB_PREFIX) is None


# --------------------------------------------------------------------------- table selection
def test_explicit_tables_default_schema_public():
    assert r.resolve_tables(BOTH, ["t", "public.u"], [], []) == ["public.t", "public.u"]


def test_schema_expansion_takes_only_ordinary_tables_and_exclusion_globs_win():
    got = r.resolve_tables(BOTH, ["public.t"], ["sales"], ["sales.tmp_*"])
    assert got == ["public.t", "sales.o"]


def test_exclusion_also_removes_explicit_tables():
    assert r.resolve_tables(BOTH, ["public.t", "public.u"], [], ["public.u"]) == ["public.t"]


def test_table_missing_on_one_node_names_node_and_fix():
    cats = {"a": cat(public__t=("r", True)), "b": cat()}
    with pytest.raises(SteepError) as err:
        r.resolve_tables(cats, ["public.t"], [], [])
    msg = str(err.value)
    assert "public.t is missing on node(s) b (present on a)" in msg
    assert "Fix:" in msg and "nothing was changed" in msg


def test_unknown_table_names_table_and_fix():
    with pytest.raises(SteepError) as err:
        r.resolve_tables(BOTH, ["public.nope"], [], [])
    assert "public.nope does not exist on any node" in str(err.value)
    assert "steep_replicated_tables" in str(err.value)


def test_table_without_primary_key_is_refused_with_the_fix():
    cats = {"a": cat(public__nopk=("r", False)), "b": cat(public__nopk=("r", False))}
    with pytest.raises(SteepError) as err:
        r.resolve_tables(cats, ["public.nopk"], [], [])
    msg = str(err.value)
    assert "public.nopk has no primary key (on a, b)" in msg
    assert "ALTER TABLE public.nopk ADD PRIMARY KEY" in msg
    assert "steep_excluded_tables" in msg


def test_no_pk_table_can_be_excluded_from_a_schema():
    cats = {n: dict(c, **cat(sales__nopk=("r", False))) for n, c in BOTH.items()}
    with pytest.raises(SteepError):
        r.resolve_tables(cats, [], ["sales"], ["sales.tmp_*"])
    assert r.resolve_tables(cats, [], ["sales"], ["sales.tmp_*", "sales.nopk"]) == ["sales.o"]


def test_view_is_refused():
    with pytest.raises(SteepError) as err:
        r.resolve_tables(BOTH, ["sales.v"], [], [])
    assert "sales.v is not an ordinary table on a (view), b (view)" in str(err.value)


@pytest.mark.parametrize("bad", ["a.b.c", ".t", "s.", "", "  "])
def test_malformed_table_names(bad):
    with pytest.raises(SteepError) as err:
        r.resolve_tables(BOTH, [bad], [], [])
    assert "Fix:" in str(err.value)


def test_reserved_schema_refused():
    with pytest.raises(SteepError) as err:
        r.resolve_tables(BOTH, ["steep_repl.nodes"], [], [])
    assert "reserved" in str(err.value)
    with pytest.raises(SteepError):
        r.resolve_tables(BOTH, [], ["pg_catalog"], [])


def test_unknown_schema_refused_when_presence_known():
    with pytest.raises(SteepError) as err:
        r.resolve_tables(BOTH, [], ["nosuch"], [], {"a": {"public"}, "b": {"public"}})
    assert "schema nosuch" in str(err.value)
    # an existing but empty schema is fine
    assert r.resolve_tables(BOTH, [], ["empty"], [], {"a": {"empty"}, "b": set()}) == []


# --------------------------------------------------------------------------- clock
def m(offset, rtt=0.2):
    return {"offset_ms": offset, "rtt_ms": rtt}


def test_drift_ok():
    v = r.evaluate_drift({"a": m(0.0), "b": m(3.0), "c": m(-2.0)}, 100, 1000)
    assert v["status"] == "ok" and v["drift_ms"] == 5.0 and v["pair"] == ["c", "b"]
    assert v["uncertainty_ms"] == 0.2


def test_drift_warn_above_warn_threshold():
    v = r.evaluate_drift({"a": m(0.0), "b": m(150.0)}, 100, 1000)
    assert v["status"] == "warn" and "steep_warn_drift_ms=100" in v["message"]


def test_drift_fail_above_max_names_fix():
    v = r.evaluate_drift({"a": m(-600.0), "b": m(600.0)}, 100, 1000)
    assert v["status"] == "fail" and v["drift_ms"] == 1200.0
    assert "steep_max_drift_ms=1000" in v["message"] and "NTP" in v["message"]
    assert "between a and b" in v["message"]


def test_drift_exactly_at_limit_passes():
    assert r.evaluate_drift({"a": m(0.0), "b": m(1000.0)}, 100, 1000)["status"] == "warn"
    assert r.evaluate_drift({"a": m(0.0), "b": m(100.0)}, 100, 1000)["status"] == "ok"


def test_drift_controller_offset_cancels_out():
    # both nodes 5 s ahead of the controller: they agree with each other
    assert r.evaluate_drift({"a": m(5000.0), "b": m(5001.0)}, 100, 1000)["status"] == "ok"


@pytest.mark.parametrize("warn,mx", [(-1, 1000), (100, -5), (2000, 1000)])
def test_drift_bad_thresholds(warn, mx):
    with pytest.raises(SteepError):
        r.evaluate_drift({"a": m(0), "b": m(1)}, warn, mx)


def test_best_offset_uses_min_rtt_sample_with_rtt_half_compensation():
    samples = [(10_000.0, 10_060.0, 10_004.0),   # rtt 4 ms
               (20_000.0, 20_050.05, 20_000.1)]  # rtt 0.1 ms, server 50 ms ahead of the midpoint
    got = r.best_offset(samples)
    assert got["rtt_ms"] == pytest.approx(0.1)
    assert got["offset_ms"] == pytest.approx(50.0, abs=0.01)
    with pytest.raises(SteepError):
        r.best_offset([])


# --------------------------------------------------------------------------- conninfo
def test_conninfo_rendering_quotes_and_hides_password():
    p = {"host": "10.0.0.1", "port": 5432, "user": "post gres", "password": "s'ec\\ret", "dbname": "app"}
    full = r.render_conninfo(p)
    assert "password='s\\'ec\\\\ret'" in full and "user='post gres'" in full
    hidden = r.render_conninfo(p, hide_password=True)
    assert "s'ec" not in hidden and r.REDACTED in hidden
    assert r.parse_conninfo(full)["password"] == "s'ec\\ret"
    assert r.conninfo_matches(full, p)
    assert not r.conninfo_matches(full, dict(p, password="other"))
    assert not r.conninfo_matches(full, dict(p, port=5433))
    assert not r.conninfo_matches("garbage ='", p)


def test_redact():
    assert r.redact("password=abc host=x", ["abc", None, ""]) == "password=******** host=x"


# --------------------------------------------------------------------------- planning
PUBS = ["steep_pub", "steep_pub_versions"]
VER = dict(ver_publication=True, ver_pub_tables=["steep_repl.row_version"], ver_pub_publish=["insert"])


def member(i, **kw):
    spec = {"node_id": i, "host": "h_" + i, "port": 5432, "password": "pw", "database": "db"}
    spec.update(kw)
    return r.Member(spec)


def empty_state(**kw):
    st = {"extension": "1.1", "has_row_version": True, "has_enable": True, "has_disable": True, "insert_versions": True,
          "publication": False, "pub_all_tables": False, "pub_tables": [], "enabled_tables": [],
          "ver_publication": False, "ver_pub_all_tables": False, "ver_pub_tables": [], "ver_pub_publish": [],
          "subscriptions": {}, "slots": {}, "database": "db"}
    st.update(kw)
    return st


def test_plan_fresh_mesh_creates_every_slot_before_any_subscription():
    ms = [member("a"), member("b"), member("c")]
    states = {x.node_id: empty_state() for x in ms}
    actions, warnings, info = r.plan(ms, states, ["public.t"])
    phases = [a.phase for a in actions]
    assert phases == sorted(phases)
    kinds = [(a.node, a.phase) for a in actions]
    assert sum(1 for _n, p in kinds if p == 5) == 6   # one slot per ordered pair
    assert sum(1 for _n, p in kinds if p == 6) == 6
    assert sum(1 for _n, p in kinds if p == 1) == 3   # enable_table on every node first
    last_slot = max(i for i, a in enumerate(actions) if a.phase == 5)
    first_sub = min(i for i, a in enumerate(actions) if a.phase == 6)
    assert last_slot < first_sub
    assert warnings == []
    assert info["publication_tables"] == ["public.t", "steep_repl.row_version"]
    sub = [a for a in actions if a.phase == 6 and a.node == "a"][0]
    assert "steep_from_b" in sub.query and "create_slot = false" in sub.query and "origin = none" in sub.query
    assert "copy_data = false" in sub.query and '"steep_to_a"' in sub.query
    assert "pw" in sub.args[0] and "pw" not in sub.display_args[0]


def test_plan_stale_node_dropped_everywhere():
    ms = [member("a"), member("b")]
    slot = {"database": "db", "plugin": "pgoutput", "active": False, "active_pid": None}

    def sub(peer, slot_of):
        return {"enabled": True, "conninfo": r.render_conninfo(member(peer).peer_conninfo()),
                "slot": "steep_to_" + slot_of, "origin": "none", "publications": PUBS,
                "tables": ["public.t", "steep_repl.row_version"]}
    common = dict(publication=True, pub_tables=["public.t"], enabled_tables=["public.t"], **VER)
    states = {
        "a": empty_state(subscriptions={"steep_from_b": sub("b", "a"), "steep_from_c": sub("c", "a")},
                         slots={"steep_to_b": slot, "steep_to_c": slot}, **common),
        "b": empty_state(subscriptions={"steep_from_a": sub("a", "b"), "steep_from_c": sub("c", "b")},
                         slots={"steep_to_a": slot, "steep_to_c": slot}, **common),
    }
    actions, _w, info = r.plan(ms, states, ["public.t"])
    assert info["removed_nodes"] == ["c"]
    texts = [(a.node, a.query % (a.args or ())) if a.args and "%s" in a.query else (a.node, a.query) for a in actions]
    for node in ("a", "b"):
        assert (node, 'ALTER SUBSCRIPTION "steep_from_c" DISABLE') in texts
        assert (node, 'ALTER SUBSCRIPTION "steep_from_c" SET (slot_name = NONE)') in texts
        assert (node, 'DROP SUBSCRIPTION "steep_from_c"') in texts
        assert any(n == node and a.kind == "drop_slot" and a.args == ("steep_to_c",) for a in actions for n in [a.node])
    assert len(actions) == 8  # nothing else to do


def test_plan_converged_is_empty_and_table_added_refreshes():
    ms = [member("a"), member("b")]
    slot = {"database": "db", "plugin": "pgoutput", "active": True, "active_pid": 1}

    def st(me, peer, tables):
        return empty_state(publication=True, pub_tables=[t for t in tables if not t.startswith("steep_repl")], **VER,
                           enabled_tables=[t for t in tables if not t.startswith("steep_repl")],
                           subscriptions={"steep_from_" + peer: {
                               "enabled": True, "conninfo": r.render_conninfo(member(peer).peer_conninfo()),
                               "slot": "steep_to_" + me, "origin": "none", "publications": PUBS,
                               "tables": tables}},
                           slots={"steep_to_" + peer: slot})
    tables = ["public.t", "steep_repl.row_version"]
    states = {"a": st("a", "b", tables), "b": st("b", "a", tables)}
    assert r.plan(ms, states, ["public.t"])[0] == []
    actions = r.plan(ms, states, ["public.t", "public.u"])[0]
    assert [a.phase for a in actions] == [1, 1, 2, 2, 7, 7]
    assert "REFRESH PUBLICATION WITH (copy_data = false)" in actions[-1].query
    # removing public.t: dropped from the publication, refreshed, THEN triggers off
    actions = r.plan(ms, states, [])[0]
    assert [a.phase for a in actions] == [2, 2, 7, 7, 9, 9]
    assert "disable_table" in actions[-1].query


def test_plan_regenerates_the_functions_an_earlier_build_generated():
    ms = [member("a"), member("b")]
    slot = {"database": "db", "plugin": "pgoutput", "active": True, "active_pid": 1}
    tables = ["public.t", "steep_repl.row_version"]

    def st(me, peer, outdated):
        return empty_state(publication=True, pub_tables=["public.t"], **VER, enabled_tables=["public.t", "public.u"],
                           outdated_tables=outdated,
                           subscriptions={"steep_from_" + peer: {
                               "enabled": True, "conninfo": r.render_conninfo(member(peer).peer_conninfo()),
                               "slot": "steep_to_" + me, "origin": "none", "publications": PUBS,
                               "tables": tables}},
                           slots={"steep_to_" + peer: slot})
    # node a: the replicated table and one enabled by hand outside the set; node b is current
    states = {"a": st("a", "b", ["public.t", "public.u"]), "b": st("b", "a", [])}
    actions, warnings, info = r.plan(ms, states, ["public.t"])
    assert [(a.node, a.phase, a.args) for a in actions] == [("a", 1, ('"public"."t"',)), ("a", 1, ('"public"."u"',))]
    assert all("enable_table" in a.query for a in actions) and warnings == []
    assert r.summary(states["a"])["outdated_tables"] == ["public.t", "public.u"]
    after = r.predicted_summary(ms, states, ["public.t"], info)
    assert after["a"]["outdated_tables"] == [] and after["a"]["enabled_tables"] == r.summary(states["a"])["enabled_tables"]
    # without enable_table (an engine that cannot regenerate) nothing is planned, and the diff says so
    states["a"]["has_enable"] = False
    actions, warnings, info = r.plan(ms, states, ["public.t"])
    assert actions == [] and any("enable_table" in w and "public.t, public.u" in w for w in warnings)
    assert r.predicted_summary(ms, states, ["public.t"], info)["a"]["outdated_tables"] == ["public.t", "public.u"]


def test_plan_changed_password_alters_connection_without_showing_it():
    ms = [member("a"), member("b", password="new-secret")]
    slot = {"database": "db", "plugin": "pgoutput", "active": True, "active_pid": 1}
    tables = ["steep_repl.row_version"]
    states = {
        "a": empty_state(publication=True, slots={"steep_to_b": slot}, **VER, subscriptions={
            "steep_from_b": {"enabled": True, "conninfo": r.render_conninfo(member("b").peer_conninfo()),
                             "slot": "steep_to_a", "origin": "none", "publications": PUBS, "tables": tables}}),
        "b": empty_state(publication=True, slots={"steep_to_a": slot}, **VER, subscriptions={
            "steep_from_a": {"enabled": False, "conninfo": r.render_conninfo(member("a").peer_conninfo()),
                             "slot": "steep_to_b", "origin": "any", "publications": PUBS, "tables": tables}}),
    }
    actions = r.plan(ms, states, [])[0]
    q = [(a.node, a.query) for a in actions]
    assert ("a", 'ALTER SUBSCRIPTION "steep_from_b" CONNECTION %s') in q
    alter = [a for a in actions if "CONNECTION" in a.query][0]
    assert "new-secret" in alter.args[0] and "new-secret" not in alter.display_args[0]
    assert ("b", 'ALTER SUBSCRIPTION "steep_from_a" SET (origin = none)') in q
    assert ("b", 'ALTER SUBSCRIPTION "steep_from_a" ENABLE') in q


def test_plan_without_conflict_engine_warns_and_skips_triggers():
    ms = [member("a"), member("b")]
    states = {x.node_id: empty_state(has_enable=False, has_row_version=False) for x in ms}
    actions, warnings, info = r.plan(ms, states, ["public.t"])
    assert not any(a.phase == 1 for a in actions)
    assert any("enable_table" in w for w in warnings)
    assert info["publication_tables"] == ["public.t"]


def test_plan_row_version_on_some_nodes_only_is_an_error():
    ms = [member("a"), member("b")]
    states = {"a": empty_state(), "b": empty_state(has_row_version=False)}
    with pytest.raises(SteepError) as err:
        r.plan(ms, states, [])
    assert "ALTER EXTENSION steep_repl UPDATE" in str(err.value)


def test_plan_refuses_all_tables_publication():
    ms = [member("a"), member("b")]
    states = {"a": empty_state(publication=True, pub_all_tables=True), "b": empty_state()}
    with pytest.raises(SteepError) as err:
        r.plan(ms, states, [])
    assert "DROP PUBLICATION steep_pub" in str(err.value)


def test_members_validation():
    with pytest.raises(SteepError):
        r.build_members([{"node_id": "a"}])
    with pytest.raises(SteepError):
        r.build_members([{"node_id": "a"}, {"node_id": "a"}])
    with pytest.raises(SteepError):
        r.build_members([{"node_id": "a"}, {"node_id": "Bad-Id"}])
    got = r.build_members([{"node_id": "b", "replication_host": "10.1.1.2"}, {"node_id": "a"}])
    assert [x.node_id for x in got] == ["a", "b"]
    assert got[1].peer_conninfo()["host"] == "10.1.1.2"
    assert got[1].conn_kw()["host"] == "127.0.0.1"


def _running_pair_states(init_c):
    slot = {"database": "db", "plugin": "pgoutput", "active": True, "active_pid": 1}
    tables = ["steep_repl.row_version"]

    def sub(peer, me):
        return {"enabled": True, "conninfo": r.render_conninfo(member(peer).peer_conninfo()),
                "slot": "steep_to_" + me, "origin": "none", "publications": PUBS, "tables": tables}
    return {
        "a": empty_state(publication=True, slots={"steep_to_b": slot, "steep_to_c": slot}, **VER,
                         subscriptions={"steep_from_b": sub("b", "a")}, init_state="SYNCHRONIZED"),
        "b": empty_state(publication=True, slots={"steep_to_a": slot}, **VER,
                         subscriptions={"steep_from_a": sub("a", "b")}),
        "c": empty_state(init_state=init_c),
    }


def test_uninitialised_newcomer_to_a_running_mesh_is_left_alone():
    ms = [member("a"), member("b"), member("c")]
    actions, warnings, info = r.plan(ms, _running_pair_states("UNINITIALIZED"), [])
    assert actions == []                 # not wired, and its prepared slot on a is not stale
    assert info["skipped_nodes"] == ["c"] and info["removed_nodes"] == []
    assert any("init_node.yml" in w and "steep_init_target=c" in w for w in warnings)


def test_newcomer_being_initialised_is_wired_and_fresh_mesh_wires_everyone():
    ms = [member("a"), member("b"), member("c")]
    actions, _w, info = r.plan(ms, _running_pair_states("CATCHING_UP"), [])
    assert info["skipped_nodes"] == []
    created = sorted((a.node, a.args[0]) for a in actions if a.phase == 5)
    assert created == [("b", "steep_to_c"), ("c", "steep_to_a"), ("c", "steep_to_b")]  # a's slot for c is reused
    fresh = {i: empty_state(init_state="UNINITIALIZED") for i in "abc"}
    assert r.uninitialised_newcomers(ms, fresh) == {}


# --------------------------------------------------------------------------- the versions publication
def _wired(pub_tables, publications, **kw):
    """A 2-node mesh wired with the given publication contents and subscription publication lists."""
    slot = {"database": "db", "plugin": "pgoutput", "active": True, "active_pid": 1}
    tables = ["public.t", "steep_repl.row_version"]

    def st(me, peer):
        return empty_state(publication=True, pub_tables=pub_tables, enabled_tables=["public.t"],
                           slots={"steep_to_" + peer: slot}, subscriptions={"steep_from_" + peer: {
                               "enabled": True, "conninfo": r.render_conninfo(member(peer).peer_conninfo()),
                               "slot": "steep_to_" + me, "origin": "none", "publications": publications,
                               "tables": tables}}, **kw)
    return [member("a"), member("b")], {"a": st("a", "b"), "b": st("b", "a")}


def _texts(actions):
    return [(a.phase, a.node, a.query) for a in actions]


def test_fresh_mesh_versions_travel_in_their_own_insert_only_publication():
    ms = [member("a"), member("b")]
    actions = r.plan(ms, {x.node_id: empty_state() for x in ms}, ["public.t"])[0]
    texts = _texts(actions)
    assert (2, "a", 'CREATE PUBLICATION "steep_pub" FOR TABLE "public"."t"') in texts
    assert (2, "a", 'CREATE PUBLICATION "steep_pub_versions" FOR TABLE "steep_repl"."row_version" '
                    "WITH (publish = 'insert')") in texts
    subs = [a for a in actions if a.kind == "create_sub"]
    assert len(subs) == 2 and all('PUBLICATION "steep_pub", "steep_pub_versions" WITH' in a.query for a in subs)


def test_migration_moves_row_version_only_after_every_subscription_reads_both():
    ms, states = _wired(["public.t", "steep_repl.row_version"], ["steep_pub"])
    actions, warnings, info = r.plan(ms, states, ["public.t"])
    assert warnings == [] and info["leaving_tables"] == []
    texts = _texts(actions)
    create = (2, "a", 'CREATE PUBLICATION "steep_pub_versions" FOR TABLE "steep_repl"."row_version" '
                      "WITH (publish = 'insert')")
    switch = (6, "a", 'ALTER SUBSCRIPTION "steep_from_b" SET PUBLICATION "steep_pub", "steep_pub_versions" '
                      "WITH (refresh = false)")
    leave = (8, "a", 'ALTER PUBLICATION "steep_pub" DROP TABLE "steep_repl"."row_version"')
    assert create in texts and switch in texts and leave in texts
    # every switch (on both nodes) comes before any drop: no walsender reads a list without the versions
    last_switch = max(i for i, a in enumerate(actions) if a.kind == "set_publication")
    first_leave = min(i for i, t in enumerate(texts) if "DROP TABLE" in t[2])
    assert last_switch < first_leave
    assert sorted(a.note for a in actions if a.kind == "set_publication") == ["steep_from_a", "steep_from_b"]
    # nothing else: no refresh (the subscriptions' table lists do not change), no trigger change
    assert len(actions) == 6
    # after the run: converged
    ms, states = _wired(["public.t"], PUBS, **VER)
    assert r.plan(ms, states, ["public.t"])[0] == []


def test_a_disabled_subscription_is_enabled_before_it_switches_publications():
    """Mesh.run waits for the slot of a switching subscription to confirm: it must be running by then."""
    ms, states = _wired(["public.t", "steep_repl.row_version"], ["steep_pub"])
    states["a"]["subscriptions"]["steep_from_b"]["enabled"] = False
    texts = [t for t in _texts(r.plan(ms, states, ["public.t"])[0]) if t[1] == "a" and t[0] == 6]
    assert [t[2].split('" ')[1][:15] for t in texts] == ["ENABLE", "SET PUBLICATION"]


def test_an_earlier_engine_anywhere_keeps_versions_in_the_main_publication():
    ms, states = _wired(["public.t", "steep_repl.row_version"], ["steep_pub"])
    states["b"]["insert_versions"] = False
    actions, warnings, _info = r.plan(ms, states, ["public.t"])
    texts = _texts(actions)
    assert not any("DROP TABLE" in t[2] for t in texts)
    assert (2, "a", "CREATE PUBLICATION \"steep_pub_versions\" WITH (publish = 'insert')") in texts
    assert any("replaces versions in place" in w and " b" in w and "foundation play" in w for w in warnings)
    assert sum(1 for a in actions if a.kind == "set_publication") == 2


def test_versions_publication_repairs():
    ms, states = _wired(["public.t"], PUBS, ver_publication=True, ver_pub_tables=["public.t"],
                        ver_pub_publish=["delete", "insert", "update"])
    texts = _texts(r.plan(ms, states, ["public.t"])[0])
    for node in ("a", "b"):
        assert (2, node, "ALTER PUBLICATION \"steep_pub_versions\" SET (publish = 'insert')") in texts
        assert (2, node, 'ALTER PUBLICATION "steep_pub_versions" ADD TABLE "steep_repl"."row_version"') in texts
        assert (2, node, 'ALTER PUBLICATION "steep_pub_versions" DROP TABLE "public"."t"') in texts
    # a user table that only the versions publication carried leaves the set: its triggers go last
    ms, states = _wired(["public.t"], PUBS, ver_publication=True, ver_pub_publish=["insert"],
                        ver_pub_tables=["public.u", "steep_repl.row_version"])
    states["a"]["enabled_tables"] = states["b"]["enabled_tables"] = ["public.t", "public.u"]
    actions, _w, info = r.plan(ms, states, ["public.t"])
    assert info["leaving_tables"] == ["public.u"]
    assert [a.phase for a in actions] == [2, 2, 9, 9]


def test_versions_publication_for_all_tables_is_refused():
    ms = [member("a"), member("b")]
    states = {"a": empty_state(), "b": empty_state(ver_publication=True, ver_pub_all_tables=True)}
    with pytest.raises(SteepError) as err:
        r.plan(ms, states, [])
    assert "DROP PUBLICATION steep_pub_versions" in str(err.value) and "on b" in str(err.value)


def test_publication_name_leaves_room_for_the_versions_publication():
    assert r.check_publication_name("p" * 54) == "p" * 54
    assert r.versions_publication("steep_pub") == "steep_pub_versions"
    for bad in ("p" * 55, "é" * 28, "", "  "):
        with pytest.raises(SteepError) as err:
            r.check_publication_name(bad)
        assert "Fix:" in str(err.value)
    with pytest.raises(SteepError) as err:
        r.ensure_mesh([{"node_id": "a"}, {"node_id": "b"}], publication="p" * 60)
    assert "at most 63 bytes" in str(err.value) and "Nothing was changed" in str(err.value)


def test_unique_indexes_the_engine_does_not_decide_are_warned_once_per_index():
    cat = {"n1": {"public.t": {"kind": "r", "has_pk": True, "uncovered_unique": ["public.t_lower"]},
                  "public.u": {"kind": "r", "has_pk": True, "uncovered_unique": ["public.u_part"]}},
           "n2": {"public.t": {"kind": "r", "has_pk": True, "uncovered_unique": ["public.t_lower"]},
                  "public.u": {"kind": "r", "has_pk": True}}}
    got = r.uncovered_unique_warnings(cat, ["public.t"])
    assert len(got) == 1 and "public.t_lower" in got[0] and "(on n1, n2)" in got[0] and "Fix:" in got[0]
    assert "public.u_part (on n1)" in r.uncovered_unique_warnings(cat, ["public.t", "public.u"])[1]
    assert r.uncovered_unique_warnings(cat, []) == []
