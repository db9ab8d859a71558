//! Minimal Ethernet II frames carrying one datagram record each.
//!
//! For the software NIC and the virtio-net / vhost-user paths: dst MAC, src
//! MAC, the IEEE local-experimental ethertype [`ETHERTYPE_ZCRX`] (0x88B5), then
//! a [`crate::datagram`] record. Frames are built without FCS, at least
//! [`MIN_FRAME_LEN`] (60) bytes; shorter payloads are zero-padded, and the
//! record's own length field tells the verifier where the padding starts.

use crate::datagram::{DatagramError, DatagramGen, DatagramStats, DatagramVerifier, Received};
use crate::record::{BufferTooSmall, ConfigError, Header, HEADER_LEN};
use thiserror::Error;

pub type MacAddr = [u8; 6];

/// IEEE 802 "local experimental ethertype 1".
pub const ETHERTYPE_ZCRX: u16 = 0x88B5;
pub const ETH_HEADER_LEN: usize = 14;
/// Minimum Ethernet frame without FCS.
pub const MIN_FRAME_LEN: usize = 60;
/// Standard 1500-byte MTU frame without FCS.
pub const DEFAULT_MAX_FRAME_LEN: usize = 1514;
/// Largest frame a [`FrameGen`] will make.
pub const MAX_FRAME_LEN: usize = 65535;
/// Locally administered unicast addresses used when the caller has none.
pub const DEFAULT_SRC_MAC: MacAddr = [0x02, 0x7a, 0x63, 0x72, 0x78, 0x01];
pub const DEFAULT_DST_MAC: MacAddr = [0x02, 0x7a, 0x63, 0x72, 0x78, 0x02];

/// Why a frame was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is shorter than an Ethernet header")]
    TooShort { len: usize },
    #[error("ethertype {found:#06x}, expected {expected:#06x}")]
    Ethertype { found: u16, expected: u16 },
    #[error("{which} MAC {found:02x?}, expected {expected:02x?}")]
    Mac {
        which: &'static str,
        found: MacAddr,
        expected: MacAddr,
    },
    #[error("frame payload: {0}")]
    Datagram(#[from] DatagramError),
}

/// A parsed Ethernet II frame (borrowing the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthFrame<'a> {
    pub dst: MacAddr,
    pub src: MacAddr,
    pub ethertype: u16,
    /// Everything after the header, padding included.
    pub payload: &'a [u8],
}

/// Split a frame (without FCS) into header fields and payload.
pub fn parse_frame(frame: &[u8]) -> Result<EthFrame<'_>, FrameError> {
    if frame.len() < ETH_HEADER_LEN {
        return Err(FrameError::TooShort { len: frame.len() });
    }
    Ok(EthFrame {
        dst: frame[0..6].try_into().unwrap(),
        src: frame[6..12].try_into().unwrap(),
        ethertype: u16::from_be_bytes([frame[12], frame[13]]),
        payload: &frame[ETH_HEADER_LEN..],
    })
}

#[inline]
fn write_eth_header(dst: MacAddr, src: MacAddr, ethertype: u16, out: &mut [u8]) {
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// Write an Ethernet II frame around `payload` into `out`, zero-padded to
/// [`MIN_FRAME_LEN`]; returns the frame length.
pub fn build_frame(
    dst: MacAddr,
    src: MacAddr,
    ethertype: u16,
    payload: &[u8],
    out: &mut [u8],
) -> Result<usize, BufferTooSmall> {
    let len = (ETH_HEADER_LEN + payload.len()).max(MIN_FRAME_LEN);
    if out.len() < len {
        return Err(BufferTooSmall {
            need: len,
            have: out.len(),
        });
    }
    write_eth_header(dst, src, ethertype, out);
    out[ETH_HEADER_LEN..ETH_HEADER_LEN + payload.len()].copy_from_slice(payload);
    out[ETH_HEADER_LEN + payload.len()..len].fill(0);
    Ok(len)
}

fn check_frame_range(min: usize, max: usize) -> Result<(), ConfigError> {
    for len in [min, max] {
        if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) {
            return Err(ConfigError::FrameLen {
                len,
                min: MIN_FRAME_LEN,
                max: MAX_FRAME_LEN,
            });
        }
    }
    if min > max {
        return Err(ConfigError::EmptyRange { min, max });
    }
    Ok(())
}

/// Generates frames whose payloads are the datagrams of
/// `DatagramGen::new(seed, min_frame_len - 14, max_frame_len - 14)`.
#[derive(Debug, Clone)]
pub struct FrameGen {
    dgen: DatagramGen,
    dst: MacAddr,
    src: MacAddr,
}

impl FrameGen {
    /// Frame lengths exclude the FCS:
    /// `MIN_FRAME_LEN <= min_frame_len <= max_frame_len <= MAX_FRAME_LEN`.
    pub fn new(
        seed: u64,
        dst: MacAddr,
        src: MacAddr,
        min_frame_len: usize,
        max_frame_len: usize,
    ) -> Result<Self, ConfigError> {
        check_frame_range(min_frame_len, max_frame_len)?;
        Ok(FrameGen {
            dgen: DatagramGen::new(
                seed,
                min_frame_len - ETH_HEADER_LEN,
                max_frame_len - ETH_HEADER_LEN,
            )?,
            dst,
            src,
        })
    }

