//! One cycle: read -> plan -> persist -> push -> record.

pub mod read;
