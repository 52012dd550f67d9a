"""Unit tests of the pure schema-sync planner (module_utils/schemasync.py; no database needed)."""
from ansible_collections.steep.repl.plugins.module_utils import schemasync as s


def col(name, type_="integer", default=None, not_null=False, identity="", generated="", generation=None, collation=None):
    return dict(name=name, type=type_, default=default, not_null=not_null, identity=identity, generated=generated,
                generation=generation, collation=collation)


ID = col("id", not_null=True)


def test_identical_tables_need_nothing_and_order_is_ignored():
    a = [ID, col("v", "text"), col("n", default="0", not_null=True)]
    b = [col("n", default="0", not_null=True), ID, col("v", "text")]
    assert s.plan_table("public.t", a, b) == ([], [], [])


def test_missing_column_is_added_with_type_default_and_not_null():
    src = [ID, col("note", "character varying(20)", "'x'::character varying", True)]
    ddl, unfixable, diffs = s.plan_table("public.t", src, [ID], target_empty=False)
    assert ddl == ['ALTER TABLE "public"."t" ADD COLUMN "note" character varying(20) DEFAULT \'x\'::character varying NOT NULL']
    assert unfixable == [] and diffs == ["public.t: column note (character varying(20)) is missing on the target"]


def test_missing_not_null_without_default_on_a_table_with_rows_is_unfixable_with_the_ddl_to_run():
    src = [ID, col("qty", not_null=True)]
    ddl, unfixable, _diffs = s.plan_table("public.t", src, [ID], target_empty=False)
    assert ddl == []
    assert len(unfixable) == 1
    msg = unfixable[0]
    assert "NOT NULL without a default" in msg and 'ALTER TABLE "public"."t" ADD COLUMN "qty" integer;' in msg
    assert 'ALTER TABLE "public"."t" ALTER COLUMN "qty" SET NOT NULL' in msg
    # on an empty target table the same column is simply added
    ddl, unfixable, _diffs = s.plan_table("public.t", src, [ID], target_empty=True)
    assert ddl == ['ALTER TABLE "public"."t" ADD COLUMN "qty" integer NOT NULL'] and unfixable == []


def test_extra_target_column_dropped_only_when_the_table_is_empty():
    tgt = [ID, col("local_only", "text")]
    ddl, unfixable, diffs = s.plan_table("public.t", [ID], tgt, target_empty=True)
    assert ddl == ['ALTER TABLE "public"."t" DROP COLUMN "local_only"'] and unfixable == []
    assert diffs == ["public.t: column local_only (text) exists only on the target"]
    ddl, unfixable, _diffs = s.plan_table("public.t", [ID], tgt, target_empty=False)
    assert ddl == [] and 'ALTER TABLE "public"."t" DROP COLUMN "local_only";' in unfixable[0]
    assert "missing replicated column" in unfixable[0]


def test_type_change_safe_widening_with_rows_unsafe_is_unfixable():
    ddl, unfixable, _diffs = s.plan_table("public.t", [ID, col("n", "bigint")], [ID, col("n")], target_empty=False)
    assert ddl == ['ALTER TABLE "public"."t" ALTER COLUMN "n" TYPE bigint USING "n"::bigint'] and not unfixable
    ddl, unfixable, _diffs = s.plan_table("public.t", [ID, col("n")], [ID, col("n", "bigint")], target_empty=False)
    assert ddl == [] and 'ALTER COLUMN "n" TYPE integer USING "n"::integer' in unfixable[0]
    ddl, unfixable, _diffs = s.plan_table("public.t", [ID, col("n")], [ID, col("n", "bigint")], target_empty=True)
    assert ddl == ['ALTER TABLE "public"."t" ALTER COLUMN "n" TYPE integer USING "n"::integer'] and not unfixable


