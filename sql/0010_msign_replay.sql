-- 0010_msign_replay: one row per state-changing signed request accepted
-- (SPEC 5): a second request with the same signature base within the
-- signature's window is refused (401 replayed) in every process and on
-- every host, because the record lives here, not in one process.
--
-- base_hash is SHA-256 of the RFC 9421 signature base, which covers the
-- method, path, query, Content-Digest and the signature parameters
-- (created, keyid, nonce, ...): keyed on what was signed, never on the
-- signature bytes, since (r, s) and (r, n - s) verify alike.
-- expires_at is the end of the window in which the signature could be
-- accepted at all (created + 300 s, plus a margin for clock skew between
-- hosts): after it the time check refuses the request anyway, and the row
-- may go. src/auth/gate.c removes a few expired rows with every insert.
CREATE TABLE msign_replay (
    base_hash   bytea PRIMARY KEY,
    key_id      text NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX msign_replay_expires ON msign_replay (expires_at);
