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

-- Register or update one node row (steep.repl.node, the agent's `node add`); audited in the same
-- transaction. Only the columns given here are managed; init_state, range_slot, ... are left alone.
-- Returns {"changed", "old", "new"}. Registering a second local node is refused with the fix.
CREATE OR REPLACE FUNCTION steep_repl.register_node(
    p_node_id TEXT, p_node_name TEXT, p_host TEXT, p_port INTEGER DEFAULT 5432,
    p_priority INTEGER DEFAULT 50, p_is_local BOOLEAN DEFAULT false)
RETURNS JSONB LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_old JSONB;
    v_new JSONB;
    v_other TEXT;
BEGIN
    IF p_node_id IS NULL OR p_node_id !~ '^[a-z_][a-z0-9_]{0,39}$' THEN
        RAISE EXCEPTION 'steep_repl: node id % is not a valid identifier', pg_catalog.quote_literal(p_node_id)
            USING ERRCODE = '22023',
                  HINT = 'use 1-40 lower-case letters, digits and _, starting with a letter or _ (e.g. node_a)';
    END IF;
    IF p_is_local THEN
        SELECT node_id INTO v_other FROM steep_repl.nodes WHERE is_local AND node_id <> p_node_id;
        IF v_other IS NOT NULL THEN
            RAISE EXCEPTION 'steep_repl: this database is already registered as node %, not %', v_other, p_node_id
                USING ERRCODE = '55000',
                      HINT = 'point the connection of ' || p_node_id || ' at its own database, or remove node '
                             || v_other || ' first';
        END IF;
    END IF;
    v_new := pg_catalog.jsonb_build_object('node_id', p_node_id, 'node_name', coalesce(p_node_name, p_node_id),
                                           'host', p_host, 'port', p_port, 'priority', p_priority,
                                           'is_local', coalesce(p_is_local, false));
    SELECT pg_catalog.jsonb_build_object('node_id', node_id, 'node_name', node_name, 'host', host, 'port', port,
                                         'priority', priority, 'is_local', is_local)
      INTO v_old FROM steep_repl.nodes WHERE node_id = p_node_id FOR UPDATE;
    IF v_old IS NOT DISTINCT FROM v_new THEN
        RETURN pg_catalog.jsonb_build_object('changed', false, 'old', v_old, 'new', v_new);
    END IF;
    INSERT INTO steep_repl.nodes AS n (node_id, node_name, host, port, priority, is_local)
    VALUES (p_node_id, coalesce(p_node_name, p_node_id), p_host, p_port, p_priority, coalesce(p_is_local, false))
    ON CONFLICT (node_id) DO UPDATE
       SET node_name = EXCLUDED.node_name, host = EXCLUDED.host, port = EXCLUDED.port,
           priority = EXCLUDED.priority, is_local = EXCLUDED.is_local, updated_at = pg_catalog.now();
    PERFORM steep_repl.audit(CASE WHEN v_old IS NULL THEN 'node_added' ELSE 'node_updated' END,
                             'node', p_node_id, v_old, v_new);
    RETURN pg_catalog.jsonb_build_object('changed', true, 'old', v_old, 'new', v_new);
END $$;

-- Remove one node row (audited). Refuses the local node and nodes still referenced (identity ranges).
-- Returns true when a row was removed.
CREATE OR REPLACE FUNCTION steep_repl.remove_node(p_node_id TEXT)
RETURNS BOOLEAN LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_old JSONB;
BEGIN
    SELECT pg_catalog.to_jsonb(n) INTO v_old FROM steep_repl.nodes n WHERE node_id = p_node_id FOR UPDATE;
    IF v_old IS NULL THEN
        RETURN false;
    END IF;
    IF (v_old ->> 'is_local')::boolean THEN
        RAISE EXCEPTION 'steep_repl: node % is this database''s own node and cannot be removed from itself', p_node_id
            USING ERRCODE = '55000', HINT = 'remove it from the other nodes, or drop the extension on this node';
    END IF;
    BEGIN
        DELETE FROM steep_repl.nodes WHERE node_id = p_node_id;
    EXCEPTION WHEN foreign_key_violation THEN
        RAISE EXCEPTION 'steep_repl: node % is still referenced (identity ranges or other node data)', p_node_id
            USING ERRCODE = '55000',
                  HINT = 'release and delete its identity ranges first, then remove the node';
    END;
    PERFORM steep_repl.audit('node_removed', 'node', p_node_id, v_old, NULL);
    RETURN true;
END $$;
