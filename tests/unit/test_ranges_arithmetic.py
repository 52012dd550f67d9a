"""Unit tests of the pure range arithmetic in module_utils/ranges.py (no database)."""
import random

import pytest

from ansible_collections.steep.repl.plugins.module_utils import ranges as rg
from ansible_collections.steep.repl.plugins.module_utils.db import SteepError


def test_block_bounds_and_slot_blocks():
    assert rg.block_bounds(0, 10000) == (1, 10000)
    assert rg.block_bounds(1, 10000) == (10001, 20000)
    assert rg.block_of(2, 3, 64) == 131
    assert rg.slot_of_block(131, 64) == 3


def test_first_range_of_each_slot_on_an_empty_table_matches_the_seed_layout():
    # seed 5.2: node A 1-10000, node B 10001-20000
    assert rg.next_range(0, 64, 10000) == (0, 1, 10000)
    assert rg.next_range(1, 64, 10000) == (1, 10001, 20000)


def test_first_range_starts_above_existing_ids():
    # ids up to 1500 exist: block 0 and 1 are (partly) used, slot 0 must jump to its next block (64)
    assert rg.next_range(0, 64, 1000, position=1500) == (64, 64001, 65000)
    assert rg.next_range(1, 64, 1000, position=1500) == (65, 65001, 66000)
    assert rg.next_range(2, 64, 1000, position=1500) == (2, 2001, 3000)
    assert rg.next_range(1, 64, 1000, position=1000) == (1, 1001, 2000)


def test_next_range_follows_the_last_block_of_the_slot():
    assert rg.next_range(3, 8, 100, position=350, last_block=3) == (11, 1101, 1200)
    assert rg.next_range(3, 8, 100, position=0, last_block=11) == (19, 1901, 2000)
    # the sequence already went further (e.g. an allocation that rolled back): never below it
    assert rg.next_range(3, 8, 100, position=5000, last_block=11)[1] > 5000


def test_next_range_refuses_overflow_and_bad_slots():
    with pytest.raises(SteepError) as err:
        rg.next_range(63, 64, 40000000, type_max=rg.TYPE_MAX["integer"])
    assert "does not fit" in str(err.value) and "bigint" in str(err.value)
    with pytest.raises(SteepError):
        rg.next_block(64, 64, 10)
    with pytest.raises(SteepError):
        rg.next_block(-1, 64, 10)


def test_random_allocations_of_all_slots_never_overlap():
    rnd = random.Random(7)
    for _i in range(30):
        slots = rnd.randint(1, 16)
        size = rnd.randint(1, 500)
        last = {s: None for s in range(slots)}
        position = {s: rnd.randint(0, 5000) for s in range(slots)}
        got = []
        for _i in range(200):
            s = rnd.randrange(slots)
            block, start, end = rg.next_range(s, slots, size, position[s], last[s])
            assert rg.slot_of_block(block, slots) == s
            last[s] = block
            position[s] = rnd.randint(start - 1, end)
            got.append((start, end, s))
        assert rg.overlaps(got) == []


def test_overlaps_finds_overlapping_pairs():
    assert rg.overlaps([(1, 10, "a"), (11, 20, "b")]) == []
    assert rg.overlaps([(1, 10, "a"), (5, 20, "b"), (30, 40, "c")]) == [((1, 10, "a"), (5, 20, "b"))]


def test_percent_used():
    assert rg.percent_used(None, 1, 100) == 0.0
    assert rg.percent_used(80, 1, 100) == 80.0
    assert rg.percent_used(500, 1, 100) == 100.0
    assert rg.percent_used(0, 1, 100) == 0.0


def test_check_size_fits_names_the_limit_and_fix():
    rg.check_size_fits("public.t", 10000, 64, "integer")
    rg.check_size_fits("public.t", 10 ** 12, 64, "bigint")
    with pytest.raises(SteepError) as err:
        rg.check_size_fits("public.t", 40000000, 64, "integer")
    msg = str(err.value)
    assert "public.t" in msg and "integer (max 2147483647)" in msg and "range_size <= 33554431" in msg
    with pytest.raises(SteepError):
        rg.check_size_fits("public.s", 1000, 64, "smallint")


# --------------------------------------------------------------------------- slots
NODES = [dict(node_id="a", priority=100), dict(node_id="b", priority=90), dict(node_id="c", priority=90)]


