-- steep_repl 1.0 -- FROZEN. Never edit: upgrades start from this file.
-- The schema of the seed (design sections 13.1-13.2, 10.2, 11.3, 17.4).
\echo Use "CREATE EXTENSION steep_repl" to load this file. \quit

CREATE SCHEMA steep_repl;

CREATE TABLE steep_repl.nodes (
    node_id TEXT PRIMARY KEY,
    node_name TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL DEFAULT 5432,
    priority INTEGER NOT NULL DEFAULT 50,
    is_coordinator BOOLEAN NOT NULL DEFAULT false,
    last_seen TIMESTAMPTZ,
    status TEXT NOT NULL DEFAULT 'unknown'
);

CREATE TABLE steep_repl.coordinator_state (
    key TEXT PRIMARY KEY,
    value JSONB NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE steep_repl.audit_log (
    id BIGSERIAL PRIMARY KEY,
    occurred_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    action TEXT NOT NULL,
    actor TEXT NOT NULL,
    target_type TEXT,
    target_id TEXT,
    old_value JSONB,
    new_value JSONB,
    client_ip INET,
    success BOOLEAN NOT NULL DEFAULT true,
    error_message TEXT
);
CREATE INDEX audit_log_occurred_at_idx ON steep_repl.audit_log (occurred_at);
CREATE INDEX audit_log_action_idx ON steep_repl.audit_log (action);
CREATE INDEX audit_log_target_idx ON steep_repl.audit_log (target_type, target_id);

CREATE TABLE steep_repl.identity_ranges (
    id BIGSERIAL PRIMARY KEY,
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    node_id TEXT NOT NULL REFERENCES steep_repl.nodes(node_id),
    range_start BIGINT NOT NULL,
    range_end BIGINT NOT NULL,
    allocated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    status TEXT NOT NULL DEFAULT 'active',
    UNIQUE (table_schema, table_name, node_id, range_start),
    CHECK (range_end >= range_start),
    CHECK (status IN ('active', 'exhausted', 'released'))
);
CREATE INDEX identity_ranges_table_idx ON steep_repl.identity_ranges (table_schema, table_name, status);

CREATE TABLE steep_repl.conflict_log (
    id BIGSERIAL PRIMARY KEY,
    detected_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    subscription TEXT NOT NULL,
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    conflict_type TEXT NOT NULL,
    local_tuple JSONB,
    remote_tuple JSONB,
    local_origin TEXT,
    remote_origin TEXT,
    local_xact_ts TIMESTAMPTZ,
    remote_xact_ts TIMESTAMPTZ,
    origin_xid BIGINT,
    resolution TEXT,
    resolved_at TIMESTAMPTZ,
    resolved_by TEXT
);
CREATE INDEX conflict_log_detected_at_idx ON steep_repl.conflict_log (detected_at);
CREATE INDEX conflict_log_table_idx ON steep_repl.conflict_log (table_schema, table_name);
CREATE INDEX conflict_log_origin_xid_idx ON steep_repl.conflict_log (origin_xid);
CREATE INDEX conflict_log_pending_idx ON steep_repl.conflict_log (resolution)
    WHERE resolution = 'PENDING';

CREATE TABLE steep_repl.ddl_queue (
    id BIGSERIAL PRIMARY KEY,
    captured_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    origin_node TEXT NOT NULL,
    ddl_command TEXT NOT NULL,
    object_type TEXT NOT NULL,
    object_schema TEXT,
    object_name TEXT,
    status TEXT NOT NULL,
    pre_fingerprint TEXT,
    post_fingerprint TEXT,
    applied_at TIMESTAMPTZ,
    applied_by TEXT,
    error_message TEXT,
    CHECK (status IN ('PENDING', 'APPROVED', 'APPLIED', 'REJECTED', 'FAILED'))
);
CREATE INDEX ddl_queue_status_idx ON steep_repl.ddl_queue (status);

CREATE TABLE steep_repl.schema_fingerprints (
    table_schema TEXT NOT NULL,
    table_name TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    column_count INTEGER NOT NULL,
    captured_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (table_schema, table_name)
);

CREATE FUNCTION steep_repl.compute_fingerprint(p_schema TEXT, p_table TEXT)
RETURNS TEXT LANGUAGE sql STABLE AS $$
    SELECT encode(pg_catalog.sha256(pg_catalog.convert_to(string_agg(
        column_name || ':' || data_type || ':' || coalesce(column_default, '') || ':' || is_nullable,
        '|' ORDER BY ordinal_position), 'UTF8')), 'hex')
    FROM information_schema.columns
    WHERE table_schema = p_schema AND table_name = p_table;
$$;

-- Keep configuration and history in pg_dump output.
SELECT pg_catalog.pg_extension_config_dump('steep_repl.nodes', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.coordinator_state', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.identity_ranges', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.conflict_log', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.ddl_queue', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.schema_fingerprints', '');
