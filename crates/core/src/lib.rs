//! The pure core: normalize -> desired state -> diff -> plan. No I/O here, so
//! all of it is unit- and property-testable. The core imports no adapter
//! (sources, store, VMS client) and no config type: it takes its own.

pub mod cameras;
pub mod cycle;
pub mod desired;
pub mod entitlements;
pub mod model;
pub mod normalize;
pub mod pacing;
pub mod plan;
pub mod rules;
