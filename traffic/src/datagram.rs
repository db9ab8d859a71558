//! One record per datagram, with loss / duplicate / reorder accounting.
//!
//! For UDP (`zcrx rx --udp`) and packet paths each datagram is a whole record
//! (see [`crate::record`], magic [`DATAGRAM_MAGIC`]) whose length varies with
//! its seq, deterministically, so the receiver can check the length too. The
//! verifier checks every datagram on its own and classifies its seq against a
//! fixed-size bitmap window, so memory stays bounded however long it runs.

use crate::checksum::fmix64;
use crate::record::{
    verify_payload, write_record, BufferTooSmall, ConfigError, Header, PayloadFault,
    DATAGRAM_MAGIC, HEADER_LEN, MAX_RECORD_LEN, MIN_RECORD_LEN,
};
use thiserror::Error;

/// Reorder window used by [`DatagramVerifier::new`], in seqs.
pub const DEFAULT_WINDOW: usize = 4096;

/// The length of each seq's datagram: `min + hash(seed, seq) % (max - min + 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LenPlan {
    seed: u64,
    min: usize,
    max: usize,
}

impl LenPlan {
    fn new(seed: u64, min: usize, max: usize) -> Result<Self, ConfigError> {
        for len in [min, max] {
            if !(MIN_RECORD_LEN..=MAX_RECORD_LEN).contains(&len) {
                return Err(ConfigError::RecordLen {
                    len,
                    min: MIN_RECORD_LEN,
                    max: MAX_RECORD_LEN,
                });
            }
        }
        if min > max {
            return Err(ConfigError::EmptyRange { min, max });
        }
        Ok(LenPlan { seed, min, max })
    }

    #[inline]
    fn len_for(&self, seq: u64) -> usize {
        let span = (self.max - self.min + 1) as u64;
        if span == 1 {
            return self.min;
        }
        let h = fmix64(self.seed ^ 0x6C65_6E67_7468_0000 ^ fmix64(seq));
        self.min + (h % span) as usize
    }
}

/// Generates datagrams for `(seed, min_len, max_len)`; datagram `seq` has
/// length [`len_for(seq)`](Self::len_for).
#[derive(Debug, Clone)]
pub struct DatagramGen {
    plan: LenPlan,
    next_seq: u64,
}

impl DatagramGen {
    /// Lengths are total datagram sizes, header included:
    /// `MIN_RECORD_LEN <= min_len <= max_len <= MAX_RECORD_LEN`.
    pub fn new(seed: u64, min_len: usize, max_len: usize) -> Result<Self, ConfigError> {
        Ok(DatagramGen {
            plan: LenPlan::new(seed, min_len, max_len)?,
            next_seq: 0,
        })
    }

    /// Length of datagram `seq`.
    #[inline]
    pub fn len_for(&self, seq: u64) -> usize {
        self.plan.len_for(seq)
    }

    /// Write datagram `seq` into the start of `buf`; returns its length.
    #[inline]
    pub fn write(&self, seq: u64, buf: &mut [u8]) -> Result<usize, BufferTooSmall> {
        let len = self.plan.len_for(seq);
        if buf.len() < len {
            return Err(BufferTooSmall {
                need: len,
                have: buf.len(),
            });
        }
        write_record(DATAGRAM_MAGIC, self.plan.seed, seq, &mut buf[..len]);
        Ok(len)
    }

    /// Write datagram [`next_seq()`](Self::next_seq) and advance; returns its
    /// length. A buffer of [`max_len()`](Self::max_len) always suffices. On
    /// error nothing is written and the seq does not advance.
    #[inline]
    pub fn next_into(&mut self, buf: &mut [u8]) -> Result<usize, BufferTooSmall> {
        let n = self.write(self.next_seq, buf)?;
        self.next_seq += 1;
        Ok(n)
    }

    /// Seq of the datagram the next [`next_into`](Self::next_into) writes.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reposition (e.g. to resend or to skip); any seq is valid.
    pub fn set_next_seq(&mut self, seq: u64) {
        self.next_seq = seq;
    }

    pub fn min_len(&self) -> usize {
        self.plan.min
    }

    pub fn max_len(&self) -> usize {
        self.plan.max
    }

    pub fn seed(&self) -> u64 {
        self.plan.seed
    }
}

