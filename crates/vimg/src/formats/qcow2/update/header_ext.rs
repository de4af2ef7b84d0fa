//! Header extensions vimg does not know, kept when it rewrites the header (iotest 031).
//!
//! Spec (docs/interop/qcow2.txt, "Header extensions"): an extension of an unknown type is
//! ignored by a reader and must be preserved by a writer that rewrites the header; QEMU
//! writes them back after its own extensions, in the order it read them, before the end
//! marker. A header with such an extension uses QEMU's whole layout (the feature name
//! table in version 3 included): it no longer fits one sector, so it is written in one
//! write of the sectors it needs, and refused when it would not fit the first cluster.

use byteorder::{ByteOrder, BE};

use super::super::header::*;

/// One extension of a type vimg does not interpret: its type and data (unpadded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UnknownExt {
    pub magic: u32,
    pub data: Vec<u8>,
}

/// The extensions in `buf[start..end]` whose type vimg does not know, in file order. The
/// area was validated by [`parse_extensions`] first; a malformed tail ends the walk.
pub(crate) fn unknown_extensions(buf: &[u8], start: usize, end: usize) -> Vec<UnknownExt> {
    let mut out = Vec::new();
    let end = end.min(buf.len());
    let mut off = start;
    while off + 8 <= end {
        let magic = BE::read_u32(&buf[off..]);
        let len = BE::read_u32(&buf[off + 4..]) as usize;
        let data_at = off + 8;
        if magic == EXT_END || len > end - data_at {
            break;
        }
        if !matches!(
            magic,
            EXT_BACKING_FORMAT | EXT_FEATURE_TABLE | EXT_BITMAPS | EXT_CRYPTO | EXT_DATA_FILE
        ) {
            out.push(UnknownExt {
                magic,
                data: buf[data_at..data_at + len].to_vec(),
            });
        }
        off = data_at + len.div_ceil(8) * 8;
    }
    out
}

/// QEMU's feature name table extension data (the table every v3 image it writes carries).
pub(crate) fn feature_table_data() -> Vec<u8> {
    let t = qemu_feature_table();
    let mut v = vec![0u8; t.len() * FEATURE_NAME_LEN];
    for (f, chunk) in t.iter().zip(v.chunks_mut(FEATURE_NAME_LEN)) {
        f.write_to(chunk);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_extensions_are_found_in_order_with_their_data() {
        let mut buf = vec![0u8; 1024];
        let mut off = 112;
        off = write_extension(&mut buf, off, EXT_BACKING_FORMAT, b"raw");
        off = write_extension(&mut buf, off, 0x1234_5678, b"first one");
        off = write_extension(&mut buf, off, EXT_FEATURE_TABLE, &feature_table_data());
        off = write_extension(&mut buf, off, 0x0bad_cafe, b"");
        write_extension(&mut buf, off, EXT_END, &[]);
        let u = unknown_extensions(&buf, 112, 1024);
        assert_eq!(
            u,
            vec![
                UnknownExt {
                    magic: 0x1234_5678,
                    data: b"first one".to_vec()
                },
                UnknownExt {
                    magic: 0x0bad_cafe,
                    data: Vec::new()
                }
            ]
        );
        assert_eq!(feature_table_data().len(), 384);
    }
}
