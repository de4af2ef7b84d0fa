//! The guest ranges of a preallocated encrypted qcow2 image that writes have defined.
//!
//! A preallocated data cluster of an encrypted image holds whatever the file holds there
//! (a hole, `fallocate`d space or plain zeros), which decrypts to noise: such an image does
//! not start out reading zeros (QEMU's `qcow2_has_zero_init` says so too). `convert` then
//! writes every range of the disk, zero ranges included (see the writer's `write_zeroes`),
//! and [`Coverage`] records what was written, so that `finish` can make whatever is left (a
//! new image from `create`, a target larger than its source, the gaps of a cluster written
//! in part) read as zeros: a zero flag on a whole untouched cluster of a version 3 image,
//! encrypted zeros elsewhere.
//!
//! Memory: one entry per run of written bytes; adjacent writes merge, so a copy that
//! proceeds in order keeps a handful of entries whatever the disk size.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent byte ranges `[start, end)`, keyed by start.
#[derive(Debug, Default)]
pub(super) struct Coverage {
    runs: BTreeMap<u64, u64>,
}

impl Coverage {
    /// Records `[start, end)` as written.
    pub(super) fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // A run that starts before `s` and reaches it merges.
        if let Some((&ps, &pe)) = self.runs.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        // Runs that start inside `[s, e]` merge too.
        let inside: Vec<(u64, u64)> = self.runs.range(s..=e).map(|(&a, &b)| (a, b)).collect();
        for (a, b) in inside {
            self.runs.remove(&a);
            e = e.max(b);
        }
        self.runs.insert(s, e);
    }

    /// The ranges of `[0, size)` no write covered, in ascending order.
    pub(super) fn gaps(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = 0;
        for (&s, &e) in &self.runs {
            if s >= size {
                break;
            }
            if s > pos {
                out.push((pos, s));
            }
            pos = pos.max(e);
        }
        if pos < size {
            out.push((pos, size));
        }
        out
    }
}

/// How one gap meets the clusters it lies in: the clusters it covers whole (every byte
/// up to the cluster's end or the disk's end), and the partial pieces.
pub(super) enum GapPiece {
    /// Guest cluster index, covered whole.
    Whole(u64),
    /// `[start, end)` inside one cluster.
    Part(u64, u64),
}

/// Splits gap `[start, end)` of a disk of `size` bytes into [`GapPiece`]s, lazily (a new
/// disk is one gap of every cluster).
pub(super) fn split_gap(
    start: u64,
    end: u64,
    cluster_size: u64,
    size: u64,
) -> impl Iterator<Item = GapPiece> {
    let mut pos = start;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let cstart = pos - pos % cluster_size;
        let cend = (cstart + cluster_size).min(size);
        let e = end.min(cend);
        let piece = if pos == cstart && e == cend {
            GapPiece::Whole(cstart / cluster_size)
        } else {
            GapPiece::Part(pos, e)
        };
        pos = e;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_and_gaps_are_what_is_left() {
        let mut c = Coverage::default();
        assert_eq!(c.gaps(100), vec![(0, 100)]);
        c.add(10, 20);
        c.add(30, 40);
        assert_eq!(c.gaps(100), vec![(0, 10), (20, 30), (40, 100)]);
        c.add(20, 30);
        assert_eq!(c.runs.len(), 1);
        assert_eq!(c.gaps(100), vec![(0, 10), (40, 100)]);
        c.add(5, 50);
        c.add(0, 5);
        c.add(60, 100);
        c.add(55, 56);
        assert_eq!(c.gaps(100), vec![(50, 55), (56, 60)]);
        c.add(0, 100);
        assert!(c.gaps(100).is_empty());
        assert_eq!(c.runs.len(), 1);
        c.add(7, 7);
        assert_eq!(c.runs.len(), 1);
    }

    #[test]
    fn gaps_split_into_whole_and_partial_clusters() {
        let got: Vec<String> = split_gap(100, 300, 128, 1000)
            .map(|g| match g {
                GapPiece::Whole(c) => format!("w{c}"),
                GapPiece::Part(s, e) => format!("{s}-{e}"),
            })
            .collect();
        assert_eq!(got, ["100-128", "w1", "256-300"]);
        // The disk's last cluster ends at the disk's end.
        let p: Vec<GapPiece> = split_gap(896, 1000, 128, 1000).collect();
        assert!(matches!(p[..], [GapPiece::Whole(7)]));
    }
}
