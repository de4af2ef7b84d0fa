//! Zero detection for the copy loop: is a buffer all zero, and which units of a chunk are.

/// True if every byte of `buf` is zero. Checks a word at a time, 64 bytes per step, which
/// the compiler turns into vector instructions.
#[inline]
pub fn is_zero(buf: &[u8]) -> bool {
    // Check the first word early: data buffers almost always fail here.
    if buf.len() >= 16 {
        let head = u128::from_ne_bytes(buf[..16].try_into().unwrap_or([1; 16]));
        if head != 0 {
            return false;
        }
    }
    let (chunks, tail) = buf.split_at(buf.len() - buf.len() % 64);
    for c in chunks.chunks_exact(64) {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    tail.iter().all(|&b| b == 0)
}

/// A run inside a chunk: `[start, end)` relative to the chunk, data or zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First byte, relative to the chunk.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// True when every byte is zero and the run is long enough to skip.
    pub zero: bool,
}

/// Splits `buf` into alternating data and zero runs at granularity `unit` (the last unit may
/// be short). Zero runs shorter than `min_zero` bytes are merged into the data around them,
/// as qemu-img's `-S` does. `min_zero == 0` disables zero detection (one data run).
pub fn split_runs(buf: &[u8], unit: usize, min_zero: usize, out: &mut Vec<Run>) {
    out.clear();
    if buf.is_empty() {
        return;
    }
    if min_zero == 0 {
        out.push(Run {
            start: 0,
            end: buf.len(),
            zero: false,
        });
        return;
    }
    let unit = unit.max(1);
    let mut pos = 0;
    while pos < buf.len() {
        let end = (pos + unit).min(buf.len());
        let zero = is_zero(&buf[pos..end]);
        match out.last_mut() {
            Some(last) if last.zero == zero => last.end = end,
            _ => out.push(Run {
                start: pos,
                end,
                zero,
            }),
        }
        pos = end;
    }
    // Zero runs too short to skip become data; then merge neighbours of the same kind.
    for r in out.iter_mut() {
        if r.zero && r.end - r.start < min_zero {
            r.zero = false;
        }
    }
    let mut merged: Vec<Run> = Vec::with_capacity(out.len());
    for r in out.drain(..) {
        match merged.last_mut() {
            Some(last) if last.zero == r.zero => last.end = r.end,
            _ => merged.push(r),
        }
    }
    *out = merged;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 1000]));
        for i in [0usize, 15, 16, 63, 64, 999] {
            let mut b = vec![0u8; 1000];
            b[i] = 1;
            assert!(!is_zero(&b), "{i}");
        }
    }

    #[test]
    fn runs_respect_min_zero() {
        let mut b = vec![0u8; 16 * 512];
        b[0] = 1; // unit 0 data
        b[3 * 512] = 1; // unit 3 data: units 1-2 zero (1 KiB)
        b[15 * 512] = 1; // unit 15 data: units 4..15 zero (5.5 KiB)
        let mut runs = Vec::new();
        split_runs(&b, 512, 4096, &mut runs);
        assert_eq!(
            runs,
            vec![
                Run {
                    start: 0,
                    end: 4 * 512,
                    zero: false
                },
                Run {
                    start: 4 * 512,
                    end: 15 * 512,
                    zero: true
                },
                Run {
                    start: 15 * 512,
                    end: 16 * 512,
                    zero: false
                },
            ]
        );
        split_runs(&b, 512, 512, &mut runs);
        assert_eq!(runs.len(), 5);
        split_runs(&b, 512, 0, &mut runs);
        assert_eq!(runs.len(), 1);
        // A short last unit.
        let b = vec![0u8; 700];
        split_runs(&b, 512, 512, &mut runs);
        assert_eq!(
            runs,
            vec![Run {
                start: 0,
                end: 700,
                zero: true
            }]
        );
    }
}