def test_widens():
    assert s.widens("character varying(10)", "character varying(20)")
    assert s.widens("character varying(10)", "text")
    assert s.widens("character varying(10)", "character varying")
    assert not s.widens("character varying(20)", "character varying(10)")
    assert s.widens("numeric(10,2)", "numeric(12,2)") and s.widens("numeric(10,2)", "numeric")
    assert not s.widens("numeric(10,2)", "numeric(10,3)") and not s.widens("numeric", "numeric(10,2)")
    assert s.widens("integer", "bigint") and not s.widens("bigint", "integer")
    assert not s.widens("integer[]", "bigint") and s.widens("text", "text")
    assert not s.widens("text", "character varying(5)")


def test_default_and_nullability_differences():
    src = [ID, col("n", default="0", not_null=True), col("v", "text")]
    tgt = [ID, col("n", default="1"), col("v", "text", default="'a'::text", not_null=True)]
    ddl, unfixable, diffs = s.plan_table("public.t", src, tgt, target_empty=False)
    assert ddl == ['ALTER TABLE "public"."t" ALTER COLUMN "n" SET DEFAULT 0',
                   'ALTER TABLE "public"."t" ALTER COLUMN "n" SET NOT NULL',
                   'ALTER TABLE "public"."t" ALTER COLUMN "v" DROP DEFAULT',
                   'ALTER TABLE "public"."t" ALTER COLUMN "v" DROP NOT NULL']
    assert not unfixable and len(diffs) == 4


def test_identifiers_are_quoted():
    src = [col('we"ird', "text"), col("Mixed Case", "text")]
    ddl, _unfixable, _diffs = s.plan_table('my schema.Tab"le', src, [col("Mixed Case", "text")])
    assert ddl == ['ALTER TABLE "my schema"."Tab""le" ADD COLUMN "we""ird" text']


def test_generated_and_identity_columns():
    gen = col("total", "integer", generated="s", generation="(qty * 2)")
    ddl, unfixable, _diffs = s.plan_table("public.t", [ID, gen], [ID], target_empty=False)
    assert ddl == ['ALTER TABLE "public"."t" ADD COLUMN "total" integer GENERATED ALWAYS AS ((qty * 2)) STORED']
    ddl, unfixable, _diffs = s.plan_table("public.t", [ID, gen], [ID, col("total")], target_empty=True)
    assert ddl == [] and 'DROP COLUMN "total"; ALTER TABLE "public"."t" ADD COLUMN "total" integer GENERATED' in unfixable[0]
    ident = col("id", "bigint", not_null=True, identity="d")
    ddl, _unfixable, _diffs = s.plan_table("public.u", [ident], [], target_empty=True)
    assert ddl == ['ALTER TABLE "public"."u" ADD COLUMN "id" bigint GENERATED BY DEFAULT AS IDENTITY']
    seq_default = col("id", "bigint", default="nextval('u_id_seq'::regclass)", not_null=True)
    ddl, _unfixable, _diffs = s.plan_table("public.u", [ident], [seq_default], target_empty=False)
    assert ddl == ['ALTER TABLE "public"."u" ALTER COLUMN "id" DROP DEFAULT',
                   'ALTER TABLE "public"."u" ALTER COLUMN "id" ADD GENERATED BY DEFAULT AS IDENTITY']


def test_plan_over_tables():
    src = {"public.a": [ID], "public.b": [ID, col("x")], "public.c": [ID]}
    tgt = {"public.a": [ID], "public.b": [ID]}
    out = s.plan(src, tgt, ["public.a", "public.b", "public.c", "public.zz"], nonempty=["public.b"])
    assert out["create"] == ["public.c"]
    assert out["ddl"] == ['ALTER TABLE "public"."b" ADD COLUMN "x" integer']
    assert out["unfixable"] == ["public.zz: missing on the source. Fix: create it there or remove it from the "
                                "replicated tables."]
    assert out["differences"] == ["public.b: column x (integer) is missing on the target",
                                  "public.c: table absent on the target"]


def test_column_sql_collation():
    assert s.column_sql(col("v", "text", collation='"C"', not_null=True)) == '"v" text COLLATE "C" NOT NULL'
