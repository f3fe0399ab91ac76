-- amo-gateway shared state, version 5: the proxy's budget of 401-triggered refreshes, shared by every replica.
-- A row says a 401 spent a refresh of the account and no other may before `closed_until` (the database's clock);
-- the row goes when the budget reopens (the retry got past the 401).
CREATE TABLE amo_refresh_budget (
    account_id    text PRIMARY KEY,
    closed_until  timestamptz NOT NULL
);
