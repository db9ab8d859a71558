//! The record format shared by streams, datagrams and frames.
//!
//! Layout, little-endian:
//!
//! | offset | size | field                                      |
//! |--------|------|--------------------------------------------|
//! | 0      | 4    | magic ([`STREAM_MAGIC`] or [`DATAGRAM_MAGIC`]) |
//! | 4      | 4    | total record length, header included       |
//! | 8      | 8    | sequence number                            |
//! | 16     | 8    | [`checksum64`](crate::checksum64) of the payload |
//! | 24     | ..   | payload                                    |
//!
//! The payload is a pure function of (magic, seed, seq, length): word `i` is a
//! counter-mode mix of a per-record key, so it can be generated and checked
//! word-at-a-time at memory speed, with no state carried between records.
//! Because the payload is derived from `seq`, a corrupted seq field or a record
//! delivered in the wrong place fails the payload comparison too.

use crate::checksum::{fmix64, le_word, Lanes};
use thiserror::Error;

/// Bytes of header in front of every payload.
pub const HEADER_LEN: usize = 24;
/// Smallest record: a header and one payload word, so every record's payload
/// depends on its seq.
pub const MIN_RECORD_LEN: usize = 32;
/// Largest record accepted (keeps verifier buffers bounded).
pub const MAX_RECORD_LEN: usize = 1 << 24;
/// Magic of byte-stream records, "ZCRS" in the byte stream.
pub const STREAM_MAGIC: u32 = u32::from_le_bytes(*b"ZCRS");
/// Magic of datagram (and frame payload) records, "ZCRD" in the byte stream.
pub const DATAGRAM_MAGIC: u32 = u32::from_le_bytes(*b"ZCRD");

/// A parameter given to a constructor is out of range.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("record length {len} is out of range {min}..={max}")]
    RecordLen { len: usize, min: usize, max: usize },
    #[error("length range {min}..={max} is empty")]
    EmptyRange { min: usize, max: usize },
    #[error("frame length {len} is out of range {min}..={max}")]
    FrameLen { len: usize, min: usize, max: usize },
    #[error("reorder window {window} must be between 64 and 2^24")]
    Window { window: usize },
}

/// The destination buffer cannot hold the next datagram or frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("buffer too small: need {need} bytes, have {have}")]
pub struct BufferTooSmall {
    pub need: usize,
    pub have: usize,
}

/// A parsed record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub magic: u32,
    pub len: u32,
    pub seq: u64,
    pub checksum: u64,
}

impl Header {
    /// Parse the first [`HEADER_LEN`] bytes; `None` if `b` is shorter.
    #[inline]
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN {
            return None;
        }
        Some(Header {
            magic: u32::from_le_bytes(b[0..4].try_into().unwrap()),
            len: u32::from_le_bytes(b[4..8].try_into().unwrap()),
            seq: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            checksum: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        })
    }

    /// Write into the first [`HEADER_LEN`] bytes of `b` (panics if shorter).
    #[inline]
    pub fn write(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.checksum.to_le_bytes());
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const WORD_MUL: u64 = 0xD6E8_FEB8_6659_FD93;

/// Per-record key: distinct for every (magic, seed, seq), far apart in the
/// counter space so payloads of different records are not shifts of each other.
#[inline]
pub(crate) fn payload_key(magic: u32, seed: u64, seq: u64) -> u64 {
    fmix64(fmix64(seed ^ ((magic as u64) << 32)) ^ seq.wrapping_mul(GOLDEN))
}

/// Output mix of the counter-mode generator: `z` is `key + i * GOLDEN` for word `i`.
#[inline(always)]
fn mix_word(z: u64) -> u64 {
    let z = (z ^ (z >> 32)).wrapping_mul(WORD_MUL);
    z ^ (z >> 29)
}

/// Payload word `i` for a key (slow path / diagnostics).
#[inline]
pub(crate) fn payload_word(key: u64, i: u64) -> u64 {
    mix_word(key.wrapping_add(i.wrapping_mul(GOLDEN)))
}

/// Fill `out` with the payload for `key` and return its checksum64, in one pass.
#[inline]
pub(crate) fn fill_payload(key: u64, out: &mut [u8]) -> u64 {
    let len = out.len();
    let mut lanes = Lanes::new();
    let mut z = key;
    let mut blocks = out.chunks_exact_mut(32);
    for b in &mut blocks {
        let w0 = mix_word(z);
        let w1 = mix_word(z.wrapping_add(GOLDEN));
        let w2 = mix_word(z.wrapping_add(GOLDEN.wrapping_mul(2)));
        let w3 = mix_word(z.wrapping_add(GOLDEN.wrapping_mul(3)));
        z = z.wrapping_add(GOLDEN.wrapping_mul(4));
        b[0..8].copy_from_slice(&w0.to_le_bytes());
        b[8..16].copy_from_slice(&w1.to_le_bytes());
        b[16..24].copy_from_slice(&w2.to_le_bytes());
        b[24..32].copy_from_slice(&w3.to_le_bytes());
        lanes.block(w0, w1, w2, w3);
    }
    for (k, c) in blocks.into_remainder().chunks_mut(8).enumerate() {
        let w = mix_word(z).to_le_bytes();
        z = z.wrapping_add(GOLDEN);
        let n = c.len();
        c.copy_from_slice(&w[..n]);
        let mut padded = [0u8; 8];
        padded[..n].copy_from_slice(&w[..n]);
        lanes.tail_word(k, u64::from_le_bytes(padded));
    }
    lanes.finish(len)
}

