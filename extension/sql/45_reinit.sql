-- Reinitialisation and reconciliation (1.1): see docs/node-init.md.

-- Replace the rows and versions of one table on a live node with the ones staged by the caller
-- in its temp tables pg_temp.steep_reinit_rows / pg_temp.steep_reinit_versions.
-- Fired by an INSERT into the caller's temp table pg_temp.steep_reinit_go (ENABLE ALWAYS trigger)
-- in a session with session_replication_role = replica and a replication origin set up: the
-- origin keeps every peer (subscribed with origin = none) from receiving the rewrite, and the
-- writes below run nested (trigger depth 2 for the conflict triggers), so the conflict engine
-- treats them as plain writes instead of incoming changes.
CREATE OR REPLACE FUNCTION steep_repl._reinit_swap() RETURNS TRIGGER
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM steep_repl.conflict_tables ct WHERE ct.tbl = NEW.tbl) THEN
        RAISE EXCEPTION 'table % is not replicated on this node (no conflict triggers)', NEW.tbl
            USING HINT = 'Fix: reinitialise replicated tables only (steep_replicated_tables), or run playbooks/site.yml.';
    END IF;
    DELETE FROM steep_repl.row_version v WHERE v.tbl = NEW.tbl;
    EXECUTE pg_catalog.format('DELETE FROM ONLY %s', NEW.qual);
    EXECUTE pg_catalog.format('INSERT INTO %s (%s) SELECT %s FROM pg_temp.steep_reinit_rows', NEW.qual, NEW.cols, NEW.cols);
    EXECUTE pg_catalog.format('INSERT INTO steep_repl.row_version (%s) SELECT %s FROM pg_temp.steep_reinit_versions',
                              NEW.vcols, NEW.vcols);
    RETURN NULL;
END $$;

-- Existing data on a joining node (seed 6.8, init with existing_data = reconcile): keys whose target
-- row must be written again once the node is in the mesh (it won, or only the target has it), with
-- the version the target held when this was decided (NULL: none). steep_repl.reconcile_push_table
-- writes them as ordinary local writes, unless the key changed since.
CREATE TABLE IF NOT EXISTS steep_repl.reconcile_push (
    tbl         TEXT NOT NULL,
    pk          TEXT NOT NULL,
    ver_ts      TIMESTAMPTZ,
    ver_node    TEXT,
    source_node TEXT NOT NULL,
    reason      TEXT NOT NULL,          -- target_won | target_only
    decided_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tbl, pk)
);

-- The version a row without one is decided with: a first version (depth 0, epoch 0) made of the
-- row's commit time (-infinity when unknown) and the node that holds it.
CREATE OR REPLACE FUNCTION steep_repl._unversioned(p_tbl TEXT, p_pk TEXT, p_ts TIMESTAMPTZ, p_node TEXT, p_img JSONB)
RETURNS steep_repl.row_version LANGUAGE plpgsql IMMUTABLE SET search_path = '' AS $$
DECLARE v steep_repl.row_version;
BEGIN
    v.tbl := p_tbl; v.pk := p_pk; v.ver_ts := coalesce(p_ts, '-infinity'); v.ver_node := p_node;
    v.depth := 0; v.epoch := 0; v.deleted := false; v.forced := false; v.gen := 0; v.op := 'I'; v.img := p_img;
    RETURN v;
END $$;

-- Reconcile one table of the (not yet wired) local node with the source's rows and versions staged
-- by the caller in pg_temp.steep_rec_rows (the columns + steep_ts, the commit time of the source
-- row when known) and pg_temp.steep_rec_versions. Runs in the caller's transaction with
-- session_replication_role = replica. Afterwards the local versions of the table are the source's;
-- rows only on the source are copied, identical rows are left alone, differing rows are decided by
-- the table's strategy (a row without a version gets a first version made of its commit time and
-- its node) and logged in conflict_log; target rows that won or that only the target has are queued
-- in reconcile_push. Returns the counts.
CREATE OR REPLACE FUNCTION steep_repl.reconcile_table(p_table pg_catalog.regclass, p_source TEXT)
RETURNS JSONB LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_schema TEXT; v_name TEXT; v_tbl TEXT; v_q TEXT; v_pk TEXT[]; v_gen TEXT[];
    v_me TEXT := steep_repl.local_node_id();
    v_strategy TEXT; v_list TEXT[];
    v_pk_s TEXT; v_pk_t TEXT; v_join TEXT;
    c RECORD; sv steep_repl.row_version; lv steep_repl.row_version; v_remote BOOLEAN;
    v_counts JSONB; v_cols TEXT; v_rcols TEXT;
