//! CHS geometry and the virtual-size rule.
//!
//! The footer stores the size twice: as `current_size` in bytes and as a CHS geometry
//! (cylinders × heads × sectors per track). The specification's CHS algorithm ("Appendix:
//! CHS Calculation") rounds down, so the two rarely agree, and products disagree about
//! which one the guest sees: Virtual PC gives the guest the CHS size, Hyper-V, Disk2VHD and
//! XenServer the `current_size`. vimg follows qemu-img exactly (see [`virtual_sectors`]).

use super::header::{Footer, SECTOR};

/// Largest cylinder count a footer can hold.
pub const CHS_MAX_CYLINDERS: u64 = 65535;
/// Largest head count the CHS algorithm produces.
pub const CHS_MAX_HEADS: u64 = 16;
/// Largest sectors-per-track count the CHS algorithm produces.
pub const CHS_MAX_SECTORS: u64 = 255;
/// The largest geometry, 65535 × 16 × 255 sectors (about 127 GiB): images bigger than this
/// (and qemu's `force_size=on` images) carry it, and their size is `current_size`.
pub const MAX_GEOMETRY: u64 = CHS_MAX_CYLINDERS * CHS_MAX_HEADS * CHS_MAX_SECTORS;
/// The largest VHD, 2040 GiB in sectors (the specification's limit for dynamic disks; qemu
/// applies it to every type).
pub const MAX_SECTORS: u64 = 0xff00_0000;

/// A CHS geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chs {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Chs {
    /// The largest geometry.
    pub const MAX: Chs = Chs {
        cylinders: CHS_MAX_CYLINDERS as u16,
        heads: CHS_MAX_HEADS as u8,
        sectors_per_track: CHS_MAX_SECTORS as u8,
    };

    /// Sectors the geometry addresses.
    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }
}

/// The specification's CHS algorithm for `total_sectors` (rounds down).
pub fn chs_for(total_sectors: u64) -> Chs {
    let total = total_sectors.min(MAX_GEOMETRY);
    let (spt, heads, cth);
    if total >= CHS_MAX_CYLINDERS * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    Chs {
        // Bounded by the clamp of `total` above: cth / heads <= 65535.
        cylinders: (cth / heads).min(CHS_MAX_CYLINDERS) as u16,
        heads: heads as u8,
        sectors_per_track: spt as u8,
    }
}

/// What a new image of `requested` bytes becomes, as `qemu-img create -f vpc` decides it:
/// the size rounded up to whole sectors, then, unless `force_size`, rounded up to the
/// nearest CHS geometry (so a conversion never truncates). Sizes at or past the largest
/// geometry (and every `force_size` size) keep their exact sector count and get the largest
/// geometry. Returns the geometry and the size in bytes, or `None` past 2040 GiB.
pub fn create_geometry(requested: u64, force_size: bool) -> Option<(Chs, u64)> {
    let bytes = requested.checked_next_multiple_of(SECTOR)?;
    let want = bytes / SECTOR;
    let chs = if force_size {
        Chs::MAX
    } else {
        let target = want.min(MAX_GEOMETRY);
        let mut chs = Chs {
            cylinders: 0,
            heads: 0,
            sectors_per_track: 0,
        };
        // The algorithm rounds down; ask for a little more until the geometry covers the
        // request. Each step adds one sector, and a geometry with S sectors per track and H
        // heads covers any count within S * H of it, so this ends within 4080 steps.
        let mut extra = 0u64;
        while target > chs.sectors() {
            chs = chs_for(target + extra);
            extra += 1;
        }
        chs
    };
    let sectors = if chs.sectors() == MAX_GEOMETRY {
        want
    } else {
        chs.sectors()
    };
    (sectors <= MAX_SECTORS).then_some((chs, sectors * SECTOR))
}

/// Creator applications whose images are sized by their CHS geometry: Virtual PC ("vpc ")
/// and qemu before `force_size` existed ("qemu"). qemu-img 10 compares all four bytes.
/// Every other creator (Hyper-V "win ", Azure "wa\0\0", Disk2VHD "d2v\0", qemu's own
/// `force_size` "qem2", XenServer "tap\0", XenConverter "CTXS", VirtualBox "vbox", ...)
/// writes a reliable `current_size`.
pub const CHS_CREATORS: [[u8; 4]; 2] = [*b"vpc ", *b"qemu"];

