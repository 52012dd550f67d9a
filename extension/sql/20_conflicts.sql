-- Conflict engine (1.1): versions that travel with the data, decisions inside PostgreSQL.
-- docs/conflicts.md explains the design and why every node ends on the same row.
-- Everything that can fire in the logical-replication apply worker runs with search_path = ''
-- and schema-qualifies every object.

-- ---------------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------------
-- The apply worker runs with enable_seqscan = off for its whole session (set by the first version it
-- handles, with its deadlock_timeout): PL/pgSQL caches a generic plan per session, and one planned while
-- a table was empty (a sequential scan) would stay in the apply worker while the table grows, making
-- every lookup of a bulk load scan the table. A session setting, not a SET clause on the functions: a
-- SET clause saves and restores the setting on every call, which cost several µs per conflict.
-- Functions reachable from any session (the user-table trigger, the API) pin search_path = ''; the
-- helpers only they and the apply worker can call (REVOKEd from PUBLIC) run with their caller's.

-- One row per replicated key: the version the local row currently holds (or a tombstone).
-- Published together with the user tables. An origin replaces a key's version with DELETE + INSERT,
-- never an UPDATE in place: receivers decide every version in their INSERT trigger (steep_repl._capture).
CREATE TABLE IF NOT EXISTS steep_repl.row_version (
    tbl        TEXT NOT NULL,            -- 'schema.table'
    pk         TEXT NOT NULL,            -- pg_catalog.jsonb_build_array(pk1, pk2, ...)::text
    ver_ts     TIMESTAMPTZ NOT NULL,     -- hybrid logical clock at the origin
    ver_node   TEXT NOT NULL,            -- origin node of this version
    depth      BIGINT NOT NULL,          -- base.depth + 1 (0 for a first version)
    epoch      BIGINT NOT NULL,          -- incarnation: +1 when a key is re-inserted over a tombstone
    deleted    BOOLEAN NOT NULL,         -- tombstone
    base_ts    TIMESTAMPTZ,              -- the version this write replaced, as seen at the origin
    base_node  TEXT,
    origin_xid BIGINT,                   -- origin transaction id (bulk resolution by xid)
    forced     BOOLEAN NOT NULL DEFAULT false,  -- written by a manual resolution / revert
    PRIMARY KEY (tbl, pk)
);
ALTER TABLE steep_repl.row_version ADD COLUMN IF NOT EXISTS gen BIGINT NOT NULL DEFAULT 0;  -- resolution generation
ALTER TABLE steep_repl.row_version ADD COLUMN IF NOT EXISTS op TEXT NOT NULL DEFAULT 'U';  -- I, U or D at the origin
ALTER TABLE steep_repl.row_version ADD COLUMN IF NOT EXISTS img JSONB;                     -- the full row (NULL: tombstone)

-- Tables with conflict triggers (filled by enable_table).
CREATE TABLE IF NOT EXISTS steep_repl.conflict_tables (
    tbl          TEXT PRIMARY KEY,       -- 'schema.table'
    table_schema TEXT NOT NULL,
    table_name   TEXT NOT NULL,
    pk_columns   TEXT[] NOT NULL,
    rowop        TEXT NOT NULL,          -- generated function steep_repl."rowop_<h>"(text, text, jsonb)
    enabled_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- md5 of the enable_table() source that generated the table's functions: an extension update that
-- changes the templates leaves the table's functions outdated until enable_table() runs again (the
-- replication module re-runs it for every table whose stamp is not the current one)
ALTER TABLE steep_repl.conflict_tables ADD COLUMN IF NOT EXISTS generator TEXT;

-- Per-table strategies; the default lives in conflict_settings('default_strategy').
CREATE TABLE IF NOT EXISTS steep_repl.conflict_strategies (
    table_schema TEXT NOT NULL,
    table_name   TEXT NOT NULL,
    strategy     TEXT NOT NULL,
    priority     TEXT[],                 -- node_priority: node ids, first = strongest
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name),
    CONSTRAINT conflict_strategies_strategy_valid CHECK (strategy IN (
        'last_write_wins', 'first_write_wins', 'node_priority', 'keep_local', 'apply_remote', 'manual'))
);

