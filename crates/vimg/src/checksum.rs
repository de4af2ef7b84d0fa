//! Checksums of output files, in the algorithms image services record (OpenStack Glance's
//! `os_hash_algo` is `sha512` by default; `md5` is its legacy `checksum` field).
//!
//! A digest is of the file's bytes exactly as a reader of the finished file sees them: holes
//! and gaps count as zeros. [`InOrderHasher`] hashes while a file is written, as long as every
//! write lands exactly where the previous one ended; anything else (a writer that seeks back
//! to fill in a header) marks it broken and the caller hashes the finished file with
//! [`hash_storage`] instead, in one pass that skips the reads of holes.

use std::fmt;
use std::str::FromStr;

use md5::Md5;
use sha2::{Digest, Sha256, Sha512};

use crate::error::{Error, Result};
use crate::storage::Storage;

/// True when a stored checksum must match the computed one. cargo-fuzz builds with
/// `--cfg fuzzing`, and then checksums (VHD footer and dynamic header, VHDX headers, region
/// tables and log entries) are not enforced: a mutated input almost never carries a valid
/// CRC-32C, so with them the fuzzer would never get past the first header and the tables
/// behind it would go unexplored. Every other check stays on; a checksum mismatch itself is
/// covered by unit tests and the hostile suite, which are built without that flag.
pub const fn checksum_matches(stored: u32, computed: u32) -> bool {
    stored == computed || cfg!(fuzzing)
}

/// A checksum algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HashAlg {
    /// SHA-256 (`sha256sum`).
    Sha256,
    /// SHA-512 (`sha512sum`); Glance's default `os_hash_algo`.
    Sha512,
    /// MD5 (`md5sum`); Glance's legacy `checksum` field.
    Md5,
}

impl HashAlg {
    /// The name as `sha256sum`-style tools and Glance's `os_hash_algo` spell it.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha512 => "sha512",
            HashAlg::Md5 => "md5",
        }
    }

    /// A fresh hasher.
    pub fn hasher(self) -> Hasher {
        Hasher(match self {
            HashAlg::Sha256 => Inner::Sha256(Sha256::new()),
            HashAlg::Sha512 => Inner::Sha512(Box::new(Sha512::new())),
            HashAlg::Md5 => Inner::Md5(Md5::new()),
        })
    }
}

impl fmt::Display for HashAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlg {
    type Err = Error;

    fn from_str(s: &str) -> Result<HashAlg> {
        match s.to_ascii_lowercase().as_str() {
            "sha256" => Ok(HashAlg::Sha256),
            "sha512" => Ok(HashAlg::Sha512),
            "md5" => Ok(HashAlg::Md5),
            _ => Err(Error::invalid_argument(format!(
                "Unknown checksum algorithm '{s}' (sha256, sha512 or md5)"
            ))),
        }
    }
}

/// A finished digest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Checksum {
    /// The algorithm.
    #[serde(serialize_with = "ser_alg")]
    pub alg: HashAlg,
    /// Lower-case hex, as `sha256sum` prints it.
    pub hex: String,
}

fn ser_alg<S: serde::Serializer>(a: &HashAlg, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(a.name())
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex)
    }
}

enum Inner {
    Sha256(Sha256),
    // Boxed: the SHA-512 state is twice the others' size.
    Sha512(Box<Sha512>),
    Md5(Md5),
}

/// An incremental hasher of one of the [`HashAlg`]s.
pub struct Hasher(Inner);

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher")
    }
}

static ZEROS: [u8; 65536] = [0u8; 65536];

