//! Transports: how the driver reaches a virtio device. The device side differs (a vhost-user
//! backend process, a PCI function behind VFIO) but the driver needs the same few things:
//! feature bits, a DMA context, queues at addresses the device sees, kicks, a start and a stop.

pub mod vfio_pci;
pub mod vhost_user;

use std::sync::Arc;

use zcrx::DmaMap;

/// Where one virtqueue's parts are, in our address space and in the device's.
#[derive(Debug, Clone, Copy)]
pub struct QueueAddrs {
    pub size: u16,
    pub desc: (u64, u64),
    pub avail: (u64, u64),
    pub used: (u64, u64),
}

/// Transport failures. The message names the step and the device's answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{step}: {msg}")]
    Device { step: &'static str, msg: String },
    #[error("the device is gone ({0}); buffers were taken back, reconnect to go on")]
    Disconnected(String),
    #[error("{0}")]
    Unsupported(String),
}

impl TransportError {
    pub fn device(step: &'static str, e: impl std::fmt::Display) -> Self {
        Self::Device { step, msg: e.to_string() }
    }
}

/// A virtio device as the driver sees it.
pub trait Transport: Send {
    /// A short description for messages ("vhost-user /run/x.sock").
    fn describe(&self) -> String;
    /// Feature bits the device offers.
    fn device_features(&mut self) -> Result<u64, TransportError>;
    /// Accept `features` (a subset of the offer).
    fn set_features(&mut self, features: u64) -> Result<(), TransportError>;
    /// The DMA context: maps memory for the device; the IOVAs it returns go into descriptors.
    fn dma(&self) -> Arc<dyn DmaMap>;
    /// Whether the device translates addresses (then VIRTIO_F_ACCESS_PLATFORM is required).
    fn translates_addresses(&self) -> bool;
    /// Largest queue size for queue `q`.
    fn max_queue_size(&mut self, q: u16) -> Result<u16, TransportError>;
    /// Tell the device where queue `q` lives.
    fn setup_queue(&mut self, q: u16, addrs: &QueueAddrs) -> Result<(), TransportError>;
    /// Read device config space.
    fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), TransportError>;
    /// Start the device with the queues set up so far.
    fn start(&mut self) -> Result<(), TransportError>;
    /// Kick queue `q`.
    fn notify(&self, q: u16);
    /// Whether the device is still there (cheap; polled now and then).
    fn is_alive(&self) -> bool;
    /// Stop the device: when this returns it no longer touches queue or buffer memory.
    fn stop(&mut self);
    /// Reach the device again after it went away. Features are negotiated again afterwards;
    /// memory mapped through [`Transport::dma`] stays mapped (re-announced as needed).
    fn reconnect(&mut self) -> Result<(), TransportError> {
        Err(TransportError::Unsupported(format!("{} cannot reconnect", self.describe())))
    }
}