CREATE TABLE IF NOT EXISTS steep_repl.conflict_settings (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO steep_repl.conflict_settings (name, value) VALUES ('default_strategy', 'last_write_wins')
ON CONFLICT (name) DO NOTHING;

-- conflict_log (seed 10.2) + what the engine needs to resolve and revert.
ALTER TABLE steep_repl.conflict_log ADD COLUMN IF NOT EXISTS pk TEXT;               -- canonical key
ALTER TABLE steep_repl.conflict_log ADD COLUMN IF NOT EXISTS strategy TEXT;
ALTER TABLE steep_repl.conflict_log ADD COLUMN IF NOT EXISTS winner TEXT;           -- local | remote
ALTER TABLE steep_repl.conflict_log ADD COLUMN IF NOT EXISTS local_version JSONB;
ALTER TABLE steep_repl.conflict_log ADD COLUMN IF NOT EXISTS remote_version JSONB;
ALTER TABLE steep_repl.conflict_log ADD COLUMN IF NOT EXISTS resolved_tuple JSONB;  -- the row the resolution left
ALTER TABLE steep_repl.conflict_log ADD COLUMN IF NOT EXISTS reverts BIGINT;        -- this row reverts that id
ALTER TABLE steep_repl.conflict_log ADD COLUMN IF NOT EXISTS reverted_by BIGINT;
ALTER TABLE steep_repl.conflict_log ADD COLUMN IF NOT EXISTS note TEXT;
-- (a key index existed here; the PENDING lookups use the seed's partial index conflict_log_pending_idx,
-- and one index less makes every logged conflict cheaper)
DROP INDEX IF EXISTS steep_repl.conflict_log_key_idx;

-- (a CHECK constraint on resolution existed here: the apply worker deserialised it for every logged
-- conflict, about 3 % of a conflict's cost. Only the engine and the resolution API write conflict_log,
-- and both write the six values of docs/conflicts.md only.)
ALTER TABLE steep_repl.conflict_log DROP CONSTRAINT IF EXISTS conflict_log_resolution_valid;

-- Tombstone horizons (docs/conflicts.md, "Tombstones"). A tombstone whose origin is node_id and whose ver_ts
-- is <= horizon is settled: every node had applied it, and every version written before some node applied it
-- had reached every node, when the horizon was set (the steep.repl.tombstones module proves it with two
-- rounds of WAL marks confirmed by every slot). So any version of its key that arrives later was written
-- after its origin saw the tombstone (or after the tombstone was purged there): it descends from it.
-- Keys whose row lost a UNIQUE_VIOLATION here and that still have to tell the other nodes
-- (steep_repl.settle_unique_conflicts; "Other unique keys" in docs/conflicts.md). Local, not published.
CREATE TABLE IF NOT EXISTS steep_repl.unique_settle (
    tbl        TEXT NOT NULL,
    pk         TEXT NOT NULL,
    queued_at  TIMESTAMPTZ NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (tbl, pk)
);

CREATE TABLE IF NOT EXISTS steep_repl.tombstone_horizon (
    node_id    TEXT PRIMARY KEY,         -- origin of the tombstones
    horizon    TIMESTAMPTZ NOT NULL,     -- that origin's hybrid logical clock at the first mark
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Derived tombstones (pseudo node 'steep_repl', "Other unique keys") proven settled on this node. Their
-- ver_ts is the losing version's, not the time they were made, so no horizon can cover them: the purge
-- records each one it found on every node before its rounds (steep_repl.settle_derived_tombstones).
CREATE TABLE IF NOT EXISTS steep_repl.derived_settled (
    tbl        TEXT NOT NULL,
    pk         TEXT NOT NULL,
    ver_ts     TIMESTAMPTZ NOT NULL,     -- the derived tombstone's version (ver_node 'steep_repl')
    settled_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tbl, pk)
);

SELECT pg_catalog.pg_extension_config_dump('steep_repl.row_version', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.derived_settled', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.tombstone_horizon', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.conflict_tables', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.conflict_strategies', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.conflict_settings', '');

-- Schema, name and kind of a table (one home for the catalog lookup every table-taking function needs).
CREATE OR REPLACE FUNCTION steep_repl._rel_name(p_table pg_catalog.regclass, OUT schema_name TEXT, OUT table_name TEXT,
                                                OUT kind "char")
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT n.nspname::TEXT, c.relname::TEXT, c.relkind
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table
$$;

-- ---------------------------------------------------------------------------------------------
-- Strategy configuration
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION steep_repl.conflict_strategy_names() RETURNS TEXT[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['last_write_wins', 'first_write_wins', 'node_priority', 'keep_local', 'apply_remote', 'manual']
$$;

-- The strategy of a table: {strategy, priority} (per-table row, else the default).
CREATE OR REPLACE FUNCTION steep_repl.table_strategy(p_schema TEXT, p_table TEXT)
RETURNS TABLE (strategy TEXT, priority TEXT[])
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT x.strategy, x.priority FROM (
        SELECT 1 AS o, s.strategy, s.priority FROM steep_repl.conflict_strategies s
        WHERE s.table_schema = p_schema AND s.table_name = p_table
        UNION ALL
        SELECT 2, coalesce((SELECT c.value FROM steep_repl.conflict_settings c WHERE c.name = 'default_strategy'),
                           'last_write_wins'), NULL::TEXT[]) x
    ORDER BY x.o LIMIT 1
$$;

-- Set the default strategy (p_table NULL or '*') or one table's strategy. Returns true when
-- something changed. Validates everything before writing; every change is audited.
CREATE OR REPLACE FUNCTION steep_repl.set_conflict_strategy(
    p_table TEXT, p_strategy TEXT, p_priority TEXT[] DEFAULT NULL)
RETURNS BOOLEAN LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_schema TEXT; v_name TEXT; v_old RECORD; v_unknown TEXT[]; v_rel pg_catalog.regclass;
BEGIN
    IF p_strategy IS NULL OR NOT (p_strategy = ANY (steep_repl.conflict_strategy_names())) THEN
        RAISE EXCEPTION 'unknown conflict strategy %', coalesce(pg_catalog.quote_literal(p_strategy), 'NULL')
            USING HINT = 'Fix: use one of ' || pg_catalog.array_to_string(steep_repl.conflict_strategy_names(), ', ') || '.',
                  ERRCODE = '22023';
    END IF;
    IF p_priority IS NOT NULL AND p_strategy <> 'node_priority' THEN
        RAISE EXCEPTION 'a priority list is only valid with the node_priority strategy (got %)', p_strategy
            USING HINT = 'Fix: drop the priority list or use strategy node_priority.', ERRCODE = '22023';
    END IF;
    IF p_priority IS NOT NULL THEN
        IF pg_catalog.cardinality(p_priority) = 0 THEN
            RAISE EXCEPTION 'the node_priority list is empty'
                USING HINT = 'Fix: list node ids, strongest first (or omit the list to use steep_repl.nodes.priority).',
                      ERRCODE = '22023';
        END IF;
        SELECT pg_catalog.array_agg(x ORDER BY o) INTO v_unknown
        FROM pg_catalog.unnest(p_priority) WITH ORDINALITY AS u(x, o)
        WHERE x IS NULL OR NOT EXISTS (SELECT 1 FROM steep_repl.nodes n WHERE n.node_id = x);
        IF v_unknown IS NOT NULL THEN
            RAISE EXCEPTION 'node_priority list names unknown node(s): %', pg_catalog.array_to_string(v_unknown, ', ', 'NULL')
                USING HINT = 'Fix: use node ids registered in steep_repl.nodes ('
                    || coalesce((SELECT pg_catalog.string_agg(node_id, ', ' ORDER BY node_id) FROM steep_repl.nodes), 'none')
                    || ').', ERRCODE = '22023';
        END IF;
        IF (SELECT pg_catalog.count(DISTINCT x) FROM pg_catalog.unnest(p_priority) x) <> pg_catalog.cardinality(p_priority) THEN
            RAISE EXCEPTION 'node_priority list % names a node twice', p_priority
                USING HINT = 'Fix: list every node once.', ERRCODE = '22023';
        END IF;
    END IF;
    IF p_table IS NULL OR p_table = '*' THEN
        IF p_strategy = 'node_priority' AND p_priority IS NOT NULL THEN
            RAISE EXCEPTION 'the default strategy cannot carry a priority list'
                USING HINT = 'Fix: set node_priority without a list (steep_repl.nodes.priority decides) or per table.',
                      ERRCODE = '22023';
        END IF;
        IF (SELECT value FROM steep_repl.conflict_settings WHERE name = 'default_strategy') IS NOT DISTINCT FROM p_strategy THEN
            RETURN false;
        END IF;
        PERFORM steep_repl.audit('conflict.default_strategy', 'conflict_settings', 'default_strategy',
            pg_catalog.jsonb_build_object('strategy', (SELECT value FROM steep_repl.conflict_settings WHERE name = 'default_strategy')),
            pg_catalog.jsonb_build_object('strategy', p_strategy));
        INSERT INTO steep_repl.conflict_settings (name, value) VALUES ('default_strategy', p_strategy)
        ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = pg_catalog.now();
        RETURN true;
    END IF;
    v_rel := pg_catalog.to_regclass(p_table);
    IF v_rel IS NULL THEN
        RAISE EXCEPTION 'table % does not exist', p_table
            USING HINT = 'Fix: name an existing table as schema.table.', ERRCODE = '42P01';
    END IF;
    SELECT r.schema_name, r.table_name INTO v_schema, v_name FROM steep_repl._rel_name(v_rel) r;
    SELECT s.strategy, s.priority INTO v_old FROM steep_repl.conflict_strategies s
    WHERE s.table_schema = v_schema AND s.table_name = v_name;
    IF FOUND AND v_old.strategy = p_strategy AND v_old.priority IS NOT DISTINCT FROM p_priority THEN
        RETURN false;
    END IF;
    PERFORM steep_repl.audit('conflict.table_strategy', 'table', v_schema || '.' || v_name,
        CASE WHEN v_old IS NULL THEN NULL ELSE pg_catalog.jsonb_build_object('strategy', v_old.strategy, 'priority', v_old.priority) END,
        pg_catalog.jsonb_build_object('strategy', p_strategy, 'priority', p_priority));
    INSERT INTO steep_repl.conflict_strategies (table_schema, table_name, strategy, priority)
    VALUES (v_schema, v_name, p_strategy, p_priority)
    ON CONFLICT (table_schema, table_name) DO UPDATE
        SET strategy = EXCLUDED.strategy, priority = EXCLUDED.priority, updated_at = pg_catalog.now();
    RETURN true;
END $$;

-- Remove a table's own strategy (it falls back to the default). Returns true when removed.
CREATE OR REPLACE FUNCTION steep_repl.clear_conflict_strategy(p_schema TEXT, p_table TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE v_old RECORD;
BEGIN
    DELETE FROM steep_repl.conflict_strategies s WHERE s.table_schema = p_schema AND s.table_name = p_table
    RETURNING s.strategy, s.priority INTO v_old;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM steep_repl.audit('conflict.table_strategy_cleared', 'table', p_schema || '.' || p_table,
        pg_catalog.jsonb_build_object('strategy', v_old.strategy, 'priority', v_old.priority), NULL);
    RETURN true;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Origin side: a new version for every local write
-- ---------------------------------------------------------------------------------------------
-- A local UPDATE or DELETE waits here for a version another transaction holds. PostgreSQL locked the
-- row before the BEFORE ROW trigger, and an apply worker that holds the version takes the row next: a
-- deadlock this session must lose (docs/conflicts.md, Deadlocks). PostgreSQL looks for a deadlock ONCE
-- per lock wait, at deadlock_timeout; a cycle that closes later (three nodes: a second local session
-- queued on the row, the apply worker joining last) would be found only by the apply worker, at its
-- 5 s, and cost an apply error. So the wait runs in rounds of at most 1.5 s (lock_timeout): every round
-- is a new wait with its own check at this session's 1 s deadlock_timeout. The caller's lock_timeout
-- still ends the wait (55P03 as PostgreSQL raises it). Returns the locked version (NULL fields: it was
-- deleted meanwhile).
CREATE OR REPLACE FUNCTION steep_repl._version_wait(p_tbl TEXT, p_pk TEXT, p_limit TEXT)
RETURNS steep_repl.row_version
LANGUAGE plpgsql SET search_path = '' SET enable_seqscan = off SET lock_timeout = '1500ms' AS $$
DECLARE
    l steep_repl.row_version;
    v_limit INTERVAL := p_limit::INTERVAL;      -- the caller's lock_timeout ('0': none)
    v_start TIMESTAMPTZ := pg_catalog.clock_timestamp();
    v_left INTERVAL;
BEGIN
    LOOP
        IF v_limit > interval '0' THEN
            v_left := v_limit - (pg_catalog.clock_timestamp() - v_start);
            IF v_left <= interval '0' THEN
                RAISE EXCEPTION 'canceling statement due to lock timeout'
                    USING DETAIL = pg_catalog.format('Waited lock_timeout (%s) for the version of %s %s.', p_limit, p_tbl, p_pk),
                          ERRCODE = '55P03';
            END IF;
        END IF;
        BEGIN
            IF v_left < interval '1500ms' THEN
                PERFORM pg_catalog.set_config('lock_timeout',
                    pg_catalog.ceil(pg_catalog.date_part('epoch', v_left) * 1000)::BIGINT || 'ms', true);
            END IF;
            SELECT * INTO l FROM steep_repl.row_version v WHERE v.tbl = p_tbl AND v.pk = p_pk FOR UPDATE;
            RETURN l;
        EXCEPTION WHEN lock_not_available THEN
            NULL;   -- no deadlock in this round (that raises 40P01): wait again, PostgreSQL checks again
        END;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION steep_repl._capture(p_tbl TEXT, p_pk TEXT, p_deleted BOOLEAN, p_img JSONB,
                                               p_insert BOOLEAN DEFAULT false)
RETURNS VOID LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' SET enable_seqscan = off AS $$
DECLARE
    l steep_repl.row_version;
    v_me TEXT := steep_repl.local_node_id();
    v_forced BOOLEAN := coalesce(pg_catalog.current_setting('steep_repl.forced', true), '') = 'on';
    v_found BOOLEAN;
BEGIN
    IF v_me IS NULL THEN
        RAISE EXCEPTION 'steep_repl: this node is not registered (no steep_repl.nodes row with is_local)'
            USING HINT = 'Fix: run the foundation play (playbooks/steep_foundation.yml) before writing to replicated tables.';
    END IF;
    -- in a deadlock with an apply worker (deadlock_timeout 5s there) this session must be the victim.
    -- 1s, not less: a deadlock check is not free, and a wait for a version runs one every round
    -- (steep_repl._version_wait), so a check that comes before a cycle closes is repeated.
    IF pg_catalog.current_setting('deadlock_timeout') <> '1s' THEN
        PERFORM pg_catalog.set_config('deadlock_timeout', '1s', true);
    END IF;
    FOR i IN 1..5 LOOP
        l := NULL;
        IF p_insert THEN
            -- no lock on this key's row yet: wait for the version as an apply worker does (version, then row)
            SELECT * INTO l FROM steep_repl.row_version v WHERE v.tbl = p_tbl AND v.pk = p_pk FOR UPDATE;
            v_found := FOUND;
        ELSE
            SELECT * INTO l FROM steep_repl.row_version v WHERE v.tbl = p_tbl AND v.pk = p_pk FOR UPDATE SKIP LOCKED;
            v_found := FOUND;
            IF NOT v_found AND EXISTS (SELECT 1 FROM steep_repl.row_version v WHERE v.tbl = p_tbl AND v.pk = p_pk) THEN
                l := steep_repl._version_wait(p_tbl, p_pk, pg_catalog.current_setting('lock_timeout'));
                v_found := l.tbl IS NOT NULL;
            END IF;
        END IF;
        IF v_found AND p_insert AND NOT l.deleted THEN
            RETURN;     -- the key exists: this INSERT fails or becomes ON CONFLICT DO UPDATE/NOTHING
        END IF;
        IF v_found THEN
            -- never an UPDATE in place: receivers get every version as an INSERT and find their own
            -- version of the key in the row_version trigger (an MVCC snapshot, and again when it moved).
            -- An UPDATE is looked up by the apply worker itself, with a dirty-snapshot index scan that
            -- can miss a version row another transaction moves (a non-HOT update, DELETE + INSERT)
            -- at that moment, and drops it as update_missing without firing a trigger; the user-row
            -- change that follows would then apply undecided. (A receiver may also not hold this
            -- key's version yet: 3+ nodes, different paths.)
            DELETE FROM steep_repl.row_version v WHERE v.tbl = p_tbl AND v.pk = p_pk;
        END IF;
        INSERT INTO steep_repl.row_version (tbl, pk, ver_ts, ver_node, depth, epoch, deleted, base_ts, base_node,
                                            origin_xid, forced, gen, op, img)
        VALUES (p_tbl, p_pk,
                CASE WHEN l.ver_ts IS NULL THEN pg_catalog.clock_timestamp()
                     ELSE GREATEST(pg_catalog.clock_timestamp(), l.ver_ts + interval '1 microsecond') END,
                v_me,
                coalesce(l.depth + 1, 0),
                CASE WHEN l.tbl IS NULL THEN 0
                     WHEN l.deleted AND NOT p_deleted THEN l.epoch + 1 ELSE l.epoch END,
                p_deleted, l.ver_ts, l.ver_node, pg_catalog.txid_current(), v_forced,
                coalesce(l.gen, 0) + CASE WHEN v_forced THEN 1 ELSE 0 END,
                CASE WHEN p_deleted THEN 'D' WHEN l.tbl IS NULL OR l.deleted THEN 'I' ELSE 'U' END,
                CASE WHEN p_deleted THEN NULL ELSE p_img END)
        ON CONFLICT (tbl, pk) DO NOTHING;
        IF FOUND THEN
            RETURN;
        END IF;     -- a concurrent writer committed a first version meanwhile: build on it
    END LOOP;
    RAISE EXCEPTION 'steep_repl: could not record a version for % % (concurrent writers)', p_tbl, p_pk
        USING HINT = 'Fix: retry the transaction.', ERRCODE = '40001';
END $$;

-- steep_repl._rowop(tbl, action, pk, img): static dispatch to the generated rowop_<h> of a table
-- (regenerated by enable_table/disable_table; plan-cached, unlike EXECUTE).
CREATE OR REPLACE FUNCTION steep_repl._rowop_regenerate() RETURNS VOID
LANGUAGE plpgsql SET search_path = '' AS $gen$
DECLARE v_body TEXT := '';
BEGIN
    SELECT coalesce(pg_catalog.string_agg(pg_catalog.format(
               '    IF p_tbl = %L THEN RETURN %s(p_action, p_pk, p_img); END IF;', ct.tbl, ct.rowop), E'\n' ORDER BY ct.tbl), '')
      INTO v_body FROM steep_repl.conflict_tables ct;
    EXECUTE pg_catalog.format($f$
CREATE OR REPLACE FUNCTION steep_repl._rowop(p_tbl TEXT, p_action TEXT, p_pk TEXT, p_img JSONB) RETURNS JSONB
LANGUAGE plpgsql SECURITY DEFINER AS $body$
BEGIN
%s
    RAISE EXCEPTION 'steep_repl: table %% has no conflict triggers on this node', p_tbl
        USING HINT = 'Fix: SELECT steep_repl.enable_table(...) or run playbooks/site.yml.';
END $body$ $f$, v_body);
    REVOKE ALL ON FUNCTION steep_repl._rowop(TEXT, TEXT, TEXT, JSONB) FROM PUBLIC;
END $gen$;
SELECT steep_repl._rowop_regenerate();

-- ---------------------------------------------------------------------------------------------
-- Apply side
-- ---------------------------------------------------------------------------------------------
-- Node strength for ties: (priority desc, node_id asc); returns true when node a is stronger.
CREATE OR REPLACE FUNCTION steep_repl._node_stronger(a TEXT, b TEXT) RETURNS BOOLEAN
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE pa INTEGER; pb INTEGER;
BEGIN
    pa := coalesce((SELECT n.priority FROM steep_repl.nodes n WHERE n.node_id = a), 0);
    pb := coalesce((SELECT n.priority FROM steep_repl.nodes n WHERE n.node_id = b), 0);
    IF pa <> pb THEN
        RETURN pa > pb;
    END IF;
    RETURN (a COLLATE "C") < (b COLLATE "C");
END $$;

-- Does version r beat version l under the strategy's total order? Identical on every node.
-- generation, incarnation and tombstone come first for every strategy; keep_local, apply_remote
-- and manual are decided by the caller and use last_write_wins here only for tie-breaking.
CREATE OR REPLACE FUNCTION steep_repl._beats(p_strategy TEXT, p_list TEXT[],
                                             r steep_repl.row_version, l steep_repl.row_version)
RETURNS BOOLEAN LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE rr BIGINT; lr BIGINT;
BEGIN
    IF r.gen <> l.gen THEN RETURN r.gen > l.gen; END IF;
    IF r.epoch <> l.epoch THEN RETURN r.epoch > l.epoch; END IF;
    IF r.deleted <> l.deleted THEN RETURN r.deleted; END IF;
    IF p_strategy = 'first_write_wins' THEN
        IF r.depth <> l.depth THEN RETURN r.depth > l.depth; END IF;
        IF r.ver_ts <> l.ver_ts THEN RETURN r.ver_ts < l.ver_ts; END IF;
    ELSIF p_strategy = 'node_priority' THEN
        IF r.depth <> l.depth THEN RETURN r.depth > l.depth; END IF;
        IF p_list IS NOT NULL THEN
            rr := -coalesce(pg_catalog.array_position(p_list, r.ver_node), 1000000);
            lr := -coalesce(pg_catalog.array_position(p_list, l.ver_node), 1000000);
            IF rr <> lr THEN RETURN rr > lr; END IF;
        END IF;
        IF r.ver_node <> l.ver_node THEN
            RETURN steep_repl._node_stronger(r.ver_node, l.ver_node);
        END IF;
        IF r.ver_ts <> l.ver_ts THEN RETURN r.ver_ts > l.ver_ts; END IF;
    ELSE
        IF r.ver_ts <> l.ver_ts THEN RETURN r.ver_ts > l.ver_ts; END IF;
    END IF;
    IF r.ver_node <> l.ver_node THEN
        RETURN steep_repl._node_stronger(r.ver_node, l.ver_node);
    END IF;
    RETURN r.depth > l.depth;
END $$;

-- (no SET clause and STABLE like jsonb_build_object, not IMMUTABLE: inlined into the conflict_log
-- INSERT; a function declared more strictly than its body is run as a separate SQL function, which
-- cost about 10 µs per call in the apply worker. Everything is schema-qualified.)
CREATE OR REPLACE FUNCTION steep_repl._version_json(v steep_repl.row_version) RETURNS JSONB
LANGUAGE sql STABLE AS $$
    SELECT pg_catalog.jsonb_build_object('ver_ts', v.ver_ts, 'ver_node', v.ver_node, 'depth', v.depth,
        'epoch', v.epoch, 'gen', v.gen, 'deleted', v.deleted, 'op', v.op, 'base_ts', v.base_ts,
        'base_node', v.base_node, 'origin_xid', v.origin_xid, 'forced', v.forced)
$$;

-- Mark the PENDING conflicts of a key resolved (a forced version from a peer or a local resolution).
CREATE OR REPLACE FUNCTION steep_repl._settle_pending(p_schema TEXT, p_table TEXT, p_pk TEXT,
    p_resolution TEXT, p_by TEXT, p_tuple JSONB, p_note TEXT)
RETURNS INTEGER LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE n INTEGER;
BEGIN
    UPDATE steep_repl.conflict_log c
       SET resolution = p_resolution, resolved_at = pg_catalog.now(), resolved_by = p_by,
           resolved_tuple = p_tuple, note = p_note
     WHERE c.resolution = 'PENDING' AND c.table_schema = p_schema AND c.table_name = p_table AND c.pk = p_pk;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- The apply context: a transaction-local setting listing the keys whose next user-row change must
-- NOT be applied as it arrives ("s": decided / materialised / duplicate), must be checked ("g":
-- first version of an INSERT, the row could exist without a version) or must carry the image of the
-- version that won ("m": a remote UPDATE that won a conflict; the image waits in steep_repl.apply_img).
-- Entries: E'\n' flag tbl E'\t' pk. Removing an "m" entry before its row change came materialises it.
-- Empty (the normal case): the user-row change is applied natively, its trigger's WHEN clause is false.
CREATE OR REPLACE FUNCTION steep_repl._ctx_set(p_key TEXT, p_flag TEXT) RETURNS VOID
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    c TEXT := coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '');
    v_tbl TEXT := pg_catalog.split_part(p_key, E'\t', 1);
    v_pk TEXT := pg_catalog.substr(p_key, pg_catalog.length(v_tbl) + 2);
BEGIN
    IF c <> '' THEN                             -- a new decision for a key replaces an older one
        IF pg_catalog.strpos(c, E'\nm' || p_key || E'\n') > 0 THEN
            -- its row change never came (or is handled here): the row becomes its version's image now
            PERFORM steep_repl._rowop(v_tbl, 'put', v_pk,
                                      (SELECT v.img FROM steep_repl.row_version v WHERE v.tbl = v_tbl AND v.pk = v_pk));
            c := pg_catalog.replace(c, E'\nm' || p_key || E'\n', E'\n');
        END IF;
        c := pg_catalog.replace(pg_catalog.replace(c, E'\ns' || p_key || E'\n', E'\n'), E'\ng' || p_key || E'\n', E'\n');
        IF c = E'\n' THEN c := ''; END IF;
    END IF;
    IF p_flag IS NOT NULL THEN
        c := CASE WHEN c = '' THEN E'\n' ELSE c END || p_flag || p_key || E'\n';
    END IF;
    PERFORM pg_catalog.set_config('steep_repl.apply_ctx', c, true);
END $$;

-- The decision for one incoming version (called by the row_version trigger below for everything
-- but the fast path). p_update: the version arrived as an UPDATE (o = the local version, found and
-- locked by the native apply); else as an INSERT. Returns true when the native change must apply n.
CREATE OR REPLACE FUNCTION steep_repl._version_decide(p_update BOOLEAN, o steep_repl.row_version,
                                                      n steep_repl.row_version)
RETURNS BOOLEAN LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    r steep_repl.row_version;
    l steep_repl.row_version;
    v_schema TEXT;
    v_name TEXT;
    v_key TEXT;
    v_cur JSONB;
    v_conflict BOOLEAN;
    v_remote BOOLEAN;
    v_strategy TEXT;
    v_list TEXT[];
    v_type TEXT;
    v_resolution TEXT;
    v_sub TEXT;
    v_cache TEXT;
    v_set TEXT;
    v_ident "char";
BEGIN
    IF pg_catalog.pg_trigger_depth() > 1 OR NOT pg_catalog.pg_replication_origin_session_is_setup() THEN
        -- our own writes below, or a replica-role session that is no apply worker (node
        -- initialisation copying versions): a plain write
        RETURN true;
    END IF;
    -- a local session that waits for us must lose a deadlock, never the apply worker: for the whole
    -- apply-worker session (set once; an aborted transaction undoes it and the next one sets it again);
    -- and no sequential scan in a plan cached while a table was small (the header of this file).
    -- Assignments, not PERFORM: PERFORM runs a query, an assignment evaluates the call directly.
    IF pg_catalog.current_setting('deadlock_timeout') <> '5s' THEN
        v_set := pg_catalog.set_config('deadlock_timeout', '5s', false);
        v_set := pg_catalog.set_config('enable_seqscan', 'off', false);
    END IF;
    r := n;
    v_key := r.tbl || E'\t' || r.pk;
    IF p_update THEN
        l := o;                                 -- the local version, found and locked by the native apply
    ELSIF o.tbl IS NOT NULL THEN
        l := o;                                 -- the row_version trigger's claim failed; it locked this one
    ELSE
        -- lock order of every apply worker: the version first (the origin WAL-logged it first), then
        -- the row. No local version: claim the key with the incoming one (a concurrent local writer
        -- that committed one meanwhile makes this a no-op and we read its version).
        FOR i IN 1..5 LOOP
            INSERT INTO steep_repl.row_version VALUES (r.*) ON CONFLICT (tbl, pk) DO NOTHING;
            IF FOUND THEN                       -- first version of this key here: it applies
                IF r.deleted THEN
                    IF r.forced THEN            -- a forced tombstone comes without a row change
                        PERFORM steep_repl._rowop(r.tbl, 'del', r.pk, NULL);
                        PERFORM steep_repl._ctx_set(v_key, 's');
                    ELSIF coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '') <> '' THEN
                        PERFORM steep_repl._ctx_set(v_key, NULL);   -- the native DELETE follows
                    END IF;
                ELSIF r.op = 'I' AND NOT r.forced THEN
                    -- the native INSERT follows; it is checked (a row without a version may exist)
                    IF coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '') = '' THEN
                        v_set := pg_catalog.set_config('steep_repl.apply_ctx', E'\ng' || v_key || E'\n', true);
                    ELSE
                        PERFORM steep_repl._ctx_set(v_key, 'g');
                    END IF;
                ELSIF EXISTS (SELECT 1 FROM steep_repl.conflict_tables ct WHERE ct.tbl = r.tbl) THEN
                    -- an update that overtook its insert (3+ nodes) or a resolution: the row is the image
                    PERFORM steep_repl._rowop(r.tbl, 'put', r.pk, r.img);
                    PERFORM steep_repl._ctx_set(v_key, 's');
                END IF;
                RETURN false;
            END IF;
            SELECT * INTO l FROM steep_repl.row_version v WHERE v.tbl = r.tbl AND v.pk = r.pk FOR UPDATE;
            IF FOUND THEN
                EXIT;
            END IF;
            l := NULL;
        END LOOP;
        IF l.tbl IS NULL THEN
            RAISE EXCEPTION 'steep_repl: cannot lock the version of % % (concurrent writers)', r.tbl, r.pk;
        END IF;
    END IF;

    -- a settled tombstone (purged elsewhere, or about to be) and a version not based on it: R was written
    -- after its origin saw the tombstone, or after the tombstone was purged there (a re-INSERT then starts
    -- over at epoch 0, stamped by a clock that may even be behind it). R descends from it: as if the key
    -- had no version here ("Tombstones" in docs/conflicts.md). Before the checks below, which compare R
    -- with L as if they could be concurrent.
    -- (Two IFs: the outer one is a simple expression, evaluated without the executor on every call; the
    -- inner one, with _settled's query, only for a tombstone.)
    IF l.deleted AND NOT p_update THEN
        IF (r.base_ts IS DISTINCT FROM l.ver_ts OR r.base_node IS DISTINCT FROM l.ver_node)
           AND (r.ver_ts <> l.ver_ts OR r.ver_node <> l.ver_node) AND steep_repl._settled(l) THEN
            DELETE FROM steep_repl.row_version v WHERE v.tbl = r.tbl AND v.pk = r.pk;
            RETURN steep_repl._version_decide(false, NULL, r);
        END IF;
    END IF;
    -- duplicate delivery (copy + replay) or an older version of the same origin: silent no-op
    IF (r.ver_ts = l.ver_ts AND r.ver_node = l.ver_node)
       OR (r.ver_node = l.ver_node AND r.ver_ts < l.ver_ts)
       OR (r.ver_ts = l.base_ts AND r.ver_node = l.base_node) THEN
        PERFORM steep_repl._ctx_set(v_key, 's');
        RETURN false;
    END IF;
    v_conflict := r.base_ts IS DISTINCT FROM l.ver_ts OR r.base_node IS DISTINCT FROM l.ver_node;
    -- the row_version trigger's fast path is skipped after a conflict, until a version descends again
    IF v_conflict IS DISTINCT FROM
       (pg_catalog.current_setting('steep_repl.apply_conflicts', true) IS NOT DISTINCT FROM 'on') THEN
        v_set := pg_catalog.set_config('steep_repl.apply_conflicts', CASE WHEN v_conflict THEN 'on' ELSE '' END, true);
    END IF;

    IF NOT v_conflict AND NOT r.forced AND (r.deleted OR l.deleted = (r.op = 'I')) THEN
        -- R descends from L: the native user-row change that follows applies it (L live: the row
        -- exists for an UPDATE/DELETE; L a tombstone: the row is absent for the re-INSERT)
        IF coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '') <> '' THEN
            PERFORM steep_repl._ctx_set(v_key, NULL);
        END IF;
        IF p_update THEN
            RETURN true;
        END IF;
        UPDATE steep_repl.row_version v
           SET ver_ts = r.ver_ts, ver_node = r.ver_node, depth = r.depth, epoch = r.epoch, deleted = r.deleted,
               base_ts = r.base_ts, base_node = r.base_node, origin_xid = r.origin_xid, forced = r.forced,
               gen = r.gen, op = r.op, img = r.img
         WHERE v.tbl = r.tbl AND v.pk = r.pk;
        RETURN false;
    END IF;

    -- the table's schema, name, replica identity and strategy, looked up once per table and transaction
    -- (cached in a transaction-local setting: a transaction of many conflicts on one table looks them up
    -- once; a change of replica identity waits for the apply transaction's lock on the table)
    v_cache := pg_catalog.current_setting('steep_repl.apply_strategy', true);
    IF v_cache IS NOT NULL AND pg_catalog.split_part(v_cache, E'\t', 1) = r.tbl THEN
        v_schema := pg_catalog.split_part(v_cache, E'\t', 2);
        v_name := pg_catalog.split_part(v_cache, E'\t', 3);
        v_strategy := pg_catalog.split_part(v_cache, E'\t', 4);
        v_list := NULLIF(pg_catalog.split_part(v_cache, E'\t', 5), '')::TEXT[];
        v_ident := pg_catalog.split_part(v_cache, E'\t', 6);
    ELSE
        SELECT ct.table_schema, ct.table_name, c.relreplident INTO v_schema, v_name, v_ident
          FROM steep_repl.conflict_tables ct
          LEFT JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(
                    pg_catalog.quote_ident(ct.table_schema) || '.' || pg_catalog.quote_ident(ct.table_name))
         WHERE ct.tbl = r.tbl;
        IF NOT FOUND THEN                       -- not a table we manage here: keep the version only
            PERFORM steep_repl._ctx_set(v_key, NULL);
            IF p_update THEN RETURN true; END IF;
            DELETE FROM steep_repl.row_version v WHERE v.tbl = r.tbl AND v.pk = r.pk;
            INSERT INTO steep_repl.row_version VALUES (r.*);
            RETURN false;
        END IF;
        SELECT s.strategy, s.priority INTO v_strategy, v_list FROM steep_repl.table_strategy(v_schema, v_name) s;
        v_set := pg_catalog.set_config('steep_repl.apply_strategy', r.tbl || E'\t' || v_schema || E'\t' || v_name
            || E'\t' || v_strategy || E'\t' || coalesce(v_list::TEXT, '') || E'\t' || coalesce(v_ident::TEXT, '-'), true);
    END IF;
    IF NOT v_conflict THEN
        v_remote := true;
    ELSE
        v_type := CASE WHEN r.deleted AND l.deleted THEN 'DELETE_DELETE'
                       WHEN r.deleted OR l.deleted THEN 'UPDATE_DELETE'
                       WHEN r.op = 'I' AND l.op = 'I' THEN 'INSERT_INSERT'
                       ELSE 'UPDATE_UPDATE' END;
        IF r.gen <> l.gen THEN
            v_remote := r.gen > l.gen;          -- a newer resolution beats everything older
        ELSIF v_type = 'DELETE_DELETE' THEN
            v_remote := steep_repl._beats('last_write_wins', NULL, r, l);
        ELSIF v_strategy = 'keep_local' OR v_strategy = 'manual' THEN
            v_remote := false;
        ELSIF v_strategy = 'apply_remote' THEN
            v_remote := true;
        ELSIF v_strategy = 'last_write_wins' AND r.epoch = l.epoch AND r.deleted = l.deleted AND r.ver_ts <> l.ver_ts THEN
            v_remote := r.ver_ts > l.ver_ts;    -- _beats('last_write_wins', ...) inlined for the common case
        ELSE
            v_remote := steep_repl._beats(v_strategy, v_list, r, l);
        END IF;
        v_resolution := CASE WHEN v_type = 'DELETE_DELETE' THEN 'BENIGN'
                             WHEN v_strategy = 'manual' AND NOT v_remote THEN 'PENDING'
                             WHEN v_remote THEN 'APPLIED_REMOTE' ELSE 'KEPT_LOCAL' END;
    END IF;

    -- remote wins: the version becomes the local one, then the row becomes its image (or goes): the
    -- version first, so that a check of the row's other unique keys (steep_repl._unique_decide) finds it.
    -- v_cur: the local row before (row locked after the version: the lock order of every apply worker)
    IF v_remote AND NOT p_update THEN
        UPDATE steep_repl.row_version v
           SET ver_ts = r.ver_ts, ver_node = r.ver_node, depth = r.depth, epoch = r.epoch, deleted = r.deleted,
               base_ts = r.base_ts, base_node = r.base_node, origin_xid = r.origin_xid, forced = r.forced,
               gen = r.gen, op = r.op, img = r.img
         WHERE v.tbl = r.tbl AND v.pk = r.pk;
    END IF;
    IF v_remote AND r.deleted AND NOT r.forced THEN
        -- the native DELETE (or primary-key-changing UPDATE) that follows removes the row
        IF coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '') <> '' THEN
            PERFORM steep_repl._ctx_set(v_key, NULL);
        END IF;
        v_cur := steep_repl._rowop(r.tbl, 'get', r.pk, NULL);
    ELSIF v_remote AND v_conflict AND r.op = 'U' AND NOT l.deleted AND NOT r.forced AND NOT p_update
          AND v_ident IN ('d', 'f') AND r.img IS NOT NULL AND l.img IS NOT NULL
          AND coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '') = '' THEN
        -- a remote update wins over a live local row: the native UPDATE that follows finds the row by
        -- its primary key (replica identity default or full: the lookup uses the primary key; with an
        -- identity index on other columns the conflict may have changed them, so the row is materialised
        -- below instead; this worker holds the version, so nobody moves the row) and the user-table
        -- trigger ("m") replaces the row it carries by R's image (what the change does not carry, e.g. an
        -- unchanged TOASTed value, may differ here). The local row is L's image (every row is the image
        -- of its version: docs/conflicts.md), logged as the local tuple.
        v_cur := l.img;
        v_set := pg_catalog.set_config('steep_repl.apply_img', v_key || E'\n' || r.img::TEXT, true);
        v_set := pg_catalog.set_config('steep_repl.apply_ctx', E'\nm' || v_key || E'\n', true);
    ELSE
        IF NOT v_remote THEN
            v_cur := steep_repl._rowop(r.tbl, 'get', r.pk, NULL);
        ELSIF r.deleted THEN
            v_cur := steep_repl._rowop(r.tbl, 'take', r.pk, NULL);
        ELSE
            v_cur := steep_repl._rowop(r.tbl, 'swap', r.pk, r.img);
        END IF;
        -- decided and materialised here: the user-row change that follows is skipped (set after our
        -- own write above, so that it does not fire the user-table trigger)
        IF coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '') = '' THEN
            v_set := pg_catalog.set_config('steep_repl.apply_ctx', E'\ns' || v_key || E'\n', true);
        ELSE
            PERFORM steep_repl._ctx_set(v_key, 's');
        END IF;
    END IF;

    IF v_conflict THEN
        -- the subscription's name, once per transaction
        v_sub := pg_catalog.current_setting('steep_repl.apply_sub', true);
        IF v_sub IS NULL OR v_sub = '' THEN
            v_sub := coalesce((SELECT s.subname::TEXT FROM pg_catalog.pg_stat_subscription s
                               WHERE s.pid = pg_catalog.pg_backend_pid() LIMIT 1), 'unknown');
            v_set := pg_catalog.set_config('steep_repl.apply_sub', v_sub, false);   -- fixed for the worker
        END IF;
        INSERT INTO steep_repl.conflict_log (subscription, table_schema, table_name, conflict_type,
            local_tuple, remote_tuple, local_origin, remote_origin, local_xact_ts, remote_xact_ts, origin_xid,
            resolution, resolved_at, resolved_by, pk, strategy, winner, local_version, remote_version, resolved_tuple)
        VALUES (v_sub, v_schema, v_name, v_type,
            v_cur, r.img, l.ver_node, r.ver_node, l.ver_ts, r.ver_ts, r.origin_xid,
            v_resolution,
            CASE WHEN v_resolution = 'PENDING' THEN NULL ELSE pg_catalog.now() END,
            CASE WHEN v_resolution = 'PENDING' THEN NULL
                 WHEN r.gen <> l.gen THEN 'steep_repl:generation' ELSE 'steep_repl:' || v_strategy END,
            r.pk, v_strategy, CASE WHEN v_remote THEN 'remote' ELSE 'local' END,
            steep_repl._version_json(l), steep_repl._version_json(r),
            CASE WHEN v_resolution = 'PENDING' THEN NULL WHEN v_remote THEN r.img ELSE v_cur END);
    END IF;

    IF NOT v_remote THEN
        RETURN false;                            -- local version and row stay
    END IF;
    IF r.forced THEN
        PERFORM steep_repl._settle_pending(v_schema, v_name, r.pk, 'APPLIED_REMOTE',
            'steep_repl:resolution@' || r.ver_node, r.img, 'resolved by a manual resolution on ' || r.ver_node);
    END IF;
    RETURN p_update;
