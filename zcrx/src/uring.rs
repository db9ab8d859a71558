//! io_uring provided-buffer receive.
