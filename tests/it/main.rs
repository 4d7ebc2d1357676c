//! The one integration-test binary: one module per area, sharing `support`.

mod prep;
mod schema;
mod support;
mod tidy;