END $$;


-- BEFORE triggers (ENABLE REPLICA) on steep_repl.row_version. No SECURITY DEFINER, no SET clause, and no
-- WHEN clause for INSERTs (the apply worker builds a new executor state per change, so a WHEN expression
-- is deserialised and compiled again for every row: dearer than this call). Origins send every version
-- as an INSERT (steep_repl._capture says why); the fast paths, with nothing pending in the context, not
-- forced and the worker's deadlock_timeout set: a first version claims its key, and a version whose
-- base is the local version and whose operation fits the local row replaces it here; the native
-- user-row change that follows applies the row. An UPDATE (an origin on an earlier 1.1 build replaced
-- its own version in place) is decided on OLD, its fast path returns NEW at once. The DELETE half of a
-- replacement is ignored.
CREATE OR REPLACE FUNCTION steep_repl._row_version_apply() RETURNS TRIGGER
LANGUAGE plpgsql AS $$
DECLARE
    l steep_repl.row_version;
    v_set TEXT;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.base_ts = OLD.ver_ts AND NEW.base_node = OLD.ver_node AND NOT NEW.forced
           AND (NEW.deleted OR OLD.deleted = (NEW.op = 'I'))
           AND pg_catalog.current_setting('deadlock_timeout') = '5s'
           AND coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '') = '' THEN
            RETURN NEW;
        END IF;
        IF pg_catalog.pg_trigger_depth() > 1 OR steep_repl._version_decide(true, OLD, NEW) THEN
            RETURN NEW;
        END IF;
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        IF pg_catalog.pg_trigger_depth() > 1 THEN
            RETURN NEW;
        END IF;
        IF NOT NEW.forced AND pg_catalog.current_setting('deadlock_timeout') = '5s'
           AND coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '') = ''
           AND pg_catalog.pg_replication_origin_session_is_setup() THEN
            IF NEW.op = 'I' AND NOT NEW.deleted THEN
                -- a first version (bulk INSERT): claim the key here, ON CONFLICT because a local writer
                -- may insert the same key concurrently; the native INSERT of the row that follows is
                -- checked by the user-table trigger ("g": a row without a version may exist)
                INSERT INTO steep_repl.row_version VALUES (NEW.*) ON CONFLICT (tbl, pk) DO NOTHING;
                IF FOUND THEN
                    v_set := pg_catalog.set_config('steep_repl.apply_ctx', E'\ng' || NEW.tbl || E'\t' || NEW.pk || E'\n', true);
                    RETURN NULL;
                END IF;
            END IF;
            -- fast path: the version descends from the local one (its base) and its operation fits the
            -- local row: one UPDATE replaces it (locking it: version first, as every apply worker), and
            -- the native user-row change that follows applies the row. An MVCC statement: if the local
            -- version changed meanwhile, the condition is checked again on the newest; if it moved
            -- (DELETE + INSERT), nothing matches and _version_decide looks again. Skipped while the
            -- transaction's last decision was a conflict: conflicts come in runs (a transaction written
            -- during a partition), where the UPDATE would find nothing every time.
            IF pg_catalog.current_setting('steep_repl.apply_conflicts', true) IS DISTINCT FROM 'on' THEN
                UPDATE steep_repl.row_version v
                   SET ver_ts = NEW.ver_ts, ver_node = NEW.ver_node, depth = NEW.depth, epoch = NEW.epoch,
                       deleted = NEW.deleted, base_ts = NEW.base_ts, base_node = NEW.base_node,
                       origin_xid = NEW.origin_xid, forced = NEW.forced, gen = NEW.gen, op = NEW.op, img = NEW.img
                 WHERE v.tbl = NEW.tbl AND v.pk = NEW.pk AND v.ver_ts = NEW.base_ts AND v.ver_node = NEW.base_node
                   AND (NEW.deleted OR v.deleted = (NEW.op = 'I'));
                IF FOUND THEN
                    RETURN NULL;
                END IF;
            END IF;
            -- not descending (a conflict, a duplicate, a tombstone first...): lock the local version and
            -- hand it over, so that _version_decide does not claim the key first
            SELECT * INTO l FROM steep_repl.row_version v WHERE v.tbl = NEW.tbl AND v.pk = NEW.pk FOR UPDATE;
        END IF;
        -- anything else (also forced versions, or something pending in the context)
        IF steep_repl._version_decide(false, l, NEW) THEN
            RETURN NEW;
        END IF;
        RETURN NULL;
    END IF;
    -- DELETE: origins replace versions by DELETE + INSERT; an apply worker ignores the DELETE
    IF pg_catalog.pg_trigger_depth() > 1 OR NOT pg_catalog.pg_replication_origin_session_is_setup() THEN
        RETURN OLD;
    END IF;
    RETURN NULL;
