//! A sequence-numbered, checksummed, infinite byte stream, and its verifier.
//!
//! The stream is a concatenation of fixed-size records (see [`crate::record`]),
//! record `n` carrying seq `n`. A receiver sees it cut into arbitrary chunks
//! (TCP segments, 4 KiB completion buffers split anywhere), so both sides work
//! on byte ranges, not records: [`StreamGen::fill`] writes the next bytes into
//! any buffer, and [`StreamVerifier::feed`] accepts any chunk. Because every
//! payload byte is compared with its expected value, a flipped bit, a dropped,
//! duplicated or reordered chunk is reported with its exact stream offset.
//!
//! Neither side allocates after construction.

use crate::record::{
    payload_byte, payload_key, verify_payload, write_record, ConfigError, Header, PayloadFault,
    HEADER_LEN, MAX_RECORD_LEN, MIN_RECORD_LEN, STREAM_MAGIC,
};
use std::io;
use thiserror::Error;

/// Record length used when the caller has no preference.
pub const DEFAULT_RECORD_LEN: usize = 1024;

fn check_record_len(record_len: usize) -> Result<(), ConfigError> {
    if (MIN_RECORD_LEN..=MAX_RECORD_LEN).contains(&record_len) {
        Ok(())
    } else {
        Err(ConfigError::RecordLen {
            len: record_len,
            min: MIN_RECORD_LEN,
            max: MAX_RECORD_LEN,
        })
    }
}

/// Generates the stream for `(seed, record_len)`.
///
/// Also implements [`io::Read`] as an endless reader (use `.take(n)` with
/// `io::copy` to send `n` bytes).
#[derive(Debug, Clone)]
pub struct StreamGen {
    seed: u64,
    record_len: usize,
    /// Seq of the record being emitted.
    seq: u64,
    /// Bytes of record `seq` already emitted; `0 < pos` means `scratch` holds it.
    pos: usize,
    scratch: Box<[u8]>,
}

impl StreamGen {
    /// `record_len` is the total record size in bytes, header included
    /// (`MIN_RECORD_LEN..=MAX_RECORD_LEN`, e.g. [`DEFAULT_RECORD_LEN`]).
    pub fn new(seed: u64, record_len: usize) -> Result<Self, ConfigError> {
        check_record_len(record_len)?;
        Ok(StreamGen {
            seed,
            record_len,
            seq: 0,
            pos: 0,
            scratch: vec![0u8; record_len].into_boxed_slice(),
        })
    }

    /// Write the next `buf.len()` bytes of the stream into `buf`.
    pub fn fill(&mut self, mut buf: &mut [u8]) {
        let rl = self.record_len;
        while !buf.is_empty() {
            if self.pos == 0 && buf.len() >= rl {
                // Whole records go straight into the destination.
                let (rec, rest) = buf.split_at_mut(rl);
                write_record(STREAM_MAGIC, self.seed, self.seq, rec);
                self.seq += 1;
                buf = rest;
                continue;
            }
            if self.pos == 0 {
                write_record(STREAM_MAGIC, self.seed, self.seq, &mut self.scratch);
            }
            let n = (rl - self.pos).min(buf.len());
            let (dst, rest) = buf.split_at_mut(n);
            dst.copy_from_slice(&self.scratch[self.pos..self.pos + n]);
            buf = rest;
            self.pos += n;
            if self.pos == rl {
                self.pos = 0;
                self.seq += 1;
            }
        }
    }

    /// Bytes generated so far (the stream offset of the next byte).
    pub fn offset(&self) -> u64 {
        self.seq * self.record_len as u64 + self.pos as u64
    }

    /// Complete records generated so far.
    pub fn records(&self) -> u64 {
        self.seq
    }

    /// Whether the bytes generated so far end on a record boundary.
    pub fn at_record_boundary(&self) -> bool {
        self.pos == 0
    }