impl Hasher {
    /// The algorithm.
    pub fn alg(&self) -> HashAlg {
        match self.0 {
            Inner::Sha256(_) => HashAlg::Sha256,
            Inner::Sha512(_) => HashAlg::Sha512,
            Inner::Md5(_) => HashAlg::Md5,
        }
    }

    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.0 {
            Inner::Sha256(h) => h.update(data),
            Inner::Sha512(h) => h.update(data),
            Inner::Md5(h) => h.update(data),
        }
    }

    /// Feeds `n` zero bytes (a hole or a gap).
    pub fn update_zeros(&mut self, mut n: u64) {
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            self.update(&ZEROS[..k]);
            n -= k as u64;
        }
    }

    /// The digest.
    pub fn finish(self) -> Checksum {
        let alg = self.alg();
        let bytes: Vec<u8> = match self.0 {
            Inner::Sha256(h) => h.finalize().to_vec(),
            Inner::Sha512(h) => h.finalize().to_vec(),
            Inner::Md5(h) => h.finalize().to_vec(),
        };
        Checksum {
            alg,
            hex: bytes.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// Hashes the bytes of a new file (one that starts empty) while it is written front to
/// back, on a thread of its own, so the hash runs beside the work that produces the bytes
/// instead of after it. A write that starts at or after the end of the previous one is
/// hashed as it comes, the gap before it as zeros (a new file reads as zeros where nothing
/// was written, and a later write into the gap lands behind the hashed end, which breaks
/// the hash). A write anywhere behind that end breaks it, and [`InOrderHasher::finish`]
/// then returns `None` so the caller reads the finished file.
///
/// Memory is bounded: data waits for the hashing thread in pieces of at most
/// [`HASH_PIECE`] bytes, at most [`HASH_QUEUE`] pieces at a time (a writer that gets ahead
/// waits); a gap is a count, not bytes.
#[derive(Debug)]
pub struct InOrderHasher {
    alg: HashAlg,
    /// The end of the bytes handed to the hash (the previous write's end).
    pos: u64,
    /// The hashing thread and what feeds it; `None` once broken (or before the first write).
    worker: Option<HashWorker>,
    broken: bool,
}

/// Bytes of one piece of data queued for the hashing thread.
pub const HASH_PIECE: usize = 1 << 20;

/// Pieces (data or gaps) queued for the hashing thread at most.
pub const HASH_QUEUE: usize = 16;

enum Piece {
    Data(Vec<u8>),
    Zeros(u64),
}

#[derive(Debug)]
struct HashWorker {
    tx: std::sync::mpsc::SyncSender<Piece>,
    thread: std::thread::JoinHandle<Hasher>,
    /// Set when the hash is abandoned, so a long gap stops being hashed.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HashWorker {
    fn start(alg: HashAlg) -> Option<HashWorker> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(HASH_QUEUE);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vimg-hash".into())
            .spawn(move || {
                let mut h = alg.hasher();
                for p in rx {
                    match p {
                        Piece::Data(d) => h.update(&d),
                        Piece::Zeros(mut n) => {
                            while n > 0 && !halt.load(Ordering::Relaxed) {
                                let k = n.min(ZEROS.len() as u64);
                                h.update(&ZEROS[..k as usize]);
                                n -= k;
                            }
                        }
                    }
                }
                h
            })
            .ok()?;
        Some(HashWorker { tx, thread, stop })
    }

    /// Queues a piece; false when the thread is gone.
    fn send(&self, p: Piece) -> bool {
        self.tx.send(p).is_ok()
    }

    /// Stops hashing and lets the thread end on its own.
    fn abandon(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits for the thread and returns its hasher.
    fn join(self) -> Option<Hasher> {
        drop(self.tx);
        self.thread.join().ok()
    }
}

impl InOrderHasher {
    /// A hasher for a file that starts empty.
    pub fn new(alg: HashAlg) -> InOrderHasher {
        InOrderHasher {
            alg,
            pos: 0,
            worker: None,
            broken: false,
        }
    }

    /// The algorithm.
    pub fn alg(&self) -> HashAlg {
        self.alg
    }

    /// Bytes handed to the hash so far (the file's length as far as the hash knows it).
    pub fn pos(&self) -> u64 {
        self.pos
    }

    fn brk(&mut self) {
        self.broken = true;
        if let Some(w) = self.worker.take() {
            w.abandon();
        }
    }

    /// Queues a piece, starting the thread on first use.
    fn feed(&mut self, p: Piece) {
        if self.broken {
            return;
        }
        if self.worker.is_none() {
            self.worker = HashWorker::start(self.alg);
        }
        let sent = self.worker.as_ref().is_some_and(|w| w.send(p));
        if !sent {
            self.brk();
        }
    }

    /// Records a write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if self.broken {
            return;
        }
        if offset < self.pos {
            self.brk();
            return;
        }
        if offset > self.pos {
            self.feed(Piece::Zeros(offset - self.pos));
        }
        for piece in data.chunks(HASH_PIECE) {
            self.feed(Piece::Data(piece.to_vec()));
        }
        self.pos = offset + data.len() as u64;
    }

    /// Records that `[offset, offset + len)` now reads as zeros (a hole punched or a range
    /// zeroed). Harmless beyond the hashed prefix, where the file reads as zeros already;
    /// inside it the hash no longer matches the file.
    pub fn zeroed(&mut self, offset: u64, len: u64) {
        if len > 0 && offset < self.pos {
            self.brk();
        }
    }

    /// Records a change of the file's length. Shrinking into the hashed prefix breaks the
    /// hash; growing is handled by [`InOrderHasher::finish`].
    pub fn set_len(&mut self, len: u64) {
        if len < self.pos {
            self.brk();
        }
    }

    /// The digest of a file of `final_len` bytes (the tail past the last write reads as
    /// zeros), or `None` when the writes did not come in order. Waits for the hashing
    /// thread.
    pub fn finish(mut self, final_len: u64) -> Option<Checksum> {
        if self.broken || final_len < self.pos {
            self.brk();
            return None;
        }
        let tail = final_len - self.pos;
        let mut h = match self.worker.take() {
            Some(w) => w.join()?,
            None => self.alg.hasher(),
        };
        h.update_zeros(tail);
        Some(h.finish())
    }
}