/// The guest-visible size in sectors, by qemu-img's rule (qemu 10, block/vpc.c):
///
/// 1. images made by Virtual PC or by qemu without `force_size` ([`CHS_CREATORS`]) are
///    sized by their CHS geometry, which is what a Virtual PC guest sees;
/// 2. all others, and any image whose geometry is the largest one (65535/16/255, which
///    marks disks too big for CHS and qemu's `force_size` images), by `current_size`;
/// 3. `current_size` counts in whole sectors (a partial last sector is dropped).
///
/// qemu before 10.0 listed the `current_size` creators instead ("win ", "qem2", "d2v ",
/// "CTXS", "tap\0") and sized every unknown creator by CHS; an Azure export ("wa\0\0")
/// showed that unknown creators are better trusted.
pub fn virtual_sectors(footer: &Footer) -> u64 {
    let chs = footer.chs_sectors();
    if CHS_CREATORS.contains(&footer.creator_app) && chs != MAX_GEOMETRY {
        chs
    } else {
        footer.current_size / SECTOR
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_matches_known_images() {
        // 10 MiB (Hyper-V "dynamic.vhd"): 301/4/17.
        let c = chs_for(10 << 11);
        assert_eq!((c.cylinders, c.heads, c.sectors_per_track), (301, 4, 17));
        // 127 GiB and beyond: 65535/16/255.
        assert_eq!(chs_for(u64::MAX), Chs::MAX);
        // 127 GiB Hyper-V disk: 65278/16/255.
        let c = chs_for(136365211648 / 512);
        assert_eq!(
            (c.cylinders, c.heads, c.sectors_per_track),
            (65278, 16, 255)
        );
    }

    #[test]
    fn create_rounds_up_like_qemu() {
        // qemu-img create -f vpc x 100M gives 104865792 bytes.
        let (chs, size) = create_geometry(100 << 20, false).unwrap();
        assert_eq!(size, 104865792);
        assert_eq!(chs.sectors() * 512, size);
        // force_size keeps the size and takes the largest geometry.
        assert_eq!(
            create_geometry(100 << 20, true).unwrap(),
            (Chs::MAX, 100 << 20)
        );
        // Sizes are rounded up to sectors first.
        assert_eq!(create_geometry(1000, true).unwrap().1, 1024);
        // Past the largest geometry the size is exact.
        assert_eq!(
            create_geometry(200 << 30, false).unwrap(),
            (Chs::MAX, 200 << 30)
        );
        // 2040 GiB is the limit.
        assert!(create_geometry(2040 << 30, true).is_some());
        assert!(create_geometry((2040 << 30) + 512, true).is_none());
        assert_eq!(create_geometry(0, false).unwrap().1, 0);
        // Every size below the largest geometry rounds up to a geometry that covers it.
        for s in [
            1u64,
            17,
            4080,
            4081,
            65535 * 16,
            1 << 20,
            123456789,
            65535 * 16 * 63,
        ] {
            let (chs, size) = create_geometry(s * 512, false).unwrap();
            assert!(size >= s * 512, "{s}");
            assert_eq!(chs.sectors() * 512, size);
        }
    }

    #[test]
    fn size_rule_follows_creator() {
        let mut f = Footer::parse(&{
            let mut b = [0u8; 512];
            b[..8].copy_from_slice(b"conectix");
            b
        })
        .unwrap();
        f.current_size = 10 << 20;
        f.cylinders = 301;
        f.heads = 4;
        f.sectors_per_track = 17;
        for (app, sectors) in [
            (*b"win ", 20480),
            (*b"qem2", 20480),
            (*b"d2v ", 20480),
            (*b"d2v\0", 20480),
            (*b"CTXS", 20480),
            (*b"tap\0", 20480),
            (*b"wa\0\0", 20480),
            (*b"vs  ", 20480),
            (*b"vpc ", 20468),
            (*b"qemu", 20468),
            (*b"vpc\0", 20480),
        ] {
            f.creator_app = app;
            assert_eq!(virtual_sectors(&f), sectors, "{app:?}");
        }
        f.creator_app = *b"vpc ";
        f.cylinders = 65535;
        f.heads = 16;
        f.sectors_per_track = 255;
        assert_eq!(virtual_sectors(&f), 20480);
        f.current_size = 1000;
        f.creator_app = *b"win ";
        assert_eq!(virtual_sectors(&f), 1);
    }
}