END $$;

-- Two triggers, one function. INSERTs (every version a peer sends) fire it without a WHEN clause.
-- UPDATEs and DELETEs arrive only from an origin on an earlier 1.1 build; the engine's own UPDATEs of
-- a version (the fast path above, every decision) and DELETEs run inside a trigger, and the WHEN clause
-- keeps those from calling the function again only to be let through (one PL/pgSQL call per conflict and
-- per applied update or delete; in the apply worker it costs about what deserialising the clause costs,
-- a few µs per conflict net).
DROP TRIGGER IF EXISTS steep_repl_apply_upd ON steep_repl.row_version;     -- an earlier 1.1 build
CREATE OR REPLACE TRIGGER steep_repl_apply BEFORE INSERT ON steep_repl.row_version
    FOR EACH ROW EXECUTE FUNCTION steep_repl._row_version_apply();
ALTER TABLE steep_repl.row_version ENABLE REPLICA TRIGGER steep_repl_apply;
CREATE OR REPLACE TRIGGER steep_repl_apply_peer BEFORE UPDATE OR DELETE ON steep_repl.row_version
    FOR EACH ROW WHEN (pg_catalog.pg_trigger_depth() = 0) EXECUTE FUNCTION steep_repl._row_version_apply();
ALTER TABLE steep_repl.row_version ENABLE REPLICA TRIGGER steep_repl_apply_peer;
REVOKE ALL ON FUNCTION steep_repl._version_decide(BOOLEAN, steep_repl.row_version, steep_repl.row_version) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Other unique keys: two rows of different primary keys that take one value of another unique
-- constraint (two nodes insert the same e-mail address under two ids). Native apply stops on it
-- (insert_exists on the unique index, for ever); steep decides between the two rows' versions, as every
-- node does, and the losing row goes: its key gets a tombstone every deciding node derives alike
-- (_unique_tombstone), so the next write of its key descends from it ("Other unique keys" in docs/conflicts.md).
-- ---------------------------------------------------------------------------------------------
-- Does version r (of one key) beat version o (of another key that took the same unique value)? Only the
-- time, node and priority list mean anything across two keys (generation, incarnation and depth count
-- the history of one key). Ties: the caller breaks them by key.
CREATE OR REPLACE FUNCTION steep_repl._unique_beats(p_strategy TEXT, p_list TEXT[],
                                                    r steep_repl.row_version, o steep_repl.row_version)
RETURNS BOOLEAN LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE rr BIGINT; orank BIGINT;
BEGIN
    IF p_strategy = 'node_priority' THEN
        IF p_list IS NOT NULL THEN
            rr := -coalesce(pg_catalog.array_position(p_list, r.ver_node), 1000000);
            orank := -coalesce(pg_catalog.array_position(p_list, o.ver_node), 1000000);
            IF rr <> orank THEN RETURN rr > orank; END IF;
        END IF;
        IF r.ver_node <> o.ver_node THEN
            RETURN steep_repl._node_stronger(r.ver_node, o.ver_node);
        END IF;
    END IF;
    IF r.ver_ts <> o.ver_ts THEN
        RETURN (r.ver_ts > o.ver_ts) = (p_strategy <> 'first_write_wins');
    END IF;
    IF r.ver_node <> o.ver_node THEN
        RETURN steep_repl._node_stronger(r.ver_node, o.ver_node);
    END IF;
    RETURN NULL;
END $$;

