-- Refused requests, counted per key, reason and minute: a key over its rpm, its budget or
-- its requests in flight (429), or asking for a model it may not use (403), or past its
-- expiry (401). Each replica counts refusals in memory and adds its counts here in batches
-- every few seconds, so that a flood of refused requests never becomes a write each.
-- reason: rpm, budget, in_flight, model_not_allowed, expired.

create table refusals (
    key_name text not null,
    reason text not null,
    -- the UTC minute the refusals fell in
    minute timestamptz not null,
    count bigint not null,
    primary key (key_name, reason, minute)
);

create index refusals_minute_idx on refusals (minute);
