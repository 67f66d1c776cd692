-- Duplicate protection across replicas: the original calls a retry may join, whichever
-- replica it lands on. An original is registered while it runs (written in the background:
-- its provider call never waits for it). When its answer was delivered or it failed, its
-- row is deleted (a retry then calls again); when its client left before receiving it, the
-- result goes to the result store and the row is marked kept, naming it. expires_at bounds
-- every row: a running row past it belongs to a replica that died mid-call (lookups ignore
-- it), a kept one is past server.duplicate_window; the sweep deletes both, and a kept row's
-- result with it. request_id is the original's, unique per call: two originals with one
-- fingerprint are two rows, the newest of which a retry joins.

create table calls_in_flight (
    fingerprint text not null,
    request_id text not null,
    replica text not null,
    state text not null check (state in ('running', 'kept')),
    result text,
    status integer,
    content_type text,
    provider text,
    started_at timestamptz not null,
    expires_at timestamptz not null,
    primary key (fingerprint, request_id),
    check ((state = 'kept') = (result is not null and status is not null))
);

create index calls_in_flight_fingerprint_idx on calls_in_flight (fingerprint, started_at);
create index calls_in_flight_expires_idx on calls_in_flight (expires_at);