    /// Length of frame `seq`.
    #[inline]
    pub fn len_for(&self, seq: u64) -> usize {
        ETH_HEADER_LEN + self.dgen.len_for(seq)
    }

    /// Write frame `seq` into the start of `buf`; returns its length.
    #[inline]
    pub fn write(&self, seq: u64, buf: &mut [u8]) -> Result<usize, BufferTooSmall> {
        let len = self.len_for(seq);
        if buf.len() < len {
            return Err(BufferTooSmall {
                need: len,
                have: buf.len(),
            });
        }
        write_eth_header(self.dst, self.src, ETHERTYPE_ZCRX, buf);
        Ok(ETH_HEADER_LEN + self.dgen.write(seq, &mut buf[ETH_HEADER_LEN..])?)
    }

    /// Write frame [`next_seq()`](Self::next_seq) and advance; a buffer of
    /// [`max_frame_len()`](Self::max_frame_len) always suffices.
    #[inline]
    pub fn next_into(&mut self, buf: &mut [u8]) -> Result<usize, BufferTooSmall> {
        let n = self.write(self.dgen.next_seq(), buf)?;
        self.dgen.set_next_seq(self.dgen.next_seq() + 1);
        Ok(n)
    }

    pub fn next_seq(&self) -> u64 {
        self.dgen.next_seq()
    }

    pub fn set_next_seq(&mut self, seq: u64) {
        self.dgen.set_next_seq(seq)
    }

    pub fn min_frame_len(&self) -> usize {
        ETH_HEADER_LEN + self.dgen.min_len()
    }

    pub fn max_frame_len(&self) -> usize {
        ETH_HEADER_LEN + self.dgen.max_len()
    }
}

/// Verifies frames from a [`FrameGen`] with the same seed and length range.
#[derive(Debug, Clone)]
pub struct FrameVerifier {
    dver: DatagramVerifier,
    macs: Option<(MacAddr, MacAddr)>,
}

impl FrameVerifier {
    pub fn new(seed: u64, min_frame_len: usize, max_frame_len: usize) -> Result<Self, ConfigError> {
        Self::with_window(
            seed,
            min_frame_len,
            max_frame_len,
            crate::datagram::DEFAULT_WINDOW,
        )
    }

    /// See [`DatagramVerifier::with_window`].
    pub fn with_window(
        seed: u64,
        min_frame_len: usize,
        max_frame_len: usize,
        window: usize,
    ) -> Result<Self, ConfigError> {
        check_frame_range(min_frame_len, max_frame_len)?;
        Ok(FrameVerifier {
            dver: DatagramVerifier::with_window(
                seed,
                min_frame_len - ETH_HEADER_LEN,
                max_frame_len - ETH_HEADER_LEN,
                window,
            )?,
            macs: None,
        })
    }

    /// Also require these addresses (by default any are accepted).
    pub fn expect_macs(mut self, dst: MacAddr, src: MacAddr) -> Self {
        self.macs = Some((dst, src));
        self
    }

    /// Verify one frame (without FCS; trailing padding of a minimum-size
    /// frame is allowed) and account for its seq.
    pub fn check(&mut self, frame: &[u8]) -> Result<Received, FrameError> {
        let r = self.check_eth(frame);
        let payload = match r {
            Ok(p) => p,
            Err(e) => {
                self.dver.note_corrupted();
                return Err(e);
            }
        };
        Ok(self.dver.check(payload)?)
    }

