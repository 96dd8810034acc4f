//! Availability bitfields: which pieces of one version a peer holds.
//!
//! Owns the in-memory set (a `bitvec`) and its canonical wire form. It does not know what a piece
//! is or who the peer is; the scheduler and the wire messages build on it.
//!
//! Wire form: the bit count, then `ceil(len / 8)` bytes, least significant bit first, with every
//! bit past `len` zero. Decoding rejects any other form, so one set has exactly one encoding.

use bitvec::prelude::{BitVec, Lsb0};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::MAX_PIECES;

/// The set of pieces (by index) that a peer holds, for one version of `len()` pieces.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bitfield {
    bits: BitVec<u8, Lsb0>,
}

impl std::fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitfield({}/{})", self.count_ones(), self.len())
    }
}

/// Why bytes are not a valid bitfield.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitfieldError {
    #[error("bitfield of {0} pieces exceeds the limit of {MAX_PIECES}")]
    TooLong(u64),
    #[error("bitfield of {len} pieces needs {expected} bytes, got {got}")]
    WrongByteCount {
        len: u32,
        expected: usize,
        got: usize,
    },
    #[error("bitfield has bits set past its length")]
    TrailingBits,
}

impl Bitfield {
    /// An empty set over `len` pieces.
    pub fn new(len: u32) -> Self {
        Self {
            bits: BitVec::repeat(false, len as usize),
        }
    }

    /// The full set over `len` pieces (what a seed announces).
    pub fn full(len: u32) -> Self {
        let mut bits = BitVec::repeat(true, len as usize);
        // `repeat` fills whole bytes; padding must be zero for the canonical form.
        bits.set_uninitialized(false);
        Self { bits }
    }

    /// Number of pieces this bitfield covers (set or not).
    pub fn len(&self) -> u32 {
        // Construction bounds the length by MAX_PIECES, which fits in u32.
        self.bits.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// Whether piece `index` is held. Out-of-range indices are simply not held.
    pub fn get(&self, index: u32) -> bool {
        self.bits.get(index as usize).is_some_and(|b| *b)
    }

    /// Marks piece `index` held. Returns whether it was newly set; ignores out-of-range indices
    /// (returns false) so a peer's bogus "have" cannot grow the set.
    pub fn set(&mut self, index: u32) -> bool {
        match self.bits.get_mut(index as usize) {
            Some(mut bit) => !std::mem::replace(&mut *bit, true),
            None => false,
        }
    }

    /// Marks piece `index` not held.
    pub fn clear(&mut self, index: u32) {
        if let Some(mut bit) = self.bits.get_mut(index as usize) {
            *bit = false;
        }
    }

    /// Adds every piece `other` holds. Returns false, changing nothing, when the lengths
    /// differ (the sets are of different versions).
    pub fn union_with(&mut self, other: &Bitfield) -> bool {
        if other.len() != self.len() {
            return false;
        }
        self.bits |= &other.bits;
        true
    }

    pub fn count_ones(&self) -> u32 {
        self.bits.count_ones() as u32
    }

    pub fn is_full(&self) -> bool {
        self.bits.all()
    }

    /// Indices of the held pieces, ascending.
    pub fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.bits.iter_ones().map(|i| i as u32)
    }

    /// Indices of the missing pieces, ascending.
    pub fn iter_zeros(&self) -> impl Iterator<Item = u32> + '_ {
        self.bits.iter_zeros().map(|i| i as u32)
    }

    /// The canonical byte form: `ceil(len/8)` bytes, LSB first, padding bits zero.
    pub fn as_bytes(&self) -> &[u8] {
        // Every constructor zeroes the padding and `set`/`clear` never reach past `len`, so the
        // raw slice is already canonical.
        self.bits.as_raw_slice()
    }

    /// Rebuilds a bitfield from its canonical parts, rejecting every non-canonical form.
    pub fn from_parts(len: u32, bytes: &[u8]) -> Result<Self, BitfieldError> {
        if u64::from(len) > MAX_PIECES {
            return Err(BitfieldError::TooLong(u64::from(len)));
        }
        let expected = (len as usize).div_ceil(8);
        if bytes.len() != expected {
            return Err(BitfieldError::WrongByteCount {
                len,
                expected,
                got: bytes.len(),
            });
        }
        let tail_bits = len % 8;
        if tail_bits != 0 && bytes[expected - 1] >> tail_bits != 0 {
            return Err(BitfieldError::TrailingBits);
        }
        let mut bits = BitVec::<u8, Lsb0>::from_slice(bytes);
        bits.truncate(len as usize);
        Ok(Self { bits })
    }
}

/// Serde form shared by every message carrying a bitfield.
#[derive(Serialize, Deserialize)]
struct BitfieldRepr<'a> {
    len: u32,
    #[serde(borrow)]
    bytes: &'a [u8],
}

impl Serialize for Bitfield {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        BitfieldRepr {
            len: self.len(),
            bytes: self.as_bytes(),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Bitfield {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let repr = BitfieldRepr::deserialize(deserializer)?;
        Bitfield::from_parts(repr.len, repr.bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_adds_pieces_of_the_same_length_only() {
        let mut a = Bitfield::new(10);
        a.set(1);
        let mut b = Bitfield::new(10);
        b.set(9);
        assert!(a.union_with(&b));
        assert_eq!(a.iter_ones().collect::<Vec<_>>(), [1, 9]);
        assert!(!a.union_with(&Bitfield::full(11)), "another version's set");
        assert_eq!(a.count_ones(), 2);
        // The padding stays zero: the canonical form survives a union.
        assert!(Bitfield::from_parts(a.len(), a.as_bytes()).is_ok());
    }

    #[test]
    fn set_get_and_count() {
        let mut b = Bitfield::new(10);
        assert!(b.set(3));
        assert!(!b.set(3), "second set is not new");
        assert!(!b.set(10), "out of range is ignored");
        assert!(b.get(3) && !b.get(4) && !b.get(100));
        assert_eq!(b.count_ones(), 1);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![3]);
        b.clear(3);
        assert_eq!(b.count_ones(), 0);
    }

    #[test]
    fn canonical_bytes_round_trip() {
        let mut b = Bitfield::new(11);
        b.set(0);
        b.set(10);
        assert_eq!(b.as_bytes(), &[0b0000_0001, 0b0000_0100]);
        assert_eq!(Bitfield::from_parts(11, b.as_bytes()).unwrap(), b);
        assert!(Bitfield::full(11).is_full());
        assert_eq!(Bitfield::full(11).as_bytes(), &[0xff, 0b0000_0111]);
    }

    #[test]
    fn rejects_non_canonical() {
        assert_eq!(
            Bitfield::from_parts(11, &[0, 0b0000_1000]),
            Err(BitfieldError::TrailingBits)
        );
        assert!(matches!(
            Bitfield::from_parts(11, &[0]),
            Err(BitfieldError::WrongByteCount { .. })
        ));
        assert!(matches!(
            Bitfield::from_parts(u32::MAX, &[]),
            Err(BitfieldError::TooLong(_))
        ));
    }
}