/// Compare `data` with the payload for `key` and compute checksum64(data), in
/// one pass. Returns `(checksum, equal)`.
#[inline]
pub(crate) fn check_payload(key: u64, data: &[u8]) -> (u64, bool) {
    let mut lanes = Lanes::new();
    let mut z = key;
    let mut diff = 0u64;
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        let r0 = le_word(&b[0..]);
        let r1 = le_word(&b[8..]);
        let r2 = le_word(&b[16..]);
        let r3 = le_word(&b[24..]);
        diff |= (r0 ^ mix_word(z))
            | (r1 ^ mix_word(z.wrapping_add(GOLDEN)))
            | (r2 ^ mix_word(z.wrapping_add(GOLDEN.wrapping_mul(2))))
            | (r3 ^ mix_word(z.wrapping_add(GOLDEN.wrapping_mul(3))));
        z = z.wrapping_add(GOLDEN.wrapping_mul(4));
        lanes.block(r0, r1, r2, r3);
    }
    for (k, c) in blocks.remainder().chunks(8).enumerate() {
        let n = c.len();
        let mut padded = [0u8; 8];
        padded[..n].copy_from_slice(c);
        let r = u64::from_le_bytes(padded);
        let mut e = mix_word(z).to_le_bytes();
        e[n..].fill(0);
        z = z.wrapping_add(GOLDEN);
        diff |= r ^ u64::from_le_bytes(e);
        lanes.tail_word(k, r);
    }
    (lanes.finish(data.len()), diff == 0)
}

/// Expected payload byte at `index` for `key`.
#[inline]
pub(crate) fn payload_byte(key: u64, index: usize) -> u8 {
    payload_word(key, (index / 8) as u64).to_le_bytes()[index % 8]
}

/// First index where `data` differs from the payload for `key` (slow path,
/// only used to describe a mismatch already detected).
pub(crate) fn first_payload_diff(key: u64, data: &[u8]) -> Option<usize> {
    data.iter()
        .enumerate()
        .find(|&(i, &b)| b != payload_byte(key, i))
        .map(|(i, _)| i)
}

/// Write the complete record (header + payload) for `seq` into `out`; the
/// record length is `out.len()` (must be in `MIN_RECORD_LEN..=MAX_RECORD_LEN`).
#[inline]
pub(crate) fn write_record(magic: u32, seed: u64, seq: u64, out: &mut [u8]) {
    debug_assert!(out.len() >= HEADER_LEN && out.len() <= MAX_RECORD_LEN);
    let key = payload_key(magic, seed, seq);
    let checksum = fill_payload(key, &mut out[HEADER_LEN..]);
    Header {
        magic,
        len: out.len() as u32,
        seq,
        checksum,
    }
    .write(out);
}

/// What is wrong with a record whose length is already known to be right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PayloadFault {
    /// Payload byte `at` (payload-relative) differs from the expected one.
    Byte { at: usize, found: u8, expected: u8 },
    /// Payload is as expected but the header checksum field is not.
    Checksum { found: u64, computed: u64 },
}

/// Check a record's payload against (magic, seed, seq) and its header checksum.
#[inline]
pub(crate) fn verify_payload(
    magic: u32,
    seed: u64,
    seq: u64,
    header_checksum: u64,
    payload: &[u8],
) -> Result<(), PayloadFault> {
    let key = payload_key(magic, seed, seq);
    let (computed, equal) = check_payload(key, payload);
    if !equal {
        let at = first_payload_diff(key, payload).expect("fast and slow compare disagree");
        return Err(PayloadFault::Byte {
            at,
            found: payload[at],
            expected: payload_byte(key, at),
        });
    }
    if computed != header_checksum {
        return Err(PayloadFault::Checksum {
            found: header_checksum,
            computed,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum64;

    #[test]
    fn fused_fill_and_check_agree_with_checksum64() {
        for len in [0usize, 1, 7, 8, 9, 31, 32, 33, 100, 1000] {
            let key = payload_key(STREAM_MAGIC, 7, len as u64);
            let mut buf = vec![0u8; len];
            let c = fill_payload(key, &mut buf);
            assert_eq!(c, checksum64(&buf), "len {len}");
            assert_eq!(check_payload(key, &buf), (c, true), "len {len}");
            for (i, &b) in buf.iter().enumerate() {
                assert_eq!(b, payload_byte(key, i));
            }
            if len > 0 {
                let mut bad = buf.clone();
                bad[len - 1] ^= 0x80;
                assert!(!check_payload(key, &bad).1, "len {len}");
                assert_eq!(first_payload_diff(key, &bad), Some(len - 1));
            }
        }
    }

    #[test]
    fn payload_depends_on_seq_seed_and_magic() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill_payload(payload_key(STREAM_MAGIC, 1, 5), &mut a);
        fill_payload(payload_key(STREAM_MAGIC, 1, 6), &mut b);
        assert_ne!(a, b);
        fill_payload(payload_key(STREAM_MAGIC, 2, 5), &mut b);
        assert_ne!(a, b);
        fill_payload(payload_key(DATAGRAM_MAGIC, 1, 5), &mut b);
        assert_ne!(a, b);
        fill_payload(payload_key(STREAM_MAGIC, 1, 5), &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            magic: STREAM_MAGIC,
            len: 0x0102_0304,
            seq: 0x1122_3344_5566_7788,
            checksum: 0xDEAD_BEEF_CAFE_F00D,
        };
        let mut b = [0u8; HEADER_LEN];
        h.write(&mut b);
        assert_eq!(&b[0..4], b"ZCRS");
        assert_eq!(&b[4..8], &[4, 3, 2, 1]);
        assert_eq!(Header::parse(&b), Some(h));
        assert_eq!(Header::parse(&b[..23]), None);
    }
}
