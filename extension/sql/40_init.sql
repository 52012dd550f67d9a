-- Node initialisation (1.1): state machine with audit, per-table progress, schema fingerprints.

-- Allowed transitions of steep_repl.nodes.init_state (seed 6.6).
CREATE OR REPLACE FUNCTION steep_repl.init_transition_allowed(p_from TEXT, p_to TEXT)
RETURNS BOOLEAN LANGUAGE sql IMMUTABLE AS $$
    SELECT p_from = p_to OR (p_from, p_to) IN (
        ('UNINITIALIZED', 'PREPARING'), ('UNINITIALIZED', 'SYNCHRONIZED'),
        ('PREPARING', 'COPYING'), ('PREPARING', 'CATCHING_UP'),
        ('COPYING', 'CATCHING_UP'), ('CATCHING_UP', 'SYNCHRONIZED'),
        ('SYNCHRONIZED', 'DIVERGED'), ('SYNCHRONIZED', 'REINITIALIZING'),
        ('DIVERGED', 'REINITIALIZING'), ('FAILED', 'REINITIALIZING'), ('FAILED', 'PREPARING'),
        ('REINITIALIZING', 'COPYING'), ('REINITIALIZING', 'PREPARING'),
        ('PREPARING', 'FAILED'), ('COPYING', 'FAILED'), ('CATCHING_UP', 'FAILED'),
        ('REINITIALIZING', 'FAILED'), ('UNINITIALIZED', 'FAILED'), ('SYNCHRONIZED', 'FAILED'),
        ('DIVERGED', 'FAILED'), ('COPYING', 'PREPARING'), ('CATCHING_UP', 'PREPARING'),
        ('CATCHING_UP', 'COPYING'),
        -- reinit of a wired node (a mesh built by site.yml leaves its nodes UNINITIALIZED)
        ('UNINITIALIZED', 'REINITIALIZING'), ('REINITIALIZING', 'CATCHING_UP'),
        -- the divergence check (steep.repl.init step verify, playbooks/verify_mesh.yml)
        ('UNINITIALIZED', 'DIVERGED'), ('DIVERGED', 'SYNCHRONIZED'))
$$;

-- Move a node to a new init state; every transition is written to audit_log.
CREATE OR REPLACE FUNCTION steep_repl.set_init_state(p_node_id TEXT, p_state TEXT, p_reason TEXT DEFAULT NULL)
RETURNS TEXT LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_old TEXT;
BEGIN
    SELECT init_state INTO v_old FROM steep_repl.nodes WHERE node_id = p_node_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'node % is not registered on this database', p_node_id
            USING HINT = 'register it first (steep.repl.node / playbooks/site.yml)';
    END IF;
    IF NOT steep_repl.init_transition_allowed(v_old, p_state) THEN
        RAISE EXCEPTION 'node %: init state % cannot go to %', p_node_id, v_old, p_state
            USING HINT = 'a FAILED or DIVERGED node is recovered with a reinit';
    END IF;
    IF v_old IS DISTINCT FROM p_state OR p_reason IS DISTINCT FROM
            (SELECT init_state_reason FROM steep_repl.nodes WHERE node_id = p_node_id) THEN
        UPDATE steep_repl.nodes
           SET init_state = p_state, init_state_reason = p_reason, updated_at = pg_catalog.now()
         WHERE node_id = p_node_id;
        PERFORM steep_repl.audit('init_state', 'node', p_node_id,
                                 pg_catalog.jsonb_build_object('state', v_old),
                                 pg_catalog.jsonb_build_object('state', p_state, 'reason', p_reason),
                                 p_state <> 'FAILED', CASE WHEN p_state = 'FAILED' THEN p_reason END);
    END IF;
    RETURN v_old;
END $$;

-- Per-table progress of an initialisation, kept on the target node.
CREATE TABLE IF NOT EXISTS steep_repl.init_progress (
    target_node TEXT NOT NULL,
    source_node TEXT NOT NULL,
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    rows_total BIGINT NOT NULL DEFAULT 0,
    rows_copied BIGINT NOT NULL DEFAULT 0,
    bytes_total BIGINT NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'pending',
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    error_message TEXT,
    PRIMARY KEY (target_node, table_schema, table_name),
    CHECK (status IN ('pending', 'copying', 'done', 'failed'))
);

-- One row per initialisation: % of tables and rows, rows/s, ETA, current table.
CREATE OR REPLACE VIEW steep_repl.init_status AS
WITH agg AS (
    SELECT p.target_node,
           min(p.source_node) AS source_node,
           count(*) AS tables_total,
           count(*) FILTER (WHERE p.status = 'done') AS tables_done,
           sum(p.rows_total)::bigint AS rows_total,
           sum(p.rows_copied)::bigint AS rows_copied,
           min(p.started_at) AS started_at,
           CASE WHEN bool_and(p.status = 'done') THEN max(p.finished_at) END AS finished_at,
           string_agg(p.table_schema || '.' || p.table_name, ', ') FILTER (WHERE p.status = 'copying')
               AS current_table,
           string_agg(p.error_message, '; ') FILTER (WHERE p.error_message IS NOT NULL) AS errors
      FROM steep_repl.init_progress p
     GROUP BY p.target_node),
