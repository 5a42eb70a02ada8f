-- dispatch schema for PostgreSQL (DISPATCH_DATABASE_URL), version 6: the tables of schema.sql, typed for
-- PostgreSQL, plus what several servers on one database share. Applied at every start under an advisory
-- lock; every statement is idempotent. Timestamps are ISO 8601 UTC text, as in SQLite, so both engines
-- run the same statements; the three SQLite functions those use are defined here first.

CREATE OR REPLACE FUNCTION json_each(document text) RETURNS TABLE (key bigint, value text)
LANGUAGE sql IMMUTABLE AS $$
    SELECT ordinality - 1, value FROM jsonb_array_elements_text(document::jsonb) WITH ORDINALITY
$$;
CREATE OR REPLACE FUNCTION json_extract(document text, path text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT document::jsonb ->> substr(path, 3)  -- '$.name' only: all the statements ask
$$;
CREATE OR REPLACE FUNCTION julianday(moment text) RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT extract(epoch FROM moment::timestamptz)::double precision / 86400 + 2440587.5
$$;
-- Emails compare as SQLite's NOCASE does.
DO $$ BEGIN
    CREATE COLLATION nocase (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

CREATE TABLE IF NOT EXISTS users (
    id            TEXT PRIMARY KEY,
    email         TEXT COLLATE nocase NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'user')),
    created_at    TEXT NOT NULL
);

-- Logged-out and refreshed JWTs, kept as long as a refresh could still use them (exp + the grace).
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti        TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL  -- epoch seconds: swept after this
);

