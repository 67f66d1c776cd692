-- Budgets: a key's spending in its current period, and the calls that hold part of it.
--
-- Before a provider call, imagegate reserves the call's worst-case cost: one conditional
-- update of the key's budget_state row (spent + reserved + amount <= the key's budget), so
-- that replicas sharing the database never grant more than the budget between them. The
-- reservation is settled (released, and the real cost added to spent) in the transaction
-- that writes the call's usage row. A reservation whose call never settles (its replica
-- died) is released once expires_at has passed, by the next reservation for that key.

create table budget_state (
    key_id integer primary key,
    -- start of the period spent counts: a UTC day or month, or the epoch for 'total'
    period_start text not null,
    spent_nanousd integer not null default 0,
    reserved_nanousd integer not null default 0
);

create table budget_reservations (
    request_id text primary key,
    key_id integer not null,
    amount_nanousd integer not null,
    expires_at text not null
);

create index budget_reservations_key_expires_idx on budget_reservations (key_id, expires_at);