-- The loser's key becomes the tombstone every deciding node derives from the losing version v alone: one
-- microsecond after it, of the pseudo node 'steep_repl' (no node writes as it, so no version of a real
-- node is ever taken for an older one of the same origin), based on v, forced and one generation up (it
-- beats a concurrent version based on v everywhere, and an apply worker that holds v's row deletes it).
-- Every node that decides writes the same version; steep_repl.settle_unique_conflicts sends it from a
-- local session later, for the nodes that never saw both rows (duplicates are no-ops there).
CREATE OR REPLACE FUNCTION steep_repl._unique_tombstone(v steep_repl.row_version) RETURNS VOID
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF v.tbl IS NULL THEN
        RETURN;
    END IF;
    UPDATE steep_repl.row_version x
       SET ver_ts = v.ver_ts + interval '1 microsecond', ver_node = 'steep_repl', depth = v.depth + 1,
           epoch = v.epoch, deleted = true, base_ts = v.ver_ts, base_node = v.ver_node, origin_xid = v.origin_xid,
           forced = true, gen = v.gen + 1, op = 'D', img = NULL
     WHERE x.tbl = v.tbl AND x.pk = v.pk;
    INSERT INTO steep_repl.unique_settle (tbl, pk) VALUES (v.tbl, v.pk) ON CONFLICT (tbl, pk) DO NOTHING;
END $$;
REVOKE ALL ON FUNCTION steep_repl._unique_tombstone(steep_repl.row_version) FROM PUBLIC;

-- Send the tombstones of the rows that lost a UNIQUE_VIOLATION here (queued by _unique_tombstone) to
-- the other nodes: a local write of the same version row (the versions publication carries the INSERT).
-- A node that applied the winner's deletion before it ever saw the loser keeps the loser otherwise. The
-- agent calls it every cycle; without an agent: SELECT steep_repl.settle_unique_conflicts(); now and
-- then. A key whose version moved on since is only dequeued. Returns how many tombstones were sent.
CREATE OR REPLACE FUNCTION steep_repl.settle_unique_conflicts(p_limit INTEGER DEFAULT 1000) RETURNS INTEGER
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    q RECORD;
    v steep_repl.row_version;
    v_sent INTEGER := 0;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'p_limit must be a positive number of keys (got %)', coalesce(p_limit::TEXT, 'NULL')
            USING HINT = 'Fix: call steep_repl.settle_unique_conflicts() without an argument (1000 keys).', ERRCODE = '22023';
    END IF;
    IF pg_catalog.pg_replication_origin_session_is_setup() THEN
        RAISE EXCEPTION 'steep_repl.settle_unique_conflicts() must run in an ordinary session (this one replays a replication origin)'
            USING HINT = 'Fix: call it from a plain connection to this node.', ERRCODE = '55000';
    END IF;
    FOR q IN DELETE FROM steep_repl.unique_settle s
              WHERE (s.tbl, s.pk) IN (SELECT u.tbl, u.pk FROM steep_repl.unique_settle u
                                       ORDER BY u.queued_at LIMIT p_limit FOR UPDATE SKIP LOCKED)
          RETURNING s.tbl, s.pk LOOP
        SELECT * INTO v FROM steep_repl.row_version x WHERE x.tbl = q.tbl AND x.pk = q.pk FOR UPDATE;
        IF FOUND AND v.ver_node = 'steep_repl' AND v.deleted AND v.forced THEN
            DELETE FROM steep_repl.row_version x WHERE x.tbl = q.tbl AND x.pk = q.pk;
            INSERT INTO steep_repl.row_version VALUES (v.*);
            v_sent := v_sent + 1;
        END IF;
    END LOOP;
    RETURN v_sent;
END $$;
REVOKE ALL ON FUNCTION steep_repl.settle_unique_conflicts(INTEGER) FROM PUBLIC;

-- The row of key p_key (image p_img, its version already the local one) is about to be written by an
-- apply worker, and the local row of key p_okey holds one of its other unique values. true: the incoming
-- row stays, the other row goes now; false: the incoming row goes (the caller skips it, or deletes its
-- old row). The loser's version becomes a tombstone. One conflict_log row (UNIQUE_VIOLATION; pk is the
-- incoming key, the local tuple is the other row). keep_local, apply_remote and manual tables decide
-- these by last_write_wins: the two rows are no versions of one row that a strategy could keep apart.
CREATE OR REPLACE FUNCTION steep_repl._unique_decide(p_tbl TEXT, p_key TEXT, p_img JSONB, p_okey TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    r steep_repl.row_version;
    o steep_repl.row_version;
    v_schema TEXT; v_name TEXT; v_strategy TEXT; v_list TEXT[];
    v_in BOOLEAN; v_oimg JSONB; v_sub TEXT;
BEGIN
    SELECT * INTO r FROM steep_repl.row_version v WHERE v.tbl = p_tbl AND v.pk = p_key;
    SELECT * INTO o FROM steep_repl.row_version v WHERE v.tbl = p_tbl AND v.pk = p_okey FOR UPDATE;
    SELECT ct.table_schema, ct.table_name INTO v_schema, v_name FROM steep_repl.conflict_tables ct WHERE ct.tbl = p_tbl;
    SELECT s.strategy, s.priority INTO v_strategy, v_list FROM steep_repl.table_strategy(v_schema, v_name) s;
    IF v_strategy IS NULL OR v_strategy NOT IN ('first_write_wins', 'node_priority') THEN
        v_strategy := 'last_write_wins';
    END IF;
    IF o.tbl IS NULL OR o.deleted THEN
        v_in := true;                   -- a row without a (live) version: the versioned row wins
    ELSIF r.tbl IS NULL OR r.deleted THEN
        v_in := false;
    ELSE
        v_in := coalesce(steep_repl._unique_beats(v_strategy, v_list, r, o),
                         (p_key COLLATE "C") < (p_okey COLLATE "C"));
    END IF;
    IF v_in THEN
        v_oimg := steep_repl._rowop(p_tbl, 'take', p_okey, NULL);
        PERFORM steep_repl._unique_tombstone(o);
    ELSE
        v_oimg := steep_repl._rowop(p_tbl, 'get', p_okey, NULL);
        PERFORM steep_repl._unique_tombstone(r);
    END IF;
    v_sub := pg_catalog.current_setting('steep_repl.apply_sub', true);
    IF v_sub IS NULL OR v_sub = '' THEN
        v_sub := coalesce((SELECT s.subname::TEXT FROM pg_catalog.pg_stat_subscription s
                           WHERE s.pid = pg_catalog.pg_backend_pid() LIMIT 1), 'unknown');
    END IF;
    INSERT INTO steep_repl.conflict_log (subscription, table_schema, table_name, conflict_type,
        local_tuple, remote_tuple, local_origin, remote_origin, local_xact_ts, remote_xact_ts, origin_xid,
        resolution, resolved_at, resolved_by, pk, strategy, winner, local_version, remote_version, resolved_tuple)
    VALUES (v_sub, v_schema, v_name, 'UNIQUE_VIOLATION',
        v_oimg, p_img, o.ver_node, r.ver_node, o.ver_ts, r.ver_ts, r.origin_xid,
        CASE WHEN v_in THEN 'APPLIED_REMOTE' ELSE 'KEPT_LOCAL' END, pg_catalog.now(), 'steep_repl:' || v_strategy,
        p_key, v_strategy, CASE WHEN v_in THEN 'remote' ELSE 'local' END,
        CASE WHEN o.tbl IS NULL THEN NULL ELSE steep_repl._version_json(o) END,
        CASE WHEN r.tbl IS NULL THEN NULL ELSE steep_repl._version_json(r) END,
        CASE WHEN v_in THEN p_img ELSE v_oimg END);
    RETURN v_in;
END $$;
REVOKE ALL ON FUNCTION steep_repl._unique_decide(TEXT, TEXT, JSONB, TEXT) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- enable_table / disable_table: generated per-table functions and triggers
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION steep_repl._conflict_fn_suffix(p_tbl TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT pg_catalog.substr(pg_catalog.md5(p_tbl), 1, 16)
$$;

-- AFTER TRUNCATE (ENABLE ALWAYS: on the origin and in the apply worker): the table's versions go with
-- its rows. On the origin the DELETEs replicate too, and receivers ignore version DELETEs: each node
-- clears its own versions when it applies the TRUNCATE.
CREATE OR REPLACE FUNCTION steep_repl._truncate_versions() RETURNS TRIGGER
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    DELETE FROM steep_repl.row_version v WHERE v.tbl = TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
    RETURN NULL;
END $$;

-- The primary-key columns of a table in key order (NULL: no primary key). The canonical key of a
-- row (row_version.pk) is a JSON array of these columns (steep_repl._key_expr).
CREATE OR REPLACE FUNCTION steep_repl._pk_columns(p_table pg_catalog.regclass) RETURNS TEXT[]
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT pg_catalog.array_agg(a.attname::TEXT ORDER BY k.ord)
    FROM pg_catalog.pg_constraint con
    CROSS JOIN LATERAL pg_catalog.unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
    WHERE con.conrelid = p_table AND con.contype = 'p'
$$;

-- A primary-key value as JSON, written the same way in every session. to_jsonb() of a timestamptz shows
-- the session's TimeZone offset, of a bytea follows bytea_output, of an interval IntervalStyle, of a
-- float extra_float_digits, of a range or another type without a JSON form its text output (DateStyle
-- too): the same row would get another key in another session, and its versions would not meet.
CREATE OR REPLACE FUNCTION steep_repl._canon(anyelement) RETURNS JSONB
LANGUAGE sql STABLE
SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres' SET bytea_output = 'hex'
SET extra_float_digits = '1'
AS $$ SELECT pg_catalog.to_jsonb($1) $$;

-- The SQL expression of the canonical key (row_version.pk) of the row p_alias of a table:
-- pg_catalog.jsonb_build_array(<pk columns in key order>)::text, where a column of a type whose JSON does
-- not depend on session settings goes in as it is and any other through steep_repl._canon() (one SET
-- function call, for such keys only). NULL: no primary key. Every place that names a row by its key
-- (the generated triggers, reinit, verify, resolutions) builds it here.
CREATE OR REPLACE FUNCTION steep_repl._cols_expr(p_table pg_catalog.regclass, p_cols INT2[], p_alias TEXT) RETURNS TEXT
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT 'pg_catalog.jsonb_build_array(' || pg_catalog.string_agg(
               CASE WHEN b.typtype = 'e' OR b.oid IN (
                        'pg_catalog.bool'::pg_catalog.regtype, 'pg_catalog.int2'::pg_catalog.regtype,
                        'pg_catalog.int4'::pg_catalog.regtype, 'pg_catalog.int8'::pg_catalog.regtype,
                        'pg_catalog.numeric'::pg_catalog.regtype, 'pg_catalog.text'::pg_catalog.regtype,
                        'pg_catalog.varchar'::pg_catalog.regtype, 'pg_catalog.bpchar'::pg_catalog.regtype,
                        'pg_catalog.char'::pg_catalog.regtype, 'pg_catalog.name'::pg_catalog.regtype,
                        'pg_catalog.uuid'::pg_catalog.regtype, 'pg_catalog.date'::pg_catalog.regtype,
                        'pg_catalog.timestamp'::pg_catalog.regtype, 'pg_catalog.time'::pg_catalog.regtype,
                        'pg_catalog.timetz'::pg_catalog.regtype, 'pg_catalog.oid'::pg_catalog.regtype)
                    THEN p_alias || '.' || pg_catalog.quote_ident(a.attname)
                    ELSE 'steep_repl._canon(' || p_alias || '.' || pg_catalog.quote_ident(a.attname) || ')' END,
               ', ' ORDER BY k.ord) || ')::text'
    FROM pg_catalog.unnest(p_cols) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = p_table AND a.attnum = k.attnum
    JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
    JOIN pg_catalog.pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
$$;

CREATE OR REPLACE FUNCTION steep_repl._key_expr(p_table pg_catalog.regclass, p_alias TEXT) RETURNS TEXT
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT steep_repl._cols_expr(p_table, con.conkey, p_alias)
    FROM pg_catalog.pg_constraint con
    WHERE con.conrelid = p_table AND con.contype = 'p'
$$;

-- The table's other unique keys that steep decides: unique constraints and indexes on plain columns,
-- not the primary key (expression and partial indexes are not, and generated columns are computed after
-- BEFORE triggers; the replication module warns about those). Key columns in index order.
CREATE OR REPLACE FUNCTION steep_repl._unique_keys(p_table pg_catalog.regclass)
RETURNS TABLE (index_oid pg_catalog.oid, index_name TEXT, nulls_not_distinct BOOLEAN, cols INT2[])
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT i.indexrelid, c.relname::TEXT, i.indnullsnotdistinct, (i.indkey::INT2[])[0:i.indnkeyatts - 1]
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
     WHERE i.indrelid = p_table AND i.indisunique AND NOT i.indisprimary AND i.indexprs IS NULL AND i.indpred IS NULL
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute g
                        WHERE g.attrelid = p_table AND g.attnum = ANY(i.indkey::INT2[]) AND g.attgenerated <> '')
$$;

-- The statements that take, for row p_alias, a transaction lock on each value of the table's other unique
-- keys (those steep decides; NULL values take none unless the index says NULLS NOT DISTINCT). Local writers
-- (capture) and apply workers (uniq_<h>) both take them, after the version: an apply worker's check for a
-- row holding the value then sees every local row that holds it committed, never one in flight that would
-- make its own write fail on the unique index. NULL: no such key.
CREATE OR REPLACE FUNCTION steep_repl._unique_lock_sql(p_table pg_catalog.regclass, p_alias TEXT) RETURNS TEXT
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT pg_catalog.string_agg(pg_catalog.format(
               E'\n    IF %s THEN PERFORM pg_catalog.pg_advisory_xact_lock(%s, pg_catalog.hashtext(%L || %s)); END IF;',
               CASE WHEN u.nulls_not_distinct THEN 'true' ELSE (
                   SELECT pg_catalog.string_agg(p_alias || '.' || pg_catalog.quote_ident(a.attname) || ' IS NOT NULL', ' AND ')
                     FROM pg_catalog.unnest(u.cols) AS k(attnum)
                     JOIN pg_catalog.pg_attribute a ON a.attrelid = p_table AND a.attnum = k.attnum) END,
               pg_catalog.hashtext('steep_repl unique'),
               u.index_name || E'\t',
               steep_repl._cols_expr(p_table, u.cols, p_alias)), '' ORDER BY u.index_oid)
      FROM steep_repl._unique_keys(p_table) u
$$;

-- The stamp of the templates enable_table() generates from (conflict_tables.generator).
CREATE OR REPLACE FUNCTION steep_repl._generator() RETURNS TEXT
LANGUAGE sql STABLE SET search_path = '' AS $$
    SELECT pg_catalog.md5(p.prosrc) FROM pg_catalog.pg_proc p
     WHERE p.oid = pg_catalog.to_regprocedure('steep_repl.enable_table(pg_catalog.regclass)')
$$;

CREATE OR REPLACE FUNCTION steep_repl.enable_table(p_table pg_catalog.regclass)
RETURNS VOID LANGUAGE plpgsql SET search_path = '' AS $gen$
DECLARE
    v_schema TEXT; v_name TEXT; v_kind "char"; v_tbl TEXT; v_h TEXT; v_q TEXT;
    v_pk TEXT[]; v_cols TEXT[];
    v_pk_new TEXT; v_pk_old TEXT; v_match TEXT; v_keyobj TEXT; v_set TEXT; v_collist TEXT; v_sel TEXT;
    v_setx TEXT; v_pklist TEXT; v_newmatch TEXT; v_oldmatch TEXT;
    v_rowop TEXT; v_capture TEXT; v_apply TEXT; v_uniq TEXT; v_uniqfn TEXT; v_nmatch TEXT; v_chk TEXT := ''; v_chkm TEXT := ''; v_plain TEXT := ''; v_uchg TEXT; v_ulock TEXT;
    v_guard TEXT := pg_catalog.current_setting('steep_repl.in_conflict_ddl', true);
BEGIN
    PERFORM pg_catalog.set_config('steep_repl.in_conflict_ddl', 'on', true);
    SELECT r.schema_name, r.table_name, r.kind INTO v_schema, v_name, v_kind FROM steep_repl._rel_name(p_table) r;
    IF v_kind IS DISTINCT FROM 'r' THEN
        RAISE EXCEPTION '% is not an ordinary table', p_table
            USING HINT = 'Fix: only ordinary tables can be replicated (partitioned tables, views and foreign tables cannot).',
                  ERRCODE = '42809';
    END IF;
    IF v_schema = 'steep_repl' THEN
        RAISE EXCEPTION 'table % belongs to steep_repl and cannot be enabled', p_table
            USING HINT = 'Fix: enable user tables only.', ERRCODE = '42809';
    END IF;
    v_tbl := v_schema || '.' || v_name;
    v_q := pg_catalog.quote_ident(v_schema) || '.' || pg_catalog.quote_ident(v_name);
    v_pk := steep_repl._pk_columns(p_table);
    IF v_pk IS NULL THEN
        RAISE EXCEPTION 'table % has no primary key; steep.repl needs one to identify rows and resolve conflicts', v_tbl
            USING HINT = pg_catalog.format('Fix: ALTER TABLE %s ADD PRIMARY KEY (<columns>); on every node, then re-run.', v_q),
                  ERRCODE = '55000';
    END IF;
    SELECT pg_catalog.array_agg(a.attname::TEXT ORDER BY a.attnum) INTO v_cols
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';

    v_h := steep_repl._conflict_fn_suffix(v_tbl);
    v_rowop := 'steep_repl.' || pg_catalog.quote_ident('rowop_' || v_h);
    v_capture := 'steep_repl.' || pg_catalog.quote_ident('capture_' || v_h);
    v_apply := 'steep_repl.' || pg_catalog.quote_ident('apply_' || v_h);
    v_uniqfn := 'steep_repl.' || pg_catalog.quote_ident('uniq_' || v_h);
    -- the table's other unique keys (steep_repl._unique_keys): the condition that finds a local row of
    -- another key holding one of the values of row steep_n_. NULL in a key column matches nothing unless
    -- the index says NULLS NOT DISTINCT.
    SELECT pg_catalog.string_agg('(' || (
               SELECT pg_catalog.string_agg('steep_t_.' || pg_catalog.quote_ident(a.attname)
                          || CASE WHEN u.nulls_not_distinct THEN ' IS NOT DISTINCT FROM ' ELSE ' = ' END
                          || 'steep_n_.' || pg_catalog.quote_ident(a.attname), ' AND ' ORDER BY k.o)
                 FROM pg_catalog.unnest(u.cols) WITH ORDINALITY AS k(attnum, o)
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = p_table AND a.attnum = k.attnum) || ')',
               ' OR ' ORDER BY u.index_oid)
      INTO v_uniq
      FROM steep_repl._unique_keys(p_table) u;
    -- an UPDATE that keeps every unique value of its row takes no value another row can hold (the index
    -- says so): it is not checked
    SELECT 'ROW(' || pg_catalog.string_agg('NEW.' || pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum)
           || ') IS DISTINCT FROM ROW(' || pg_catalog.string_agg('OLD.' || pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum)
           || ')'
      INTO v_uchg
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = p_table AND a.attnum IN (SELECT k.attnum FROM steep_repl._unique_keys(p_table) u,
                                                        pg_catalog.unnest(u.cols) AS k(attnum));
    v_ulock := steep_repl._unique_lock_sql(p_table, 'NEW');

    v_pk_new := steep_repl._key_expr(p_table, 'NEW');
    v_pk_old := steep_repl._key_expr(p_table, 'OLD');
    SELECT pg_catalog.string_agg('steep_t_.' || pg_catalog.quote_ident(c) || ' = steep_k_.' || pg_catalog.quote_ident(c), ' AND '),
           pg_catalog.string_agg('steep_t_.' || pg_catalog.quote_ident(c) || ' = NEW.' || pg_catalog.quote_ident(c), ' AND '),
           pg_catalog.string_agg('steep_t_.' || pg_catalog.quote_ident(c) || ' = OLD.' || pg_catalog.quote_ident(c), ' AND '),
           pg_catalog.string_agg('steep_t_.' || pg_catalog.quote_ident(c) || ' = steep_n_.' || pg_catalog.quote_ident(c), ' AND '),
           'pg_catalog.jsonb_build_object(' || pg_catalog.string_agg(pg_catalog.quote_literal(c) || ', steep_j_->' || (o - 1), ', ') || ')'
      INTO v_match, v_newmatch, v_oldmatch, v_nmatch, v_keyobj
    FROM pg_catalog.unnest(v_pk) WITH ORDINALITY AS u(c, o);
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(c) || ' = steep_x_.' || pg_catalog.quote_ident(c), ', '),
           pg_catalog.string_agg(pg_catalog.quote_ident(c), ', '),
           pg_catalog.string_agg('steep_x_.' || pg_catalog.quote_ident(c), ', '),
           pg_catalog.string_agg(pg_catalog.quote_ident(c) || ' = EXCLUDED.' || pg_catalog.quote_ident(c), ', ')
      INTO v_set, v_collist, v_sel, v_setx
    FROM pg_catalog.unnest(v_cols) AS u(c);
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(c), ', ') INTO v_pklist FROM pg_catalog.unnest(v_pk) AS u(c);

    -- rowop: lock/read, insert, update, delete one row of the table by canonical key / image
    EXECUTE pg_catalog.format($f$
CREATE OR REPLACE FUNCTION %1$s(p_action TEXT, p_pk TEXT, p_img JSONB) RETURNS JSONB
LANGUAGE plpgsql SECURITY DEFINER AS $body$
#variable_conflict use_column
DECLARE
    steep_j_ JSONB := p_pk::JSONB;
    steep_k_ %2$s := pg_catalog.jsonb_populate_record(NULL::%2$s, %3$s);
    steep_r_ JSONB;
BEGIN
    IF p_action = 'lock' THEN
        SELECT pg_catalog.to_jsonb(steep_t_.*) INTO steep_r_ FROM ONLY %2$s AS steep_t_ WHERE %4$s FOR UPDATE;
        RETURN steep_r_;
    ELSIF p_action = 'get' THEN
        SELECT pg_catalog.to_jsonb(steep_t_.*) INTO steep_r_ FROM ONLY %2$s AS steep_t_ WHERE %4$s;
        RETURN steep_r_;
    ELSIF p_action = 'ins' THEN
        INSERT INTO %2$s (%5$s) SELECT %6$s FROM pg_catalog.jsonb_populate_record(NULL::%2$s, p_img) AS steep_x_;
    ELSIF p_action = 'upd' THEN
        UPDATE ONLY %2$s AS steep_t_ SET %7$s FROM pg_catalog.jsonb_populate_record(NULL::%2$s, p_img) AS steep_x_ WHERE %4$s;
    ELSIF p_action = 'swap' THEN
        SELECT pg_catalog.to_jsonb(steep_t_.*) INTO steep_r_ FROM ONLY %2$s AS steep_t_ WHERE %4$s FOR UPDATE;
        IF steep_r_ IS NULL THEN
            INSERT INTO %2$s AS steep_t_ (%5$s) SELECT %6$s FROM pg_catalog.jsonb_populate_record(NULL::%2$s, p_img) AS steep_x_
            ON CONFLICT (%8$s) DO UPDATE SET %9$s;
        ELSE
            UPDATE ONLY %2$s AS steep_t_ SET %7$s FROM pg_catalog.jsonb_populate_record(NULL::%2$s, p_img) AS steep_x_ WHERE %4$s;
        END IF;
        RETURN steep_r_;
    ELSIF p_action = 'take' THEN
        DELETE FROM ONLY %2$s AS steep_t_ WHERE %4$s RETURNING pg_catalog.to_jsonb(steep_t_.*) INTO steep_r_;
        RETURN steep_r_;
    ELSIF p_action = 'put' THEN
        INSERT INTO %2$s AS steep_t_ (%5$s) SELECT %6$s FROM pg_catalog.jsonb_populate_record(NULL::%2$s, p_img) AS steep_x_
        ON CONFLICT (%8$s) DO UPDATE SET %9$s;
    ELSIF p_action = 'del' THEN
        DELETE FROM ONLY %2$s AS steep_t_ WHERE %4$s;
    ELSE
        RAISE EXCEPTION 'steep_repl: unknown row operation %%', p_action;
    END IF;
    RETURN NULL;
END $body$ $f$, v_rowop, v_q, v_keyobj, v_match, v_collist, v_sel, v_set, v_pklist, v_setx);

    -- capture: origin side, ordinary sessions only. BEFORE ROW, so the version is WAL-logged
    -- before the row and every apply worker locks version then row (no deadlock between them).
    EXECUTE pg_catalog.format($f$
CREATE OR REPLACE FUNCTION %1$s() RETURNS TRIGGER
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $body$
#variable_conflict use_column
DECLARE steep_k_ TEXT; steep_ok_ TEXT;
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM steep_repl._capture(%2$L, %4$s, true, NULL);
        RETURN OLD;
    END IF;
    steep_k_ := %3$s;
    IF TG_OP = 'INSERT' THEN
        -- no version when the key is live (checked under the version's lock): the INSERT fails or
        -- turns into ON CONFLICT DO UPDATE (captured then) / DO NOTHING
        PERFORM steep_repl._capture(%2$L, steep_k_, false, pg_catalog.to_jsonb(NEW), true);%7$s
        RETURN NEW;
    END IF;
    steep_ok_ := %4$s;
    IF steep_ok_ <> steep_k_ THEN
        PERFORM steep_repl._capture(%2$L, steep_ok_, true, NULL);
    END IF;
    PERFORM steep_repl._capture(%2$L, steep_k_, false, pg_catalog.to_jsonb(NEW));%8$s
    RETURN NEW;
END $body$ $f$, v_capture, v_tbl, v_pk_new, v_pk_old, v_q, v_newmatch, coalesce(v_ulock, ''),
               -- an UPDATE that keeps its key and its unique values holds them already: no lock
               coalesce(E'\n    IF steep_ok_ <> steep_k_ OR ' || v_uchg || ' THEN' || pg_catalog.replace(v_ulock, E'\n', E'\n    ')
                        || E'\n    END IF;', ''));

    -- uniq: other unique keys (anyelement: a parameter of the table's row type would make DROP TABLE
    -- depend on this function). Before an apply worker writes a row, each local row of another key that
    -- holds one of its unique values is decided against it (steep_repl._unique_decide): false when the
    -- incoming row loses (it is not written). The apply trigger calls it before every row it lets through.
    IF v_uniq IS NOT NULL THEN
        EXECUTE pg_catalog.format($f$
CREATE OR REPLACE FUNCTION %1$s(steep_n_ anyelement) RETURNS BOOLEAN
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $body$
DECLARE steep_o_ TEXT; steep_k_ TEXT := %4$s;
BEGIN%8$s
    FOR steep_o_ IN SELECT %5$s FROM ONLY %2$s AS steep_t_ WHERE (%6$s) AND NOT (%7$s) LOOP
        IF NOT steep_repl._unique_decide(%3$L, steep_k_, pg_catalog.to_jsonb(steep_n_), steep_o_) THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END $body$ $f$, v_uniqfn, v_q, v_tbl, steep_repl._key_expr(p_table, 'steep_n_'), steep_repl._key_expr(p_table, 'steep_t_'),
               v_uniq, v_nmatch, steep_repl._unique_lock_sql(p_table, 'steep_n_'));
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s(anyelement) FROM PUBLIC', v_uniqfn);
        -- the incoming row lost: an UPDATE's old row goes too (the key's version is a tombstone now)
        v_chk := pg_catalog.format(E'\n    IF (TG_OP <> ''UPDATE'' OR %s) AND NOT %s(NEW) THEN\n        IF TG_OP = ''UPDATE'' THEN DELETE FROM ONLY %s AS steep_t_ WHERE %s; END IF;\n        RETURN NULL;\n    END IF;',
                                   v_uchg, v_uniqfn, v_q, v_oldmatch);
        v_chkm := E'\n    IF pg_catalog.pg_replication_origin_session_is_setup() AND TG_OP <> ''DELETE'' THEN' || v_chk || E'\n    END IF;';
        -- fired by steep_repl_a_unique_*: with nothing pending in the context the change applies as it is, checked
        v_plain := E'\n    IF steep_c_ = '''' THEN\n        IF TG_OP = ''DELETE'' THEN RETURN OLD; END IF;' || v_chk
                   || E'\n        RETURN NEW;\n    END IF;';
    ELSE
        EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %s(anyelement)', v_uniqfn);
    END IF;

    -- apply: fires only while the transaction's apply context lists keys (WHEN clause): the user-row
    -- change of a key decided "s" by its version is skipped (decided, materialised or a duplicate);
    -- any other change applies as it arrives, an INSERT of an existing key becoming an update (a row
    -- without a version, or a change that no version accompanied: never an insert_exists error loop).
    EXECUTE pg_catalog.format($f$
CREATE OR REPLACE FUNCTION %1$s() RETURNS TRIGGER
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $body$
#variable_conflict use_column
DECLARE steep_c_ TEXT; steep_k_ TEXT; steep_ok_ TEXT; steep_s_ BOOLEAN; steep_os_ BOOLEAN; steep_i_ TEXT;
BEGIN
    IF pg_catalog.pg_trigger_depth() > 1 OR NOT pg_catalog.pg_replication_origin_session_is_setup() THEN
        -- our own materialisation (nested) or a replica-role write that is no apply worker
        IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;%10$s
        RETURN NEW;
    END IF;
    steep_c_ := coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '');%11$s
    IF TG_OP <> 'INSERT' THEN
        steep_ok_ := %2$L || E'\t' || %4$s;
        IF pg_catalog.strpos(steep_c_, E'\nm' || steep_ok_ || E'\n') > 0 THEN
            steep_i_ := pg_catalog.current_setting('steep_repl.apply_img', true);
            IF TG_OP = 'UPDATE' AND steep_c_ = E'\nm' || steep_ok_ || E'\n' AND steep_ok_ = %2$L || E'\t' || %3$s
               AND pg_catalog.left(steep_i_, pg_catalog.length(steep_ok_) + 1) = steep_ok_ || E'\n' THEN
                -- a remote update that won a conflict (the only entry): this change carries R's image
                steep_c_ := pg_catalog.set_config('steep_repl.apply_ctx', '', true);
                NEW := pg_catalog.jsonb_populate_record(NEW, pg_catalog.substr(steep_i_, pg_catalog.length(steep_ok_) + 2)::JSONB);%9$s
                RETURN NEW;
            END IF;
            -- anything else: the image is materialised now (from the version) and this change is skipped
            PERFORM steep_repl._ctx_set(steep_ok_, 's');
            steep_c_ := coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '');
        END IF;
        steep_os_ := pg_catalog.strpos(steep_c_, E'\ns' || steep_ok_ || E'\n') > 0;
        IF TG_OP = 'DELETE' THEN
            IF steep_os_ THEN
                PERFORM steep_repl._ctx_set(steep_ok_, NULL);
                RETURN NULL;
            END IF;
            RETURN OLD;
        END IF;
    END IF;
    steep_k_ := %2$L || E'\t' || %3$s;
    IF pg_catalog.strpos(steep_c_, E'\nm' || steep_k_ || E'\n') > 0 THEN
        PERFORM steep_repl._ctx_set(steep_k_, 's');          -- materialised now, this change is skipped
        steep_c_ := coalesce(pg_catalog.current_setting('steep_repl.apply_ctx', true), '');
    END IF;
    steep_s_ := pg_catalog.strpos(steep_c_, E'\ns' || steep_k_ || E'\n') > 0;
    IF steep_c_ = E'\ns' || steep_k_ || E'\n' OR steep_c_ = E'\ng' || steep_k_ || E'\n' THEN
        steep_c_ := pg_catalog.set_config('steep_repl.apply_ctx', '', true);     -- the only entry: consumed
    ELSIF steep_s_ OR pg_catalog.strpos(steep_c_, E'\ng' || steep_k_ || E'\n') > 0 THEN
        PERFORM steep_repl._ctx_set(steep_k_, NULL);
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF steep_ok_ = steep_k_ THEN
            IF steep_s_ THEN RETURN NULL; END IF;%9$s
            RETURN NEW;
        END IF;
        -- a primary-key change: the old key's tombstone and the new key's version were decided apart
        IF steep_os_ THEN
            PERFORM steep_repl._ctx_set(steep_ok_, NULL);
        END IF;
        IF steep_s_ THEN                        -- the new key keeps its local row
            IF NOT steep_os_ THEN               -- the old key's tombstone applies
                DELETE FROM ONLY %5$s AS steep_t_ WHERE %7$s;
            END IF;
            RETURN NULL;
        END IF;
        IF steep_os_ OR EXISTS (SELECT 1 FROM ONLY %5$s AS steep_t_ WHERE %6$s) THEN
            IF NOT steep_os_ THEN
                DELETE FROM ONLY %5$s AS steep_t_ WHERE %7$s;
            END IF;
            PERFORM %8$s('put', %3$s, pg_catalog.to_jsonb(NEW));
            RETURN NULL;
        END IF;%9$s
        RETURN NEW;
    END IF;
    IF steep_s_ THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM ONLY %5$s AS steep_t_ WHERE %6$s) THEN
        PERFORM %8$s('upd', %3$s, pg_catalog.to_jsonb(NEW));
        RETURN NULL;
    END IF;%9$s
    RETURN NEW;
END $body$ $f$, v_apply, v_tbl, v_pk_new, v_pk_old, v_q, v_newmatch, v_oldmatch, v_rowop, v_chk, v_chkm, v_plain);

    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s(TEXT, TEXT, JSONB) FROM PUBLIC', v_rowop);
    EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER steep_repl_capture BEFORE INSERT OR UPDATE OR DELETE ON %s '
                              'FOR EACH ROW EXECUTE FUNCTION %s()', v_q, v_capture);
    EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER steep_repl_apply BEFORE INSERT OR UPDATE OR DELETE ON %s '
                              'FOR EACH ROW WHEN (pg_catalog.current_setting(''steep_repl.apply_ctx'', true) <> '''') '
                              'EXECUTE FUNCTION %s()', v_q, v_apply);
    EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE REPLICA TRIGGER steep_repl_apply', v_q);
    -- with other unique keys, the changes that come with no context are checked too: every INSERT, and an
    -- UPDATE that changes a unique value (an UPDATE that keeps them, and a DELETE, fire nothing). Same
    -- function. These fire before steep_repl_apply (BEFORE triggers fire in name order) and never set the
    -- context, so at most one of the three fires for a change.
    IF v_uniq IS NOT NULL THEN
        EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER steep_repl_a_unique_ins BEFORE INSERT ON %s FOR EACH ROW '
                                  'WHEN (coalesce(pg_catalog.current_setting(''steep_repl.apply_ctx'', true), '''') = '''') '
                                  'EXECUTE FUNCTION %s()', v_q, v_apply);
        EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER steep_repl_a_unique_upd BEFORE UPDATE ON %s FOR EACH ROW '
                                  'WHEN (coalesce(pg_catalog.current_setting(''steep_repl.apply_ctx'', true), '''') = '''' AND %s) '
                                  'EXECUTE FUNCTION %s()', v_q, v_uchg, v_apply);
        EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE REPLICA TRIGGER steep_repl_a_unique_ins', v_q);
        EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE REPLICA TRIGGER steep_repl_a_unique_upd', v_q);
    ELSE
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS steep_repl_a_unique_ins ON %s', v_q);
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS steep_repl_a_unique_upd ON %s', v_q);
    END IF;
    -- TRUNCATE (local or applied from a peer) forgets the table's versions on that node, so the rows
    -- inserted afterwards get first versions again (never an unversioned change that could stop a
    -- subscription on insert_exists)
    EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER steep_repl_truncate AFTER TRUNCATE ON %s '
                              'FOR EACH STATEMENT EXECUTE FUNCTION steep_repl._truncate_versions()', v_q);
    EXECUTE pg_catalog.format('ALTER TABLE %s ENABLE ALWAYS TRIGGER steep_repl_truncate', v_q);
    -- a new primary key (ALTER TABLE ... DROP CONSTRAINT, ADD PRIMARY KEY): the versions are keyed by the
    -- old one, so none of them describes a key of the new one (a stale live version of a key the table
    -- lacks would make a local INSERT of it write no version: insert_exists between nodes). They go; the
    -- rows get versions again as they are written, like the rows of a table enabled with data in it
    IF EXISTS (SELECT 1 FROM steep_repl.conflict_tables ct WHERE ct.tbl = v_tbl AND ct.pk_columns IS DISTINCT FROM v_pk) THEN
        DELETE FROM steep_repl.row_version WHERE tbl = v_tbl;
    END IF;
    INSERT INTO steep_repl.conflict_tables (tbl, table_schema, table_name, pk_columns, rowop, generator)
    VALUES (v_tbl, v_schema, v_name, v_pk, v_rowop, steep_repl._generator())
    ON CONFLICT (tbl) DO UPDATE SET pk_columns = EXCLUDED.pk_columns, rowop = EXCLUDED.rowop,
                                    generator = EXCLUDED.generator;
    PERFORM steep_repl._rowop_regenerate();
    PERFORM pg_catalog.set_config('steep_repl.in_conflict_ddl', coalesce(v_guard, ''), true);
