"""The backend's schema, as named and ordered migrations for SQLite and PostgreSQL.

Tokens ``{id}``, ``{blob}``, ``{bigint}`` and ``{bool}`` are filled in per dialect by
:mod:`backend.db`. Times are Unix milliseconds, amounts milli-tokens, distances metres.
Append new migrations; never edit one that has shipped.
"""

MIGRATIONS: list[tuple[str, str]] = [
    ("001_devices", """
CREATE TABLE devices (
    dev            TEXT PRIMARY KEY,          -- 32 hex chars
    pub            {blob} NOT NULL,           -- raw 32-byte Ed25519 key
    vin            TEXT,                      -- the VIN it is approved for
    status         TEXT NOT NULL,             -- pending | approved | revoked | rejected
    enrollment     TEXT NOT NULL,             -- the signed enrolment JWS, verbatim
    fleet_token_id {bigint},
    enrolled_at    {bigint} NOT NULL,
    decided_at     {bigint},
    decided_by     TEXT,
    flagged_vin    TEXT,                      -- a vin_mismatch waiting for an operator
    through        {bigint} NOT NULL DEFAULT 0,   -- highest seq with every seq <= it stored
    head_id        TEXT,                      -- record id at seq = through (the chain tip)
    last_seen      {bigint},                  -- arrival time of the last message
    status_json    TEXT,                      -- the last retained status message
    online         {bool} NOT NULL DEFAULT 0
);
CREATE TABLE fleet_tokens (
    id          {id},
    token_hash  TEXT NOT NULL UNIQUE,          -- SHA-256 hex, never the token itself
    label       TEXT NOT NULL,
    expires_at  {bigint},
    max_uses    {bigint},
    uses        {bigint} NOT NULL DEFAULT 0,
    created_at  {bigint} NOT NULL
)
"""),
    ("002_records", """
CREATE TABLE records (
    dev          TEXT NOT NULL REFERENCES devices(dev),
    seq          {bigint} NOT NULL,
    id           TEXT NOT NULL UNIQUE,         -- SHA-256 of the JWS
    jws          TEXT NOT NULL,                -- verbatim, as signed
    kind         TEXT NOT NULL,
    t            {bigint} NOT NULL,            -- as signed by the device
    t_est        {bigint} NOT NULL,            -- best estimate of wall time (unsynced clocks)
    clock        TEXT NOT NULL,
    boot         TEXT NOT NULL,
    mono_ms      {bigint} NOT NULL,
    vin          TEXT,
    odo_m        {bigint},
    src          TEXT,
    status       TEXT NOT NULL,                -- accepted | rejected
    reason       TEXT,
    received_at  {bigint} NOT NULL,
    PRIMARY KEY (dev, seq)
);
CREATE INDEX records_vin ON records (vin, seq);
CREATE TABLE forks (
    id           {id},
    dev          TEXT NOT NULL REFERENCES devices(dev),
    seq          {bigint} NOT NULL,
    record_id    TEXT NOT NULL UNIQUE,
    jws          TEXT NOT NULL,
    received_at  {bigint} NOT NULL
);
CREATE TABLE rejections (                    -- records that did not take a seq
    id           {id},
    dev          TEXT NOT NULL,                -- as named by the topic
    seq          {bigint},
    reason       TEXT NOT NULL,
    detail       TEXT NOT NULL,
    body         TEXT NOT NULL,
    received_at  {bigint} NOT NULL
);
CREATE INDEX rejections_dev ON rejections (dev, id)
"""),
    ("003_ledger", """
CREATE TABLE drivers (
    id          TEXT PRIMARY KEY,
    name        TEXT,
    created_at  {bigint} NOT NULL
);
CREATE TABLE assignments (
    id          {id},
    driver_id   TEXT NOT NULL REFERENCES drivers(id),
    vin         TEXT NOT NULL,
    valid_from  {bigint} NOT NULL,
    valid_to    {bigint},
    created_at  {bigint} NOT NULL
);
CREATE INDEX assignments_vin ON assignments (vin, valid_from);
CREATE TABLE transfers (
    id             {id},
    key            TEXT NOT NULL UNIQUE,       -- idempotency key
    from_account   TEXT NOT NULL,
    to_account     TEXT NOT NULL,
    amount         {bigint} NOT NULL CHECK (amount > 0),
    rule_id        TEXT,
    rules_version  TEXT,
    dev            TEXT,
    record_id      TEXT,
    week           TEXT,
    memo           TEXT,
    created_at     {bigint} NOT NULL
);
CREATE INDEX transfers_from ON transfers (from_account, id);
CREATE INDEX transfers_to ON transfers (to_account, id)
"""),
    ("004_translog", """
CREATE TABLE translog (
    idx         {bigint} PRIMARY KEY,          -- 0-based leaf index
    entry_kind  TEXT NOT NULL,                 -- record | transfer
    ref         TEXT NOT NULL UNIQUE,          -- record id, or transfer key
    entry       {blob} NOT NULL,               -- the leaf's data
    leaf_hash   {blob} NOT NULL,
    created_at  {bigint} NOT NULL
);
CREATE TABLE checkpoints (
    size        {bigint} PRIMARY KEY,
    root        {blob} NOT NULL,
    signed      TEXT NOT NULL,                 -- the signed checkpoint (JWS by the log key)
    created_at  {bigint} NOT NULL
);
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
)
"""),
    ("005_operators", """
CREATE TABLE operators (
    username       TEXT PRIMARY KEY,
    password_hash  TEXT NOT NULL,
    created_at     {bigint} NOT NULL
);
CREATE TABLE sessions (
    token_hash  TEXT PRIMARY KEY,
    username    TEXT NOT NULL REFERENCES operators(username),
    expires_at  {bigint} NOT NULL
)
"""),
    ("101_translog_nodes", """
CREATE TABLE translog_nodes (                -- complete subtrees of the log, for O(log n) roots and proofs
    level  {bigint} NOT NULL,                  -- a node at level L covers 2**L leaves (L >= 1)
    idx    {bigint} NOT NULL,                  -- its position among the nodes of that level
    hash   {blob} NOT NULL,
    PRIMARY KEY (level, idx)
);
CREATE INDEX transfers_dev_week ON transfers (dev, week);
CREATE INDEX transfers_record ON transfers (record_id)
"""),
    ("102_evidence_budget", """
CREATE TABLE evidence_budget (               -- how much refused content each device has had kept
    bucket      TEXT PRIMARY KEY,              -- a device id, or *unknown* for every unenrolled topic
    kept        {bigint} NOT NULL,
    kept_bytes  {bigint} NOT NULL,
    dropped     {bigint} NOT NULL              -- refused afterwards: counted, not stored
)
"""),
    ("103_vehicles", """
CREATE TABLE vehicles (                      -- the highest odometer accepted per VIN, from any device
    vin         TEXT PRIMARY KEY,
    top_odo_m   {bigint} NOT NULL,
    top_src     TEXT,
    top_dev     TEXT NOT NULL,
    top_seq     {bigint} NOT NULL,
    updated_at  {bigint} NOT NULL
);
ALTER TABLE devices ADD COLUMN approved_at {bigint};     -- first approval: rewards count from then
ALTER TABLE devices ADD COLUMN held_at {bigint};         -- rewards held since (a rollback) until cleared
ALTER TABLE devices ADD COLUMN held_reason TEXT;
ALTER TABLE devices ADD COLUMN retired_at {bigint};      -- replaced by another dongle in the same vehicle
ALTER TABLE records ADD COLUMN base_odo_m {bigint};      -- a trip: the vehicle's highest reading before it
CREATE INDEX records_vin_time ON records (vin, t_est);
UPDATE devices SET approved_at = decided_at WHERE status = 'approved';
INSERT INTO vehicles (vin, top_odo_m, top_src, top_dev, top_seq, updated_at)
    SELECT r.vin, r.odo_m, r.src, r.dev, r.seq, r.received_at FROM records r
    WHERE r.status = 'accepted' AND r.vin IS NOT NULL AND r.odo_m IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM records q WHERE q.vin = r.vin AND q.status = 'accepted'
                      AND q.odo_m IS NOT NULL AND (q.odo_m > r.odo_m OR (q.odo_m = r.odo_m AND
                      (q.dev > r.dev OR (q.dev = r.dev AND q.seq > r.seq)))))
"""),
    ("104_log_notes", """
CREATE TABLE log_checkpoints (               -- c2sp.org/tlog-checkpoint notes signed by the log key
    size        {bigint} PRIMARY KEY,
    root        {blob} NOT NULL,
    note        TEXT NOT NULL,                 -- the note: body and the log's signature line
    created_at  {bigint} NOT NULL
);
CREATE TABLE log_cosignatures (              -- c2sp.org/tlog-cosignature lines returned by witnesses
    size        {bigint} NOT NULL,
    witness     TEXT NOT NULL,                 -- the witness's URL, as configured
    line        TEXT NOT NULL,                 -- the signature line, verbatim
    created_at  {bigint} NOT NULL,
    PRIMARY KEY (size, witness)
);
CREATE TABLE log_witnesses (                 -- what each configured witness has cosigned
    witness     TEXT PRIMARY KEY,
    size        {bigint} NOT NULL,             -- the largest checkpoint it cosigned (or said it has)
    last_error  TEXT,
    updated_at  {bigint} NOT NULL
)
"""),
    ("105_device_log", """
CREATE TABLE device_log (                    -- the log's enrolment and decision entries, by device and VIN
    ref     TEXT PRIMARY KEY,                  -- the entry's ref (tables translog_queue, then translog)
    dev     TEXT NOT NULL,
    vin     TEXT,                              -- the enrolment's VIN, or the one the decision is about
    kind    TEXT NOT NULL,                     -- enrolment or decision
    action  TEXT,                              -- a decision's: approve, revoke, retire or clear
    at      {bigint} NOT NULL
);
CREATE INDEX device_log_dev ON device_log (dev);
CREATE INDEX device_log_vin ON device_log (vin)
"""),
    ("106_translog_queue", """
CREATE TABLE translog_queue (                -- entries stored, not yet in the tree: the sequencer's work
    id          {id},                          -- arrival order: the order they are integrated in
    entry_kind  TEXT NOT NULL,
    ref         TEXT NOT NULL UNIQUE,
    entry       {blob} NOT NULL,
    created_at  {bigint} NOT NULL
)
"""),
    ("107_transfers_week", """
CREATE INDEX transfers_rule_week ON transfers (rule_id, week)   -- a rule's weekly total, at each credit
"""),
    ("108_rules_versions", """
CREATE TABLE rules_versions (                -- the published rules files: the rule book
    id              {id},                      -- publication order
    version         TEXT NOT NULL UNIQUE,      -- the file's version
    sha256          TEXT NOT NULL UNIQUE,      -- hex SHA-256 of the file's bytes
    effective_from  {bigint} NOT NULL UNIQUE,  -- from when it decides credits (0: from the beginning)
    published_at    {bigint} NOT NULL,
    text            TEXT NOT NULL              -- the file, verbatim
);
-- a reward's rules version, by the sha256 of its file (rules_versions.sha256)
ALTER TABLE transfers ADD COLUMN rules_sha256 TEXT
"""),
    ("109_api_tokens", """
CREATE TABLE api_tokens (                    -- bearer credentials of the JSON API (odo-backend api-tokens)
    id          {id},
    name        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,          -- SHA-256 hex, never the token itself
    role        TEXT NOT NULL,                 -- operator, partner or driver
    driver_id   TEXT REFERENCES drivers(id),   -- a driver token's driver
    expires_at  {bigint},
    revoked_at  {bigint},                      -- a revoked token's row is kept
    created_at  {bigint} NOT NULL
);
CREATE UNIQUE INDEX api_tokens_name ON api_tokens (name) WHERE revoked_at IS NULL
"""),
    ("110_driver_portal", """
CREATE TABLE driver_passwords (              -- a driver's portal password (scrypt, as an operator's)
    driver_id      TEXT PRIMARY KEY REFERENCES drivers(id),
    password_hash  TEXT NOT NULL,
    updated_at     {bigint} NOT NULL
);
CREATE TABLE driver_login_codes (            -- one-time codes an operator issued, only their hashes
    code_hash   TEXT PRIMARY KEY,              -- SHA-256 of the driver id and the code
    driver_id   TEXT NOT NULL REFERENCES drivers(id),
    created_at  {bigint} NOT NULL,
    expires_at  {bigint} NOT NULL,
    used_at     {bigint}                       -- set by the login it let in, never again
);
CREATE INDEX driver_login_codes_driver ON driver_login_codes (driver_id);
CREATE TABLE driver_sessions (               -- the portal's sessions, apart from the operators'
    token_hash  TEXT PRIMARY KEY,
    driver_id   TEXT NOT NULL REFERENCES drivers(id),
    expires_at  {bigint} NOT NULL
)
"""),
    ("111_display_units", """
ALTER TABLE devices ADD COLUMN display_unit TEXT;        -- km | mi, or NULL for the fleet's display_unit
CREATE TABLE vehicle_allowances (            -- a lease's mileage allowance per VIN
    vin         TEXT PRIMARY KEY,
    per_year_m  {bigint} NOT NULL,             -- metres a year (given in km or mi, to the nearest metre)
    unit        TEXT NOT NULL,                 -- the unit it was given in: km | mi
    set_at      {bigint} NOT NULL,
    set_by      TEXT NOT NULL
)
"""),
    ("112_webhooks", """
CREATE TABLE webhook_events (                -- what the watcher found (backend.notify.events), once each
    key          TEXT PRIMARY KEY,             -- e.g. fork:<record id>: also the body's id
    event        TEXT NOT NULL,                -- one of backend.notify.config.EVENTS
    at           {bigint} NOT NULL,            -- when it happened
    body         TEXT NOT NULL,                -- the JSON body sent to every webhook, verbatim
    detected_at  {bigint} NOT NULL
);
CREATE TABLE webhook_deliveries (            -- one per event and webhook subscribed to it when it was found
    id           {id},
    event_key    TEXT NOT NULL REFERENCES webhook_events(key),
    webhook      TEXT NOT NULL,                -- the webhook's URL, as configured
    status       TEXT NOT NULL,                -- pending, delivered or failed (tries or age used up)
    attempts     {bigint} NOT NULL DEFAULT 0,
    next_at      {bigint},                     -- pending: not tried again before then
    lease_until  {bigint},                     -- a process is trying it until then
    lease_owner  TEXT,
    last_code    {bigint},                     -- the last attempt's HTTP status, if it had one
    last_error   TEXT,
    created_at   {bigint} NOT NULL,
    updated_at   {bigint} NOT NULL,
    UNIQUE (event_key, webhook)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (webhook, status, next_at);
CREATE INDEX webhook_deliveries_updated ON webhook_deliveries (updated_at);
CREATE TABLE webhook_attempts (              -- every attempt of every delivery
    delivery_id  {bigint} NOT NULL REFERENCES webhook_deliveries(id),
    n            {bigint} NOT NULL,            -- 1, 2, 3 …
    at           {bigint} NOT NULL,
    code         {bigint},                     -- the HTTP status, or null when there was none
    error        TEXT,                         -- null for a 2xx
    next_at      {bigint},                     -- the retry it scheduled, null when it ended the delivery
    PRIMARY KEY (delivery_id, n)
);
CREATE TABLE webhook_cursors (               -- how far the watcher has looked, per source
    source  TEXT PRIMARY KEY,
    at      {bigint} NOT NULL
);
CREATE INDEX forks_received ON forks (received_at);
CREATE INDEX records_events ON records (received_at) WHERE kind = 'event'
"""),
    ("113_claims", """
CREATE TABLE claim_codes (                   -- one-time pairing codes: a driver claims the car a device is in
    id          {id},
    code_hash   TEXT NOT NULL UNIQUE,          -- SHA-256 hex of the code, never the code itself
    driver_id   TEXT NOT NULL REFERENCES drivers(id),
    created_at  {bigint} NOT NULL,
    expires_at  {bigint} NOT NULL,             -- set to now when a newer code of the driver is made
    used_at     {bigint},                      -- the backend's receipt time of the claim
    used_by     TEXT,                          -- the device that claimed with it
    vin         TEXT,
    valid_from  {bigint},                      -- the start of the driver's assignment it made or found
    created     {bool}                         -- 1: it made that assignment, 0: the driver had the car
);
CREATE INDEX claim_codes_driver ON claim_codes (driver_id, expires_at);
CREATE TABLE claim_failures (                -- wrong, expired or used codes per device, in a window
    dev           TEXT PRIMARY KEY,
    window_start  {bigint} NOT NULL,
    failures      {bigint} NOT NULL
)
"""),
]
