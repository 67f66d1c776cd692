-- Replicas: one row per running imagegate process on this database, written by its
-- heartbeat every few seconds and deleted when it stops cleanly, so that every replica
-- (GET /admin/replicas, the dashboard) sees which others run, what version and which
-- settings (config_hash). A row that is no longer written is a replica that died; rows
-- unseen for an hour are deleted by the next heartbeat of any replica.

create table replicas (
    id text primary key,
    version text not null,
    started_at timestamptz not null,
    last_seen timestamptz not null,
    calls_in_flight bigint not null,
    config_hash text not null
);

create index replicas_last_seen_idx on replicas (last_seen);