def test_slots_follow_priority_then_node_id():
    assert rg.assign_slots(NODES) == {"a": 0, "b": 1, "c": 2}


def test_recorded_slots_never_move_when_a_higher_priority_node_joins():
    known = [{"a": 0, "b": 1}, {"a": 0, "b": 1}]
    nodes = NODES[:2] + [dict(node_id="z", priority=1000)]
    assert rg.assign_slots(nodes, known) == {"a": 0, "b": 1, "z": 2}


def test_slots_of_nodes_missing_from_the_inventory_stay_reserved():
    got = rg.assign_slots([dict(node_id="c", priority=5)], [{"a": 0, "b": 1}])
    assert got["c"] == 2 and got["a"] == 0


def test_configured_slot_is_used_and_conflicts_are_errors():
    assert rg.assign_slots([dict(node_id="a", priority=1, slot=5), dict(node_id="b", priority=2)]) == {"a": 5, "b": 0}
    with pytest.raises(SteepError) as err:
        rg.assign_slots([dict(node_id="a", slot=1), dict(node_id="b", slot=1)])
    assert "both have range slot 1" in str(err.value)
    with pytest.raises(SteepError) as err:
        rg.assign_slots([dict(node_id="a", slot=3)], [{"a": 0}])
    assert "already uses slot 0" in str(err.value)
    with pytest.raises(SteepError) as err:
        rg.assign_slots([dict(node_id="a")], [{"a": 0}, {"a": 1}])
    assert "recorded with range slot 0 on one node and 1" in str(err.value)
    with pytest.raises(SteepError):
        rg.assign_slots([dict(node_id="a", slot=64)])
    with pytest.raises(SteepError) as err:
        rg.assign_slots([dict(node_id="a"), dict(node_id="b")], slot_count=1)
    assert "no free range slot" in str(err.value)


# --------------------------------------------------------------------------- settings
def test_table_settings_defaults_overrides_and_disable():
    got = rg.table_settings(["orders", "public.lines"], {
        "default_range_size": 500, "threshold_percent": 70,
        "tables": {"public.orders": {"range_size": 100000}, "public.audit": {"enabled": False}}})
    assert got["public.orders"] == dict(range_size=100000, threshold_percent=70, enabled=True, explicit=True)
    assert got["public.lines"] == dict(range_size=500, threshold_percent=70, enabled=True, explicit=False)
    assert got["public.audit"]["enabled"] is False
    assert rg.table_settings([], None) == {}


@pytest.mark.parametrize("config,part", [
    ({"default_range_size": -5}, "default_range_size -5 is invalid"),
    ({"default_range_size": 0}, "positive"),
    ({"default_range_size": True}, "invalid"),
    ({"threshold_percent": 0}, "threshold_percent 0 is invalid"),
    ({"threshold_percent": 101}, "between 1 and 100"),
    ({"tables": {"public.t": {"range_size": -1}}}, "tables[public.t].range_size -1 is invalid"),
    ({"tables": {"public.t": {"size": 10}}}, "unknown key(s) size"),
])
def test_table_settings_bad_input(config, part):
    with pytest.raises(SteepError) as err:
        rg.table_settings(["public.t"], config)
    assert part in str(err.value)


def test_usage_summary():
    rows = [dict(range_start=1, range_end=100, status="exhausted"),
            dict(range_start=201, range_end=300, status="active"),
            dict(range_start=401, range_end=500, status="active")]
    u = rg.usage(rows, 250)
    assert u["current_range"] == [201, 300] and u["percent_used"] == 50.0 and u["next_range"] == [401, 500]
    u = rg.usage(rows[:2], 150)  # sequence not yet moved into the range
    assert u["current_range"] == [201, 300] and u["percent_used"] == 0.0 and u["next_range"] is None
    u = rg.usage(rows[:2], 300)
    assert u["current_range"] == [201, 300] and u["percent_used"] == 100.0
    assert rg.usage([], None)["current_range"] is None


def test_pg_name_fits_namedatalen():
    assert rg.pg_name("steep_range_", "t") == "steep_range_t"
    assert len(rg.pg_name("steep_range_guard_", "x" * 63)) == 63
    assert rg.normalize("orders") == "public.orders"
