//! A userspace virtio-net driver whose receive buffers are the niovs of a zcrx area: the device
//! writes frames straight into user memory.
//!
//! - [`virtqueue`]: the driver side of a split virtqueue (the device is untrusted);
//! - [`transport`]: how the device is reached (vhost-user frontend, vfio-pci);
//! - [`iova`]: the IOVA allocator of the VFIO transport;
//! - [`net`]: the virtio-net device and its zero-copy rx queue;
//! - [`register`]: the one helper that opens a device and binds an ifq to it.
pub mod iova;
pub mod net;
pub mod register;
pub mod transport;
pub mod virtqueue;

pub use net::{NetConfig, NetError, NetRx, NetStats, RxPoll, VirtioNet};
pub use register::{register_ifq, RegisterError};