/// Why a datagram was rejected. Rejected datagrams do not touch the seq
/// accounting (their seq field cannot be trusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DatagramError {
    #[error("datagram of {len} bytes is shorter than a record header")]
    TooShort { len: usize },
    #[error("bad magic {found:#010x} (expected {expected:#010x})")]
    Magic { found: u32, expected: u32 },
    #[error("length field says {field} bytes but the datagram has {actual} (truncated or padded)")]
    LengthField { field: u32, actual: usize },
    #[error("datagram seq {seq} has {found} bytes but that seq is generated with {expected} (seq field corrupted, or another seed/length range)")]
    UnexpectedLength {
        seq: u64,
        found: usize,
        expected: usize,
    },
    #[error("datagram seq {seq}: byte {at} is {found:#04x}, expected {expected:#04x}")]
    Payload {
        seq: u64,
        at: usize,
        found: u8,
        expected: u8,
    },
    #[error("datagram seq {seq}: header checksum {found:#018x} but payload checksums to {computed:#018x}")]
    Checksum { seq: u64, found: u64, computed: u64 },
}

/// How a valid datagram's seq relates to what came before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The seq right after the highest seen so far (or 0 first).
    InOrder,
    /// Beyond the next expected seq; `skipped` seqs are (so far) missing.
    Ahead { skipped: u64 },
    /// Below the highest seen, not seen before: reordered.
    Late,
    /// Seen before, within the window.
    Duplicate,
    /// More than the window behind the highest seq: already counted lost,
    /// cannot tell a duplicate from a very late first arrival.
    TooLate,
}

/// A datagram that passed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub seq: u64,
    pub len: usize,
    pub arrival: Arrival,
}

/// Counters of a [`DatagramVerifier`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatagramStats {
    /// Valid datagrams, all arrivals included.
    pub received: u64,
    /// Distinct seqs received (in order, ahead, or late within the window).
    pub unique: u64,
    pub duplicates: u64,
    /// Distinct seqs that arrived after a higher seq (within the window).
    pub reordered: u64,
    /// Arrivals more than the window behind (still counted in `lost`).
    pub too_late: u64,
    /// Datagrams rejected with an error.
    pub corrupted: u64,
    /// Seqs below `expected` never received (in time).
    pub lost: u64,
    /// Seqs accounted for: highest seq seen + 1, or the `sent` count given to
    /// [`DatagramVerifier::stats_assuming_sent`] if larger.
    pub expected: u64,
}

/// Verifies datagrams from a [`DatagramGen`] with the same parameters.
#[derive(Debug, Clone)]
pub struct DatagramVerifier {
    plan: LenPlan,
    /// Bit `seq % window` is set iff `seq` in `[next - window, next)` was received.
    bits: Box<[u64]>,
    window: u64,
    /// Highest seq seen + 1.
    next: u64,
    stats: DatagramStats,
}

impl DatagramVerifier {
    /// Same parameters as the generator; reorder window [`DEFAULT_WINDOW`].
    pub fn new(seed: u64, min_len: usize, max_len: usize) -> Result<Self, ConfigError> {
        Self::with_window(seed, min_len, max_len, DEFAULT_WINDOW)
    }

    /// `window`: how many seqs behind the highest one a datagram may arrive and
    /// still be told apart as late or duplicate (rounded up to a multiple of
    /// 64, `64..=2^24`).
    pub fn with_window(
        seed: u64,
        min_len: usize,
        max_len: usize,
        window: usize,
    ) -> Result<Self, ConfigError> {
        let plan = LenPlan::new(seed, min_len, max_len)?;
        if !(64..=1 << 24).contains(&window) {
            return Err(ConfigError::Window { window });
        }
        let words = window.div_ceil(64);
        Ok(DatagramVerifier {
            plan,
            bits: vec![0u64; words].into_boxed_slice(),
            window: (words * 64) as u64,
            next: 0,
            stats: DatagramStats::default(),
        })
    }

    /// Verify one datagram (exactly the bytes received) and account for its seq.
    pub fn check(&mut self, dgram: &[u8]) -> Result<Received, DatagramError> {
        match self.validate(dgram) {
            Ok(seq) => {
                let arrival = self.account(seq);
                Ok(Received {
                    seq,
                    len: dgram.len(),
                    arrival,
                })
            }
            Err(e) => {
                self.stats.corrupted += 1;
                Err(e)
            }
        }
    }

