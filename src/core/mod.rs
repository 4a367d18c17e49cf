//! The pure core: normalize -> desired state -> diff -> plan. No I/O here, so
//! all of it is unit- and property-testable.

pub mod desired;
pub mod model;
pub mod normalize;
pub mod plan;
pub mod rules;