END $gen$;

CREATE OR REPLACE FUNCTION steep_repl.disable_table(p_table pg_catalog.regclass)
RETURNS VOID LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE v_schema TEXT; v_name TEXT; v_q TEXT;
BEGIN
    SELECT r.schema_name, r.table_name INTO v_schema, v_name FROM steep_repl._rel_name(p_table) r;
    v_q := pg_catalog.quote_ident(v_schema) || '.' || pg_catalog.quote_ident(v_name);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS steep_repl_capture ON %s', v_q);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS steep_repl_apply ON %s', v_q);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS steep_repl_a_unique_ins ON %s', v_q);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS steep_repl_a_unique_upd ON %s', v_q);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS steep_repl_truncate ON %s', v_q);
    PERFORM steep_repl._forget_table(v_schema, v_name);
END $$;

-- Everything steep keeps for a table on this node, gone: its generated functions, its conflict_tables row
-- and its versions (disable_table, and a DROP of the table; conflict_log keeps its history).
CREATE OR REPLACE FUNCTION steep_repl._forget_table(p_schema TEXT, p_name TEXT) RETURNS VOID
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE v_tbl TEXT := p_schema || '.' || p_name; v_h TEXT; v_fn pg_catalog.regprocedure;
BEGIN
    v_h := steep_repl._conflict_fn_suffix(v_tbl);
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS steep_repl.%I()', 'capture_' || v_h);
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS steep_repl.%I()', 'apply_' || v_h);
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS steep_repl.%I(TEXT, TEXT, JSONB)', 'rowop_' || v_h);
    FOR v_fn IN SELECT p.oid::pg_catalog.regprocedure FROM pg_catalog.pg_proc p
                 WHERE p.pronamespace = 'steep_repl'::pg_catalog.regnamespace AND p.proname = 'uniq_' || v_h LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION %s', v_fn);
    END LOOP;
    DELETE FROM steep_repl.conflict_tables WHERE tbl = v_tbl;
    DELETE FROM steep_repl.row_version WHERE tbl = v_tbl;
    PERFORM steep_repl._rowop_regenerate();
END $$;
REVOKE ALL ON FUNCTION steep_repl._forget_table(TEXT, TEXT) FROM PUBLIC;

-- A replicated table dropped on this node forgets its versions with it. Left behind, a version of a key
-- the table (created again under the same name) no longer has would make a local INSERT of that key
-- write no version, and two nodes inserting it would stop each other's subscription (insert_exists).
CREATE OR REPLACE FUNCTION steep_repl._conflict_drop() RETURNS EVENT_TRIGGER
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE r RECORD;
BEGIN
    IF pg_catalog.to_regclass('steep_repl.conflict_tables') IS NULL THEN
        RETURN;                                 -- DROP EXTENSION steep_repl
    END IF;
    FOR r IN SELECT DISTINCT ct.table_schema, ct.table_name
               FROM pg_catalog.pg_event_trigger_dropped_objects() d
               JOIN steep_repl.conflict_tables ct ON ct.table_schema = d.schema_name AND ct.table_name = d.object_name
              WHERE d.object_type = 'table' LOOP
        PERFORM steep_repl._forget_table(r.table_schema, r.table_name);
    END LOOP;
    -- DROP INDEX of a unique index: the tables of that schema that check other unique keys get their
    -- functions again (a check of a unique key that is gone would remove rows that violate nothing)
    IF TG_TAG = 'DROP INDEX' THEN
        FOR r IN SELECT DISTINCT c.oid FROM pg_catalog.pg_event_trigger_dropped_objects() d
                   JOIN steep_repl.conflict_tables ct ON ct.table_schema = d.schema_name
                   JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(
                        pg_catalog.quote_ident(ct.table_schema) || '.' || pg_catalog.quote_ident(ct.table_name))
                  WHERE d.object_type = 'index'
                    AND pg_catalog.to_regproc('steep_repl.' || pg_catalog.quote_ident('uniq_' || steep_repl._conflict_fn_suffix(ct.tbl))) IS NOT NULL LOOP
            PERFORM steep_repl.enable_table(r.oid::pg_catalog.regclass);
        END LOOP;
    END IF;
END $$;

-- Re-generate the functions after ALTER TABLE (columns added, dropped, renamed).
CREATE OR REPLACE FUNCTION steep_repl._conflict_ddl() RETURNS EVENT_TRIGGER
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE r RECORD;
BEGIN
    IF coalesce(pg_catalog.current_setting('steep_repl.in_conflict_ddl', true), '') = 'on' THEN
        RETURN;                                 -- our own ALTER TABLE ... ENABLE REPLICA TRIGGER
    END IF;
    PERFORM pg_catalog.set_config('steep_repl.in_conflict_ddl', 'on', true);
    -- ALTER TABLE (columns, keys, constraints) and CREATE UNIQUE INDEX (another unique key to check)
    FOR r IN SELECT DISTINCT c.oid AS objid FROM pg_catalog.pg_event_trigger_ddl_commands() d
             LEFT JOIN pg_catalog.pg_index i ON d.command_tag = 'CREATE INDEX' AND i.indexrelid = d.objid
             JOIN pg_catalog.pg_class c ON c.oid = CASE WHEN d.command_tag = 'CREATE INDEX' THEN i.indrelid ELSE d.objid END
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             JOIN steep_repl.conflict_tables ct ON ct.table_schema = n.nspname AND ct.table_name = c.relname
             WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objsubid = 0
               AND (d.command_tag = 'ALTER TABLE' OR (d.command_tag = 'CREATE INDEX' AND i.indisunique)) LOOP
        PERFORM steep_repl.enable_table(r.objid::pg_catalog.regclass);
    END LOOP;
    PERFORM pg_catalog.set_config('steep_repl.in_conflict_ddl', '', true);
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'steep_repl_conflict_ddl'
                   AND evttags @> ARRAY['ALTER TABLE', 'CREATE INDEX']) THEN
        DROP EVENT TRIGGER IF EXISTS steep_repl_conflict_ddl;      -- an earlier build: ALTER TABLE only
        CREATE EVENT TRIGGER steep_repl_conflict_ddl ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE INDEX')
            EXECUTE FUNCTION steep_repl._conflict_ddl();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'steep_repl_conflict_drop') THEN
        CREATE EVENT TRIGGER steep_repl_conflict_drop ON sql_drop
            EXECUTE FUNCTION steep_repl._conflict_drop();
    END IF;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Tombstones (docs/conflicts.md, "Tombstones"): settled ones are purged by steep.repl.tombstones
