//! The result of a metadata consistency check (`vimg check`), with qemu-img's JSON keys.
//!
//! vimg's readers verify tables when an image is opened (qcow2 L2 tables when they are
//! first used) and refuse an image whose tables contradict themselves or the file: such an
//! image never opens. For a check, that refusal is the finding: the open error of kind
//! [`ErrorKind::Corrupt`] becomes a report with one corruption whose message is the
//! reader's error ([`CheckReport::from_open_error`]), so `vimg check` exits 2 ("corrupt")
//! as qemu-img does for an image it opens and finds corrupt, not 1 ("could not check").
//! Errors of other kinds (a malformed header, an unsupported feature, a missing file) still
//! mean the image could not be checked.

use serde::Serialize;

use crate::error::{Error, ErrorKind};

/// What a check found. Counts follow `qemu-img check`: `corruptions` are errors that make the
/// image unsafe to use, `leaks` are clusters allocated but unused (harmless wasted space).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// First byte past the image's last used cluster, when the format tracks it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_end_offset: Option<u64>,
    /// Clusters the virtual disk spans.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_clusters: Option<u64>,
    /// Errors that kept the check from completing.
    pub check_errors: u64,
    /// Corruptions a repair (`check -r all`) fixed.
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    /// Leaked clusters a repair (`check -r`) fixed.
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    /// Allocated guest clusters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocated_clusters: Option<u64>,
    /// Guest clusters not stored right after the previous one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragmented_clusters: Option<u64>,
    /// Compressed guest clusters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed_clusters: Option<u64>,
    /// Corruptions found.
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    /// Leaked clusters found.
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    /// One line per problem, in the order found (human output): the first
    /// `MAX_MESSAGES` (1000); the rest are only counted in [`CheckReport::omitted_messages`].
    #[serde(skip)]
    pub messages: Vec<String>,
    /// Problems found past the first `MAX_MESSAGES` (1000): counted, not described, so memory does
    /// not depend on how often an image repeats one corruption.
    #[serde(skip)]
    pub omitted_messages: u64,
}

/// Messages a report keeps (qemu-img prints every one; a crafted image can make millions).
pub const MAX_MESSAGES: usize = 1000;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl CheckReport {
    /// The report for an image that failed to open with `e`: one corruption, worded
    /// `ERROR <reader's error>`, when `e` is of kind [`ErrorKind::Corrupt`]; `None` for any
    /// other kind (the image could not be checked).
    ///
    /// ```
    /// use vimg::CheckReport;
    /// let e = vimg::Error::corrupt("L2 table entry 3 points past the end of the file");
    /// let r = CheckReport::from_open_error(&e).expect("corrupt");
    /// assert_eq!((r.corruptions, r.check_errors), (1, 0));
    /// assert!(CheckReport::from_open_error(&vimg::Error::invalid("bad magic")).is_none());
    /// ```
    pub fn from_open_error(e: &Error) -> Option<CheckReport> {
        if e.kind() != ErrorKind::Corrupt {
            return None;
        }
        let mut r = CheckReport::default();
        r.corruption(format!("ERROR {}", e.message()));
        Some(r)
    }

    /// Records a corruption with its description, worded as qemu-img words it
    /// (`ERROR cluster 5 refcount=0 reference=1`).
    pub fn corruption(&mut self, msg: impl Into<String>) {
        self.corruptions += 1;
        self.message(msg);
    }

    /// Records `n` corruptions of one kind, described once by `msg` (built only when a
    /// message is still kept).
    pub fn corruptions_n(&mut self, n: u64, msg: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        self.corruptions += n;
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg());
            self.omitted_messages += n - 1;
        } else {
            self.omitted_messages += n;
        }
    }

    /// Records a leak with its description (`Leaked cluster 5 refcount=1 reference=0`).
    pub fn leak(&mut self, msg: impl Into<String>) {
        self.leaks += 1;
        self.message(msg);
    }

    /// Keeps `msg` when fewer than `MAX_MESSAGES` (1000) are kept, else counts it.
    pub fn message(&mut self, msg: impl Into<String>) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg.into());
        } else {
            self.omitted_messages += 1;
        }
    }

    /// The line that stands for the omitted messages, when there are any.
    pub fn omitted_line(&self) -> Option<String> {
        (self.omitted_messages > 0).then(|| {
            format!(
                "({} more messages not shown; the counts below include them)",
                self.omitted_messages
            )
        })
    }
}
