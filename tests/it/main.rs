//! One integration-test binary: real imagegate on port 0, stand-in providers, real databases.

mod cli;
mod db;
mod edits;
mod generations;
mod helpers;
mod hostile;
mod sdk;
mod store;
mod upstream;
