-- AI Farm server: MySQL / MariaDB schema.
--
-- The specification's three tables (tasks, task_assignments, clients) keep their names,
-- columns and enum values. Everything else is additive: extra columns (marked "additive"),
-- extra enum values at the end of an enum, and the tables task_shards, task_rounds,
-- admin_tokens and audit_log. store/models.py mirrors this file; tests/services/test_schema.py applies
-- this file to MariaDB and compares it with the models.
--
-- Apply with:  mysql ai_farm < schema.sql
-- (CREATE DATABASE ai_farm CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci; first.)

CREATE TABLE tasks (
    id INT AUTO_INCREMENT PRIMARY KEY,
    type VARCHAR(255) NOT NULL,
    requirements JSON NOT NULL,
    -- additive values: paused, stopped
    status ENUM('pending', 'running', 'completed', 'failed', 'error', 'paused', 'stopped') NOT NULL,
    client_id VARCHAR(255),
    created_at DATETIME NOT NULL,
    updated_at DATETIME NOT NULL,
    result JSON,
    error_log TEXT,
    priority INT DEFAULT 0,
    config JSON,
    checkpoint_path VARCHAR(255),
    -- additive
    num_shards INT NOT NULL DEFAULT 1,
    current_round INT NOT NULL DEFAULT 0,
    status_reason VARCHAR(255),
    -- the secret seed of the task's central-DP noise: random, made by the server, never sent
    -- to a client (docs/aggregation.md, "The noise seed")
    noise_secret BIGINT,
    -- the SHA-256 of the file at checkpoint_path, stored when it is written
    checkpoint_sha256 VARCHAR(64),
    INDEX ix_tasks_status_priority (status, priority DESC, id)
);