    /// Bytes still needed to complete the current record (0 at a boundary);
    /// fill this many more to let the receiver finish cleanly.
    pub fn bytes_to_boundary(&self) -> usize {
        if self.pos == 0 {
            0
        } else {
            self.record_len - self.pos
        }
    }

    pub fn record_len(&self) -> usize {
        self.record_len
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }
}

impl io::Read for StreamGen {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.fill(buf);
        Ok(buf.len())
    }
}

/// Which check failed, see [`Mismatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MismatchKind {
    #[error("bad magic {found:#010x} (expected {expected:#010x}): stream out of sync, data lost, duplicated or reordered")]
    Magic { found: u32, expected: u32 },
    #[error("bad record length {found} (expected {expected})")]
    Length { found: u32, expected: u32 },
    #[error("seq {found} where {expected} was expected: records dropped, duplicated or reordered")]
    Seq { found: u64, expected: u64 },
    #[error("payload byte {found:#04x}, expected {expected:#04x}")]
    Payload { found: u8, expected: u8 },
    #[error("header checksum {found:#018x} but payload checksums to {computed:#018x}")]
    Checksum { found: u64, computed: u64 },
    /// Only from a partial trailing record (fields there may be incomplete).
    #[error("header byte {index} is {found:#04x}, expected {expected:#04x}")]
    HeaderByte {
        index: usize,
        found: u8,
        expected: u8,
    },
    #[error("stream ended {have} bytes into a {need}-byte record")]
    Truncated { have: usize, need: usize },
}

/// The first point where the received stream differs from the expected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("stream mismatch at byte offset {offset} (record seq {seq}): {kind}")]
pub struct Mismatch {
    /// Stream offset of the first wrong byte: the field's first byte for a
    /// wrong header field, where the data ended for [`MismatchKind::Truncated`].
    pub offset: u64,
    /// Seq of the record that was expected at that point (= record index).
    pub seq: u64,
    pub kind: MismatchKind,
}

/// What a finished verification saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSummary {
    /// Bytes received.
    pub bytes: u64,
    /// Complete records verified.
    pub records: u64,
    /// Bytes of a trailing partial record (checked against the expected
    /// prefix), 0 when the stream ended on a record boundary.
    pub partial_bytes: usize,
}

/// Checks a received stream for `(seed, record_len)` chunk by chunk.
///
/// After the first mismatch the verifier is poisoned: every later call returns
/// that same mismatch. Also implements [`io::Write`] (a mismatch becomes an
/// `InvalidData` error carrying the [`Mismatch`]), so `io::copy(&mut sock, &mut v)` works.
#[derive(Debug, Clone)]
pub struct StreamVerifier {
    seed: u64,
    record_len: usize,
    /// Seq of the record being received.
    seq: u64,
    /// Bytes of record `seq` received so far, held in `asm`.
    pos: usize,
    asm: Box<[u8]>,
    failed: Option<Mismatch>,
}

impl StreamVerifier {
    /// Must be given the generator's `seed` and `record_len`.
    pub fn new(seed: u64, record_len: usize) -> Result<Self, ConfigError> {
        check_record_len(record_len)?;
        Ok(StreamVerifier {
            seed,
            record_len,
            seq: 0,
            pos: 0,
            asm: vec![0u8; record_len].into_boxed_slice(),
            failed: None,
        })
    }

