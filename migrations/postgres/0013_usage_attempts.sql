-- A client request that failed over writes one row per provider attempt: the first under
-- the request's own id, the next ones under `<id>-<n>`. These columns tie them together
-- and say why an attempt gave no image, so that reports can show one request with its
-- attempts folded under it, and count as failed only the requests their clients saw fail.
--
-- attempt: 1 for the first provider call of a request, 2 for the next route, and so on.
-- client_request_id: the request's own id, without the attempt's `-<n>` (null on rows
-- written before this column: their own request_id). For a client that sent an
-- x-request-id imagegate kept, it is `<that id>~req_...`: it starts with the id the client
-- was answered with.
-- cause: why an attempt gave no image: refused, dns, tls, timeout, reset, connect, other
-- (the provider was not reached or broke off), or http_<status> (it answered an error).

alter table usage add column attempt integer not null default 1;
alter table usage add column client_request_id text;
alter table usage add column cause text;

create index usage_client_request_id_idx on usage (client_request_id);
