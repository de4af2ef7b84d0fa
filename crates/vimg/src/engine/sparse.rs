//! qemu-img's `-S` (minimum sparse size) when it is larger than the writer's unit: which
//! parts of a data chunk are written and which are skipped as zero.
//!
//! qemu-img (`convert`, qemu-img.c's zero detection) looks at a read buffer in 512-byte
//! sectors. A run of zero sectors is skipped only when it is at least `-S` long, and the
//! ends of the runs are moved to multiples of the largest power of two not above `-S`
//! (absolute sector numbers), so that writes do not start or end inside such a block: a data
//! run is extended to the next boundary, a zero run is shortened to the previous one, and a
//! zero run that does not reach a boundary before the next data becomes data. A zero run at
//! the start of the buffer is skipped whatever its length; one at its end only when the
//! buffer ends there. With `-S 4k` into 1 KiB qcow2 clusters, a 1 KiB write at offset 0 thus
//! allocates clusters 0-3, as qemu-img's does (iotest 122).
//!
//! When the writer's unit is at least `-S`, the result is the same as deciding unit by unit
//! ([`super::zero::split_runs`]), which is cheaper; this module is used below that size.

use super::zero::{is_zero, Run};

const SECTOR: usize = 512;

/// Splits `buf`, whose first byte is at image offset `abs_start` (a multiple of 512), into
/// data and zero runs of whole `unit`s (the last may be short), the way qemu-img's `-S
/// min_zero` decides which sectors it writes: a unit is data when any sector qemu-img would
/// write lies in it. `min_zero` is a multiple of 512, at least 512.
pub fn split_runs_qemu(
    buf: &[u8],
    abs_start: u64,
    unit: usize,
    min_zero: usize,
    out: &mut Vec<Run>,
) {
    out.clear();
    if buf.is_empty() {
        return;
    }
    let sectors: Vec<bool> = buf.chunks(SECTOR).map(is_zero).collect();
    let min = (min_zero / SECTOR).max(1);
    // The largest power of two not above `min`.
    let align = 1usize << (usize::BITS - 1 - min.leading_zeros());
    let first = abs_start / SECTOR as u64;
    let scan = Scan {
        zero: &sectors,
        first,
        align,
    };
    // Sector runs qemu-img would write (data) or skip.
    let mut written = vec![false; sectors.len()];
    let mut pos = 0;
    while pos < sectors.len() {
        let (data, n) = scan.allocated_min(pos, sectors.len() - pos, min);
        if data {
            written[pos..pos + n].iter_mut().for_each(|w| *w = true);
        }
        pos += n.max(1);
    }
    // Whole units: data when any written sector is in them.
    let unit = unit.max(1);
    let mut start = 0;
    while start < buf.len() {
        let end = (start + unit).min(buf.len());
        let (s0, s1) = (start / SECTOR, end.div_ceil(SECTOR));
        let zero = !written[s0..s1].iter().any(|&w| w);
        match out.last_mut() {
            Some(last) if last.zero == zero => last.end = end,
            _ => out.push(Run { start, end, zero }),
        }
        start = end;
    }
}

/// The sectors of one buffer, zero or not, and where they lie in the image.
struct Scan<'a> {
    zero: &'a [bool],
    /// Absolute sector number of `zero[0]`.
    first: u64,
    /// Sector alignment of run ends (a power of two).
    align: usize,
}

