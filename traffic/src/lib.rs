//! Test traffic.
