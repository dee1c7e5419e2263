-- One row per job run. A row is written when the run starts (result 'running') and
-- updated when it ends, so a run cut short by a crash stays visible as 'interrupted'.
CREATE TABLE job_runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job         TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    database    TEXT    NOT NULL,
    trigger     TEXT    NOT NULL,                 -- schedule | startup | missed | manual
    started_at  INTEGER NOT NULL,                 -- unix milliseconds, UTC
    finished_at INTEGER,                          -- unix milliseconds, UTC
    result      TEXT    NOT NULL
        CHECK (result IN ('running', 'success', 'failure', 'interrupted')),
    attempts    INTEGER NOT NULL DEFAULT 1,
    error       TEXT,
    details     TEXT                              -- JSON object, job-kind specific
);

CREATE INDEX job_runs_job_started ON job_runs (job, started_at);
CREATE INDEX job_runs_started ON job_runs (started_at);
