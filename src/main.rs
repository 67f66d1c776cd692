//! The `imagegate` command line.
fn main() {}
