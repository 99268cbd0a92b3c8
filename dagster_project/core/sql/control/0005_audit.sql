-- The hash-chained audit trail (core/audit.py): tables, guards, append function, role.
CREATE SCHEMA IF NOT EXISTS audit;

CREATE TABLE IF NOT EXISTS audit.entries (
    seq         bigint PRIMARY KEY CHECK (seq >= 1),
    prev_hash   text NOT NULL,
    payload     text NOT NULL,
    entry_hash  text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    change_id   text NOT NULL UNIQUE,
    product     text,
    release     text,
    environment text
);
CREATE INDEX IF NOT EXISTS entries_product_idx ON audit.entries (product, seq);

CREATE TABLE IF NOT EXISTS audit.head (
    id   int PRIMARY KEY CHECK (id = 1),
    seq  bigint NOT NULL,
    hash text NOT NULL
);

-- UPDATE, DELETE and TRUNCATE are never allowed, whoever asks.
CREATE OR REPLACE FUNCTION audit.reject_change() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'audit.%: % is not allowed: the audit trail is append-only',
        TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'write through audit.append(change_id, payload)';
END
$fn$;

-- INSERT into entries and UPDATE of head only from audit.append, and the head only ever
-- advances by one onto the entry that links to it.
CREATE OR REPLACE FUNCTION audit.guard_write() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_TABLE_NAME = 'head' AND TG_OP = 'INSERT' THEN
        IF NEW.id = 1 AND NEW.seq = 0 AND NEW.hash = '0000000000000000000000000000000000000000000000000000000000000000' THEN
            RETURN NEW;  -- the initial head written by ensure_audit_schema
        END IF;
        RAISE EXCEPTION 'audit.head: only the initial head row may be inserted'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF current_setting('audit.writer', true) IS DISTINCT FROM 'append' THEN
        RAISE EXCEPTION 'audit.%: direct % is not allowed', TG_TABLE_NAME, TG_OP
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'write through audit.append(change_id, payload)';
    END IF;
    -- Nested IF: PL/pgSQL does not short-circuit AND, and entries rows have no NEW.id.
    IF TG_TABLE_NAME = 'head' THEN
        IF NOT (NEW.id = 1 AND NEW.seq = OLD.seq + 1 AND EXISTS (
                SELECT 1 FROM audit.entries e
                WHERE e.seq = NEW.seq AND e.entry_hash = NEW.hash AND e.prev_hash = OLD.hash))
        THEN
            RAISE EXCEPTION 'audit.head: may only advance by one onto the appended entry'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;
    RETURN NEW;
END
$fn$;

CREATE OR REPLACE TRIGGER entries_insert_guard BEFORE INSERT ON audit.entries
    FOR EACH ROW EXECUTE FUNCTION audit.guard_write();
CREATE OR REPLACE TRIGGER entries_no_change BEFORE UPDATE OR DELETE ON audit.entries
    FOR EACH ROW EXECUTE FUNCTION audit.reject_change();
CREATE OR REPLACE TRIGGER entries_no_truncate BEFORE TRUNCATE ON audit.entries
    FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();
CREATE OR REPLACE TRIGGER head_write_guard BEFORE INSERT OR UPDATE ON audit.head
    FOR EACH ROW EXECUTE FUNCTION audit.guard_write();
CREATE OR REPLACE TRIGGER head_no_delete BEFORE DELETE ON audit.head
    FOR EACH ROW EXECUTE FUNCTION audit.reject_change();
CREATE OR REPLACE TRIGGER head_no_truncate BEFORE TRUNCATE ON audit.head
    FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();

INSERT INTO audit.head (id, seq, hash)
SELECT 1, 0, '0000000000000000000000000000000000000000000000000000000000000000' WHERE NOT EXISTS (SELECT 1 FROM audit.head);

CREATE OR REPLACE FUNCTION audit.append(p_change_id text, p_payload text)
RETURNS TABLE (
    seq bigint, change_id text, product text, release text, environment text,
    recorded_at timestamptz, prev_hash text, entry_hash text, payload text, created boolean
)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
#variable_conflict use_column
DECLARE
    v_doc json;
    v_field text;
    v_head_seq bigint;
    v_head_hash text;
    v_hash text;
BEGIN
    IF coalesce(btrim(p_change_id), '') = '' THEN
        RAISE EXCEPTION 'audit.append: change_id is empty'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        v_doc := p_payload::json;
    EXCEPTION WHEN others THEN
        -- never echo the payload: it holds the guardrail token
        RAISE EXCEPTION 'audit.append: payload is not valid JSON'
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF json_typeof(v_doc) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'audit.append: payload must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_field IN ARRAY ARRAY['timestamp', 'identity', 'artifact_sha256', 'environment', 'guardrail_token'] LOOP
        IF coalesce(v_doc ->> v_field, '') = '' THEN
            RAISE EXCEPTION 'audit.append: payload field % is missing or empty', v_field
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    IF (v_doc ->> 'change_id') IS DISTINCT FROM p_change_id THEN
        RAISE EXCEPTION 'audit.append: payload field change_id does not match the argument'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- The head row lock serialises appends: one predecessor per entry, no gaps, no forks.
    SELECT h.seq, h.hash INTO v_head_seq, v_head_hash FROM audit.head h WHERE h.id = 1 FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'audit.append: audit.head row is missing';
    END IF;

    -- Checked under the lock, so a concurrent append of the same change is seen here.
    IF EXISTS (SELECT 1 FROM audit.entries e WHERE e.change_id = p_change_id) THEN
        RETURN QUERY SELECT e.seq, e.change_id, e.product, e.release, e.environment,
                            e.recorded_at, e.prev_hash, e.entry_hash, e.payload, false
                     FROM audit.entries e WHERE e.change_id = p_change_id;
        RETURN;
    END IF;

    v_hash := encode(sha256(convert_to(v_head_hash || p_payload, 'UTF8')), 'hex');
    PERFORM set_config('audit.writer', 'append', true);
    INSERT INTO audit.entries AS e (seq, prev_hash, payload, entry_hash, recorded_at,
                                    change_id, product, release, environment)
    VALUES (v_head_seq + 1, v_head_hash, p_payload, v_hash, clock_timestamp(),
            p_change_id, v_doc ->> 'product', v_doc ->> 'release', v_doc ->> 'environment');
    UPDATE audit.head h SET seq = v_head_seq + 1, hash = v_hash WHERE h.id = 1;
    PERFORM set_config('audit.writer', '', true);

    RETURN QUERY SELECT e.seq, e.change_id, e.product, e.release, e.environment,
                        e.recorded_at, e.prev_hash, e.entry_hash, e.payload, true
                 FROM audit.entries e WHERE e.seq = v_head_seq + 1;
END
$fn$;

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'release_pipeline') THEN
        BEGIN
            CREATE ROLE release_pipeline NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created meanwhile by another database's setup (roles are cluster-wide)
        END;
    END IF;
    IF NOT pg_has_role(current_user, 'release_pipeline', 'MEMBER') THEN
        EXECUTE format('GRANT release_pipeline TO %I', current_user);
    END IF;
END
$do$;

REVOKE ALL ON ALL TABLES IN SCHEMA audit FROM PUBLIC, release_pipeline;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA audit FROM PUBLIC, release_pipeline;
GRANT USAGE ON SCHEMA audit TO release_pipeline;
GRANT SELECT ON audit.entries, audit.head TO release_pipeline;
GRANT EXECUTE ON FUNCTION audit.append(text, text) TO release_pipeline;
