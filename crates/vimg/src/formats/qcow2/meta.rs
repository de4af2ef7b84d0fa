//! Bookkeeping the reader uses to hold tables to the rules of the spec's "Cluster mapping"
//! section: where the image's own metadata lives (a data cluster may not point there), and
//! which host clusters guest clusters already use (two guest clusters may not share one).

use std::collections::HashMap;

/// Sorted, merged ranges of host clusters that hold metadata.
#[derive(Clone, Debug, Default)]
pub struct MetaMap {
    /// `(first cluster, one past the last)`, sorted and disjoint.
    ranges: Vec<(u64, u64)>,
}

impl MetaMap {
    /// Builds the map from unsorted, possibly overlapping ranges.
    pub fn new(mut ranges: Vec<(u64, u64)>) -> MetaMap {
        ranges.retain(|r| r.1 > r.0);
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        MetaMap { ranges: merged }
    }

    /// Bytes of memory the map holds.
    pub fn memory(&self) -> u64 {
        self.ranges.len() as u64 * 16
    }

    /// True when any cluster of `[first, last]` holds metadata.
    pub fn hits(&self, first: u64, last: u64) -> bool {
        // The first range that ends after `first`.
        let i = self.ranges.partition_point(|r| r.1 <= first);
        self.ranges.get(i).is_some_and(|r| r.0 <= last)
    }
}

/// Bits per chunk of a [`SparseBits`]: one chunk is 4 KiB.
const CHUNK_BITS: u64 = 32768;

/// A set of host cluster indexes, allocated in 4 KiB chunks as clusters are used, so memory
/// follows the allocated data (one bit per used cluster), not the file size.
#[derive(Debug, Default)]
pub struct SparseBits {
    chunks: HashMap<u64, Box<[u64]>>,
}

impl SparseBits {
    /// Sets bit `i`; returns whether it was set before.
    pub fn test_and_set(&mut self, i: u64) -> bool {
        let chunk = self
            .chunks
            .entry(i / CHUNK_BITS)
            .or_insert_with(|| vec![0u64; (CHUNK_BITS / 64) as usize].into_boxed_slice());
        let bit = i % CHUNK_BITS;
        let word = &mut chunk[(bit / 64) as usize];
        let mask = 1u64 << (bit % 64);
        let was = *word & mask != 0;
        *word |= mask;
        was
    }

    /// True when bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        self.chunks
            .get(&(i / CHUNK_BITS))
            .is_some_and(|c| c[((i % CHUNK_BITS) / 64) as usize] & (1u64 << (i % 64)) != 0)
    }

    /// Bytes of memory the set holds.
    pub fn memory(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK_BITS / 8
    }
}

/// Counts per chunk of a [`SparseCounts`]: one chunk is 4 KiB.
const COUNT_CHUNK: u64 = 2048;

/// A saturating 16-bit count per host cluster, allocated in 4 KiB chunks as clusters are
/// counted: memory follows the file's used clusters (two bytes each), never how often an
/// entry repeats.
#[derive(Debug, Default)]
pub struct SparseCounts {
    chunks: HashMap<u64, Box<[u16]>>,
}

impl SparseCounts {
    /// Adds one to the count of `i`; returns the new count.
    pub fn inc(&mut self, i: u64) -> u16 {
        let chunk = self
            .chunks
            .entry(i / COUNT_CHUNK)
            .or_insert_with(|| vec![0u16; COUNT_CHUNK as usize].into_boxed_slice());
        let c = &mut chunk[(i % COUNT_CHUNK) as usize];
        *c = c.saturating_add(1);
        *c
    }

    /// Bytes of memory the counts hold.
    pub fn memory(&self) -> u64 {
        self.chunks.len() as u64 * COUNT_CHUNK * 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_map_hits() {
        let m = MetaMap::new(vec![(5, 6), (0, 1), (3, 5), (10, 12), (11, 13)]);
        assert_eq!(m.ranges, vec![(0, 1), (3, 6), (10, 13)]);
        assert!(m.hits(0, 0));
        assert!(!m.hits(1, 2));
        assert!(m.hits(2, 3));
        assert!(m.hits(5, 5));
        assert!(!m.hits(6, 9));
        assert!(m.hits(12, 12));
        assert!(!m.hits(13, u64::MAX));
    }

    #[test]
    fn sparse_bits() {
        let mut s = SparseBits::default();
        assert!(!s.test_and_set(5));
        assert!(s.test_and_set(5));
        assert!(!s.test_and_set(1 << 40));
        assert!(s.get(1 << 40));
        assert!(!s.get(6));
        assert_eq!(s.memory(), 8192);
    }

    #[test]
    fn sparse_counts() {
        let mut c = SparseCounts::default();
        assert_eq!(c.inc(7), 1);
        assert_eq!(c.inc(7), 2);
        assert_eq!(c.inc(1 << 40), 1);
        assert_eq!(c.memory(), 8192);
    }
}
