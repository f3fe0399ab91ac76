-- amo-gateway shared state, version 4: the alert outbox and the audit trail, shared by every replica.
-- Neither holds a secret (the file versions are plain JSON too): alerts carry account ids, subdomains, reasons
-- and times; the audit trail names every secret by an HMAC only. So these rows are plain, not sealed.

-- The alert outbox (backends/pg_outbox.py). Every change holds the lock on the one row of amo_alert_outbox,
-- as the file version holds its flock: one alert per state change, one lease per delivery.
CREATE TABLE amo_alert_outbox (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    dropped     bigint NOT NULL DEFAULT 0       -- deliveries dropped for AMO_ALERT_OUTBOX_MAX
);
INSERT INTO amo_alert_outbox DEFAULT VALUES;

CREATE TABLE amo_alert_active (                 -- the conditions in force and when each was last sent
    key         text PRIMARY KEY,               -- account_id|kind
    record      jsonb NOT NULL
);

CREATE TABLE amo_alert_history (                -- the alerts raised, with each target's delivery state
    seq         bigserial PRIMARY KEY,
    id          text NOT NULL UNIQUE,
    account_id  text,
    entry       jsonb NOT NULL
);
CREATE INDEX amo_alert_history_account ON amo_alert_history (account_id, seq);

CREATE TABLE amo_alert_deliveries (             -- one per alert and target, in the order queued
    seq         bigserial PRIMARY KEY,
    id          text NOT NULL,                  -- the alert's id: receivers drop a redelivery by it
    target      text NOT NULL,
    payload     jsonb NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    next_at     double precision NOT NULL,      -- the gateway's clock, like every alert time
    lease_until double precision NOT NULL DEFAULT 0,
    lease       text,                           -- the process that holds it until lease_until
    last_error  text,
    UNIQUE (id, target)
);
CREATE INDEX amo_alert_deliveries_target ON amo_alert_deliveries (target, seq);

-- The audit trail (backends/pg_audit.py): append-only, in the order written. The offsets place each line in
-- the trail's whole length in bytes (a line counted with its newline, as in the file), so keeping the last
-- AMO_AUDIT_MAX_BYTES * (AMO_AUDIT_BACKUPS + 1) bytes is one indexed DELETE.
CREATE TABLE amo_audit (
    seq          bigserial PRIMARY KEY,
    line         text NOT NULL,                 -- the JSON line exactly as the file version stores it
    start_offset bigint NOT NULL,
    end_offset   bigint NOT NULL
);
CREATE INDEX amo_audit_start ON amo_audit (start_offset);

CREATE FUNCTION amo_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'amo_audit is append-only: a line is never changed once written';
END
$$;
CREATE TRIGGER amo_audit_no_update BEFORE UPDATE ON amo_audit
    FOR EACH ROW EXECUTE FUNCTION amo_audit_append_only();
