//! Every test of tests/engine.rs again, with the state store in a real
//! PostgreSQL (SPEC §13: every promise holds on both backends). The lab
//! sees this binary's name (`on_postgres`) and gives each test a fresh
//! database on a throw-away cluster (`billsync_emulators::postgres`).

#[path = "engine.rs"]
mod engine;
