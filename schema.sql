-- dispatch schema, version 6 (dispatch.py's MIGRATIONS bring an older database here). Applied at every start; every statement is idempotent.
-- Timestamps are ISO 8601 UTC text with milliseconds ("2026-01-25T10:30:00.000Z"), so text order is time order.

CREATE TABLE IF NOT EXISTS users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'user')),
    created_at    TEXT NOT NULL
);

-- Logged-out and refreshed JWTs, kept as long as a refresh could still use them (exp + the grace).
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti        TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL  -- epoch seconds: swept after this
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
    cpu_count       INTEGER,
    total_memory_mb INTEGER,
    metadata        TEXT NOT NULL DEFAULT '{}',
    tags            TEXT NOT NULL DEFAULT '[]',
    reported_status TEXT NOT NULL DEFAULT 'idle',  -- 'offline': its agent's last word, it stopped
    jobs_completed  INTEGER NOT NULL DEFAULT 0,    -- jobs completed on it (trigger jobs_count_completed)
    registered_at   TEXT NOT NULL,
    last_heartbeat  TEXT NOT NULL,
    -- takes jobs (available) or not: waiting for approval (pending), or paused by an admin
    state           TEXT NOT NULL DEFAULT 'available' CHECK (state IN ('available', 'paused', 'pending')),
    -- what it offers the farm (cpu_count and total_memory_mb are what the machine has)
    cpus            INTEGER NOT NULL DEFAULT 1,
    memory_mb       INTEGER NOT NULL DEFAULT 0,
    gpus            INTEGER NOT NULL DEFAULT 0,
    reported_pause  TEXT  -- why its agent takes no jobs now ("owner active"), NULL while it takes them
);

