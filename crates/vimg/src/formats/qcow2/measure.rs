//! `vimg measure -O qcow2`: the same arithmetic as QEMU's `qcow2_measure`. `fully-allocated`
//! counts the header, every L2 table, the L1 table and the refcount structures (found as a
//! fixed point: refcount blocks count themselves) plus every data cluster; `required` swaps
//! the data clusters for the ones the source really holds.

use super::write::{Prealloc, WriteOptions};
use crate::error::Result;
use crate::formats::{DataSummary, Measure};
use crate::options::CreateOptions;

/// Refcount blocks plus refcount table clusters needed to count `clusters` clusters and
/// themselves (QEMU's `qcow2_refcount_metadata_size`, without the generous increase).
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let (blocks, table) =
        super::refcount::refcount_structure(clusters, cluster_size, refcount_order);
    (blocks + table) * cluster_size
}

/// Bytes of a fully allocated image of `total_size` guest bytes (QEMU's
/// `qcow2_calc_prealloc_size`).
pub fn prealloc_size(
    total_size: u64,
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> u64 {
    let aligned = total_size.div_ceil(cluster_size) * cluster_size;
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cluster_size;
    let per_l2 = cluster_size / l2e;
    let nl2e = (aligned / cluster_size).div_ceil(per_l2) * per_l2;
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cluster_size).div_ceil(cluster_size / 8) * (cluster_size / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size(
        (meta + aligned) / cluster_size,
        cluster_size,
        refcount_order,
    );
    meta + aligned
}

/// `measure` for qcow2.
pub fn measure(size: u64, opts: &CreateOptions, data: Option<&dyn DataSummary>) -> Result<Measure> {
    let mut plain = opts.clone();
    plain.compress = false;
    // The options first, then the size in qcow2_measure's words (iotest 271), which are
    // not create's.
    let g = WriteOptions::from_options(&plain, 0)?.geometry();
    if g.l1_entries_for(size) * 8 > super::header::MAX_L1_BYTES
        || size > crate::limits::MAX_VIRTUAL_SIZE
    {
        return Err(super::error::Qcow2Error::BadOption(
            "The image size is too large (try using a larger cluster size)".into(),
        )
        .into());
    }
    let o = WriteOptions::from_options(&plain, size)?;
    let cs = 1u64 << o.cluster_bits;
    let mut virtual_size = size.div_ceil(cs) * cs;
    let mut required = 0u64;
    let mut bitmaps = None;
    if let Some(d) = data {
        virtual_size = d.virtual_size().div_ceil(cs) * cs;
        required = if o.backing_file.is_some() {
            // The new image's backing file may share nothing with the source.
            virtual_size
        } else {
            d.data_units(cs)? * cs
        };
        if o.version >= 3 {
            if let Some(list) = d.persistent_bitmaps() {
                let mut total = 0u64;
                let mut dir = 0u64;
                for (name, granularity) in list {
                    let bits = d.virtual_size().div_ceil(granularity.max(1));
                    let clusters = bits.div_ceil(8).div_ceil(cs);
                    total += clusters * cs + (clusters * 8).div_ceil(cs) * cs;
                    dir += (24 + name.len() as u64).div_ceil(8) * 8;
                }
                bitmaps = Some(total + dir.div_ceil(cs) * cs);
            }
        }
    }
    if matches!(o.prealloc, Prealloc::Full | Prealloc::Falloc) {
        required = virtual_size;
    }
    let fully = prealloc_size(virtual_size, cs, o.refcount_order, o.extended_l2);
    let luks = match o.encrypt {
        true => super::encrypt_write::measure_extra(opts, cs)?,
        false => 0,
    };
    Ok(Measure {
        required: fully - virtual_size + required + luks,
        fully_allocated: fully + luks,
        bitmaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_qemu_for_sizes() {
        // qemu-img measure --size 1G -O qcow2
        let m = measure(1 << 30, &CreateOptions::new(), None).unwrap();
        assert_eq!((m.required, m.fully_allocated), (393216, 1074135040));
        // 64 MiB, as for a 64 MiB raw source without data.
        assert_eq!(prealloc_size(64 << 20, 65536, 4, false), 67436544);
    }
}
