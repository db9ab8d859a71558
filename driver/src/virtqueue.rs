//! Driver-side split virtqueue.
