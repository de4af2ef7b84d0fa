//! Two-level cluster tables kept whole after open: an L1 of optional L2 tables of raw
//! entries, as the qcow (v1) and QED readers hold them (QEMU's docs/interop/qed_spec.txt
//! "Table lookup"; qcow v1 has the same shape). The reader decides what an entry means; this
//! finds entries and how far a run of alike entries goes.

/// An L1 of optional L2 tables, `per` entries each.
pub(crate) struct ClusterTables<'a> {
    /// The L2 tables by L1 index (`None`: unallocated).
    pub l2: &'a [Option<Vec<u64>>],
    /// Entries per L2 table.
    pub per: u64,
}

impl ClusterTables<'_> {
    /// True when L1 entry `i` has an L2 table.
    fn has_table(&self, i: u64) -> bool {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.l2.get(i))
            .is_some_and(Option::is_some)
    }

    /// The L2 entry for guest cluster `c` (0 when its table is unallocated).
    pub fn entry(&self, c: u64) -> u64 {
        let (i, j) = (c / self.per, c % self.per);
        match usize::try_from(i).ok().and_then(|i| self.l2.get(i)) {
            Some(Some(t)) => t.get(j as usize).copied().unwrap_or(0),
            _ => 0,
        }
    }

    /// The guest offset (at most `end`) where the run starting at cluster `c0` (of `cs`
    /// bytes) ends: the run goes on while `same(c, entry)` holds for the next cluster. A
    /// missing L2 table is skipped whole, so the work follows the tables, not the disk size.
    pub fn run_end(&self, c0: u64, cs: u64, end: u64, same: impl Fn(u64, u64) -> bool) -> u64 {
        let mut c = c0;
        loop {
            let next = if self.has_table(c / self.per) {
                c + 1
            } else {
                (c / self.per + 1) * self.per
            };
            let cur = next.saturating_mul(cs).min(end);
            if cur >= end {
                return cur;
            }
            c = next;
            if !same(c, self.entry(c)) {
                return cur;
            }
        }
    }
}