CREATE TABLE IF NOT EXISTS files (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    owner_id    TEXT NOT NULL,
    uploaded_at TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_expires ON files (expires_at);

CREATE TABLE IF NOT EXISTS jobs (
    id                TEXT PRIMARY KEY,
    seq               INTEGER NOT NULL UNIQUE,  -- submission order, the tie-break of every sort
    command           TEXT NOT NULL,
    file_id           TEXT,
    file_name         TEXT,
    file_sha256       TEXT,                     -- the input's hash, for the agent to check what it fetched
    working_directory TEXT,
    timeout           INTEGER NOT NULL,
    priority          TEXT NOT NULL,
    priority_rank     INTEGER NOT NULL,         -- high 2, normal 1, low 0
    tags              TEXT NOT NULL DEFAULT '[]',
    status            TEXT NOT NULL,
    submitted_by      TEXT NOT NULL,
    worker_id         TEXT,
    attempt           INTEGER NOT NULL DEFAULT 0,  -- hand-outs so far; the current one holds the job
    max_attempts      INTEGER NOT NULL DEFAULT 3,  -- attempts lost workers may cost before the job fails
    losses            INTEGER NOT NULL DEFAULT 0,  -- attempts lost with their worker so far
    retries           INTEGER NOT NULL DEFAULT 0,  -- re-runs allowed after a non-zero exit or a timeout
    retried           INTEGER NOT NULL DEFAULT 0,
    claim_run         TEXT,                        -- the agent run and poll that claimed the current attempt,
    claim_poll        INTEGER,                     -- so its heartbeats can say which claims reached it
    stdout_chars      INTEGER NOT NULL DEFAULT 0,  -- output received in the current attempt,
    stderr_chars      INTEGER NOT NULL DEFAULT 0,  -- kept or not (see job_output.part)
    progress          INTEGER,
    exit_code         INTEGER,
    error             TEXT,
    created_at        TEXT NOT NULL,
    started_at        TEXT,                        -- claimed
    command_started_at TEXT,                       -- the command started on the worker: the timeout's start
    completed_at      TEXT,
    cpus              INTEGER NOT NULL DEFAULT 1,  -- what it asks of a worker while it runs
    memory_mb         INTEGER NOT NULL DEFAULT 0,
    gpus              INTEGER NOT NULL DEFAULT 0,
    after             TEXT NOT NULL DEFAULT '[]',  -- the jobs it waits for (ids, JSON)
    parents_left      INTEGER NOT NULL DEFAULT 0,  -- of those, not completed yet: it is claimable at 0
    artifact_patterns TEXT NOT NULL DEFAULT '[]',  -- globs of the files to bring back (JSON)
    artifacts_when    TEXT NOT NULL DEFAULT 'on_success',
    input_tree_id     TEXT,                        -- its input as files by content (input_trees), or NULL
    env               TEXT NOT NULL DEFAULT '{}',  -- variables added to its command's environment (JSON)
    artifacts_attempt INTEGER,                     -- the attempt the artifacts below belong to
    artifacts_size    INTEGER,                     -- the zip's bytes (NULL: none kept)
    artifacts_files   INTEGER,
    artifacts_sha256  TEXT,
    artifacts_error   TEXT,                        -- why that attempt has no artifacts (too big)
    suspended_at      TEXT,                        -- its agent stopped its processes then (owner back)
    suspended_seconds REAL NOT NULL DEFAULT 0      -- earlier suspensions of the attempt: not in its timeout
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
    size         INTEGER NOT NULL,
    created_at   TEXT NOT NULL,
    last_used_at TEXT NOT NULL  -- sent, asked about, or named by a submitted job
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_last_used ON blobs (last_used_at);
CREATE TABLE IF NOT EXISTS blob_owners (
    sha256  TEXT NOT NULL,
    user_id TEXT NOT NULL,
    PRIMARY KEY (sha256, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS input_trees (
    id           TEXT PRIMARY KEY,  -- SHA-256 of the tree's JSON
    tree         TEXT NOT NULL,
    files        INTEGER NOT NULL,
    size         INTEGER NOT NULL,
    created_at   TEXT NOT NULL,
    last_used_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS input_trees_last_used ON input_trees (last_used_at);
-- Which blobs each tree holds: what a worker may fetch for the job it runs, and what keeps a blob.
CREATE TABLE IF NOT EXISTS tree_blobs (
    tree_id TEXT NOT NULL,
    sha256  TEXT NOT NULL,
    PRIMARY KEY (tree_id, sha256)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tree_blobs_blob ON tree_blobs (sha256);

-- Dependencies: a row per (parent, child). Both triggers act inside the statement that changes the
-- job, so a crash can never leave a child waiting for a parent that has already completed.
CREATE TABLE IF NOT EXISTS job_parents (
    parent_id TEXT NOT NULL,
    child_id  TEXT NOT NULL,
    PRIMARY KEY (parent_id, child_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_parents_child ON job_parents (child_id);
CREATE TRIGGER IF NOT EXISTS jobs_link_parents AFTER INSERT ON jobs WHEN NEW.after != '[]' BEGIN
    INSERT OR IGNORE INTO job_parents (parent_id, child_id) SELECT value, NEW.id FROM json_each(NEW.after);
END;
CREATE TRIGGER IF NOT EXISTS jobs_release_children AFTER UPDATE OF status ON jobs
WHEN NEW.status = 'completed' AND OLD.status != 'completed' BEGIN
    -- +status: found by the children's ids; an index on status would walk the whole queue
    UPDATE jobs SET parents_left = parents_left - 1
    WHERE id IN (SELECT child_id FROM job_parents WHERE parent_id = NEW.id) AND +status = 'queued';
END;
-- A worker's jobs done are counted here, in the statement that completes the job: the count survives
-- agent restarts and job retention, and never lags the job list.
CREATE TRIGGER IF NOT EXISTS jobs_count_completed AFTER UPDATE OF status ON jobs
WHEN NEW.status = 'completed' AND OLD.status != 'completed' BEGIN
    UPDATE workers SET jobs_completed = jobs_completed + 1 WHERE id = NEW.worker_id;
END;

-- Output is appended chunk by chunk, so a long log costs O(total size), never a rewrite per chunk.
-- Past the cap a stream keeps its head and a sliding tail; what fell between is counted, not kept.
CREATE TABLE IF NOT EXISTS job_output (
    chunk   INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    stream  TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    part    TEXT NOT NULL CHECK (part IN ('head', 'tail')),
    size    INTEGER NOT NULL,  -- length(data), before it: trimming the tail reads no data
    data    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_output_job ON job_output (job_id, attempt, stream, part, chunk);

-- Small facts about the database itself (the health check writes here to prove it can).
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

PRAGMA user_version = 7;
