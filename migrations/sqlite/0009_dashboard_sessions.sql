-- Dashboard sessions: one row per login, so that every replica sharing the database knows
-- them, a logout ends one (its row is deleted), and none outlives expires_at (at most 12
-- hours after its login) whatever its cookie says. The cookie holds a random id; only a
-- hash of it is stored (HMAC-SHA256 keyed by the admin token: a new admin token ends every
-- session). Rows past expires_at are deleted at the next login.

create table dashboard_sessions (
    hash text primary key,
    created_at text not null,
    expires_at text not null
);

create index dashboard_sessions_expires_idx on dashboard_sessions (expires_at);
