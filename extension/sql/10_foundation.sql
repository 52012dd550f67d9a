-- Foundation (1.1): local node identity, node life-cycle columns, audit helper.

ALTER TABLE steep_repl.nodes ADD COLUMN IF NOT EXISTS is_local BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE steep_repl.nodes ADD COLUMN IF NOT EXISTS init_state TEXT NOT NULL DEFAULT 'UNINITIALIZED';
ALTER TABLE steep_repl.nodes ADD COLUMN IF NOT EXISTS init_state_reason TEXT;
ALTER TABLE steep_repl.nodes ADD COLUMN IF NOT EXISTS registered_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE steep_repl.nodes ADD COLUMN IF NOT EXISTS updated_at TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE UNIQUE INDEX IF NOT EXISTS nodes_one_local_idx ON steep_repl.nodes (is_local) WHERE is_local;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                   WHERE conname = 'nodes_node_id_format'
                     AND conrelid = 'steep_repl.nodes'::pg_catalog.regclass) THEN
        ALTER TABLE steep_repl.nodes ADD CONSTRAINT nodes_node_id_format
            CHECK (node_id ~ '^[a-z_][a-z0-9_]{0,39}$');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                   WHERE conname = 'nodes_init_state_valid'
                     AND conrelid = 'steep_repl.nodes'::pg_catalog.regclass) THEN
        ALTER TABLE steep_repl.nodes ADD CONSTRAINT nodes_init_state_valid
            CHECK (init_state IN ('UNINITIALIZED', 'PREPARING', 'COPYING', 'CATCHING_UP',
                                  'SYNCHRONIZED', 'FAILED', 'DIVERGED', 'REINITIALIZING'));
    END IF;
END $$;

-- The id of the node this database is (NULL until steep.repl.node registers it).
CREATE OR REPLACE FUNCTION steep_repl.local_node_id() RETURNS TEXT
LANGUAGE sql STABLE AS $$
    SELECT node_id FROM steep_repl.nodes WHERE is_local
$$;

-- One audit row; actor is the session user unless given.
CREATE OR REPLACE FUNCTION steep_repl.audit(
    p_action TEXT, p_target_type TEXT, p_target_id TEXT,
    p_old JSONB DEFAULT NULL, p_new JSONB DEFAULT NULL,
    p_success BOOLEAN DEFAULT true, p_error TEXT DEFAULT NULL, p_actor TEXT DEFAULT NULL)
RETURNS BIGINT LANGUAGE sql VOLATILE AS $$
    INSERT INTO steep_repl.audit_log (action, actor, target_type, target_id, old_value,
                                      new_value, client_ip, success, error_message)
    VALUES (p_action, coalesce(p_actor, pg_catalog.session_user()::text), p_target_type,
            p_target_id, p_old, p_new, pg_catalog.inet_client_addr(), p_success, p_error)
    RETURNING id
$$;

SELECT pg_catalog.pg_extension_config_dump('steep_repl.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.identity_ranges_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.conflict_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('steep_repl.ddl_queue_id_seq', '');
