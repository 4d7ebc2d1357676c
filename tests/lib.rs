//! Integration tests for the gz workspace live in `it/`; this library is empty.
