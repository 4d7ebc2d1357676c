//! The one integration-test binary: one module per area, sharing `support`.

mod eval;
mod model;
mod pipeline;
mod prep;
mod schema;
mod support;
mod synth;
mod tidy;
mod train;
