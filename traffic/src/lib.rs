//! Test traffic that proves every byte arrived.
//!
//! * [`stream`]: an endless byte stream of sequence-numbered, checksummed
//!   records that can be generated into and verified from arbitrary chunks
//!   (TCP, zero-copy receive buffers split anywhere).
//! * [`datagram`]: one record per datagram, with loss / duplicate / reorder
//!   accounting in a bounded window.
//! * [`frame`]: the same records inside minimal Ethernet II frames.
//! * [`pcap`]: a classic pcap writer (frames, or UDP payloads wrapped in
//!   synthetic Ethernet/IPv4/UDP headers) and a small reader.
//!
//! Generation and verification run at memory speed and never allocate after
//! construction: payload bytes are a counter-mode function of (seed, seq), so
//! both sides compute them word-at-a-time instead of storing anything.

mod checksum;
pub mod datagram;
pub mod frame;
pub mod pcap;
pub mod record;
pub mod stream;
pub mod testpmd;

pub use checksum::checksum64;
pub use datagram::{
    Arrival, DatagramError, DatagramGen, DatagramStats, DatagramVerifier, Received,
};
pub use frame::{EthFrame, FrameError, FrameGen, FrameVerifier, MacAddr};
pub use pcap::{PcapError, PcapReader, PcapRecord, PcapWriter};
pub use record::{BufferTooSmall, ConfigError, Header};
pub use stream::{Mismatch, MismatchKind, StreamGen, StreamSummary, StreamVerifier};
