-- cost_nanousd may be null: a call on an unpriced route (a price no page publishes) is
-- recorded with its tokens and no cost, and reports show it as unpriced rather than $0.
--
-- sqlite cannot drop a not null constraint in place: the table is rebuilt, ids kept.

create table usage_new (
    id integer primary key,
    request_id text not null unique,
    key_id integer not null,
    key_name text not null,
    model text not null,
    provider text not null,
    upstream_model text not null,
    endpoint text not null,
    status integer not null,
    outcome text not null,
    streamed integer not null,
    n integer,
    size text,
    quality text,
    images integer not null,
    text_input_tokens integer,
    image_input_tokens integer,
    cached_text_input_tokens integer,
    cached_image_input_tokens integer,
    input_tokens integer,
    output_tokens integer,
    total_tokens integer,
    cost_nanousd integer,
    latency_ms integer not null,
    created_at text not null,
    raw_usage text,
    usage_suspect integer not null default 0,
    cost_estimated integer not null default 0
);

insert into usage_new (
    id, request_id, key_id, key_name, model, provider, upstream_model, endpoint, status,
    outcome, streamed, n, size, quality, images, text_input_tokens, image_input_tokens,
    cached_text_input_tokens, cached_image_input_tokens, input_tokens, output_tokens,
    total_tokens, cost_nanousd, latency_ms, created_at, raw_usage, usage_suspect,
    cost_estimated
)
select
    id, request_id, key_id, key_name, model, provider, upstream_model, endpoint, status,
    outcome, streamed, n, size, quality, images, text_input_tokens, image_input_tokens,
    cached_text_input_tokens, cached_image_input_tokens, input_tokens, output_tokens,
    total_tokens, cost_nanousd, latency_ms, created_at, raw_usage, usage_suspect,
    cost_estimated
from usage;

drop table usage;
alter table usage_new rename to usage;

create index usage_key_name_created_at_idx on usage (key_name, created_at);
create index usage_created_at_idx on usage (created_at);
