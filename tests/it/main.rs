//! One integration-test binary: real imagegate on port 0, stand-in providers, real databases.

mod architecture;
mod cli;
mod connections;
mod db;
mod dedupe;
mod edits;
mod failover;
mod faults;
mod gate;
mod generations;
mod helpers;
mod hostile;
mod journal;
mod keys;
mod limits;
mod sdk;
mod store;
mod upstream;