BEGIN
    SELECT r.schema_name, r.table_name INTO v_schema, v_name FROM steep_repl._rel_name(p_table) r;
    v_tbl := v_schema || '.' || v_name;
    v_q := pg_catalog.quote_ident(v_schema) || '.' || pg_catalog.quote_ident(v_name);
    v_pk := steep_repl._pk_columns(p_table);
    IF v_pk IS NULL THEN
        RAISE EXCEPTION 'table % has no primary key, so its rows cannot be reconciled', v_tbl
            USING HINT = 'Fix: add a primary key on every node (steep.repl needs one), then re-run.';
    END IF;
    SELECT coalesce(pg_catalog.array_agg(a.attname::TEXT), '{}') INTO v_gen FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated <> '';
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum),
           pg_catalog.string_agg('r.' || pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum)
      INTO v_cols, v_rcols FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = p_table AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
    SELECT s.strategy, s.priority INTO v_strategy, v_list FROM steep_repl.table_strategy(v_schema, v_name) s;
    v_pk_s := steep_repl._key_expr(p_table, 's');
    v_pk_t := steep_repl._key_expr(p_table, 't');
    SELECT pg_catalog.string_agg('t.' || pg_catalog.quote_ident(x) || ' = s.' || pg_catalog.quote_ident(x), ' AND ')
      INTO v_join FROM pg_catalog.unnest(v_pk) AS u(x);

    DROP TABLE IF EXISTS pg_temp.steep_rec_cmp;
    EXECUTE pg_catalog.format($f$
        CREATE TEMP TABLE steep_rec_cmp ON COMMIT DROP AS
        SELECT CASE WHEN s.steep_in_s THEN %1$s ELSE %2$s END AS pk,
               coalesce(s.steep_in_s, false) AS in_s, coalesce(t.steep_in_t, false) AS in_t,
               pg_catalog.to_jsonb(s) - ARRAY['steep_in_s', 'steep_ts'] AS s_img,
               pg_catalog.to_jsonb(t) - (ARRAY['steep_in_t', 'steep_ts'] || %3$L::TEXT[]) AS t_img,
               s.steep_ts AS s_ts, t.steep_ts AS t_ts, NULL::BOOLEAN AS src_wins
          FROM (SELECT true AS steep_in_s, x.* FROM pg_temp.steep_rec_rows x) s
          FULL JOIN (SELECT true AS steep_in_t, y.*,
                            CASE WHEN pg_catalog.current_setting('track_commit_timestamp')::BOOLEAN
                                 THEN pg_catalog.pg_xact_commit_timestamp(y.xmin) END AS steep_ts
                       FROM ONLY %4$s y) t ON %5$s$f$, v_pk_s, v_pk_t, v_gen, v_q, v_join);
    CREATE INDEX ON pg_temp.steep_rec_cmp (pk);

    -- differing rows: the table's strategy decides, with both tuples logged
    FOR c IN SELECT * FROM pg_temp.steep_rec_cmp x WHERE x.in_s AND x.in_t AND x.s_img <> x.t_img LOOP
        IF v_strategy = 'manual' THEN
            RAISE EXCEPTION 'table % uses the manual conflict strategy and key % differs between % and %', v_tbl,
                c.pk, p_source, v_me
                USING HINT = 'Fix: give the table an automatic strategy for the join (steep_conflict_strategies), or '
                             'make the rows equal on the target, then re-run.';
        END IF;
        sv := NULL;
        SELECT * INTO sv FROM pg_temp.steep_rec_versions v WHERE v.tbl = v_tbl AND v.pk = c.pk AND NOT v.deleted;
        IF NOT FOUND THEN
            sv := steep_repl._unversioned(v_tbl, c.pk, c.s_ts, p_source, c.s_img);
        END IF;
        lv := NULL;
        SELECT * INTO lv FROM steep_repl.row_version v WHERE v.tbl = v_tbl AND v.pk = c.pk AND NOT v.deleted;
        IF NOT FOUND THEN
            lv := steep_repl._unversioned(v_tbl, c.pk, c.t_ts, v_me, c.t_img);
        END IF;
        v_remote := CASE v_strategy WHEN 'keep_local' THEN false WHEN 'apply_remote' THEN true
                                    ELSE steep_repl._beats(v_strategy, v_list, sv, lv) END;
        UPDATE pg_temp.steep_rec_cmp x SET src_wins = v_remote WHERE x.pk = c.pk;
        INSERT INTO steep_repl.conflict_log (subscription, table_schema, table_name, conflict_type,
            local_tuple, remote_tuple, local_origin, remote_origin, local_xact_ts, remote_xact_ts, origin_xid,
            resolution, resolved_at, resolved_by, pk, strategy, winner, local_version, remote_version,
            resolved_tuple, note)
        VALUES ('reconcile:' || p_source, v_schema, v_name, 'INSERT_INSERT',
            c.t_img, c.s_img, lv.ver_node, sv.ver_node, lv.ver_ts, sv.ver_ts, sv.origin_xid,
            CASE WHEN v_remote THEN 'APPLIED_REMOTE' ELSE 'KEPT_LOCAL' END, pg_catalog.now(),
            'steep_repl:' || v_strategy, c.pk, v_strategy, CASE WHEN v_remote THEN 'remote' ELSE 'local' END,
            steep_repl._version_json(lv), steep_repl._version_json(sv),
            CASE WHEN v_remote THEN c.s_img ELSE c.t_img END,
            'existing data reconciled while ' || v_me || ' joined from ' || p_source);
    END LOOP;

    -- the local versions of the table become the source's
    DELETE FROM steep_repl.row_version v WHERE v.tbl = v_tbl;
    INSERT INTO steep_repl.row_version SELECT * FROM pg_temp.steep_rec_versions;
    -- rows only on the source, and differing rows the source won
    EXECUTE pg_catalog.format($f$
        INSERT INTO %1$s (%2$s) SELECT %3$s FROM pg_temp.steep_rec_cmp x,
               pg_catalog.jsonb_populate_record(NULL::%1$s, x.s_img) r WHERE x.in_s AND NOT x.in_t$f$, v_q, v_cols, v_rcols);
    EXECUTE pg_catalog.format($f$
        DELETE FROM ONLY %1$s t USING pg_temp.steep_rec_cmp x WHERE x.src_wins AND %2$s = x.pk$f$, v_q, v_pk_t);
    EXECUTE pg_catalog.format($f$
        INSERT INTO %1$s (%2$s) SELECT %3$s FROM pg_temp.steep_rec_cmp x,
               pg_catalog.jsonb_populate_record(NULL::%1$s, x.s_img) r WHERE x.src_wins$f$, v_q, v_cols, v_rcols);
    -- target rows that must reach every node
    DELETE FROM steep_repl.reconcile_push p WHERE p.tbl = v_tbl;
    INSERT INTO steep_repl.reconcile_push (tbl, pk, ver_ts, ver_node, source_node, reason)
    SELECT v_tbl, x.pk, v.ver_ts, v.ver_node, p_source, CASE WHEN x.in_s THEN 'target_won' ELSE 'target_only' END
      FROM pg_temp.steep_rec_cmp x
      LEFT JOIN pg_temp.steep_rec_versions v ON v.tbl = v_tbl AND v.pk = x.pk
     WHERE x.in_t AND (NOT x.in_s OR (x.s_img <> x.t_img AND NOT x.src_wins));
    SELECT pg_catalog.jsonb_build_object(
               'source_only', count(*) FILTER (WHERE x.in_s AND NOT x.in_t),
               'identical', count(*) FILTER (WHERE x.in_s AND x.in_t AND x.s_img = x.t_img),
               'source_won', count(*) FILTER (WHERE x.src_wins),
               'target_won', count(*) FILTER (WHERE x.in_s AND x.in_t AND x.s_img <> x.t_img AND NOT x.src_wins),
               'target_only', count(*) FILTER (WHERE x.in_t AND NOT x.in_s))
      INTO v_counts FROM pg_temp.steep_rec_cmp x;
    DROP TABLE pg_temp.steep_rec_cmp;
    RETURN v_counts;
