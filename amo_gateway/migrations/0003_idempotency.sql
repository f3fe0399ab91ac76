-- amo-gateway shared state, version 3: Idempotency-Key answers shared by every replica.
-- A retry may reach another replica than the first request did; it must get the first answer replayed.
-- The answer (amoCRM's status, headers and body: customer data) is sealed like the accounts.
CREATE TABLE amo_idempotency (
    consumer        text NOT NULL,
    key             text NOT NULL,
    request_fp      text NOT NULL,
    expires_at      timestamptz NOT NULL,
    status          integer,                    -- NULL while the first request is in flight
    sealed          bytea,                      -- {"headers": …, "body": base64} under the vault key ring
    key_fp          text,
    outcome_unknown boolean NOT NULL DEFAULT false,
    PRIMARY KEY (consumer, key)
);
CREATE INDEX amo_idempotency_expiry ON amo_idempotency (expires_at);
