//! The qcow2 table walk: mapping the whole of a 1 TiB image that holds 1024 data clusters
//! scattered over it (one per 1 GiB, so about a thousand L2 tables). No data is read; this
//! is what the copy engine's planner pays before it copies anything, and it must grow with
//! the allocated data, not with the virtual size.

use std::os::unix::fs::FileExt;

use criterion::{criterion_group, criterion_main, Criterion};
use vimg::{ConvertOptions, Format, Image, OpenOptions};

const TIB: u64 = 1 << 40;

fn table_walk(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("sparse.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(TIB).unwrap();
    for i in 0..1024u64 {
        // One 4 KiB write in each GiB, at a varying place inside it.
        let off = (i << 30) + ((i * 7919) % 16384) * 65536;
        f.write_all_at(&[(i as u8) | 1; 4096], off).unwrap();
    }
    drop(f);
    let qcow2 = dir.path().join("sparse.qcow2");
    let src = Image::open(&raw, &OpenOptions::with_format(Some(Format::Raw))).unwrap();
    vimg::convert(&src, &qcow2, &ConvertOptions::new(Format::Qcow2)).unwrap();
    std::fs::remove_file(&raw).unwrap();
    let img = Image::open(&qcow2, &OpenOptions::with_format(Some(Format::Qcow2))).unwrap();
    assert_eq!(img.virtual_size(), TIB);

    let mut g = c.benchmark_group("qcow2_table_walk");
    g.sample_size(20);
    g.bench_function("map_1TiB_1024_clusters", |b| {
        b.iter(|| {
            let mut pos = 0;
            let mut data = 0u64;
            while pos < TIB {
                let (e, _, _) = img.map_flat(pos, TIB - pos).unwrap();
                if e.kind.has_data() {
                    data += e.len;
                }
                pos = e.end();
            }
            assert_eq!(data, 1024 * 65536);
        })
    });
    g.finish();
}

criterion_group!(benches, table_walk);
criterion_main!(benches);