impl Scan<'_> {
    /// The run starting at `pos` (of at most `n` sectors): whether it is written, and its
    /// length with its end moved to an alignment boundary where qemu-img moves it.
    fn allocated(&self, pos: usize, n: usize) -> (bool, usize) {
        if n == 0 {
            return (false, 0);
        }
        let mut is_zero = self.zero[pos];
        let mut i = 1;
        while i < n && self.zero[pos + i] == is_zero {
            i += 1;
        }
        if i == n {
            return (!is_zero, i);
        }
        let mask = self.align as u64 - 1;
        let tail = ((self.first + (pos + i) as u64) & mask) as usize;
        if tail != 0 {
            if is_zero && i <= tail {
                // Too short to reach a boundary: the data after it is written with it.
                is_zero = false;
            }
            if is_zero {
                i -= tail;
            } else {
                i = (i + self.align - tail).min(n);
            }
        }
        (!is_zero, i)
    }

    /// Like [`Scan::allocated`], but a written run goes on over zero runs shorter than
    /// `min` sectors that data follows.
    fn allocated_min(&self, pos: usize, n: usize, min: usize) -> (bool, usize) {
        let min = min.min(n);
        let (data, first) = self.allocated(pos, n);
        if !data {
            return (false, first);
        }
        let mut used = first;
        let mut checked = first;
        while checked < n {
            let (d, k) = self.allocated(pos + checked, n - checked);
            checked += k;
            if d {
                used = checked;
            } else if k >= min {
                break;
            }
        }
        (true, used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(buf: &[u8], abs: u64, unit: usize, min: usize) -> Vec<(usize, usize, bool)> {
        let mut out = Vec::new();
        split_runs_qemu(buf, abs, unit, min, &mut out);
        out.iter().map(|r| (r.start, r.end, r.zero)).collect()
    }

    /// iotest 122's "Non-zero -S" image: 1 KiB of data at 0, 8 KiB and 17 KiB of a
    /// 66 KiB allocated run.
    fn image_122() -> Vec<u8> {
        let mut b = vec![0u8; 66 * 1024];
        for k in [0usize, 8, 17] {
            b[k * 1024..(k + 1) * 1024].fill(0xcd);
        }
        b
    }

    #[test]
    fn qemu_img_122_s4k() {
        // qemu-img: data 0-4k, 8k-12k, 16k-20k; the rest zero.
        let r = runs(&image_122(), 0, 1024, 4096);
        assert_eq!(
            r,
            vec![
                (0, 4096, false),
                (4096, 8192, true),
                (8192, 12288, false),
                (12288, 16384, true),
                (16384, 20480, false),
                (20480, 66 * 1024, true),
            ]
        );
    }

    #[test]
    fn qemu_img_122_s8k() {
        // qemu-img: one data run 0-24k (the 4k-7k zero gap is shorter than 8k).
        let r = runs(&image_122(), 0, 1024, 8192);
        assert_eq!(r, vec![(0, 24576, false), (24576, 66 * 1024, true)]);
    }

    #[test]
    fn leading_zero_run_is_skipped_unless_inside_a_block() {
        // Zero sectors 0-3 then data: the zeros share the aligned 4k block with the data.
        let mut b = vec![0u8; 16 * 512];
        b[4 * 512] = 1;
        assert_eq!(runs(&b, 0, 512, 4096)[0], (0, 8 * 512, false));
        // Zero sectors 0-9 then data at 10: sectors 0-7 are a whole block and skipped.
        let mut b = vec![0u8; 16 * 512];
        b[10 * 512] = 1;
        assert_eq!(
            runs(&b, 0, 512, 4096),
            vec![(0, 8 * 512, true), (8 * 512, 16 * 512, false)]
        );
    }

    #[test]
    fn alignment_is_absolute() {
        // The same data one sector later in the image: the block boundary moves with it.
        let mut b = vec![0u8; 32 * 512];
        b[0] = 1;
        // Starting at sector 7: data run 7..8 ends at the boundary, 8..39 zero.
        assert_eq!(
            runs(&b, 7 * 512, 512, 4096),
            vec![(0, 512, false), (512, 32 * 512, true)]
        );
    }

    #[test]
    fn all_zero_and_all_data() {
        assert_eq!(runs(&[0u8; 3000], 0, 512, 4096), vec![(0, 3000, true)]);
        assert_eq!(runs(&[1u8; 3000], 0, 512, 4096), vec![(0, 3000, false)]);
        assert!(runs(&[], 0, 512, 4096).is_empty());
    }

    #[test]
    fn non_power_of_two_minimum() {
        // -S 3k: blocks of 2k (4 sectors), zero runs of at least 6 sectors skipped.
        let mut b = vec![0u8; 24 * 512];
        b[0] = 1;
        b[12 * 512] = 1;
        // Data 0 -> 0..4; zero 4..12 (8 sectors, ends at a boundary) skipped; data 12..16.
        assert_eq!(
            runs(&b, 0, 512, 3072),
            vec![
                (0, 4 * 512, false),
                (4 * 512, 12 * 512, true),
                (12 * 512, 16 * 512, false),
                (16 * 512, 24 * 512, true)
            ]
        );
    }
}
