-- Version 1: the store of one coordinator (issue 15, phase 1).
--
-- Bodies are the prost bytes `store/codec.rs` writes for every engine; the
-- other columns are only what SQL filters, orders or checks on. Ids are
-- ULIDs as uuid (16 big-endian bytes), so uuid order is creation order.

CREATE TABLE tasks (
    id uuid PRIMARY KEY,
    state smallint NOT NULL,          -- the weft.v1 TaskState number
    attempt bigint NOT NULL,
    outcome smallint,                 -- the latest attempt's Outcome number, if any
    updated_at timestamptz NOT NULL,
    finished_at timestamptz,          -- updated_at once final; NULL while live
    next_seq bigint NOT NULL,         -- the seq the next event gets: the gap check
    record bytea NOT NULL             -- encode_task_without_spec
);
CREATE INDEX tasks_state ON tasks (state, id);                                     -- List by state
CREATE INDEX tasks_live ON tasks (id) WHERE finished_at IS NULL;                   -- a restart
CREATE INDEX tasks_final ON tasks (finished_at, id) WHERE finished_at IS NOT NULL; -- retention, recently final

CREATE TABLE task_specs (id uuid PRIMARY KEY, spec bytea NOT NULL);   -- written once
CREATE TABLE task_secrets (id uuid PRIMARY KEY, env bytea NOT NULL);  -- deleted when final

CREATE TABLE events (
    task_id uuid NOT NULL,
    seq bigint NOT NULL,
    attempt bigint NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (task_id, seq)
);

CREATE TABLE tokens (id text PRIMARY KEY, record bytea NOT NULL);     -- a hash, never a secret
CREATE TABLE node_identities (id uuid PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE schedules (name text PRIMARY KEY, record bytea NOT NULL);
CREATE TABLE limits (kind text NOT NULL, name text NOT NULL, record bytea NOT NULL, PRIMARY KEY (kind, name));