    /// Accept the next chunk of the stream (any length, split anywhere).
    /// Complete records are verified immediately; a partial record is buffered
    /// until it completes (or until [`finish`](Self::finish)).
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), Mismatch> {
        if let Some(m) = self.failed {
            return Err(m);
        }
        let rl = self.record_len;
        while !chunk.is_empty() {
            if self.pos == 0 && chunk.len() >= rl {
                // Verify whole records in place, without copying.
                let (rec, rest) = chunk.split_at(rl);
                self.check_record(rec)?;
                chunk = rest;
                continue;
            }
            let n = (rl - self.pos).min(chunk.len());
            self.asm[self.pos..self.pos + n].copy_from_slice(&chunk[..n]);
            self.pos += n;
            chunk = &chunk[n..];
            if self.pos == rl {
                let asm = std::mem::take(&mut self.asm);
                let r = self.check_record(&asm);
                self.asm = asm;
                r?;
            }
        }
        Ok(())
    }

    /// Verify one complete record (`rec.len() == record_len`) with seq `self.seq`.
    #[inline]
    fn check_record(&mut self, rec: &[u8]) -> Result<(), Mismatch> {
        let start = self.seq * self.record_len as u64;
        let h = Header::parse(rec).expect("record shorter than header");
        let fail = |off: u64, kind| Mismatch {
            offset: start + off,
            seq: self.seq,
            kind,
        };
        let r = if h.magic != STREAM_MAGIC {
            Err(fail(
                0,
                MismatchKind::Magic {
                    found: h.magic,
                    expected: STREAM_MAGIC,
                },
            ))
        } else if h.len as usize != self.record_len {
            Err(fail(
                4,
                MismatchKind::Length {
                    found: h.len,
                    expected: self.record_len as u32,
                },
            ))
        } else if h.seq != self.seq {
            Err(fail(
                8,
                MismatchKind::Seq {
                    found: h.seq,
                    expected: self.seq,
                },
            ))
        } else {
            match verify_payload(
                STREAM_MAGIC,
                self.seed,
                self.seq,
                h.checksum,
                &rec[HEADER_LEN..],
            ) {
                Ok(()) => Ok(()),
                Err(PayloadFault::Byte {
                    at,
                    found,
                    expected,
                }) => Err(fail(
                    (HEADER_LEN + at) as u64,
                    MismatchKind::Payload { found, expected },
                )),
                Err(PayloadFault::Checksum { found, computed }) => {
                    Err(fail(16, MismatchKind::Checksum { found, computed }))
                }
            }
        };
        match r {
            Ok(()) => {
                self.seq += 1;
                self.pos = 0;
                Ok(())
            }
            Err(m) => {
                self.failed = Some(m);
                Err(m)
            }
        }
    }

    /// Bytes accepted so far: verified records plus the buffered partial one.
    /// After a mismatch, the offset of the start of the failing record.
    pub fn bytes(&self) -> u64 {
        self.seq * self.record_len as u64
            + if self.failed.is_some() {
                0
            } else {
                self.pos as u64
            }
    }

    /// Complete records verified so far.
    pub fn records(&self) -> u64 {
        self.seq
    }

    /// Whether the bytes received so far end exactly on a record boundary.
    pub fn at_record_boundary(&self) -> bool {
        self.pos == 0
    }

    /// Bytes of the buffered, not yet complete record.
    pub fn partial_len(&self) -> usize {
        self.pos
    }

    /// The mismatch that poisoned this verifier, if any.
    pub fn error(&self) -> Option<&Mismatch> {
        self.failed.as_ref()
    }

    pub fn record_len(&self) -> usize {
        self.record_len
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// End of stream, which must fall on a record boundary; a trailing partial
    /// record is a [`MismatchKind::Truncated`] error.
    pub fn finish(&self) -> Result<StreamSummary, Mismatch> {
        if let Some(m) = self.failed {
            return Err(m);
        }
        if self.pos != 0 {
            return Err(Mismatch {
                offset: self.bytes(),
                seq: self.seq,
                kind: MismatchKind::Truncated {
                    have: self.pos,
                    need: self.record_len,
                },
            });
        }
        Ok(self.summary())
    }

    /// End of stream where the caller accepts a cut mid-record (e.g. the
    /// sender was stopped by a timer): the partial record's bytes are still
    /// checked against the expected prefix.
    pub fn finish_allow_partial(&self) -> Result<StreamSummary, Mismatch> {
        if let Some(m) = self.failed {
            return Err(m);
        }
        let start = self.seq * self.record_len as u64;
        let mut expected = [0u8; HEADER_LEN];
        Header {
            magic: STREAM_MAGIC,
            len: self.record_len as u32,
            seq: self.seq,
            checksum: 0, // needs the whole payload: skipped below
        }
        .write(&mut expected);
        let key = payload_key(STREAM_MAGIC, self.seed, self.seq);
        for (i, &b) in self.asm[..self.pos].iter().enumerate() {
            let (exp, kind) = if i < HEADER_LEN {
                if (16..24).contains(&i) {
                    continue; // checksum field: cannot be checked for a partial payload
                }
                (
                    expected[i],
                    MismatchKind::HeaderByte {
                        index: i,
                        found: b,
                        expected: expected[i],
                    },
                )
            } else {
                let e = payload_byte(key, i - HEADER_LEN);
                (
                    e,
                    MismatchKind::Payload {
                        found: b,
                        expected: e,
                    },
                )
            };
            if b != exp {
                return Err(Mismatch {
                    offset: start + i as u64,
                    seq: self.seq,
                    kind,
                });
            }
        }
        Ok(self.summary())
    }

    fn summary(&self) -> StreamSummary {
        StreamSummary {
            bytes: self.bytes(),
            records: self.seq,
            partial_bytes: self.pos,
        }
    }
}

