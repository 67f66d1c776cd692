//! One integration-test binary: real imagegate on port 0, stand-in providers, real databases.

mod admin_usage;
mod architecture;
mod cli;
mod connections;
mod dashboard;
mod dedupe;
mod edits;
mod endpoints;
mod extract;
mod failover;
mod faults;
mod gate;
mod generations;
mod hostile;
mod jobs;
mod journal;
mod keys;
mod limits;
mod pricing;
mod router;
mod sdk;
mod store;
mod support;
mod upstream;
