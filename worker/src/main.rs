//! `tcmu-warden-worker`: the built-in worker executable.
fn main() {}