    fn check_eth<'a>(&self, frame: &'a [u8]) -> Result<&'a [u8], FrameError> {
        let f = parse_frame(frame)?;
        if f.ethertype != ETHERTYPE_ZCRX {
            return Err(FrameError::Ethertype {
                found: f.ethertype,
                expected: ETHERTYPE_ZCRX,
            });
        }
        if let Some((dst, src)) = self.macs {
            for (which, found, expected) in [("dst", f.dst, dst), ("src", f.src, src)] {
                if found != expected {
                    return Err(FrameError::Mac {
                        which,
                        found,
                        expected,
                    });
                }
            }
        }
        let mut payload = f.payload;
        if frame.len() == MIN_FRAME_LEN {
            if let Some(h) = Header::parse(payload) {
                let l = h.len as usize;
                if (HEADER_LEN..payload.len()).contains(&l) {
                    payload = &payload[..l];
                }
            }
        }
        Ok(payload)
    }

    pub fn stats(&self) -> DatagramStats {
        self.dver.stats()
    }

    pub fn stats_assuming_sent(&self, sent: u64) -> DatagramStats {
        self.dver.stats_assuming_sent(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datagram::Arrival;
    use crate::record::DATAGRAM_MAGIC;

    #[test]
    fn build_and_parse_round_trip_with_padding() {
        let mut out = [0xEEu8; 100];
        let n = build_frame(DEFAULT_DST_MAC, DEFAULT_SRC_MAC, 0x0800, b"hello", &mut out).unwrap();
        assert_eq!(n, 60);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        assert!(out[19..60].iter().all(|&b| b == 0), "padding must be zero");
        let f = parse_frame(&out[..n]).unwrap();
        assert_eq!(
            (f.dst, f.src, f.ethertype),
            (DEFAULT_DST_MAC, DEFAULT_SRC_MAC, 0x0800)
        );
        assert_eq!(&f.payload[..5], b"hello");
        assert_eq!(f.payload.len(), 46);
        let big = [7u8; 1500];
        assert_eq!(
            build_frame([1; 6], [2; 6], 1, &big, &mut out),
            Err(BufferTooSmall {
                need: 1514,
                have: 100
            })
        );
        assert_eq!(
            parse_frame(&out[..13]),
            Err(FrameError::TooShort { len: 13 })
        );
    }

    #[test]
    fn config_is_validated() {
        assert!(matches!(
            FrameGen::new(1, DEFAULT_DST_MAC, DEFAULT_SRC_MAC, 59, 1514),
            Err(ConfigError::FrameLen { len: 59, .. })
        ));
        assert!(FrameVerifier::new(1, 60, 65536).is_err());
        assert!(FrameVerifier::new(1, 100, 99).is_err());
    }

    #[test]
    fn generated_frames_verify_and_carry_records() {
        let mut g = FrameGen::new(9, DEFAULT_DST_MAC, DEFAULT_SRC_MAC, 60, 1514).unwrap();
        let mut v = FrameVerifier::new(9, 60, 1514)
            .unwrap()
            .expect_macs(DEFAULT_DST_MAC, DEFAULT_SRC_MAC);
        let mut buf = vec![0u8; g.max_frame_len()];
        let mut lens = std::collections::BTreeSet::new();
        for seq in 0..300u64 {
            let n = g.next_into(&mut buf).unwrap();
            assert_eq!(n, g.len_for(seq));
            assert!((60..=1514).contains(&n));
            lens.insert(n);
            let f = parse_frame(&buf[..n]).unwrap();
            assert_eq!(f.ethertype, ETHERTYPE_ZCRX);
            let h = Header::parse(f.payload).unwrap();
            assert_eq!(
                (h.magic, h.seq, h.len as usize),
                (DATAGRAM_MAGIC, seq, n - 14)
            );
            let r = v.check(&buf[..n]).unwrap();
            assert_eq!((r.seq, r.arrival), (seq, Arrival::InOrder));
        }
        assert!(lens.len() > 100, "lengths should vary");
        assert_eq!(v.stats().unique, 300);
    }

    #[test]
    fn bad_frames_are_rejected_and_counted() {
        let g = FrameGen::new(3, [1; 6], [2; 6], 64, 64).unwrap();
        let mut v = FrameVerifier::new(3, 64, 64)
            .unwrap()
            .expect_macs([1; 6], [2; 6]);
        let mut f = [0u8; 64];
        g.write(0, &mut f).unwrap();

        let mut bad = f;
        bad[13] ^= 1;
        assert!(matches!(
            v.check(&bad),
            Err(FrameError::Ethertype { found: 0x88B4, .. })
        ));
        let mut bad = f;
        bad[7] = 9;
        assert!(matches!(
            v.check(&bad),
            Err(FrameError::Mac { which: "src", .. })
        ));
        let mut bad = f;
        bad[50] ^= 0x40;
        assert!(matches!(
            v.check(&bad),
            Err(FrameError::Datagram(DatagramError::Payload {
                seq: 0,
                at: 36,
                ..
            }))
        ));
        assert_eq!(v.stats().corrupted, 3);
        assert_eq!(v.check(&f).unwrap().seq, 0);
    }

    #[test]
    fn padded_minimum_frame_with_short_record_verifies() {
        // A 32-byte record (shorter than the 46-byte minimum payload) from a
        // datagram generator, framed and padded by build_frame.
        let mut dg = crate::datagram::DatagramGen::new(4, 32, 32).unwrap();
        let mut rec = [0u8; 32];
        dg.next_into(&mut rec).unwrap();
        let mut frame = [0u8; 60];
        assert_eq!(
            build_frame([1; 6], [2; 6], ETHERTYPE_ZCRX, &rec, &mut frame),
            Ok(60)
        );
        // The verifier for 60-byte frames expects 46-byte records, so build a
        // datagram verifier directly for the trimmed payload check instead.
        let mut v = FrameVerifier {
            dver: DatagramVerifier::new(4, 32, 32).unwrap(),
            macs: None,
        };
        assert_eq!(v.check(&frame).unwrap().len, 32);
        // A longer-than-minimum frame is not trimmed: trailing bytes are an error.
        let mut long = [0u8; 61];
        long[..60].copy_from_slice(&frame);
        assert!(matches!(
            v.check(&long),
            Err(FrameError::Datagram(DatagramError::LengthField {
                field: 32,
                actual: 47
            }))
        ));
    }
}
