//! Compressing one 64 KiB cluster as the writers do: raw deflate with a 4 KiB window at
//! qcow2's `-c` level, zlib (libdeflate) at the streamOptimized VMDK level, and zstd at qcow2's level;
//! and decompressing it again (the compressed-input path).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use vimg::codec::{decompress, deflate, zlib_compress, zstd_compress};
use vimg::formats::qcow2::{DEFLATE_LEVEL as QCOW2_LEVEL, ZSTD_LEVEL};
use vimg::formats::vmdk::DEFLATE_LEVEL as VMDK_LEVEL;
use vimg::mapping::Codec;

const CLUSTER: usize = 64 << 10;

/// Text-like data, as in the benchmark workload of `compare.sh`.
fn text(n: usize) -> Vec<u8> {
    let words: Vec<&[u8]> = "the of and to in is was for on that with as by at from his her an it this which be are or had have not were but its they all one there also new more first two time some other into after can would may most years these only over such people used when three many where states"
        .split(' ')
        .map(str::as_bytes)
        .collect();
    let mut x = 0x2545f4914f6cdd1du64;
    let mut out = Vec::with_capacity(n + 64);
    while out.len() < n {
        for i in 0..12 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i > 0 {
                out.push(b' ');
            }
            out.extend_from_slice(words[(x % words.len() as u64) as usize]);
        }
        out.extend_from_slice(b".\n");
    }
    out.truncate(n);
    out
}

fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9e3779b97f4a7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn compress_cluster(c: &mut Criterion) {
    let mut g = c.benchmark_group("compress_64KiB");
    g.throughput(Throughput::Bytes(CLUSTER as u64));
    for (kind, data) in [("text", text(CLUSTER)), ("random", noise(CLUSTER))] {
        g.bench_function(format!("qcow2_deflate_l{QCOW2_LEVEL}_{kind}"), |b| {
            b.iter(|| deflate(black_box(&data), QCOW2_LEVEL, 12, false, CLUSTER))
        });
        g.bench_function(format!("vmdk_libdeflate_l{VMDK_LEVEL}_{kind}"), |b| {
            b.iter(|| zlib_compress(black_box(&data), VMDK_LEVEL as i32, 2 * CLUSTER))
        });
        g.bench_function(format!("zstd_l{ZSTD_LEVEL}_{kind}"), |b| {
            b.iter(|| zstd_compress(black_box(&data), ZSTD_LEVEL, CLUSTER))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("decompress_64KiB");
    g.throughput(Throughput::Bytes(CLUSTER as u64));
    let data = text(CLUSTER);
    let mut out = vec![0u8; CLUSTER];
    let d = deflate(&data, QCOW2_LEVEL, 12, false, CLUSTER).unwrap();
    g.bench_function("qcow2_deflate_text", |b| {
        b.iter(|| decompress(Codec::Deflate, black_box(&d), &mut out).unwrap())
    });
    let z = zstd_compress(&data, ZSTD_LEVEL, CLUSTER).unwrap();
    g.bench_function("zstd_text", |b| {
        b.iter(|| decompress(Codec::Zstd, black_box(&z), &mut out).unwrap())
    });
    g.finish();
}

criterion_group!(benches, compress_cluster);
criterion_main!(benches);