-- ---------------------------------------------------------------------------------------------
-- A settled tombstone: at or below its origin's horizon (a derived one: recorded in derived_settled), of a
-- table whose strategy is an order. Under keep_local, apply_remote and manual, nodes may keep different
-- versions of a key on purpose, so a tombstone there is never settled (a later version of another node must
-- still meet it).
CREATE OR REPLACE FUNCTION steep_repl._settled(v steep_repl.row_version) RETURNS BOOLEAN
LANGUAGE sql STABLE AS $$
    SELECT v.deleted AND EXISTS (
        SELECT 1 FROM steep_repl.conflict_tables ct, steep_repl.table_strategy(ct.table_schema, ct.table_name) s
         WHERE ct.tbl = v.tbl AND s.strategy IN ('last_write_wins', 'first_write_wins', 'node_priority')
           AND (EXISTS (SELECT 1 FROM steep_repl.tombstone_horizon h
                         WHERE h.node_id = v.ver_node AND v.ver_ts <= h.horizon)
                OR (v.ver_node = 'steep_repl'
                    AND EXISTS (SELECT 1 FROM steep_repl.derived_settled d
                                 WHERE d.tbl = v.tbl AND d.pk = v.pk AND d.ver_ts = v.ver_ts))))
$$;

-- Record derived tombstones as settled: p_keys is [[tbl, pk, ver_ts epoch seconds], ...], the derived
-- tombstones (not queued for sending) that every node held before the purge's rounds. Only an entry that
-- is this node's current version of the key, exactly, is recorded. Returns how many were recorded.
-- Called by steep.repl.tombstones on every node after its rounds, before any node purges.
CREATE OR REPLACE FUNCTION steep_repl.settle_derived_tombstones(p_keys JSONB) RETURNS INTEGER
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_n INTEGER;
BEGIN
    IF p_keys IS NULL OR pg_catalog.jsonb_typeof(p_keys) <> 'array'
       OR EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements(p_keys) e
                   WHERE pg_catalog.jsonb_typeof(e) <> 'array' OR pg_catalog.jsonb_array_length(e) <> 3
                      OR pg_catalog.jsonb_typeof(e -> 0) <> 'string' OR pg_catalog.jsonb_typeof(e -> 1) <> 'string'
                      OR pg_catalog.jsonb_typeof(e -> 2) <> 'number') THEN
        RAISE EXCEPTION 'derived tombstones must be a JSON array of [table, key, version time in epoch seconds], got %',
            pg_catalog.left(coalesce(p_keys::TEXT, 'NULL'), 200)
            USING HINT = 'Fix: run the steep.repl.tombstones module (playbooks/purge_tombstones.yml); it finds them.',
                  ERRCODE = '22023';
    END IF;
    -- records whose key has moved on to another version since (the purge takes a record with its tombstone)
    DELETE FROM steep_repl.derived_settled d
     WHERE NOT EXISTS (SELECT 1 FROM steep_repl.row_version v WHERE v.tbl = d.tbl AND v.pk = d.pk
                          AND v.ver_node = 'steep_repl' AND v.deleted AND v.ver_ts = d.ver_ts);
    WITH k AS (
        SELECT e ->> 0 AS tbl, e ->> 1 AS pk, (e ->> 2)::NUMERIC AS ts FROM pg_catalog.jsonb_array_elements(p_keys) e),
    rec AS (
        INSERT INTO steep_repl.derived_settled AS d (tbl, pk, ver_ts)
        SELECT v.tbl, v.pk, v.ver_ts FROM k JOIN steep_repl.row_version v ON v.tbl = k.tbl AND v.pk = k.pk
         WHERE v.ver_node = 'steep_repl' AND v.deleted AND EXTRACT(EPOCH FROM v.ver_ts) = k.ts
        ON CONFLICT (tbl, pk) DO UPDATE SET ver_ts = EXCLUDED.ver_ts, settled_at = pg_catalog.now()
         WHERE d.ver_ts IS DISTINCT FROM EXCLUDED.ver_ts
        RETURNING 1)
    SELECT count(*) INTO v_n FROM rec;
    IF v_n > 0 THEN
        PERFORM steep_repl.audit('tombstones.derived', 'node', steep_repl.local_node_id(), NULL,
                                 pg_catalog.jsonb_build_object('settled', v_n));
    END IF;
    RETURN v_n;
END $$;
REVOKE ALL ON FUNCTION steep_repl.settle_derived_tombstones(JSONB) FROM PUBLIC;

-- Record horizons {node_id: timestamptz}; a horizon only moves forward. Returns how many moved.
-- Called by steep.repl.tombstones on every node, only after it proved the horizons (see the table).
CREATE OR REPLACE FUNCTION steep_repl.set_tombstone_horizon(p_horizons JSONB) RETURNS INTEGER
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_bad TEXT;
    v_moved INTEGER;
