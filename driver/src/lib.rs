//! A userspace virtio-net driver whose receive buffers are the niovs of a zcrx area.
pub mod virtqueue;
