//! The hot paths of a conversion: zero detection, and one chunk through the copy loop
//! (planning, a pooled buffer, the read through the mapping, the zero scan, the hand-over to
//! the writer), measured without disk I/O: the source is in memory and the writer drops
//! what it gets.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use vimg::engine::zero::{is_zero, split_runs};
use vimg::engine::{copy, CopyOptions};
use vimg::storage::MemStorage;
use vimg::writer::EncodedUnit;
use vimg::{Format, Image, ImageWriter, OpenOptions, WriterCaps};

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

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
    // The engine's scan: 512-byte units, zero runs of at least 4 KiB skipped.
    let mut runs = Vec::new();
    g.bench_function("1MiB_split_runs_zero", |b| {
        b.iter(|| split_runs(black_box(&zeros), 512, 4096, &mut runs))
    });
    let data = noise(1 << 20, 7);
    g.bench_function("1MiB_split_runs_data", |b| {
        b.iter(|| split_runs(black_box(&data), 512, 4096, &mut runs))
    });
    g.finish();
}

/// A writer that keeps nothing: what is left is the engine's own cost.
struct NullWriter;

impl ImageWriter for NullWriter {
    fn caps(&self) -> WriterCaps {
        WriterCaps {
            unit: 512,
            ordered: false,
            encodes: false,
        }
    }

    fn write(&self, _offset: u64, data: &[u8], _encoded: &[EncodedUnit]) -> vimg::Result<()> {
        black_box(data);
        Ok(())
    }

    fn finish(self: Box<Self>) -> vimg::Result<()> {
        Ok(())
    }
}

fn copy_chunk(c: &mut Criterion) {
    const CHUNK: usize = 2 << 20;
    let mut g = c.benchmark_group("copy_loop");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    for (name, bytes) in [
        ("one_2MiB_data_chunk", noise(CHUNK, 3)),
        ("one_2MiB_zero_chunk", vec![0u8; CHUNK]),
    ] {
        let img = Image::open_storage(
            Arc::new(MemStorage::new(bytes)),
            None,
            &OpenOptions::with_format(Some(Format::Raw)),
        )
        .unwrap();
        let mut opts = CopyOptions::default();
        opts.workers = 1;
        g.bench_function(name, |b| b.iter(|| copy(&img, &NullWriter, &opts).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, zero_detection, copy_chunk);
criterion_main!(benches);