BEGIN
    IF p_horizons IS NULL OR pg_catalog.jsonb_typeof(p_horizons) <> 'object' THEN
        RAISE EXCEPTION 'tombstone horizons must be a JSON object {node_id: timestamp}, got %', coalesce(p_horizons::TEXT, 'NULL')
            USING HINT = 'Fix: run the steep.repl.tombstones module (playbooks/purge_tombstones.yml); it computes them.',
                  ERRCODE = '22023';
    END IF;
    -- a node of steep_repl.nodes, or a departed one: it left tombstones here, and nothing here receives from it
    SELECT pg_catalog.string_agg(pg_catalog.quote_literal(e.key), ', ' ORDER BY e.key) INTO v_bad
      FROM pg_catalog.jsonb_each(p_horizons) e
     WHERE NOT EXISTS (SELECT 1 FROM steep_repl.nodes n WHERE n.node_id = e.key)
       AND (e.key = 'steep_repl'
            OR NOT EXISTS (SELECT 1 FROM steep_repl.row_version v WHERE v.ver_node = e.key AND v.deleted)
            OR EXISTS (SELECT 1 FROM pg_catalog.pg_subscription s
                        WHERE s.subname = 'steep_from_' || e.key
                          AND s.subdbid = (SELECT d.oid FROM pg_catalog.pg_database d
                                            WHERE d.datname = pg_catalog.current_database())));
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'tombstone horizons name nodes this node does not know: %', v_bad
            USING HINT = 'Fix: run the foundation play (playbooks/steep_foundation.yml) so every node knows the mesh, then re-run.',
                  ERRCODE = '22023';
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.format('%s: %s', e.key, e.value), ', ' ORDER BY e.key) INTO v_bad
      FROM pg_catalog.jsonb_each(p_horizons) e
     WHERE CASE WHEN pg_catalog.jsonb_typeof(e.value) <> 'string'
                      OR NOT pg_catalog.pg_input_is_valid(e.value #>> '{}', 'timestamptz') THEN true
                 ELSE NOT pg_catalog.isfinite((e.value #>> '{}')::TIMESTAMPTZ)
                      OR (e.value #>> '{}')::TIMESTAMPTZ > pg_catalog.clock_timestamp() + interval '1 minute' END;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'tombstone horizons must be finite timestamps, at most a minute ahead of this node''s clock: %', v_bad
            USING HINT = 'Fix: run the steep.repl.tombstones module (playbooks/purge_tombstones.yml); it computes them.',
                  ERRCODE = '22023';
    END IF;
    WITH moved AS (
        INSERT INTO steep_repl.tombstone_horizon AS h (node_id, horizon)
        SELECT e.key, (e.value #>> '{}')::TIMESTAMPTZ FROM pg_catalog.jsonb_each(p_horizons) e
        ON CONFLICT (node_id) DO UPDATE SET horizon = EXCLUDED.horizon, updated_at = pg_catalog.now()
         WHERE h.horizon < EXCLUDED.horizon
        RETURNING h.node_id, h.horizon)
    SELECT count(*) INTO v_moved FROM moved;
    IF v_moved > 0 THEN
        PERFORM steep_repl.audit('tombstones.horizon', 'node', steep_repl.local_node_id(), NULL, p_horizons);
    END IF;
    RETURN v_moved;
END $$;

-- Delete up to p_limit settled tombstones (skipping versions another transaction holds). Returns how many.
-- A tombstone's DELETE is not sent (the versions publication carries INSERTs only): every node purges its own.
CREATE OR REPLACE FUNCTION steep_repl.purge_tombstones(p_limit INTEGER DEFAULT 10000) RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_purged BIGINT;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'purge_tombstones: the batch size must be a positive number, got %', coalesce(p_limit::TEXT, 'NULL')
            USING HINT = 'Fix: pass a batch size of 1 or more (the default is 10000).', ERRCODE = '22023';
    END IF;
    WITH victims AS (
        SELECT v.tbl, v.pk FROM steep_repl.row_version v
         WHERE v.deleted AND steep_repl._settled(v)
         LIMIT p_limit FOR UPDATE OF v SKIP LOCKED),
    gone AS (
        DELETE FROM steep_repl.row_version v USING victims x
         WHERE v.tbl = x.tbl AND v.pk = x.pk AND v.deleted AND steep_repl._settled(v)
        RETURNING v.tbl, v.pk),
    unrecorded AS (                     -- a purged derived tombstone's record goes with it
        DELETE FROM steep_repl.derived_settled d USING gone g WHERE d.tbl = g.tbl AND d.pk = g.pk)
    SELECT count(*) INTO v_purged FROM gone;
    RETURN v_purged;
END $$;
REVOKE ALL ON FUNCTION steep_repl.set_tombstone_horizon(JSONB) FROM PUBLIC;
REVOKE ALL ON FUNCTION steep_repl.purge_tombstones(INTEGER) FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Resolution API (a resolution is a local write flagged forced: it reaches every node)
-- ---------------------------------------------------------------------------------------------
-- Write p_img (NULL = delete) for a key as a forced local write. Returns the row now in place.
CREATE OR REPLACE FUNCTION steep_repl._forced_write(p_tbl TEXT, p_pk TEXT, p_img JSONB)
RETURNS JSONB LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE t RECORD; v_cur JSONB; v_prev TEXT;
BEGIN
    SELECT * INTO t FROM steep_repl.conflict_tables ct WHERE ct.tbl = p_tbl;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % has no conflict triggers on this node', p_tbl
            USING HINT = 'Fix: add it to steep_replicated_tables and run playbooks/site.yml (or SELECT steep_repl.enable_table(...)).';
    END IF;
    IF pg_catalog.current_setting('session_replication_role') <> 'origin' THEN
        RAISE EXCEPTION 'session_replication_role is %: a resolution must run as an ordinary write',
            pg_catalog.current_setting('session_replication_role')
            USING HINT = 'Fix: SET session_replication_role = origin; and retry.';
    END IF;
    PERFORM steep_repl._check_image(p_tbl, p_pk, p_img);
    v_prev := pg_catalog.current_setting('steep_repl.forced', true);
    PERFORM pg_catalog.set_config('steep_repl.forced', 'on', true);
    EXECUTE pg_catalog.format('SELECT %s($1, $2, NULL)', t.rowop) INTO v_cur USING 'lock', p_pk;
    IF p_img IS NULL THEN
        IF v_cur IS NOT NULL THEN
            EXECUTE pg_catalog.format('SELECT %s($1, $2, NULL)', t.rowop) USING 'del', p_pk;
        ELSE                                    -- already absent here: still send a forced tombstone
            PERFORM steep_repl._capture(p_tbl, p_pk, true, NULL);
        END IF;
    ELSIF v_cur IS NULL THEN
        EXECUTE pg_catalog.format('SELECT %s($1, $2, $3)', t.rowop) USING 'ins', p_pk, p_img;
    ELSE
        EXECUTE pg_catalog.format('SELECT %s($1, $2, $3)', t.rowop) USING 'upd', p_pk, p_img;
    END IF;
    PERFORM pg_catalog.set_config('steep_repl.forced', coalesce(v_prev, ''), true);
    EXECUTE pg_catalog.format('SELECT %s($1, $2, NULL)', t.rowop) INTO v_cur USING 'get', p_pk;
    RETURN v_cur;
END $$;

-- What keeps a row image from being written into its table now, or NULL: a value its column's type
-- does not accept, a NULL (or missing) value of a NOT NULL column, and with p_strict a key that is no
-- column (a typo in a merged row would be dropped silently). The images of conflict_log were taken
-- when the conflict happened; an ALTER TABLE since can make them unfit. Arrays and objects are left
-- to the write itself (their JSON text is not their input syntax).
CREATE OR REPLACE FUNCTION steep_repl._image_problem(p_tbl TEXT, p_img JSONB, p_strict BOOLEAN DEFAULT false)
RETURNS TEXT LANGUAGE sql STABLE SET search_path = '' AS $$
    WITH cols AS (
        SELECT a.attname::TEXT AS col, pg_catalog.format_type(a.atttypid, a.atttypmod) AS typ,
               a.attnotnull AS notnull, a.attgenerated <> '' AS generated
          FROM steep_repl.conflict_tables ct
          JOIN pg_catalog.pg_attribute a
            ON a.attrelid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', ct.table_schema, ct.table_name))
         WHERE ct.tbl = p_tbl AND a.attnum > 0 AND NOT a.attisdropped),
    problems AS (
        SELECT 1 AS o, c.col, pg_catalog.format('column %I (%s): %s', c.col, c.typ,
                   (pg_catalog.pg_input_error_info(p_img ->> c.col, c.typ)).message) AS what
          FROM cols c
         WHERE NOT c.generated AND pg_catalog.jsonb_typeof(p_img -> c.col) IN ('string', 'number', 'boolean')
           AND NOT pg_catalog.pg_input_is_valid(p_img ->> c.col, c.typ)
        UNION ALL
        SELECT 2, c.col, pg_catalog.format('column %I (%s) is NOT NULL, the row has %s', c.col, c.typ,
                   CASE WHEN p_img ? c.col THEN 'null' ELSE 'no value' END)
          FROM cols c
         WHERE c.notnull AND NOT c.generated AND coalesce(pg_catalog.jsonb_typeof(p_img -> c.col), 'null') = 'null'
        UNION ALL
        SELECT 3, k, pg_catalog.format('%I is not a column of the table', k)
          FROM pg_catalog.jsonb_object_keys(p_img) AS k
         WHERE p_strict AND NOT EXISTS (SELECT 1 FROM cols c WHERE c.col = k))
    SELECT pg_catalog.string_agg(what, '; ' ORDER BY o, col) FROM problems
$$;

-- Refuse, naming the fix, a row image (not a tombstone) that cannot be written into its table now.
CREATE OR REPLACE FUNCTION steep_repl._check_image(p_tbl TEXT, p_pk TEXT, p_img JSONB, p_strict BOOLEAN DEFAULT false)
RETURNS VOID LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE v_bad TEXT := CASE WHEN p_img IS NOT NULL THEN steep_repl._image_problem(p_tbl, p_img, p_strict) END;
BEGIN
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'the row for % (key %) does not fit the table: %', p_tbl, p_pk, v_bad
            USING DETAIL = pg_catalog.format('row: %s', p_img),
                  HINT = 'Fix: the table changed since the conflict (ALTER TABLE), or the merged row has a wrong value: '
                         'write the row you want directly (it replicates), or give a merged row that fits; nothing was changed.',
                  ERRCODE = '22023';
    END IF;
END $$;

-- The canonical key of a row image of a table (PK columns in order).
CREATE OR REPLACE FUNCTION steep_repl._image_pk(p_tbl TEXT, p_img JSONB) RETURNS TEXT
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE t RECORD; v_pk TEXT;
BEGIN
    SELECT ct.table_schema, ct.table_name INTO t FROM steep_repl.conflict_tables ct WHERE ct.tbl = p_tbl;
    EXECUTE pg_catalog.format('SELECT %s FROM pg_catalog.jsonb_populate_record(NULL::%I.%I, $1) AS r',
        steep_repl._key_expr(pg_catalog.format('%I.%I', t.table_schema, t.table_name)::pg_catalog.regclass, 'r'),
        t.table_schema, t.table_name) INTO v_pk USING p_img;
    RETURN v_pk;
END $$;

CREATE OR REPLACE FUNCTION steep_repl.resolve_conflict(
    p_conflict_id BIGINT, p_resolution TEXT, p_merged JSONB DEFAULT NULL)
RETURNS TEXT LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    c steep_repl.conflict_log;
    v_tbl TEXT; v_cur JSONB; v_target JSONB; v_label TEXT; v_after JSONB; v_by TEXT := pg_catalog.session_user()::TEXT;
BEGIN
    IF p_resolution IS NULL OR p_resolution NOT IN ('local', 'remote', 'merge') THEN
        RAISE EXCEPTION 'unknown resolution %', coalesce(pg_catalog.quote_literal(p_resolution), 'NULL')
            USING HINT = 'Fix: use local, remote or merge (merge needs the merged row).', ERRCODE = '22023';
    END IF;
    SELECT * INTO c FROM steep_repl.conflict_log WHERE id = p_conflict_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'conflict % does not exist', p_conflict_id
            USING HINT = 'Fix: list pending conflicts with SELECT id, table_schema, table_name, pk FROM steep_repl.conflict_log WHERE resolution = ''PENDING'';',
                  ERRCODE = 'P0002';
    END IF;
    IF c.resolution IS DISTINCT FROM 'PENDING' THEN
        RAISE EXCEPTION 'conflict % is not pending (resolution %, resolved at % by %)', p_conflict_id,
            c.resolution, c.resolved_at, c.resolved_by
            USING HINT = 'Fix: only PENDING conflicts can be resolved; use steep_repl.revert_resolution() to undo a resolution.',
                  ERRCODE = '55000';
    END IF;
    IF p_resolution = 'merge' AND (p_merged IS NULL OR pg_catalog.jsonb_typeof(p_merged) <> 'object') THEN
        RAISE EXCEPTION 'merge needs the merged row as a JSON object (got %)', coalesce(p_merged::TEXT, 'NULL')
            USING HINT = 'Fix: pass p_merged, e.g. ''{"status": "shipped"}''::jsonb (columns not given keep their local value).',
                  ERRCODE = '22023';
    END IF;
    IF p_resolution <> 'merge' AND p_merged IS NOT NULL THEN
        RAISE EXCEPTION 'a merged row is only valid with resolution merge (got %)', p_resolution
            USING HINT = 'Fix: drop p_merged or use merge.', ERRCODE = '22023';
    END IF;
    v_tbl := c.table_schema || '.' || c.table_name;
    IF NOT EXISTS (SELECT 1 FROM steep_repl.conflict_tables ct WHERE ct.tbl = v_tbl) THEN
        RAISE EXCEPTION 'table % has no conflict triggers on this node', v_tbl
            USING HINT = 'Fix: add it to steep_replicated_tables and run playbooks/site.yml.', ERRCODE = '55000';
    END IF;
    EXECUTE pg_catalog.format('SELECT %s($1, $2, NULL)', (SELECT ct.rowop FROM steep_repl.conflict_tables ct WHERE ct.tbl = v_tbl))
        INTO v_cur USING 'get', c.pk;
    IF p_resolution = 'local' THEN
        v_target := v_cur; v_label := 'KEPT_LOCAL';
    ELSIF p_resolution = 'remote' THEN
        IF c.remote_tuple IS NULL AND NOT coalesce((c.remote_version ->> 'deleted')::BOOLEAN, false) THEN
            RAISE EXCEPTION 'conflict % has no remote row recorded', p_conflict_id
                USING HINT = 'Fix: resolve with merge and give the full row.', ERRCODE = '55000';
        END IF;
        v_target := c.remote_tuple; v_label := 'APPLIED_REMOTE';
    ELSE
        v_target := coalesce(v_cur, c.local_tuple, c.remote_tuple, '{}'::JSONB) || p_merged;
        PERFORM steep_repl._check_image(v_tbl, c.pk, v_target, true);     -- strict: a misspelt column is no column
        IF steep_repl._image_pk(v_tbl, v_target) IS DISTINCT FROM c.pk THEN
            RAISE EXCEPTION 'the merged row changes the primary key of conflict % (% -> %)', p_conflict_id,
                c.pk, steep_repl._image_pk(v_tbl, v_target)
                USING HINT = 'Fix: keep the primary key columns out of p_merged or give them their current values.',
                      ERRCODE = '22023';
        END IF;
        v_label := 'MERGED';
    END IF;
    v_after := steep_repl._forced_write(v_tbl, c.pk, v_target);
    UPDATE steep_repl.conflict_log
       SET resolution = v_label, resolved_at = pg_catalog.now(), resolved_by = v_by, resolved_tuple = v_after,
           note = 'manual: ' || p_resolution
     WHERE id = p_conflict_id;
    PERFORM steep_repl._settle_pending(c.table_schema, c.table_name, c.pk, v_label, v_by, v_after,
                                       'settled by the resolution of conflict ' || p_conflict_id);
    PERFORM steep_repl.audit('conflict.resolve', 'conflict', p_conflict_id::TEXT,
        pg_catalog.jsonb_build_object('resolution', 'PENDING', 'local_tuple', v_cur),
        pg_catalog.jsonb_build_object('resolution', v_label, 'row', v_after, 'choice', p_resolution));
    RETURN v_label;
END $$;

CREATE OR REPLACE FUNCTION steep_repl.resolve_conflicts_bulk(
    p_resolution TEXT,
    p_filter_xid BIGINT DEFAULT NULL,
    p_filter_table TEXT DEFAULT NULL,
    p_filter_time_start TIMESTAMPTZ DEFAULT NULL,
    p_filter_time_end TIMESTAMPTZ DEFAULT NULL)
RETURNS INTEGER LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE v_schema TEXT; v_name TEXT; v_id BIGINT; n INTEGER := 0;
BEGIN
    IF p_resolution IS NULL OR p_resolution NOT IN ('local', 'remote') THEN
        RAISE EXCEPTION 'bulk resolution must be local or remote (got %)', coalesce(pg_catalog.quote_literal(p_resolution), 'NULL')
            USING HINT = 'Fix: use local or remote; merge needs a row per conflict (steep_repl.resolve_conflict).',
                  ERRCODE = '22023';
    END IF;
    IF p_filter_time_start IS NOT NULL AND p_filter_time_end IS NOT NULL AND p_filter_time_end < p_filter_time_start THEN
        RAISE EXCEPTION 'the time window ends (%) before it starts (%)', p_filter_time_end, p_filter_time_start
            USING HINT = 'Fix: swap the bounds.', ERRCODE = '22023';
    END IF;
    IF p_filter_table IS NOT NULL THEN
        IF pg_catalog.strpos(p_filter_table, '.') > 0 THEN
            v_schema := pg_catalog.split_part(p_filter_table, '.', 1);
            v_name := pg_catalog.substr(p_filter_table, pg_catalog.length(v_schema) + 2);
        ELSE
            v_schema := 'public'; v_name := p_filter_table;
        END IF;
    END IF;
    FOR v_id IN SELECT c.id FROM steep_repl.conflict_log c
                WHERE c.resolution = 'PENDING'
                  AND (p_filter_xid IS NULL OR c.origin_xid = p_filter_xid)
                  AND (v_schema IS NULL OR (c.table_schema = v_schema AND c.table_name = v_name))
                  AND (p_filter_time_start IS NULL OR c.detected_at >= p_filter_time_start)
                  AND (p_filter_time_end IS NULL OR c.detected_at <= p_filter_time_end)
                ORDER BY c.id LOOP
        -- an earlier resolution of the same key may have settled this one already
        IF (SELECT c.resolution FROM steep_repl.conflict_log c WHERE c.id = v_id) = 'PENDING' THEN
            PERFORM steep_repl.resolve_conflict(v_id, p_resolution);
            n := n + 1;
        END IF;
    END LOOP;
    PERFORM steep_repl.audit('conflict.resolve_bulk', 'conflict', NULL, NULL,
        pg_catalog.jsonb_build_object('resolution', p_resolution, 'xid', p_filter_xid, 'table', p_filter_table,
                                      'time_start', p_filter_time_start, 'time_end', p_filter_time_end, 'resolved', n));
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION steep_repl.revert_resolution(
    p_conflict_id BIGINT, p_reason TEXT DEFAULT 'Manual revert')
RETURNS BIGINT LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    c steep_repl.conflict_log; v_tbl TEXT; v_cur JSONB; v_target JSONB; v_label TEXT; v_after JSONB; v_new BIGINT;
    v_was JSONB;
    v_by TEXT := pg_catalog.session_user()::TEXT;
BEGIN
    SELECT * INTO c FROM steep_repl.conflict_log WHERE id = p_conflict_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'conflict % does not exist', p_conflict_id
            USING HINT = 'Fix: SELECT id, resolution FROM steep_repl.conflict_log ORDER BY id DESC; to find it.',
                  ERRCODE = 'P0002';
    END IF;
    IF c.conflict_type = 'UNIQUE_VIOLATION' THEN
        RAISE EXCEPTION 'conflict % cannot be reverted: it is a UNIQUE_VIOLATION between two rows of %.% (key % and the row in local_tuple), which cannot both exist',
            p_conflict_id, c.table_schema, c.table_name, c.pk
            USING HINT = 'Fix: to keep the other row, change or delete the row that won on one node (nothing waits for it), then insert the other row again from local_tuple/remote_tuple.',
                  ERRCODE = '55000';
    END IF;
    IF c.resolution IS NULL OR c.resolution NOT IN ('APPLIED_REMOTE', 'KEPT_LOCAL', 'MERGED') THEN
        RAISE EXCEPTION 'conflict % cannot be reverted: its resolution is %', p_conflict_id, coalesce(c.resolution, 'NULL')
            USING HINT = CASE c.resolution
                WHEN 'PENDING' THEN 'Fix: resolve it with steep_repl.resolve_conflict().'
                WHEN 'REVERTED' THEN pg_catalog.format('Fix: it was already reverted; revert conflict %s to flip it back.', c.reverted_by)
                ELSE 'Fix: only APPLIED_REMOTE, KEPT_LOCAL and MERGED resolutions can be reverted.' END,
                  ERRCODE = '55000';
    END IF;
    v_tbl := c.table_schema || '.' || c.table_name;
    IF NOT EXISTS (SELECT 1 FROM steep_repl.conflict_tables ct WHERE ct.tbl = v_tbl) THEN
        RAISE EXCEPTION 'table % has no conflict triggers on this node', v_tbl
            USING HINT = 'Fix: add it to steep_replicated_tables and run playbooks/site.yml.', ERRCODE = '55000';
    END IF;
    PERFORM steep_repl._check_image(v_tbl, c.pk, c.resolved_tuple);
    PERFORM steep_repl._check_image(v_tbl, c.pk, CASE WHEN c.resolution = 'KEPT_LOCAL' THEN c.remote_tuple ELSE c.local_tuple END);
    -- the row now and the row the resolution left, compared as rows of the table: both images go through
    -- the column types in this session (a timestamptz written by a session in another TimeZone, or a
    -- bytea under another bytea_output, is the same value in a different text)
    EXECUTE pg_catalog.format('SELECT %s($1, $2, NULL), pg_catalog.to_jsonb(pg_catalog.jsonb_populate_record(NULL::%I.%I, $3))',
                              (SELECT ct.rowop FROM steep_repl.conflict_tables ct WHERE ct.tbl = v_tbl),
                              c.table_schema, c.table_name)
        INTO v_cur, v_was USING 'get', c.pk, c.resolved_tuple;
    IF v_cur IS DISTINCT FROM v_was THEN
        RAISE EXCEPTION 'the row of conflict % changed after the resolution; reverting would lose that change', p_conflict_id
            USING DETAIL = pg_catalog.format('now: %s; left by the resolution: %s', coalesce(v_cur::TEXT, 'absent'),
                                             coalesce(c.resolved_tuple::TEXT, 'absent')),
                  HINT = 'Fix: write the row you want directly (it replicates), nothing was changed.', ERRCODE = '55000';
    END IF;
    IF c.resolution = 'KEPT_LOCAL' THEN
        v_target := c.remote_tuple; v_label := 'APPLIED_REMOTE';
    ELSE
        v_target := c.local_tuple; v_label := 'KEPT_LOCAL';
    END IF;
    v_after := steep_repl._forced_write(v_tbl, c.pk, v_target);
    INSERT INTO steep_repl.conflict_log (subscription, table_schema, table_name, conflict_type, local_tuple,
        remote_tuple, local_origin, remote_origin, local_xact_ts, remote_xact_ts, origin_xid, resolution,
        resolved_at, resolved_by, pk, strategy, winner, local_version, remote_version, resolved_tuple, reverts, note)
    VALUES (c.subscription, c.table_schema, c.table_name, c.conflict_type, c.local_tuple, c.remote_tuple,
        c.local_origin, c.remote_origin, c.local_xact_ts, c.remote_xact_ts, c.origin_xid, v_label,
        pg_catalog.now(), v_by, c.pk, c.strategy, CASE WHEN v_label = 'KEPT_LOCAL' THEN 'local' ELSE 'remote' END,
        c.local_version, c.remote_version, v_after, p_conflict_id, 'revert: ' || coalesce(p_reason, ''))
    RETURNING id INTO v_new;
    UPDATE steep_repl.conflict_log SET resolution = 'REVERTED', reverted_by = v_new WHERE id = p_conflict_id;
    PERFORM steep_repl.audit('conflict.revert', 'conflict', p_conflict_id::TEXT,
        pg_catalog.jsonb_build_object('resolution', c.resolution, 'row', v_cur),
        pg_catalog.jsonb_build_object('resolution', v_label, 'row', v_after, 'new_conflict_id', v_new,
                                      'reason', p_reason));
    RETURN v_new;
END $$;

-- Retention of this node's conflict log: deletes at most p_limit decided entries detected more than
-- p_older_than ago (oldest first). PENDING entries stay, and so does an entry whose revert partner
-- (reverts / reverted_by) is PENDING or not old enough to go with it: a revert chain goes whole. One
-- audit_log row when something went. Returns how many went. conflict_log is local to each node.
CREATE OR REPLACE FUNCTION steep_repl.purge_conflict_log(p_older_than INTERVAL, p_limit INTEGER DEFAULT 10000)
RETURNS BIGINT LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_cut TIMESTAMPTZ;
    v_n BIGINT;
BEGIN
    IF p_older_than IS NULL OR p_older_than < INTERVAL '0' THEN
        RAISE EXCEPTION 'purge_conflict_log: the age must be an interval of 0 or more, got %', coalesce(p_older_than::TEXT, 'NULL')
            USING HINT = 'Fix: pass how long a decided conflict is kept, e.g. ''90 days''; nothing was deleted.', ERRCODE = '22023';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'purge_conflict_log: the batch size must be a positive number, got %', coalesce(p_limit::TEXT, 'NULL')
            USING HINT = 'Fix: pass a batch size of 1 or more (the default is 10000); nothing was deleted.', ERRCODE = '22023';
    END IF;
    v_cut := pg_catalog.now() - p_older_than;
    WITH victims AS (
        SELECT c.id FROM steep_repl.conflict_log c
         WHERE c.detected_at < v_cut AND c.resolution <> 'PENDING'
           AND NOT EXISTS (SELECT 1 FROM steep_repl.conflict_log o          -- a partner that does not go too
                            WHERE o.id IN (c.reverts, c.reverted_by)
                              AND (o.detected_at < v_cut AND o.resolution <> 'PENDING') IS NOT TRUE)
         ORDER BY c.id LIMIT p_limit FOR UPDATE SKIP LOCKED),
    gone AS (
        DELETE FROM steep_repl.conflict_log c USING victims x WHERE c.id = x.id RETURNING 1)
    SELECT count(*) INTO v_n FROM gone;
    IF v_n > 0 THEN
        PERFORM steep_repl.audit('conflict_log.purge', 'conflict_log', steep_repl.local_node_id(), NULL,
            pg_catalog.jsonb_build_object('older_than', p_older_than::TEXT, 'detected_before', v_cut, 'deleted', v_n));
    END IF;
    RETURN v_n;
END $$;
REVOKE ALL ON FUNCTION steep_repl.purge_conflict_log(INTERVAL, INTEGER) FROM PUBLIC;

-- SECURITY DEFINER helpers are for the generated triggers only.
REVOKE ALL ON FUNCTION steep_repl._capture(TEXT, TEXT, BOOLEAN, JSONB, BOOLEAN) FROM PUBLIC;
REVOKE ALL ON FUNCTION steep_repl._version_wait(TEXT, TEXT, TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION steep_repl._settle_pending(TEXT, TEXT, TEXT, TEXT, TEXT, JSONB, TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION steep_repl._truncate_versions() FROM PUBLIC;
