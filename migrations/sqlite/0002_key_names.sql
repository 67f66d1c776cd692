-- Key names are unique among active keys only: a rotated key (the old one revoked, a new
-- one created under the same name) keeps the service under one name in usage reports.
--
-- SQLite cannot drop a column's unique constraint: the table is rebuilt without it. Ids are
-- copied as they are, and autoincrement's high-water mark moves with the renamed table.

create table api_keys_new (
    id integer primary key autoincrement,
    name text not null,
    prefix text not null,
    hash text not null unique,
    created_at text not null,
    revoked_at text
);

insert into api_keys_new (id, name, prefix, hash, created_at, revoked_at)
select id, name, prefix, hash, created_at, revoked_at from api_keys;

drop table api_keys;

alter table api_keys_new rename to api_keys;

create unique index api_keys_active_name on api_keys (name) where revoked_at is null;
