//! The hot paths of a conversion: zero detection and one chunk through the copy loop.

use std::os::unix::fs::FileExt;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use vimg::engine::zero::is_zero;
use vimg::{ConvertOptions, Format, Image, OpenOptions};

fn zero_detection(c: &mut Criterion) {
    let zeros = vec![0u8; 1 << 20];
    let mut g = c.benchmark_group("zero_detection");
    g.throughput(Throughput::Bytes(zeros.len() as u64));
    g.bench_function("1MiB_all_zero", |b| b.iter(|| is_zero(black_box(&zeros))));
    let mut late = zeros.clone();
    late[(1 << 20) - 1] = 1;
    g.bench_function("1MiB_last_byte_set", |b| {
        b.iter(|| is_zero(black_box(&late)))
    });
    g.finish();
}

fn copy_chunk(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let f = std::fs::File::create(&src).unwrap();
    let mut x = 1u64;
    let data: Vec<u8> = (0..(8 << 20))
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    f.write_all_at(&data, 0).unwrap();
    let img = Image::open(&src, &OpenOptions::with_format(Some(Format::Raw))).unwrap();
    let dst = dir.path().join("dst.raw");
    let mut g = c.benchmark_group("copy_loop");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(20);
    g.bench_function("raw_to_raw_8MiB", |b| {
        b.iter(|| vimg::convert(&img, &dst, &ConvertOptions::new(Format::Raw)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, zero_detection, copy_chunk);
criterion_main!(benches);
