"""steep.repl.init step=reinit: which tables a reinit replaces (pure function, bad input names the fix)."""
import pytest

from ansible_collections.steep.repl.plugins.module_utils.db import SteepError
from ansible_collections.steep.repl.plugins.module_utils.nodeinit import reinit_selection

DESIRED = ["public.items", "public.notes", "sales.line_items", "sales.orders"]


def test_tables_default_to_public_and_are_deduplicated():
    assert reinit_selection(DESIRED, ["items", "public.items", "sales.orders"]) == ["public.items", "sales.orders"]


def test_schema_and_full():
    assert reinit_selection(DESIRED, reinit_schema="sales") == ["sales.line_items", "sales.orders"]
    assert reinit_selection(DESIRED, full=True) == DESIRED


@pytest.mark.parametrize("kwargs, expected", [
    (dict(), "choose exactly one of"),
    (dict(reinit_tables=["items"], full=True), "choose exactly one of"),
    (dict(reinit_tables=["items"], reinit_schema="sales"), "choose exactly one of"),
    (dict(reinit_tables=["public.nope", "items"]), "public.nope is not replicated"),
    (dict(reinit_tables=["a.b.c"]), "is not 'schema.table'"),
    (dict(reinit_schema="hr"), "schema hr holds no replicated table"),
])
def test_bad_selection_names_the_fix(kwargs, expected):
    with pytest.raises(SteepError) as exc:
        reinit_selection(DESIRED, **kwargs)
    assert expected in str(exc.value) and "Fix" in str(exc.value)


def test_full_with_nothing_replicated():
    with pytest.raises(SteepError, match="nothing to reinitialise"):
        reinit_selection([], full=True)