impl io::Write for StreamVerifier {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.feed(buf)
            .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, m))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream(seed: u64, rl: usize, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        StreamGen::new(seed, rl).unwrap().fill(&mut v);
        v
    }

    /// Cut `data` into chunks of the given sizes (cycled), never empty.
    fn chunks<'a>(data: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut off = 0;
        let mut i = 0;
        while off < data.len() {
            let n = sizes[i % sizes.len()].max(1).min(data.len() - off);
            out.push(&data[off..off + n]);
            off += n;
            i += 1;
        }
        out
    }

    /// Feed all chunks then finish; the first error.
    fn verify(seed: u64, rl: usize, parts: &[&[u8]]) -> Result<StreamSummary, Mismatch> {
        let mut v = StreamVerifier::new(seed, rl).unwrap();
        for p in parts {
            v.feed(p)?;
        }
        v.finish_allow_partial()
    }

    fn verify_strict(seed: u64, rl: usize, parts: &[&[u8]]) -> Result<StreamSummary, Mismatch> {
        let mut v = StreamVerifier::new(seed, rl).unwrap();
        for p in parts {
            v.feed(p)?;
        }
        v.finish()
    }

    /// Where a flip of byte `off` must be reported: the field start for header
    /// bytes, the byte itself for payload bytes.
    fn expected_report(off: usize, rl: usize) -> u64 {
        let in_rec = off % rl;
        let field = match in_rec {
            0..=3 => 0,
            4..=7 => 4,
            8..=15 => 8,
            16..=23 => 16,
            _ => in_rec,
        };
        (off - in_rec + field) as u64
    }

    #[test]
    fn layout_is_as_documented() {
        let rl = 64;
        let s = stream(9, rl, 3 * rl);
        for seq in 0..3u64 {
            let r = &s[seq as usize * rl..][..rl];
            let h = Header::parse(r).unwrap();
            assert_eq!(&r[0..4], b"ZCRS");
            assert_eq!(h.len as usize, rl);
            assert_eq!(h.seq, seq);
            assert_eq!(h.checksum, crate::checksum64(&r[HEADER_LEN..]));
        }
        assert_ne!(s[24..64], s[64 + 24..128]);
    }

    #[test]
    fn rejects_bad_record_len() {
        assert!(matches!(
            StreamGen::new(1, 31),
            Err(ConfigError::RecordLen { len: 31, .. })
        ));
        assert!(StreamVerifier::new(1, MAX_RECORD_LEN + 1).is_err());
        assert!(StreamGen::new(1, 32).is_ok());
    }

    #[test]
    fn counters_and_boundaries() {
        let mut g = StreamGen::new(3, 100).unwrap();
        let mut v = StreamVerifier::new(3, 100).unwrap();
        let mut buf = [0u8; 250];
        g.fill(&mut buf);
        assert_eq!(
            (g.offset(), g.records(), g.bytes_to_boundary()),
            (250, 2, 50)
        );
        v.feed(&buf).unwrap();
        assert_eq!((v.bytes(), v.records(), v.partial_len()), (250, 2, 50));
        assert!(!v.at_record_boundary());
        let m = v.finish().unwrap_err();
        assert_eq!(
            m.kind,
            MismatchKind::Truncated {
                have: 50,
                need: 100
            }
        );
        assert_eq!(m.offset, 250);
        assert_eq!(v.finish_allow_partial().unwrap().partial_bytes, 50);
        let mut tail = vec![0u8; g.bytes_to_boundary()];
        g.fill(&mut tail);
        assert!(g.at_record_boundary());
        v.feed(&tail).unwrap();
        assert_eq!(
            v.finish().unwrap(),
            StreamSummary {
                bytes: 300,
                records: 3,
                partial_bytes: 0
            }
        );
    }

    #[test]
    fn partial_trailing_record_is_checked_by_finish_allow_partial() {
        let s = stream(8, 64, 64 * 2 + 40);
        let check = |i: usize| {
            let mut t = s.clone();
            t[i] ^= 0x08;
            let mut v = StreamVerifier::new(8, 64).unwrap();
            v.feed(&t).unwrap(); // the partial record is only buffered
            v.finish_allow_partial().unwrap_err()
        };
        let m = check(128 + 30);
        assert_eq!((m.offset, m.seq), (158, 2));
        assert_eq!(
            m.kind,
            MismatchKind::Payload {
                found: s[158] ^ 0x08,
                expected: s[158]
            }
        );
        let m = check(128 + 8); // low byte of the seq field, which is 2
        assert_eq!(m.offset, 136);
        assert_eq!(
            m.kind,
            MismatchKind::HeaderByte {
                index: 8,
                found: 2 ^ 0x08,
                expected: 2
            }
        );
        let mut v = StreamVerifier::new(8, 64).unwrap();
        v.feed(&s).unwrap();
        assert_eq!(v.finish_allow_partial().unwrap().partial_bytes, 40);
    }

    #[test]
    fn wrong_seed_is_detected_in_first_payload_byte() {
        let s = stream(1, 64, 64);
        let m = verify(2, 64, &[&s]).unwrap_err();
        assert_eq!(m.offset, HEADER_LEN as u64);
        assert!(matches!(m.kind, MismatchKind::Payload { .. }));
    }

    #[test]
    fn poisoned_after_mismatch() {
        let mut s = stream(1, 64, 256);
        s[100] ^= 1;
        let mut v = StreamVerifier::new(1, 64).unwrap();
        let first = v.feed(&s[..128]).unwrap_err();
        assert_eq!((first.offset, first.seq), (100, 1));
        assert_eq!(
            first.kind,
            MismatchKind::Payload {
                found: s[100],
                expected: s[100] ^ 1
            }
        );
        assert_eq!(v.error(), Some(&first));
        assert_eq!(v.records(), 1);
        assert_eq!(v.feed(&s[128..]), Err(first));
        assert_eq!(v.finish(), Err(first));
    }

    #[test]
    fn checksum_field_corruption_is_a_checksum_mismatch() {
        let mut s = stream(4, 64, 128);
        s[64 + 17] ^= 0x10;
        let m = verify(4, 64, &[&s]).unwrap_err();
        assert_eq!(m.offset, 64 + 16);
        assert!(matches!(m.kind, MismatchKind::Checksum { .. }), "{m}");
    }

    #[test]
    fn skipped_record_is_a_seq_error() {
        let s = stream(5, 64, 64 * 4);
        let mut v = StreamVerifier::new(5, 64).unwrap();
        v.feed(&s[..64]).unwrap();
        let m = v.feed(&s[128..]).unwrap_err();
        assert_eq!(
            m.kind,
            MismatchKind::Seq {
                found: 2,
                expected: 1
            }
        );
        assert_eq!(m.offset, 64 + 8);
    }

    #[test]
    fn io_traits_round_trip() {
        let mut g = StreamGen::new(6, 1000).unwrap();
        let mut v = StreamVerifier::new(6, 1000).unwrap();
        let n = io::copy(&mut io::Read::take(&mut g, 123_000), &mut v).unwrap();
        assert_eq!(n, 123_000);
        assert_eq!(v.finish().unwrap().records, 123);
        let mut bad = StreamVerifier::new(7, 1000).unwrap();
        let e = io::copy(&mut io::Read::take(&mut g, 1000), &mut bad).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.get_ref().unwrap().downcast_ref::<Mismatch>().is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Generator chunking must not change the bytes, and any verifier
        /// chunking accepts them.
        #[test]
        fn round_trip_any_chunking(
            seed in any::<u64>(),
            rl in 32usize..300,
            total in 0usize..6000,
            gen_sizes in proptest::collection::vec(1usize..700, 1..8),
            ver_sizes in proptest::collection::vec(1usize..700, 1..8),
        ) {
            let whole = stream(seed, rl, total);
            let mut g = StreamGen::new(seed, rl).unwrap();
            let mut pieced = vec![0u8; total];
            let (mut off, mut i) = (0, 0);
            while off < total {
                let n = gen_sizes[i % gen_sizes.len()].min(total - off);
                g.fill(&mut pieced[off..off + n]);
                off += n;
                i += 1;
            }
            prop_assert_eq!(&pieced, &whole);
            prop_assert_eq!(g.offset(), total as u64);

            let mut v = StreamVerifier::new(seed, rl).unwrap();
            for c in chunks(&whole, &ver_sizes) {
                v.feed(c).unwrap();
            }
            prop_assert_eq!(v.bytes(), total as u64);
            prop_assert_eq!(v.records(), (total / rl) as u64);
            prop_assert_eq!(v.at_record_boundary(), total % rl == 0);
            prop_assert_eq!(v.finish().is_ok(), total % rl == 0);
            prop_assert_eq!(v.finish_allow_partial().unwrap().partial_bytes, total % rl);
        }

        #[test]
        fn flipped_bit_is_found_exactly(
            seed in any::<u64>(),
            rl in 32usize..300,
            total in 32usize..5000,
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
            sizes in proptest::collection::vec(1usize..700, 1..8),
        ) {
            let mut s = stream(seed, rl, total);
            let off = pos.index(total);
            let partial = off >= total / rl * rl;
            // A partial trailing record's checksum field cannot be verified
            // (its payload is incomplete): the one place a flip goes unseen.
            prop_assume!(!(partial && (16..24).contains(&(off % rl))));
            s[off] ^= 1 << bit;
            let m = verify(seed, rl, &chunks(&s, &sizes)).unwrap_err();
            let want = if partial { off as u64 } else { expected_report(off, rl) };
            prop_assert_eq!(m.offset, want, "{}", m);
            prop_assert_eq!(m.seq, (off / rl) as u64);
        }

        // The three below end the valid stream on a record boundary and use
        // the strict `finish`, so the only acceptable input is the exact
        // stream: any real change must be reported.

        #[test]
        fn dropped_chunk_is_detected(
            seed in any::<u64>(),
            rl in 32usize..300,
            records in 2usize..20,
            sizes in proptest::collection::vec(1usize..700, 1..8),
            which in any::<prop::sample::Index>(),
        ) {
            let s = stream(seed, rl, records * rl);
            let sizes: Vec<usize> = sizes.iter().map(|&n| n.min(s.len() / 2)).collect();
            let mut parts = chunks(&s, &sizes);
            prop_assert!(parts.len() >= 2);
            // Dropping the final chunk is only visible as a short stream
            // (the caller's byte count), so drop anything before it.
            let i = which.index(parts.len() - 1);
            let dropped = parts.remove(i);
            let r = verify_strict(seed, rl, &parts);
            prop_assert!(r.is_err(), "dropping {} bytes at chunk {} undetected", dropped.len(), i);
        }

        #[test]
        fn duplicated_chunk_is_detected(
            seed in any::<u64>(),
            rl in 32usize..300,
            records in 1usize..20,
            sizes in proptest::collection::vec(1usize..700, 1..8),
            which in any::<prop::sample::Index>(),
        ) {
            let s = stream(seed, rl, records * rl);
            let mut parts = chunks(&s, &sizes);
            let i = which.index(parts.len());
            let dup = parts[i];
            parts.insert(i + 1, dup);
            prop_assert!(verify_strict(seed, rl, &parts).is_err());
        }

        #[test]
        fn swapped_chunks_are_detected(
            seed in any::<u64>(),
            rl in 32usize..300,
            records in 1usize..20,
            sizes in proptest::collection::vec(1usize..700, 1..8),
            which in any::<prop::sample::Index>(),
        ) {
            let s = stream(seed, rl, records * rl);
            let sizes: Vec<usize> = sizes.iter().map(|&n| n.min(s.len() / 2)).collect();
            let mut parts = chunks(&s, &sizes);
            prop_assert!(parts.len() >= 2);
            let i = which.index(parts.len() - 1);
            // Swapping e.g. two equal bytes changes nothing.
            prop_assume!([parts[i], parts[i + 1]].concat() != [parts[i + 1], parts[i]].concat());
            parts.swap(i, i + 1);
            prop_assert!(verify_strict(seed, rl, &parts).is_err());
        }
    }

    /// Throughput in release: `cargo test --release -p zcrx-traffic -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn throughput() {
        use std::time::{Duration, Instant};
        let total: usize = 2 << 30;
        for (rl, chunk) in [
            (DEFAULT_RECORD_LEN, 64 << 10),
            (DEFAULT_RECORD_LEN, 4096),
            (1000, 4096),
            (4096, 64 << 10),
        ] {
            let mut g = StreamGen::new(1, rl).unwrap();
            let mut buf = vec![0u8; chunk];
            let t = Instant::now();
            for _ in 0..total / chunk {
                g.fill(std::hint::black_box(&mut buf));
            }
            let gen = total as f64 / t.elapsed().as_secs_f64() / 1e9;

            // Verify a 4 MiB ring of chunks, refilled (untimed) per lap.
            let mut g = StreamGen::new(1, rl).unwrap();
            let mut v = StreamVerifier::new(1, rl).unwrap();
            let mut ring: Vec<Vec<u8>> = (0..(4 << 20) / chunk).map(|_| vec![0u8; chunk]).collect();
            let mut timed = Duration::ZERO;
            for _ in 0..total / (4 << 20) {
                for b in &mut ring {
                    g.fill(b);
                }
                let t = Instant::now();
                for b in &ring {
                    v.feed(std::hint::black_box(b)).unwrap();
                }
                timed += t.elapsed();
            }
            assert_eq!(v.bytes(), total as u64);
            let ver = total as f64 / timed.as_secs_f64() / 1e9;
            println!("record_len {rl}, {chunk}-byte chunks: StreamGen::fill {gen:.2} GB/s, StreamVerifier::feed {ver:.2} GB/s");
        }
        let data = vec![0x5au8; 1 << 20];
        let t = Instant::now();
        let mut x = 0;
        for _ in 0..4096 {
            x ^= crate::checksum64(std::hint::black_box(&data));
        }
        std::hint::black_box(x);
        println!(
            "checksum64: {:.2} GB/s",
            4096.0 * (1 << 20) as f64 / t.elapsed().as_secs_f64() / 1e9
        );
    }
}