CREATE TABLE task_assignments (
    id INT AUTO_INCREMENT PRIMARY KEY,
    task_id INT NOT NULL,
    client_id VARCHAR(255) NOT NULL,
    assigned_at DATETIME NOT NULL,
    -- additive values: released (the client went away or was disabled; not the shard's fault),
    -- timed_out (past deadline_at; the shard was reissued, a late result may still win)
    status ENUM('assigned', 'training', 'completed', 'failed', 'released', 'timed_out') NOT NULL,
    `rank` INT NOT NULL,
    -- for federated rounds: the client's uploaded update
    checkpoint_path VARCHAR(255),
    -- additive
    `round` INT NOT NULL DEFAULT 0,
    shard_id INT NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    progress FLOAT,
    metrics JSON,
    error TEXT,
    update_sha256 VARCHAR(64),
    num_examples INT,
    deadline_at DATETIME(6),  -- fixed when handed out, the sweep times the assignment out after it
    FOREIGN KEY (task_id) REFERENCES tasks(id) ON DELETE CASCADE,
    INDEX ix_assignments_client_status (client_id, status),
    INDEX ix_assignments_task_round (task_id, `round`, `rank`),
    INDEX ix_assignments_deadline (status, deadline_at)
);

CREATE TABLE clients (
    id VARCHAR(255) PRIMARY KEY,
    cpu_info JSON NOT NULL,
    ram_info JSON NOT NULL,
    gpu_info JSON,
    session_info JSON,
    last_seen DATETIME NOT NULL,
    status ENUM('active', 'inactive') NOT NULL,
    -- additive
    token_hash VARCHAR(64) NOT NULL,
    created_at DATETIME NOT NULL,
    disabled BOOL NOT NULL DEFAULT 0,
    cpu_cores INT NOT NULL DEFAULT 0,
    ram_gb DOUBLE NOT NULL DEFAULT 0,
    gpu_count INT NOT NULL DEFAULT 0,
    gpu_memory_gb DOUBLE NOT NULL DEFAULT 0,
    task_types JSON,
    conn_id VARCHAR(64),
    pending_requests INT NOT NULL DEFAULT 0,
    requested_at DATETIME(6),
    -- reliability: what became of its work, and how much it may hold at once
    valid_results INT NOT NULL DEFAULT 0,
    error_results INT NOT NULL DEFAULT 0,
    timeouts INT NOT NULL DEFAULT 0,
    refused_updates INT NOT NULL DEFAULT 0,
    turnaround_s DOUBLE NOT NULL DEFAULT 0,  -- summed over valid results
    throughput DOUBLE,  -- training examples per second, measured on federated rounds
    task_quota INT,  -- open assignments it may hold (NULL: MAX_TASKS_PER_CLIENT)
    -- the resource use it last reported (heartbeat, task_progress), and when
    utilization JSON,
    utilization_at DATETIME(6),
    UNIQUE INDEX ix_clients_conn (conn_id),
    INDEX ix_clients_status_seen (status, last_seen),
    INDEX ix_clients_waiting (pending_requests, requested_at)
);

-- Claimable work: rank `rank` of round `round` of a task. The claim runs
--   SELECT ... WHERE status = 'queued' ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED
-- and ix_task_shards_claim matches that ORDER BY exactly (with priority ASC in the index
-- MariaDB cannot use it for the sort and the claim runs ~300x slower).
CREATE TABLE task_shards (
    id INT AUTO_INCREMENT PRIMARY KEY,
    task_id INT NOT NULL,
    `round` INT NOT NULL,
    `rank` INT NOT NULL,
    status ENUM('queued', 'assigned', 'done', 'failed', 'paused', 'cancelled') NOT NULL,
    priority INT NOT NULL DEFAULT 0,
    task_type VARCHAR(255) NOT NULL,
    req_cpu_cores INT NOT NULL DEFAULT 0,
    req_ram_gb DOUBLE NOT NULL DEFAULT 0,
    req_gpu_count INT NOT NULL DEFAULT 0,
    req_gpu_memory_gb DOUBLE NOT NULL DEFAULT 0,
    assignment_id INT,
    attempts INT NOT NULL DEFAULT 0,
    created_at DATETIME(6) NOT NULL,
    updated_at DATETIME(6) NOT NULL,
    CONSTRAINT uq_task_shards_task_round_rank UNIQUE (task_id, `round`, `rank`),
    FOREIGN KEY (task_id) REFERENCES tasks(id) ON DELETE CASCADE,
    INDEX ix_task_shards_claim (status, priority DESC, id)
);

-- A federated round: the global model it trains from, the server optimizer state entering
-- it, and its metrics once aggregated.
CREATE TABLE task_rounds (
    id INT AUTO_INCREMENT PRIMARY KEY,
    task_id INT NOT NULL,
    `round` INT NOT NULL,
    status ENUM('training', 'done', 'failed') NOT NULL,
    model_path VARCHAR(255) NOT NULL,
    model_sha256 VARCHAR(64) NOT NULL,
    state_path VARCHAR(255),
    metrics JSON,
    started_at DATETIME(6) NOT NULL,
    finished_at DATETIME(6),
    aggregating_since DATETIME(6),  -- a lease: an aggregation of this round began then
    deadline_at DATETIME(6),  -- round_timeout_s: then the round closes on a quorum, or retries
    retries INT NOT NULL DEFAULT 0,  -- round timeouts that reissued missing ranks
    CONSTRAINT uq_task_rounds_task_round UNIQUE (task_id, `round`),
    FOREIGN KEY (task_id) REFERENCES tasks(id) ON DELETE CASCADE
);

-- Admin API tokens, stored as SHA-256 of the token. ADMIN_TOKEN from the environment is
-- accepted without a row here. A sign-in to the admin panel (ADMIN_USERNAME and
-- ADMIN_PASSWORD) issues a token that expires (expires_at), labelled panel:<user>. API
-- tokens (POST /api/tokens, python -m app token) expire only when created with expires_in.
-- A revoked token's row is deleted.
CREATE TABLE admin_tokens (
    id INT AUTO_INCREMENT PRIMARY KEY,
    token_hash VARCHAR(64) NOT NULL UNIQUE,
    label VARCHAR(255) NOT NULL,
    created_at DATETIME NOT NULL,
    expires_at DATETIME,
    last_used_at DATETIME  -- refreshed at most once a minute
);

-- Every admin write and panel sign-in, newest last: who (token:<id>, user:<name>, env for
-- ADMIN_TOKEN, anonymous for a failed sign-in), what, on what, from where.
CREATE TABLE audit_log (
    id INT AUTO_INCREMENT PRIMARY KEY,
    at DATETIME(6) NOT NULL,
    actor VARCHAR(255) NOT NULL,
    action VARCHAR(64) NOT NULL,
    target VARCHAR(255),
    detail JSON,
    remote VARCHAR(64)
);
