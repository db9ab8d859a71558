//! vhost-user-net backend.
