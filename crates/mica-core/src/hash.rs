//! FNV-1a 64: the one non-cryptographic hash of mica (split streams, split fingerprints,
//! weight-file checksums, per-id orderings). Values are stored in run directories, so the
//! output must never change.

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv1a64_seeded(0, bytes)
}

/// FNV-1a 64 of `bytes`, starting from the standard offset basis XOR `seed` (a keyed
/// variant: the same bytes hash differently under different seeds; seed 0 is plain FNV-1a).
pub fn fnv1a64_seeded(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = Fnv1a64::with_seed(seed);
    h.update(bytes);
    h.finish()
}

/// Incremental FNV-1a 64: `update` with the pieces in order, then `finish`; the result equals
/// [`fnv1a64`] of the concatenation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a64 {
    state: u64,
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv1a64 {
    /// A fresh hasher (the standard offset basis).
    pub fn new() -> Self {
        Self::with_seed(0)
    }

    /// A fresh hasher starting from the offset basis XOR `seed`, as [`fnv1a64_seeded`].
    pub fn with_seed(seed: u64) -> Self {
        Fnv1a64 {
            state: OFFSET_BASIS ^ seed,
        }
    }

    /// Feeds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.state ^= u64::from(b);
            self.state = self.state.wrapping_mul(PRIME);
        }
    }

    /// The hash of everything fed so far (the hasher can keep being fed).
    pub fn finish(&self) -> u64 {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_test_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn seeded_and_incremental_agree_with_one_shot() {
        assert_eq!(fnv1a64_seeded(0, b"foobar"), fnv1a64(b"foobar"));
        assert_ne!(fnv1a64_seeded(7, b"foobar"), fnv1a64(b"foobar"));
        let mut h = Fnv1a64::new();
        h.update(b"foo");
        h.update(b"");
        h.update(b"bar");
        assert_eq!(h.finish(), fnv1a64(b"foobar"));
        let mut k = Fnv1a64::with_seed(7);
        k.update(b"foobar");
        assert_eq!(k.finish(), fnv1a64_seeded(7, b"foobar"));
    }
}
