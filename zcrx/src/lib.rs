//! The io_uring zcrx receive model in userspace.
pub mod uring;