END $$;

-- Once the node is in the mesh: write its queued rows of one table again as ordinary local writes
-- (the capture trigger gives them versions that reach every node), unless the key changed since the
-- decision (a later write won): a row the target won is updated in place (its version is the
-- source's, so every node takes the update); a row only the target has is deleted without
-- replication triggers and inserted again, as if written now. Returns the number of rows written.
CREATE OR REPLACE FUNCTION steep_repl.reconcile_push_table(p_tbl TEXT)
RETURNS BIGINT LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    v_rel pg_catalog.regclass := pg_catalog.to_regclass(p_tbl);
    v_pk TEXT[]; v_pk_t TEXT; v_cols TEXT; v_tcols TEXT; v_join TEXT; n BIGINT; m BIGINT;
BEGIN
    IF v_rel IS NULL THEN
        RAISE EXCEPTION 'table % does not exist', p_tbl
            USING HINT = 'Fix: create it, or DELETE its rows from steep_repl.reconcile_push.';
    END IF;
    v_pk := steep_repl._pk_columns(v_rel);
    v_pk_t := steep_repl._key_expr(v_rel, 't');
    SELECT pg_catalog.string_agg('t.' || pg_catalog.quote_ident(x) || ' = s.' || pg_catalog.quote_ident(x), ' AND ')
      INTO v_join FROM pg_catalog.unnest(v_pk) AS u(x);
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum),
           pg_catalog.string_agg('t.' || pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum)
      INTO v_cols, v_tcols FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = v_rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
    -- rows the target won: an update in place
    EXECUTE pg_catalog.format($f$
        UPDATE %1$s AS t SET %2$I = t.%2$I
          FROM steep_repl.reconcile_push p
          LEFT JOIN steep_repl.row_version v ON v.tbl = p.tbl AND v.pk = p.pk
         WHERE p.tbl = %3$L AND p.reason = 'target_won' AND %4$s = p.pk
           AND v.ver_ts IS NOT DISTINCT FROM p.ver_ts AND v.ver_node IS NOT DISTINCT FROM p.ver_node$f$,
        v_rel, v_pk[1], p_tbl, v_pk_t);
    GET DIAGNOSTICS n = ROW_COUNT;
    -- rows only on the target: inserted again (the delete runs as replica: no version, no FK action)
    DROP TABLE IF EXISTS pg_temp.steep_push_rows;
    EXECUTE pg_catalog.format($f$
        CREATE TEMP TABLE steep_push_rows ON COMMIT DROP AS
        SELECT %4$s FROM %1$s AS t
          JOIN steep_repl.reconcile_push p ON p.tbl = %2$L AND p.reason = 'target_only' AND %3$s = p.pk
          LEFT JOIN steep_repl.row_version v ON v.tbl = p.tbl AND v.pk = p.pk
         WHERE v.ver_ts IS NOT DISTINCT FROM p.ver_ts AND v.ver_node IS NOT DISTINCT FROM p.ver_node$f$,
        v_rel, p_tbl, v_pk_t, v_tcols);
    PERFORM pg_catalog.set_config('session_replication_role', 'replica', true);
    EXECUTE pg_catalog.format('DELETE FROM ONLY %1$s AS t USING pg_temp.steep_push_rows s WHERE %2$s', v_rel, v_join);
    PERFORM pg_catalog.set_config('session_replication_role', 'origin', true);
    EXECUTE pg_catalog.format('INSERT INTO %1$s (%2$s) SELECT %2$s FROM pg_temp.steep_push_rows', v_rel, v_cols);
    GET DIAGNOSTICS m = ROW_COUNT;
    DROP TABLE pg_temp.steep_push_rows;
    DELETE FROM steep_repl.reconcile_push p WHERE p.tbl = p_tbl;
    RETURN n + m;
END $$;
