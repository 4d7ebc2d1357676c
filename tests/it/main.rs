//! The one integration-test binary: one module per area, sharing `support`.

mod eval;
mod pipeline;
mod model;
mod prep;
mod schema;
mod support;
mod synth;
mod tidy;
mod train;