    /// Content checks only; returns the seq.
    fn validate(&self, d: &[u8]) -> Result<u64, DatagramError> {
        let h = Header::parse(d).ok_or(DatagramError::TooShort { len: d.len() })?;
        if h.magic != DATAGRAM_MAGIC {
            return Err(DatagramError::Magic {
                found: h.magic,
                expected: DATAGRAM_MAGIC,
            });
        }
        if h.len as usize != d.len() {
            return Err(DatagramError::LengthField {
                field: h.len,
                actual: d.len(),
            });
        }
        let expected = self.plan.len_for(h.seq);
        if d.len() != expected {
            return Err(DatagramError::UnexpectedLength {
                seq: h.seq,
                found: d.len(),
                expected,
            });
        }
        match verify_payload(
            DATAGRAM_MAGIC,
            self.plan.seed,
            h.seq,
            h.checksum,
            &d[HEADER_LEN..],
        ) {
            Ok(()) => Ok(h.seq),
            Err(PayloadFault::Byte {
                at,
                found,
                expected,
            }) => Err(DatagramError::Payload {
                seq: h.seq,
                at: HEADER_LEN + at,
                found,
                expected,
            }),
            Err(PayloadFault::Checksum { found, computed }) => Err(DatagramError::Checksum {
                seq: h.seq,
                found,
                computed,
            }),
        }
    }

    #[inline]
    fn slot(&self, seq: u64) -> (usize, u64) {
        let b = seq % self.window;
        ((b / 64) as usize, 1u64 << (b % 64))
    }

    fn account(&mut self, seq: u64) -> Arrival {
        self.stats.received += 1;
        if seq >= self.next {
            // Slide the window so it ends at seq: clear the slots of next..=seq.
            let span = seq - self.next + 1;
            if span >= self.window {
                self.bits.fill(0);
            } else {
                for s in self.next..=seq {
                    let (w, m) = self.slot(s);
                    self.bits[w] &= !m;
                }
            }
            let (w, m) = self.slot(seq);
            self.bits[w] |= m;
            let skipped = seq - self.next;
            self.next = seq + 1;
            self.stats.unique += 1;
            return if skipped == 0 {
                Arrival::InOrder
            } else {
                Arrival::Ahead { skipped }
            };
        }
        if self.next - seq > self.window {
            self.stats.too_late += 1;
            return Arrival::TooLate;
        }
        let (w, m) = self.slot(seq);
        if self.bits[w] & m != 0 {
            self.stats.duplicates += 1;
            Arrival::Duplicate
        } else {
            self.bits[w] |= m;
            self.stats.unique += 1;
            self.stats.reordered += 1;
            Arrival::Late
        }
    }

    /// Count a datagram rejected by an outer layer (e.g. a bad frame header).
    pub(crate) fn note_corrupted(&mut self) {
        self.stats.corrupted += 1;
    }

    /// Counters, with `lost` counted up to the highest seq seen.
    pub fn stats(&self) -> DatagramStats {
        self.stats_assuming_sent(0)
    }

    /// Counters when the sender says it sent seqs `0..sent`, so losses after
    /// the highest seq received count too.
    pub fn stats_assuming_sent(&self, sent: u64) -> DatagramStats {
        let expected = self.next.max(sent);
        DatagramStats {
            lost: expected - self.stats.unique,
            expected,
            ..self.stats
        }
    }

