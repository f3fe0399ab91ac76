-- amo-gateway shared state, version 2: the per-account amoCRM budget shared by every replica.
-- One row per request sent to amoCRM in the last window (database clock); older rows are deleted as new ones come.
CREATE TABLE amo_rate_sends (
    account_id  text NOT NULL,
    sent_at     timestamptz NOT NULL
);
CREATE INDEX amo_rate_sends_account ON amo_rate_sends (account_id, sent_at);
