-- amo-gateway shared state, version 1: what the vault file holds, one row per record.
-- Secrets never sit in a plain column: `sealed` is a Fernet token (the vault key ring), so a dump holds
-- ciphertext only; `key_fp` names the key that sealed it so rotate-key finds the rows still under an old one.

CREATE TABLE amo_accounts (
    account_id  text PRIMARY KEY,
    sealed      bytea NOT NULL,                 -- the account's JSON (its token pair, in-flight marker) encrypted
    key_fp      text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX amo_accounts_updated ON amo_accounts (updated_at);  -- a probe's "what changed lately"

CREATE TABLE amo_states (
    state_key   text PRIMARY KEY,               -- SHA-256 of the issued state, never the state itself
    sealed      bytea NOT NULL,
    key_fp      text NOT NULL,
    expires_at  double precision NOT NULL       -- the gateway's clock, like every token time
);
CREATE INDEX amo_states_expiry ON amo_states (expires_at);

CREATE TABLE amo_exchange_slots (
    slot        text PRIMARY KEY,               -- SHA-256 of the login
    until       double precision NOT NULL
);

-- One replica refreshes an account at a time: a lease outlives a holder cut off from the database for as long
-- as its amoCRM call can last, so nobody sends the same refresh token meanwhile.
CREATE TABLE amo_refresh_leases (
    account_id  text PRIMARY KEY,
    holder      text NOT NULL,
    until       timestamptz NOT NULL
);
