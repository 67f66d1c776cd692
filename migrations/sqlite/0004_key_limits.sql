-- Limits per key, each optional (null: no limit of that kind), changed through the admin API.
-- budget_nanousd and budget_period: a spending cap per 'day', 'month' or in 'total'.
-- rpm: requests per minute (key_rate_limits below).
-- max_in_flight: requests at once, instead of limits.max_in_flight_per_key.
-- models: a json array of public model names the key may use.
-- expires_at: the key is refused from then on (utc text, as every timestamp here).
-- metadata: a json object kept for the operator.

alter table api_keys add column budget_nanousd integer check (budget_nanousd >= 0);
alter table api_keys add column budget_period text
    check (budget_period in ('day', 'month', 'total'));
alter table api_keys add column rpm integer check (rpm > 0);
alter table api_keys add column max_in_flight integer check (max_in_flight > 0);
alter table api_keys add column models text;
alter table api_keys add column expires_at text;
alter table api_keys add column metadata text;

-- One row per key with an rpm: a GCRA (generic cell rate algorithm), the same statement as
-- on postgres (see its migration), on one node.
create table key_rate_limits (
    key_id integer primary key,
    tat_ns integer not null,
    at_ns integer not null,
    allowed boolean not null
);