rate AS (
    SELECT a.*,
           a.rows_copied / GREATEST(extract(epoch FROM
               coalesce(a.finished_at, pg_catalog.clock_timestamp()) - a.started_at), 0.001)
               AS rows_per_second
      FROM agg a)
SELECT r.target_node, r.source_node, n.init_state AS state,
       r.tables_total, r.tables_done,
       round(100.0 * r.tables_done / GREATEST(r.tables_total, 1), 1) AS tables_percent,
       r.rows_total, r.rows_copied,
       round(100.0 * r.rows_copied / GREATEST(r.rows_total, 1), 1) AS rows_percent,
       round(r.rows_per_second::numeric, 1) AS rows_per_second,
       CASE WHEN r.finished_at IS NOT NULL THEN interval '0'
            WHEN r.rows_per_second > 0 THEN pg_catalog.make_interval(
                secs => GREATEST(r.rows_total - r.rows_copied, 0) / r.rows_per_second)
       END AS eta,
       r.current_table, r.started_at, r.finished_at, r.errors
  FROM rate r
  LEFT JOIN steep_repl.nodes n ON n.node_id = r.target_node;

-- Fingerprints of peers, captured by the init module for compare_schemas.
CREATE TABLE IF NOT EXISTS steep_repl.peer_fingerprints (
    node_id TEXT NOT NULL,
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    column_count INTEGER NOT NULL,
    captured_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, table_schema, table_name)
);

-- Refresh steep_repl.schema_fingerprints for the given tables (default: every user table).
CREATE OR REPLACE FUNCTION steep_repl.capture_fingerprints(p_tables TEXT[] DEFAULT NULL)
RETURNS INTEGER LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_count INTEGER;
BEGIN
    WITH t AS (
        SELECT c.table_schema::text AS s, c.table_name::text AS n, count(*)::int AS cols
          FROM information_schema.columns c
          JOIN information_schema.tables tb ON tb.table_schema = c.table_schema
                                           AND tb.table_name = c.table_name
                                           AND tb.table_type = 'BASE TABLE'
         WHERE c.table_schema NOT IN ('pg_catalog', 'information_schema', 'steep_repl')
           AND c.table_schema NOT LIKE 'pg\_%'
           AND (p_tables IS NULL OR (c.table_schema || '.' || c.table_name) = ANY (p_tables))
         GROUP BY 1, 2)
    INSERT INTO steep_repl.schema_fingerprints AS f (table_schema, table_name, fingerprint, column_count, captured_at)
    SELECT s, n, steep_repl.compute_fingerprint(s, n), cols, pg_catalog.now() FROM t
    ON CONFLICT (table_schema, table_name) DO UPDATE
       SET fingerprint = EXCLUDED.fingerprint, column_count = EXCLUDED.column_count,
           captured_at = EXCLUDED.captured_at;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END $$;

-- Seed 17.4: compare the schemas of two nodes. Fingerprints of the local node come from
-- schema_fingerprints, those of a peer from peer_fingerprints (filled by steep.repl.init).
CREATE OR REPLACE FUNCTION steep_repl.compare_schemas(p_source_node TEXT, p_target_node TEXT)
RETURNS TABLE (table_name TEXT, status TEXT, difference TEXT) LANGUAGE sql STABLE AS $$
    WITH fp AS (
        SELECT steep_repl.local_node_id() AS node_id, f.table_schema, f.table_name, f.fingerprint,
               f.column_count
          FROM steep_repl.schema_fingerprints f
        UNION ALL
        SELECT p.node_id, p.table_schema, p.table_name, p.fingerprint, p.column_count
          FROM steep_repl.peer_fingerprints p
         WHERE p.node_id IS DISTINCT FROM steep_repl.local_node_id()),
    s AS (SELECT * FROM fp WHERE node_id = p_source_node),
    t AS (SELECT * FROM fp WHERE node_id = p_target_node)
    SELECT coalesce(s.table_schema, t.table_schema) || '.' || coalesce(s.table_name, t.table_name),
           CASE WHEN t.fingerprint IS NULL THEN 'missing_on_target'
                WHEN s.fingerprint IS NULL THEN 'missing_on_source'
                WHEN s.fingerprint = t.fingerprint THEN 'match'
                ELSE 'mismatch' END,
           CASE WHEN t.fingerprint IS NULL THEN 'table absent on ' || p_target_node
                WHEN s.fingerprint IS NULL THEN 'table absent on ' || p_source_node
                WHEN s.fingerprint = t.fingerprint THEN NULL
                ELSE pg_catalog.format('%s columns on %s, %s on %s; fingerprints differ',
                                       s.column_count, p_source_node, t.column_count, p_target_node) END
      FROM s FULL JOIN t ON s.table_schema = t.table_schema AND s.table_name = t.table_name
     ORDER BY 1
$$;