    /// Window size in seqs (after rounding).
    pub fn window(&self) -> usize {
        self.window as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gen_all(g: &mut DatagramGen, n: u64) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; g.max_len()];
        (0..n)
            .map(|_| {
                let len = g.next_into(&mut buf).unwrap();
                buf[..len].to_vec()
            })
            .collect()
    }

    #[test]
    fn config_is_validated() {
        assert!(matches!(
            DatagramGen::new(1, 31, 100),
            Err(ConfigError::RecordLen { len: 31, .. })
        ));
        assert!(matches!(
            DatagramGen::new(1, 100, 99),
            Err(ConfigError::EmptyRange { .. })
        ));
        assert!(DatagramVerifier::with_window(1, 32, 64, 63).is_err());
        assert_eq!(
            DatagramVerifier::with_window(1, 32, 64, 65)
                .unwrap()
                .window(),
            128
        );
    }

    #[test]
    fn lengths_vary_within_bounds_and_are_deterministic() {
        let g = DatagramGen::new(11, 40, 1500).unwrap();
        let lens: Vec<usize> = (0..2000).map(|s| g.len_for(s)).collect();
        assert!(lens.iter().all(|&l| (40..=1500).contains(&l)));
        assert!(lens.iter().any(|&l| l < 200) && lens.iter().any(|&l| l > 1300));
        let h = DatagramGen::new(11, 40, 1500).unwrap();
        assert!((0..2000).all(|s| h.len_for(s) == lens[s as usize]));
        let fixed = DatagramGen::new(1, 64, 64).unwrap();
        assert!((0..100).all(|s| fixed.len_for(s) == 64));
    }

    #[test]
    fn generated_datagrams_have_the_record_layout() {
        let mut g = DatagramGen::new(2, 32, 300).unwrap();
        for (seq, d) in gen_all(&mut g, 50).iter().enumerate() {
            let h = Header::parse(d).unwrap();
            assert_eq!(&d[..4], b"ZCRD");
            assert_eq!((h.len as usize, h.seq), (d.len(), seq as u64));
            assert_eq!(h.checksum, crate::checksum64(&d[HEADER_LEN..]));
        }
    }

    #[test]
    fn small_buffer_is_an_error_and_does_not_advance() {
        let mut g = DatagramGen::new(2, 100, 100).unwrap();
        let mut buf = [0u8; 99];
        assert_eq!(
            g.next_into(&mut buf),
            Err(BufferTooSmall {
                need: 100,
                have: 99
            })
        );
        assert_eq!(g.next_seq(), 0);
    }

    #[test]
    fn clean_run_is_all_in_order() {
        let mut g = DatagramGen::new(3, 32, 1472).unwrap();
        let mut v = DatagramVerifier::new(3, 32, 1472).unwrap();
        for (seq, d) in gen_all(&mut g, 500).iter().enumerate() {
            let r = v.check(d).unwrap();
            assert_eq!(
                r,
                Received {
                    seq: seq as u64,
                    len: d.len(),
                    arrival: Arrival::InOrder
                }
            );
        }
        let s = v.stats();
        assert_eq!(
            (s.received, s.unique, s.lost, s.expected),
            (500, 500, 0, 500)
        );
        assert_eq!(
            (s.duplicates, s.reordered, s.corrupted, s.too_late),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn loss_duplication_reorder_accounting() {
        let mut g = DatagramGen::new(4, 32, 200).unwrap();
        let all = gen_all(&mut g, 20);
        let mut v = DatagramVerifier::new(4, 32, 200).unwrap();
        // 0 1 3 2 2 5 7 6 1 ... 19; lost: 4, 8, 18 (and 19 never sent below)
        let order: Vec<usize> = vec![0, 1, 3, 2, 2, 5, 7, 6, 1, 9, 10, 11, 12, 13, 14, 15, 16, 17];
        let arrivals: Vec<Arrival> = order
            .iter()
            .map(|&i| v.check(&all[i]).unwrap().arrival)
            .collect();
        assert_eq!(arrivals[2], Arrival::Ahead { skipped: 1 });
        assert_eq!(arrivals[3], Arrival::Late);
        assert_eq!(arrivals[4], Arrival::Duplicate);
        assert_eq!(arrivals[5], Arrival::Ahead { skipped: 1 });
        assert_eq!(arrivals[8], Arrival::Duplicate);
        assert_eq!(arrivals[9], Arrival::Ahead { skipped: 1 });
        let s = v.stats();
        assert_eq!(s.received, 18);
        assert_eq!(s.unique, 16);
        assert_eq!(s.duplicates, 2);
        assert_eq!(s.reordered, 2); // 2 and 6
        assert_eq!(s.lost, 2); // 4, 8
        assert_eq!(s.expected, 18);
        let s = v.stats_assuming_sent(20);
        assert_eq!((s.lost, s.expected), (4, 20)); // + 18, 19
    }

    #[test]
    fn corrupted_datagrams_are_rejected_without_touching_accounting() {
        let mut g = DatagramGen::new(5, 64, 64).unwrap();
        let all = gen_all(&mut g, 4);
        let mut v = DatagramVerifier::new(5, 64, 64).unwrap();
        v.check(&all[0]).unwrap();

        let mut d = all[1].clone();
        d[40] ^= 4;
        assert!(matches!(
            v.check(&d),
            Err(DatagramError::Payload { seq: 1, at: 40, .. })
        ));
        let mut d = all[1].clone();
        d[8] = 200; // seq field: the payload no longer matches that seq
        assert!(matches!(
            v.check(&d),
            Err(DatagramError::Payload { seq: 200, .. })
        ));
        let mut d = all[1].clone();
        d[20] ^= 1;
        assert!(matches!(
            v.check(&d),
            Err(DatagramError::Checksum { seq: 1, .. })
        ));
        let mut d = all[1].clone();
        d[0] ^= 1;
        assert!(matches!(v.check(&d), Err(DatagramError::Magic { .. })));
        assert_eq!(
            v.check(&all[1][..63]),
            Err(DatagramError::LengthField {
                field: 64,
                actual: 63
            })
        );
        assert_eq!(
            v.check(&all[1][..10]),
            Err(DatagramError::TooShort { len: 10 })
        );

        let s = v.stats();
        assert_eq!((s.corrupted, s.received, s.expected), (6, 1, 1));
        assert_eq!(v.check(&all[1]).unwrap().arrival, Arrival::InOrder);
    }

    #[test]
    fn wrong_length_range_is_detected() {
        let mut g = DatagramGen::new(6, 32, 1000).unwrap();
        let mut v = DatagramVerifier::new(6, 32, 999).unwrap();
        // Same seed, other range: lengths differ for almost every seq.
        let mismatches = gen_all(&mut g, 20)
            .iter()
            .filter(|d| matches!(v.check(d), Err(DatagramError::UnexpectedLength { .. })))
            .count();
        assert!(mismatches > 15, "{mismatches}");
    }

    #[test]
    fn window_bounds_late_detection() {
        let mut g = DatagramGen::new(7, 32, 32).unwrap();
        let all = gen_all(&mut g, 300);
        let mut v = DatagramVerifier::with_window(7, 32, 32, 64).unwrap();
        v.check(&all[0]).unwrap();
        v.check(&all[1]).unwrap();
        assert_eq!(
            v.check(&all[200]).unwrap().arrival,
            Arrival::Ahead { skipped: 198 }
        );
        // 200 - 64 = 136: seq 137 is within the window, 136 is not.
        assert_eq!(v.check(&all[137]).unwrap().arrival, Arrival::Late);
        assert_eq!(v.check(&all[137]).unwrap().arrival, Arrival::Duplicate);
        assert_eq!(v.check(&all[136]).unwrap().arrival, Arrival::TooLate);
        assert_eq!(v.check(&all[1]).unwrap().arrival, Arrival::TooLate);
        // Slots reused by the slide must not claim old seqs were seen.
        assert_eq!(v.check(&all[199]).unwrap().arrival, Arrival::Late);
        assert_eq!(v.check(&all[201]).unwrap().arrival, Arrival::InOrder);
        let s = v.stats();
        assert_eq!(
            (s.unique, s.too_late, s.duplicates, s.reordered),
            (6, 2, 1, 2)
        );
        assert_eq!(s.lost, 202 - 6);
    }

    #[test]
    fn small_slide_frees_reused_slots() {
        let mut g = DatagramGen::new(8, 32, 32).unwrap();
        let all = gen_all(&mut g, 80);
        let mut v = DatagramVerifier::with_window(8, 32, 32, 64).unwrap();
        for d in &all[..=10] {
            v.check(d).unwrap();
        }
        // Slide by 60: seqs 64..=70 reuse the slots of 0..=6.
        assert_eq!(
            v.check(&all[70]).unwrap().arrival,
            Arrival::Ahead { skipped: 59 }
        );
        assert_eq!(v.check(&all[66]).unwrap().arrival, Arrival::Late);
        assert_eq!(v.check(&all[7]).unwrap().arrival, Arrival::Duplicate);
        assert_eq!(v.check(&all[6]).unwrap().arrival, Arrival::TooLate);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Against a HashSet model; a 64-seq window over seqs 0..300 makes
        /// slots get reused and seqs expire.
        #[test]
        fn accounting_matches_a_set_model(
            seed in any::<u64>(),
            ops in proptest::collection::vec(0u64..300, 0..400),
        ) {
            let g = DatagramGen::new(seed, 32, 128).unwrap();
            let mut v = DatagramVerifier::with_window(seed, 32, 128, 64).unwrap();
            let mut seen = std::collections::HashSet::new();
            let mut next = 0u64;
            let mut buf = [0u8; 128];
            let (mut dups, mut late, mut too_late) = (0u64, 0u64, 0u64);
            for &seq in &ops {
                let n = g.write(seq, &mut buf).unwrap();
                let r = v.check(&buf[..n]).unwrap();
                let want = if seq >= next {
                    seen.insert(seq);
                    if seq == next { Arrival::InOrder } else { Arrival::Ahead { skipped: seq - next } }
                } else if next - seq > 64 {
                    too_late += 1;
                    Arrival::TooLate
                } else if seen.contains(&seq) {
                    dups += 1;
                    Arrival::Duplicate
                } else {
                    seen.insert(seq);
                    late += 1;
                    Arrival::Late
                };
                prop_assert_eq!(r.arrival, want, "seq {}", seq);
                next = next.max(seq + 1);
            }
            let s = v.stats();
            prop_assert_eq!(s.too_late, too_late);
            prop_assert_eq!(s.unique, seen.len() as u64);
            prop_assert_eq!(s.duplicates, dups);
            prop_assert_eq!(s.reordered, late);
            prop_assert_eq!(s.lost, next - seen.len() as u64);
        }
    }
}
