-- imagegate's first schema: client keys and one row per provider call.

create table api_keys (
    id bigint generated always as identity primary key,
    name text not null unique,
    -- the key itself is never stored: only a short prefix for listings and its hex sha-256
    prefix text not null,
    hash text not null unique,
    created_at timestamptz not null default now(),
    revoked_at timestamptz
);

-- key_name is copied into every row so reports need no join and survive a renamed or
-- missing key; key_id has no foreign key so that a batch of usage is never refused.
create table usage (
    id bigint generated always as identity primary key,
    -- unique so that replaying a batch (after a crash, from the journal) is a no-op
    request_id text not null unique,
    key_id bigint not null,
    key_name text not null,
    model text not null,
    provider text not null,
    upstream_model text not null,
    endpoint text not null,
    status integer not null,
    outcome text not null,
    streamed boolean not null,
    n integer,
    size text,
    quality text,
    images integer not null,
    text_input_tokens bigint not null,
    image_input_tokens bigint not null,
    cached_text_input_tokens bigint not null,
    cached_image_input_tokens bigint not null,
    input_tokens bigint not null,
    output_tokens bigint not null,
    total_tokens bigint not null,
    cost_nanousd bigint not null,
    latency_ms bigint not null,
    created_at timestamptz not null,
    -- text, not jsonb: kept byte for byte as the provider sent it
    raw_usage text
);

create index usage_key_name_created_at_idx on usage (key_name, created_at);
create index usage_created_at_idx on usage (created_at);
