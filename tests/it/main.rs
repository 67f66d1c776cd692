//! One integration-test binary: real imagegate on port 0, stand-in providers, real databases.

mod db;
mod generations;
mod helpers;
mod store;
mod upstream;
