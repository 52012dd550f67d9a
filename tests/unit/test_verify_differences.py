"""verify.differences: rows are compared only where both nodes hold the same version of a key."""
from ansible_collections.steep.repl.plugins.module_utils import verify

V1, V2 = "2026-11-29 10:00:00+00 node1", "2026-11-29 10:00:01+00 node2"


def test_same_version_same_row_is_no_difference():
    assert verify.differences({"[1]": (V1, "a")}, {"[1]": (V1, "a")}) == []


def test_same_version_other_row_is_a_difference():
    assert verify.differences({"[1]": (V1, "a")}, {"[1]": (V1, "b")}) == ["[1]"]


def test_other_version_is_in_flight_and_skipped():
    assert verify.differences({"[1]": (V1, "a")}, {"[1]": (V2, "b")}) == []
    assert verify.differences({"[1]": (V1, "a")}, {}) == []           # the version has not arrived yet


def test_unversioned_rows_must_match_and_exist_on_both():
    assert verify.differences({"[1]": (None, "a")}, {"[1]": (None, "a")}) == []
    assert verify.differences({"[1]": (None, "a")}, {}) == ["[1]"]
    assert verify.differences({}, {"[2]": (None, "x")}) == ["[2]"]


def test_tombstones_with_a_row_left_behind_differ():
    assert verify.differences({"[3]": (V1, None)}, {"[3]": (V1, None)}) == []
    assert verify.differences({"[3]": (V1, None)}, {"[3]": (V1, "zombie")}) == ["[3]"]


def test_describe_shows_a_sample_of_keys():
    text = verify.describe("public.t", ["[%d]" % i for i in range(8)])
    assert text.startswith("public.t: 8 row(s) differ") and "[4] ..." in text and "[5]" not in text
