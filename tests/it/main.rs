//! The one integration-test binary: one module per area, sharing `support`.

mod schema;
mod support;
mod tidy;
