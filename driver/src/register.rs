//! The registration helper of the zcrx design: find the device, get its DMA context, create the
//! area mapped for it, open the rx queue with the area as its buffer provider. Any failure
//! unwinds all of it (each step's owner drops what it took).

use zcrx::{AreaReg, IfqReg, IfqUser};

use crate::net::{negotiate, NetConfig, NetError, NetRx, VirtioNet};
use crate::transport::Transport;

/// Registration failures.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("device {device}: {source}")]
    Device { device: String, source: NetError },
    #[error("{0}")]
    Ifq(#[from] zcrx::Error),
    #[error("the device has one rx queue; if_rxq {0} does not exist")]
    NoSuchQueue(u32),
}

/// Open `transport`'s device, create the ifq's area mapped for it, bind it to rx queue 0.
pub fn register_ifq(
    mut transport: Box<dyn Transport>,
    reg: IfqReg,
    area: AreaReg,
    cfg: NetConfig,
) -> Result<(NetRx, IfqUser), RegisterError> {
    if reg.if_rxq != 0 {
        return Err(RegisterError::NoSuchQueue(reg.if_rxq));
    }
    // Everything is checked before the device hears from us.
    zcrx::ifq::validate(&reg, true).map_err(zcrx::Error::from)?;
    let device = transport.describe();
    let dev_err = |source| RegisterError::Device { device: device.clone(), source };
    // 1. The device and its DMA context.
    let features = negotiate(&mut *transport, cfg.frames_span(reg.rx_buf_len)).map_err(dev_err)?;
    let dma = transport.dma();
    // 2. The area, mapped at creation.
    let (ifq, user) = zcrx::Ifq::register(reg, area, Some(dma))?;
    // 3. The rx queue, fed from the area. (Failures drop `ifq`: unmapped, unlocked.)
    let dev = VirtioNet::start(transport, features, cfg).map_err(dev_err)?;
    Ok((NetRx::new(dev, ifq), user))
}
