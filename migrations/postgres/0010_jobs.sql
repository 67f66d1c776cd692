-- Async jobs (`Prefer: respond-async`): one row per job, so that every replica sharing the
-- database answers its polls, counts a key's unfinished jobs against
-- jobs.max_queued_per_key, and fails the jobs of a replica that died. The replica that
-- accepted a job runs it and holds a lease on it (lease_until), renewed while it lives; a
-- job whose lease ran out while unfinished is failed `job_interrupted` by whichever replica
-- notices. Its result is an object of the result store ([results] url) named result_name.
-- key_id has no foreign key, as in usage: a job outlives nothing of its key.

create table jobs (
    id text primary key,
    key_id bigint not null,
    status text not null
        check (status in ('queued', 'in_progress', 'succeeded', 'failed', 'expired')),
    -- generations, edits
    endpoint text not null,
    -- the creating request's id: its usage rows carry it
    request_id text not null,
    -- hex of the duplicate-protection fingerprint: a retried creation finds its job
    fingerprint text,
    created_at timestamptz not null,
    started_at timestamptz,
    completed_at timestamptz,
    -- why it failed: OpenAI's error detail as JSON text
    error text,
    -- the status the synchronous call would have answered with, once finished
    status_code integer,
    result_name text,
    result_bytes bigint,
    -- the replica that runs it, and until when its lease holds
    replica text not null,
    lease_until timestamptz not null,
    -- the intent (JSON) of the provider call in flight: what its interrupted usage row is
    -- made of when its replica dies
    call_intent text
);

-- A key's unfinished jobs (the queue limit), and the unfinished jobs whose lease ran out.
create index jobs_open_idx on jobs (key_id) where status in ('queued', 'in_progress');
create index jobs_lease_idx on jobs (lease_until) where status in ('queued', 'in_progress');
-- Finished jobs by age: retention, and a key's kept jobs.
create index jobs_completed_idx on jobs (completed_at) where completed_at is not null;
create index jobs_key_completed_idx on jobs (key_id, completed_at)
    where status in ('succeeded', 'failed');
-- A retried creation finds the job its first try created.
create index jobs_fingerprint_idx on jobs (key_id, fingerprint) where fingerprint is not null;
