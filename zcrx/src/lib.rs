//! The io_uring zcrx receive model in userspace.
//!
//! An [`Area`](area::Area) of user memory is split into fixed-size buffers (niovs). Received
//! data lands in them and is announced by completions ([`Cqe`]: area offset and length); the user
//! reads it in place and returns buffers on the refill queue ([`Rqe`]). With a device (see the
//! driver crate) the device writes the buffers itself; without one (NODEV) the
//! [copy fallback](copy) fills them from a kernel socket. Application code is the same.
//!
//! ```no_run
//! use zcrx::{Ifq, IfqReg, AreaReg, MemoryKind, Cqe};
//! let (mut ifq, mut user) = Ifq::register(IfqReg::default(), AreaReg::new(MemoryKind::Anonymous, 1 << 20), None)?;
//! # let sock = std::net::TcpStream::connect("127.0.0.1:1")?;
//! use std::os::fd::AsFd;
//! ifq.copy_stream(sock.as_fd(), &Default::default())?;
//! let mut cqes = [Cqe::default(); 64];
//! let n = user.recv(&mut cqes);
//! for c in &cqes[..n] {
//!     let bytes = user.data(c)?;
//!     # let _ = bytes;
//!     user.refill(c)?;
//! }
//! user.flush_rq();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod area;
pub mod copy;
pub mod dma;
pub mod ifq;
pub mod mem;
pub mod memlock;
pub mod ring;
pub mod uapi;
pub mod uring;

pub use area::{Area, AreaError, AreaMemory, AreaReg, AreaSource, MemoryKind};
pub use copy::{CopyLimits, CopyOutcome};
pub use dma::{DmaError, DmaMap, DmaSegment};
pub use ifq::{BufError, ConsumeError, Error, Ifq, IfqStats, IfqUser, NiovState, RegError};
pub use memlock::MemlockPolicy;
pub use uapi::{Cqe, IfqReg, Rqe};