impl Drop for InOrderHasher {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.abandon();
        }
    }
}

/// Hashes every byte of `storage` in one pass. Holes the source reports are hashed as zeros
/// without being read.
pub fn hash_storage(storage: &dyn Storage, alg: HashAlg) -> Result<Checksum> {
    let mut h = alg.hasher();
    let len = storage.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let next = storage
            .next_data(pos)
            .map_err(|e| Error::io(format_args!("look for data at {pos:#x}"), e))?;
        let Some((start, end)) = next else {
            h.update_zeros(len - pos);
            break;
        };
        let start = start.clamp(pos, len);
        // A source that answers with an empty range would stall the walk: read the rest.
        let end = if end.min(len) > start {
            end.min(len)
        } else {
            len
        };
        h.update_zeros(start - pos);
        let mut p = start;
        while p < end {
            let n = (end - p).min(buf.len() as u64) as usize;
            storage
                .read_exact_at(&mut buf[..n], p)
                .map_err(|e| Error::io(format_args!("read for the checksum at {p:#x}"), e))?;
            h.update(&buf[..n]);
            p += n as u64;
        }
        pos = end;
    }
    Ok(h.finish())
}

/// Hashes the file at `path` (its bytes as stored, compressed or not).
pub fn hash_file(path: impl AsRef<std::path::Path>, alg: HashAlg) -> Result<Checksum> {
    let path = path.as_ref();
    let s = crate::storage::FileStorage::open(path)
        .map_err(|e| Error::io(format_args!("open '{}'", path.display()), e))?;
    hash_storage(&s, alg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn known_digests() {
        let m = MemStorage::new(b"abc".to_vec());
        assert_eq!(
            hash_storage(&m, HashAlg::Sha256).unwrap().hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hash_storage(&m, HashAlg::Md5).unwrap().hex,
            "900150983cd24fb0d6963f7d28e17f72"
        );
        assert!(hash_storage(&m, HashAlg::Sha512)
            .unwrap()
            .hex
            .starts_with("ddaf35a193617aba"));
        assert_eq!(
            "SHA512".parse::<HashAlg>().unwrap(),
            HashAlg::Sha512,
            "names are case-insensitive"
        );
        assert!("crc32".parse::<HashAlg>().is_err());
    }

    #[test]
    fn in_order_equals_whole_file_and_breaks_on_seek() {
        let mut data = vec![0u8; 10000];
        data[..5].copy_from_slice(b"hello");
        data[6000..6003].copy_from_slice(b"end");
        let want = hash_storage(&MemStorage::new(data.clone()), HashAlg::Sha256).unwrap();
        let mut h = InOrderHasher::new(HashAlg::Sha256);
        h.write(0, &data[..6000]);
        h.write(6000, &data[6000..6003]);
        h.zeroed(7000, 100);
        assert_eq!(h.finish(10000), Some(want.clone()));
        let mut h = InOrderHasher::new(HashAlg::Sha256);
        h.write(0, b"hello");
        h.write(0, b"HELLO");
        assert_eq!(h.finish(10000), None);
        // A write past the end: the gap is hashed as zeros (a new file reads so there).
        let mut h = InOrderHasher::new(HashAlg::Sha256);
        h.write(0, &data[..5]);
        h.write(6000, &data[6000..6003]);
        assert_eq!(h.finish(10000), Some(want.clone()));
        // ... and a later write into the gap breaks it.
        let mut h = InOrderHasher::new(HashAlg::Sha256);
        h.write(0, b"hello");
        h.write(6000, b"end");
        h.write(100, b"gap");
        assert_eq!(h.finish(10000), None);
        // Large writes go in pieces; zeroing behind the end or shrinking breaks it.
        let big: Vec<u8> = (0..3 * HASH_PIECE + 77).map(|i| (i % 251) as u8).collect();
        let mut whole = big.clone();
        whole.resize(whole.len() + 1000, 0);
        let want = hash_storage(&MemStorage::new(whole.clone()), HashAlg::Sha512).unwrap();
        let mut h = InOrderHasher::new(HashAlg::Sha512);
        h.write(0, &big[..10]);
        h.write(10, &big[10..]);
        assert_eq!(h.finish(whole.len() as u64), Some(want));
        let mut h = InOrderHasher::new(HashAlg::Sha512);
        h.write(0, &big);
        h.zeroed(5, 10);
        assert_eq!(h.finish(whole.len() as u64), None);
        let mut h = InOrderHasher::new(HashAlg::Sha512);
        h.write(0, &big);
        h.set_len(5);
        assert_eq!(h.finish(whole.len() as u64), None);
        // An empty file.
        let h = InOrderHasher::new(HashAlg::Md5);
        assert_eq!(h.finish(0).unwrap().hex, "d41d8cd98f00b204e9800998ecf8427e");
    }
}
