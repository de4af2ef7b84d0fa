//! Progress of `amend -p`, counted in QEMU's units so that qemu-img's `(NN.NN/100%)`
//! lines come out the same (block/qcow2.c `qcow2_amend_helper_cb`, iotest 061):
//!
//! - an upgrade to version 3 is two steps (the snapshot table completed, the header);
//! - a downgrade to version 2 counts the L1 entries of the active table and then of every
//!   snapshot's table, one step per entry visited, whether or not it held zero clusters;
//! - several operations in one `amend` are one scale: the work of the operations done, plus
//!   the current one's, projected over the operations not yet started.
//!
//! Counting is all this module does: it reports where the update is, never decides what
//! it writes.

/// The operations `amend` reports, in the order it runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AmendOp {
    Upgrade,
    Downgrade,
}

/// Where an `amend` is, in QEMU's units, and the sink that hears about it.
pub(crate) struct AmendProgress {
    sink: Box<dyn FnMut(f64) + Send>,
    /// How many operations report (set by `amend` once it knows what it changes).
    pub(super) total_ops: u64,
    done_ops: u64,
    offset_done: u64,
    last_work: u64,
    last_op: Option<AmendOp>,
}

impl std::fmt::Debug for AmendProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmendProgress")
            .field("total_ops", &self.total_ops)
            .field("done_ops", &self.done_ops)
            .finish_non_exhaustive()
    }
}

impl AmendProgress {
    pub(super) fn new(sink: Box<dyn FnMut(f64) + Send>) -> AmendProgress {
        AmendProgress {
            sink,
            total_ops: 0,
            done_ops: 0,
            offset_done: 0,
            last_work: 0,
            last_op: None,
        }
    }

    /// Operation `op` is at `offset` of `work` steps: one report, in percent of the whole.
    pub(super) fn report(&mut self, op: AmendOp, offset: u64, work: u64) {
        if self.last_op != Some(op) {
            if self.last_op.is_some() {
                self.offset_done += self.last_work;
                self.done_ops += 1;
            }
            self.last_op = Some(op);
        }
        if self.done_ops >= self.total_ops {
            return;
        }
        self.last_work = work;
        let current = self.offset_done + work;
        let projected = current * (self.total_ops - self.done_ops - 1) / (self.done_ops + 1);
        let total = current + projected;
        if total > 0 {
            (self.sink)(100.0 * (self.offset_done + offset) as f64 / total as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn run(ops: u64, steps: &[(AmendOp, u64, u64)]) -> Vec<String> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let mut p = AmendProgress::new(Box::new(move |pct| {
            s2.lock().unwrap().push(format!("{pct:.2}"));
        }));
        p.total_ops = ops;
        for &(op, o, w) in steps {
            p.report(op, o, w);
        }
        let v = seen.lock().unwrap().clone();
        v
    }

    #[test]
    fn one_downgrade_counts_entries() {
        let steps: Vec<_> = (1..=8).map(|i| (AmendOp::Downgrade, i, 8)).collect();
        let v = run(1, &steps);
        assert_eq!(v.first().map(String::as_str), Some("12.50"));
        assert_eq!(v.last().map(String::as_str), Some("100.00"));
        assert_eq!(v.len(), 8);
    }

    #[test]
    fn two_operations_share_the_scale() {
        // Upgrade (2 steps) then a downgrade of 4 entries: the first operation is
        // projected to be half of the whole.
        let v = run(
            2,
            &[
                (AmendOp::Upgrade, 0, 2),
                (AmendOp::Upgrade, 2, 2),
                (AmendOp::Downgrade, 4, 4),
            ],
        );
        assert_eq!(v, ["0.00", "50.00", "100.00"]);
    }
}