-- Personal API tokens ("dsp_..."), for scripts; only a hash is kept, the token is shown once.
CREATE TABLE IF NOT EXISTS api_tokens (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    name       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,  -- SHA-256 of the token
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS api_tokens_user ON api_tokens (user_id);

CREATE TABLE IF NOT EXISTS workers (
    id              TEXT PRIMARY KEY,
    token_hash      TEXT NOT NULL UNIQUE,
    hostname        TEXT NOT NULL,
    cpu_count       BIGINT,
    total_memory_mb BIGINT,
    metadata        TEXT NOT NULL DEFAULT '{}',
    tags            TEXT NOT NULL DEFAULT '[]',
    reported_status TEXT NOT NULL DEFAULT 'idle',  -- 'offline': its agent's last word, it stopped
    jobs_completed  BIGINT NOT NULL DEFAULT 0,    -- jobs completed on it (trigger jobs_count_completed)
    registered_at   TEXT NOT NULL,
    last_heartbeat  TEXT NOT NULL,
    -- takes jobs (available) or not: waiting for approval (pending), or paused by an admin
    state           TEXT NOT NULL DEFAULT 'available' CHECK (state IN ('available', 'paused', 'pending')),
    -- what it offers the farm (cpu_count and total_memory_mb are what the machine has)
    cpus            BIGINT NOT NULL DEFAULT 1,
    memory_mb       BIGINT NOT NULL DEFAULT 0,
    gpus            BIGINT NOT NULL DEFAULT 0,
    reported_pause  TEXT  -- why its agent takes no jobs now ("owner active"), NULL while it takes them
);

CREATE TABLE IF NOT EXISTS files (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    size        BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    owner_id    TEXT NOT NULL,
    uploaded_at TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_expires ON files (expires_at);

CREATE SEQUENCE IF NOT EXISTS jobs_seq;  -- jobs.seq of new jobs, whichever server queues them
CREATE TABLE IF NOT EXISTS jobs (
    id                TEXT PRIMARY KEY,
    seq               BIGINT NOT NULL UNIQUE,  -- submission order, the tie-break of every sort
    command           TEXT NOT NULL,
    file_id           TEXT,
    file_name         TEXT,
    file_sha256       TEXT,                     -- the input's hash, for the agent to check what it fetched
    working_directory TEXT,
    timeout           BIGINT NOT NULL,
    priority          TEXT NOT NULL,
    priority_rank     BIGINT NOT NULL,         -- high 2, normal 1, low 0
    tags              TEXT NOT NULL DEFAULT '[]',
    status            TEXT NOT NULL,
    submitted_by      TEXT NOT NULL,
    worker_id         TEXT,
    attempt           BIGINT NOT NULL DEFAULT 0,  -- hand-outs so far; the current one holds the job
    max_attempts      BIGINT NOT NULL DEFAULT 3,  -- attempts lost workers may cost before the job fails
    losses            BIGINT NOT NULL DEFAULT 0,  -- attempts lost with their worker so far
    retries           BIGINT NOT NULL DEFAULT 0,  -- re-runs allowed after a non-zero exit or a timeout
    retried           BIGINT NOT NULL DEFAULT 0,
    claim_run         TEXT,                        -- the agent run and poll that claimed the current attempt,
    claim_poll        BIGINT,                     -- so its heartbeats can say which claims reached it
    stdout_chars      BIGINT NOT NULL DEFAULT 0,  -- output received in the current attempt,
    stderr_chars      BIGINT NOT NULL DEFAULT 0,  -- kept or not (see job_output.part)
    progress          BIGINT,
    exit_code         BIGINT,
    error             TEXT,
    created_at        TEXT NOT NULL,
    started_at        TEXT,                        -- claimed
    command_started_at TEXT,                       -- the command started on the worker: the timeout's start
    completed_at      TEXT,
    cpus              BIGINT NOT NULL DEFAULT 1,  -- what it asks of a worker while it runs
    memory_mb         BIGINT NOT NULL DEFAULT 0,
    gpus              BIGINT NOT NULL DEFAULT 0,
    after             TEXT NOT NULL DEFAULT '[]',  -- the jobs it waits for (ids, JSON)
    parents_left      BIGINT NOT NULL DEFAULT 0,  -- of those, not completed yet: it is claimable at 0
    artifact_patterns TEXT NOT NULL DEFAULT '[]',  -- globs of the files to bring back (JSON)
    artifacts_when    TEXT NOT NULL DEFAULT 'on_success',
    input_tree_id     TEXT,                        -- its input as files by content (input_trees), or NULL
    env               TEXT NOT NULL DEFAULT '{}',  -- variables added to its command's environment (JSON)
    artifacts_attempt BIGINT,                     -- the attempt the artifacts below belong to
    artifacts_size    BIGINT,                     -- the zip's bytes (NULL: none kept)
    artifacts_files   BIGINT,
    artifacts_sha256  TEXT,
    artifacts_error   TEXT,                        -- why that attempt has no artifacts (too big)
    suspended_at      TEXT,                        -- its agent stopped its processes then (owner back)
    suspended_seconds DOUBLE PRECISION NOT NULL DEFAULT 0      -- earlier suspensions of the attempt: not in its timeout
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, priority_rank DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_worker ON jobs (worker_id, status);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (completed_at) WHERE completed_at IS NOT NULL;
-- The claim walks the people with claimable jobs, and each one's queue in order, by seeks (see claim_next_job).
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (status, parents_left, submitted_by, priority_rank DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (submitted_by, status);         -- running now, per person
CREATE INDEX IF NOT EXISTS jobs_owner_served ON jobs (submitted_by, started_at);  -- served last, per person
CREATE INDEX IF NOT EXISTS jobs_input_tree ON jobs (input_tree_id) WHERE input_tree_id IS NOT NULL;

-- Content-addressed inputs. A blob is a file's content, named by its SHA-256 and kept once in
-- <data dir>/blobs; each person who sent it is an owner, and only an owner (or an admin) may name
-- it in a job. An input tree is a job's files ([{"path", "sha256", "size", "mode"}]), kept once
-- under a hash of its JSON. Both are swept once nothing has used them for DISPATCH_FILE_TTL_DAYS.
CREATE TABLE IF NOT EXISTS blobs (
    sha256       TEXT PRIMARY KEY,
    size         BIGINT NOT NULL,
    created_at   TEXT NOT NULL,
    last_used_at TEXT NOT NULL  -- sent, asked about, or named by a submitted job
);
CREATE INDEX IF NOT EXISTS blobs_last_used ON blobs (last_used_at);
CREATE TABLE IF NOT EXISTS blob_owners (
    sha256  TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (sha256, user_id)
);
CREATE TABLE IF NOT EXISTS input_trees (
    id           TEXT PRIMARY KEY,  -- SHA-256 of the tree's JSON
    tree         TEXT NOT NULL,
    files        BIGINT NOT NULL,
    size         BIGINT NOT NULL,
    created_at   TEXT NOT NULL,
    last_used_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS input_trees_last_used ON input_trees (last_used_at);
-- Which blobs each tree holds: what a worker may fetch for the job it runs, and what keeps a blob.
CREATE TABLE IF NOT EXISTS tree_blobs (
    tree_id TEXT NOT NULL,
    sha256  TEXT NOT NULL,
    PRIMARY KEY (tree_id, sha256)
);
CREATE INDEX IF NOT EXISTS tree_blobs_blob ON tree_blobs (sha256);

-- Dependencies: a row per (parent, child). Both triggers act inside the statement that changes the
-- job, so a crash can never leave a child waiting for a parent that has already completed.
CREATE TABLE IF NOT EXISTS job_parents (
    parent_id TEXT NOT NULL,
    child_id  TEXT NOT NULL,
    PRIMARY KEY (parent_id, child_id)
);
CREATE INDEX IF NOT EXISTS job_parents_child ON job_parents (child_id);
CREATE OR REPLACE FUNCTION jobs_link_parents() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    INSERT INTO job_parents (parent_id, child_id) SELECT value, NEW.id FROM json_each(NEW.after)
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER jobs_link_parents AFTER INSERT ON jobs
FOR EACH ROW WHEN (NEW.after != '[]') EXECUTE FUNCTION jobs_link_parents();
CREATE OR REPLACE FUNCTION jobs_release_children() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    UPDATE jobs SET parents_left = parents_left - 1
    WHERE id IN (SELECT child_id FROM job_parents WHERE parent_id = NEW.id) AND status = 'queued';
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER jobs_release_children AFTER UPDATE OF status ON jobs
FOR EACH ROW WHEN (NEW.status = 'completed' AND OLD.status != 'completed') EXECUTE FUNCTION jobs_release_children();
-- A worker's jobs done are counted here, in the statement that completes the job: the count survives
-- agent restarts and job retention, and never lags the job list.
CREATE OR REPLACE FUNCTION jobs_count_completed() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
    UPDATE workers SET jobs_completed = jobs_completed + 1 WHERE id = NEW.worker_id;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER jobs_count_completed AFTER UPDATE OF status ON jobs
FOR EACH ROW WHEN (NEW.status = 'completed' AND OLD.status != 'completed') EXECUTE FUNCTION jobs_count_completed();

-- Output is appended chunk by chunk, so a long log costs O(total size), never a rewrite per chunk.
-- Past the cap a stream keeps its head and a sliding tail; what fell between is counted, not kept.
CREATE TABLE IF NOT EXISTS job_output (
    chunk   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id  TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    stream  TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    part    TEXT NOT NULL CHECK (part IN ('head', 'tail')),
    size    BIGINT NOT NULL,  -- length(data), before it: trimming the tail reads no data
    data    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_output_job ON job_output (job_id, attempt, stream, part, chunk);

-- Small facts about the database itself (the health check writes here to prove it can).
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Every server's events (job and worker changes, output), so that a WebSocket on any server sees all of
-- them: a server writes each here and NOTIFYs dispatch_events (no payload), the others read what is new.
-- Kept a minute.
CREATE TABLE IF NOT EXISTS events (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    server    TEXT NOT NULL,  -- the server that published it (it has already sent it to its own clients)
    at        TEXT NOT NULL,
    event     TEXT NOT NULL   -- the event's JSON, as sent to WebSocket clients
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
-- A server's events, in order, then a NOTIFY naming the server (so it can skip its own). One server
-- at a time (the lock, until the statement's transaction ends), so ids become visible in their
-- order and a reader that has seen id n never misses a smaller one.
CREATE OR REPLACE FUNCTION publish_events(origin text, moment text, batch text) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN
    PERFORM pg_advisory_xact_lock(7401003);
    INSERT INTO events (server, at, event) SELECT origin, moment, value FROM json_each(batch) ORDER BY key;
    PERFORM pg_notify('dispatch_events', origin);
END $$;

-- The contents of uploads, blobs and artifacts, in chunks of at most 1 MB, so that every server can
-- serve every file and one pg_dump backs up the whole farm. key: "upload/<id>", "blob/<sha256>" or
-- "artifacts/<job id>.<attempt>".
CREATE TABLE IF NOT EXISTS file_chunks (
    key  TEXT NOT NULL,
    n    BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (key, n)
);

INSERT INTO meta (key, value) VALUES ('schema_version', '7') ON CONFLICT (key) DO UPDATE SET value = excluded.value;

