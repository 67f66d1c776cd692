-- Limits per key, each optional (null: no limit of that kind), changed through the admin API.
-- budget_nanousd and budget_period: a spending cap per 'day', 'month' or in 'total'.
-- rpm: requests per minute, across replicas (key_rate_limits below).
-- max_in_flight: requests at once per replica, instead of limits.max_in_flight_per_key.
-- models: a json array of public model names the key may use.
-- expires_at: the key is refused from then on.
-- metadata: a json object kept for the operator; text, as the key's other json.

alter table api_keys add column budget_nanousd bigint check (budget_nanousd >= 0);
alter table api_keys add column budget_period text
    check (budget_period in ('day', 'month', 'total'));
alter table api_keys add column rpm bigint check (rpm > 0);
alter table api_keys add column max_in_flight bigint check (max_in_flight > 0);
alter table api_keys add column models text;
alter table api_keys add column expires_at timestamptz;
alter table api_keys add column metadata text;

-- One row per key with an rpm: a GCRA (generic cell rate algorithm). tat_ns is the key's
-- theoretical arrival time in nanoseconds since the epoch: each request allowed moves it
-- 60 s / rpm later (from now, when it is in the past); a request is allowed while it stays
-- within 60 s of now. One upsert reads and moves it atomically, so replicas share it; at_ns
-- is the time of that upsert and allowed its verdict, returned with it.
create table key_rate_limits (
    key_id bigint primary key,
    tat_ns bigint not null,
    at_ns bigint not null,
    allowed boolean not null
);
