"""Pure functions of plugins/module_utils/conflicts.py (no database)."""
import pytest

from ansible_collections.steep.repl.plugins.module_utils import conflicts as c
from ansible_collections.steep.repl.plugins.module_utils.db import SteepError


def test_normalize_strategies_accepts_both_forms():
    out = c.normalize_strategies({"orders": "manual",
                                  "public.prefs": {"strategy": "node_priority", "priority": ["node_a", "node_b"]}},
                                 known_nodes={"node_a", "node_b"})
    assert out == {"public.orders": {"strategy": "manual", "priority": None},
                   "public.prefs": {"strategy": "node_priority", "priority": ["node_a", "node_b"]}}
    assert c.normalize_strategies(None) == {}


@pytest.mark.parametrize("tables,needle", [
    ({"public.t": "newest"}, "unknown conflict strategy 'newest'"),
    ({"public.t": {"strategy": "manual", "priority": ["a"]}}, "only valid with node_priority"),
    ({"public.t": {"strategy": "node_priority", "priority": []}}, "non-empty list"),
    ({"public.t": {"strategy": "node_priority", "priority": ["a", "a"]}}, "names a node twice"),
    ({"public.t": {"strategy": "node_priority", "priority": ["zz"]}}, "unknown node(s) zz"),
    ({"public.t": {"strategy": "manual", "extra": 1}}, "unknown key(s) extra"),
    ({"public.t": {"priority": ["a"]}}, "must be a strategy name"),
    ({"a.b.c": "manual"}, "is not schema.table"),
    ({"": "manual"}, "empty table name"),
    ({"t": "manual", "public.t": "manual"}, "names public.t twice"),
    (["public.t"], "must be a mapping"),
])
def test_normalize_strategies_errors(tables, needle):
    with pytest.raises(SteepError) as err:
        c.normalize_strategies(tables, known_nodes={"a", "b"})
    assert needle in str(err.value)
    assert "Fix" in str(err.value)


def test_validate_strategy():
    assert c.validate_strategy("manual") == "manual"
    with pytest.raises(SteepError):
        c.validate_strategy("latest")


def test_convergence_warnings():
    assert c.convergence_warnings({"default_strategy": "last_write_wins", "tables": {}}) == []
    w = c.convergence_warnings({"default_strategy": "keep_local",
                                "tables": {"public.a": {"strategy": "apply_remote"},
                                           "public.b": {"strategy": "manual"},
                                           "public.c": {"strategy": "node_priority"}}})
    assert len(w) == 3
    assert "default strategy uses keep_local" in w[0] and "DIVERGE" in w[0]
    assert "public.a uses apply_remote" in w[1]
    assert "public.b uses manual" in w[2] and "state=resolved" in w[2]
    same = {"default_strategy": "last_write_wins", "tables": {}}
    assert c.convergence_warnings(same, {"n1": same, "n2": dict(same)}) == []
    other = {"default_strategy": "first_write_wins", "tables": {}}
    w = c.convergence_warnings(same, {"n1": same, "n2": other})
    assert len(w) == 1 and "different conflict strategies" in w[0]


def test_plan_configuration():
    current = {"default_strategy": "last_write_wins",
               "tables": {"public.a": {"strategy": "manual", "priority": None},
                          "public.gone": {"strategy": "keep_local", "priority": None}}}
    wanted = {"public.a": {"strategy": "manual", "priority": None},
              "public.b": {"strategy": "node_priority", "priority": ["x"]}}
    assert c.plan_configuration(current, "last_write_wins", wanted) == [
        ("set", ("public.b", "node_priority", ["x"])), ("clear", ("public.gone",))]
    assert c.plan_configuration(current, "manual", wanted, purge=False) == [
        ("set", (None, "manual", None)), ("set", ("public.b", "node_priority", ["x"]))]
    assert c.plan_configuration(current, None, {"public.a": {"strategy": "manual", "priority": None},
                                                "public.gone": {"strategy": "keep_local", "priority": None}}) == []


def test_helpers():
    assert c.normalize_table_name(" orders ") == "public.orders"
    assert c.quote_for_regclass('s."x') == '"s"."""x"'
    assert c._plain(None) is None
    assert c._json(None) is None and c._json({"a": 1}) == '{"a": 1}'
