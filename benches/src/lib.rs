//! Benchmarks live in `benches/` (criterion) and `compare.sh` (vimg against qemu-img).
