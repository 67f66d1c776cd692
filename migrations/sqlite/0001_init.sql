-- imagegate's first schema: client keys and one row per provider call.
--
-- Timestamps are utc text of fixed width, 'yyyy-mm-dd hh:mm:ss.ffffff', so that comparing
-- the text compares the instants, date(created_at) is the utc day, and sqlite's own date
-- functions read them.

create table api_keys (
    -- autoincrement so that an id is never handed out twice: usage rows keep key_id
    id integer primary key autoincrement,
    name text not null unique,
    -- the key itself is never stored: only a short prefix for listings and its hex sha-256
    prefix text not null,
    hash text not null unique,
    created_at text not null,
    revoked_at text
);

-- key_name is copied into every row so reports need no join and survive a renamed or
-- missing key; key_id has no foreign key so that a batch of usage is never refused.
create table usage (
    id integer primary key,
    -- unique so that replaying a batch (after a crash, from the journal) is a no-op
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
    text_input_tokens integer not null,
    image_input_tokens integer not null,
    cached_text_input_tokens integer not null,
    cached_image_input_tokens integer not null,
    input_tokens integer not null,
    output_tokens integer not null,
    total_tokens integer not null,
    cost_nanousd integer not null,
    latency_ms integer not null,
    created_at text not null,
    raw_usage text
);

create index usage_key_name_created_at_idx on usage (key_name, created_at);
create index usage_created_at_idx on usage (created_at);
