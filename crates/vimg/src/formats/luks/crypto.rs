//! The cryptography LUKS1 names by string, built from RustCrypto crates: the hash (for
//! PBKDF2, the anti-forensic splitter and ESSIV), the payload cipher (AES in XTS, CBC or
//! ECB mode) and the IV generator (plain, plain64, essiv), as the LUKS1 On-Disk Format
//! Specification (version 1.2.3) section 1 ("cipher-name", "cipher-mode", "hash-spec") and
//! dm-crypt's IV generators define them, and as QEMU's crypto/ layer implements them.
//!
//! Every sector is 512 bytes (LUKS1 section 2.4: "sector" = 512 bytes); IVs count sectors
//! from the start of the area being encrypted (the payload, or one key slot's material).

use aes::cipher::{
    generic_array::GenericArray, BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt,
    BlockEncryptMut, BlockSizeUser, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use zeroize::Zeroizing;

use super::error::LuksError;
use crate::escape::escape_control;

/// Bytes in one LUKS sector.
pub const SECTOR: usize = 512;

/// A hash named in a LUKS header (`hash-spec`) or a cipher mode's ESSIV part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    /// SHA-1 (cryptsetup's old default).
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256 (qemu-img's default).
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl Hash {
    /// Parses a header or option name.
    pub fn from_name(name: &str) -> Result<Hash, LuksError> {
        Ok(match name {
            "sha1" => Hash::Sha1,
            "sha224" => Hash::Sha224,
            "sha256" => Hash::Sha256,
            "sha384" => Hash::Sha384,
            "sha512" => Hash::Sha512,
            _ => {
                return Err(LuksError::Algorithm {
                    what: "Hash algorithm",
                    name: escape_control(name).into_owned(),
                })
            }
        })
    }

    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            Hash::Sha1 => "sha1",
            Hash::Sha224 => "sha224",
            Hash::Sha256 => "sha256",
            Hash::Sha384 => "sha384",
            Hash::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha224 => 28,
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            Hash::Sha1 => run::<Sha1>(parts),
            Hash::Sha224 => run::<Sha224>(parts),
            Hash::Sha256 => run::<Sha256>(parts),
            Hash::Sha384 => run::<Sha384>(parts),
            Hash::Sha512 => run::<Sha512>(parts),
        }
    }

    /// PBKDF2-HMAC with this hash (RFC 8018 section 5.2), filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            Hash::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            Hash::Sha224 => pbkdf2_hmac::<Sha224>(password, salt, iterations, out),
            Hash::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            Hash::Sha384 => pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            Hash::Sha512 => pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }
}

/// The block cipher mode of `cipher-mode` (the part before `-`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// XTS (IEEE 1619): two keys, the IV is the tweak.
    Xts,
    /// CBC, one IV per sector.
    Cbc,
    /// ECB: no IV.
    Ecb,
}

impl Mode {
    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Xts => "xts",
            Mode::Cbc => "cbc",
            Mode::Ecb => "ecb",
        }
    }

    /// Parses a mode name.
    pub fn from_name(name: &str) -> Result<Mode, LuksError> {
        Ok(match name {
            "xts" => Mode::Xts,
            "cbc" => Mode::Cbc,
            "ecb" => Mode::Ecb,
            _ => {
                return Err(LuksError::Algorithm {
                    what: "Cipher mode",
                    name: escape_control(name).into_owned(),
                })
            }
        })
    }
}

/// The IV generator of `cipher-mode` (after `-`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGen {
    /// The sector number, truncated to 32 bits, little-endian.
    Plain,
    /// The sector number, 64 bits little-endian.
    Plain64,
    /// plain64 encrypted with a key that is the hash of the volume key.
    Essiv(Hash),
}

impl IvGen {
    /// qemu's name of the algorithm (without the hash).
    pub fn name(self) -> &'static str {
        match self {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv(_) => "essiv",
        }
    }

    /// Parses the part of `cipher-mode` after `-` (`plain64`, `essiv:sha256`). As QEMU and
    /// dm-crypt do, a hash after plain/plain64 is accepted and ignored.
    pub fn from_spec(spec: &str) -> Result<IvGen, LuksError> {
        let (alg, hash) = match spec.split_once(':') {
            Some((a, h)) => (a, Some(Hash::from_name(h)?)),
            None => (spec, None),
        };
        Ok(match (alg, hash) {
            ("plain", _) => IvGen::Plain,
            ("plain64", _) => IvGen::Plain64,
            ("essiv", Some(h)) => IvGen::Essiv(h),
            ("essiv", None) => {
                return Err(LuksError::Algorithm {
                    what: "IV generator (missing hash)",
                    name: "essiv".into(),
                })
            }
            _ => {
                return Err(LuksError::Algorithm {
                    what: "IV generator",
                    name: escape_control(alg).into_owned(),
                })
            }
        })
    }
}

/// Everything a header says about how sectors are encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CipherSpec {
    /// Bytes of the volume key (both XTS keys together).
    pub key_bytes: usize,
    /// Block mode.
    pub mode: Mode,
    /// IV generator.
    pub ivgen: IvGen,
}

impl CipherSpec {
    /// Checks that `cipher-name` `name` with `key_bytes` and `mode`/`ivgen` is something
    /// vimg encrypts: AES with a 128, 192 or 256-bit key (each doubled for XTS), and an
    /// ESSIV hash whose digest is an AES key.
    pub fn new(name: &str, key_bytes: usize, mode: Mode, ivgen: IvGen) -> Result<Self, LuksError> {
        if name != "aes" {
            return Err(LuksError::Algorithm {
                what: "Cipher",
                name: escape_control(name).into_owned(),
            });
        }
        let aes_key = match mode {
            Mode::Xts if key_bytes.is_multiple_of(2) => key_bytes / 2,
            Mode::Xts => 0,
            _ => key_bytes,
        };
        if !matches!(aes_key, 16 | 24 | 32) {
            return Err(LuksError::Algorithm {
                what: "Cipher",
                name: format!("aes with a {key_bytes}-byte {} key", mode.name()),
            });
        }
        if let IvGen::Essiv(h) = ivgen {
            if !matches!(h.digest_len(), 16 | 24 | 32) {
                return Err(LuksError::Algorithm {
                    what: "ESSIV hash",
                    name: h.name().into(),
                });
            }
        }
        Ok(CipherSpec {
            key_bytes,
            mode,
            ivgen,
        })
    }

    /// qemu's `cipher-alg` name: `aes-256` (the size of one AES key).
    pub fn alg_name(&self) -> String {
        let bits = match self.mode {
            Mode::Xts => self.key_bytes * 4,
            _ => self.key_bytes * 8,
        };
        format!("aes-{bits}")
    }

    /// The header's `cipher-mode` string (`xts-plain64`, `cbc-essiv:sha256`).
    pub fn mode_spec(&self) -> String {
        match self.ivgen {
            IvGen::Essiv(h) => format!("{}-essiv:{}", self.mode.name(), h.name()),
            g => format!("{}-{}", self.mode.name(), g.name()),
        }
    }
}

/// AES with the key size picked at run time.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Aes {
        match key.len() {
            16 => Aes::A128(Aes128::new(GenericArray::from_slice(key))),
            24 => Aes::A192(Aes192::new(GenericArray::from_slice(key))),
            // CipherSpec::new admits 16, 24 and 32 only.
            _ => Aes::A256(Aes256::new(GenericArray::from_slice(key))),
        }
    }

    fn encrypt_block(&self, b: &mut [u8; 16]) {
        let b = GenericArray::from_mut_slice(b);
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }
}

/// The keyed payload cipher: encrypts and decrypts whole sectors.
pub struct SectorCipher {
    spec: CipherSpec,
    inner: Inner,
    essiv: Option<Aes>,
}

enum Inner {
    Xts128(Box<xts_mode::Xts128<Aes128>>),
    Xts192(Box<xts_mode::Xts128<Aes192>>),
    Xts256(Box<xts_mode::Xts128<Aes256>>),
    Block(Box<Aes>),
}

fn cbc<C>(c: &C, iv: &[u8; 16], buf: &mut [u8], enc: bool)
where
    C: BlockCipher
        + BlockEncrypt
        + BlockDecrypt
        + BlockSizeUser<BlockSize = aes::cipher::consts::U16>
        + Clone,
{
    use aes::cipher::InnerIvInit;
    let iv = GenericArray::from_slice(iv);
    if enc {
        let mut e = cbc::Encryptor::<C>::inner_iv_init(c.clone(), iv);
        for b in buf.chunks_exact_mut(16) {
            e.encrypt_block_mut(GenericArray::from_mut_slice(b));
        }
    } else {
        let mut d = cbc::Decryptor::<C>::inner_iv_init(c.clone(), iv);
        for b in buf.chunks_exact_mut(16) {
            d.decrypt_block_mut(GenericArray::from_mut_slice(b));
        }
    }
}

fn xts<C>(x: &xts_mode::Xts128<C>, tweak: [u8; 16], buf: &mut [u8], enc: bool)
where
    C: BlockCipher
        + BlockEncrypt
        + BlockDecrypt
        + BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    if enc {
        x.encrypt_sector(buf, tweak);
    } else {
        x.decrypt_sector(buf, tweak);
    }
}

fn ecb<C>(c: &C, buf: &mut [u8], enc: bool)
where
    C: BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    for b in buf.chunks_exact_mut(16) {
        let b = GenericArray::from_mut_slice(b);
        if enc {
            c.encrypt_block(b);
        } else {
            c.decrypt_block(b);
        }
    }
}

impl SectorCipher {
    /// Keys the cipher with `key` (`spec.key_bytes` long).
    pub fn new(spec: CipherSpec, key: &[u8]) -> SectorCipher {
        let inner = match spec.mode {
            Mode::Xts => {
                let (a, b) = key.split_at(key.len() / 2);
                match (Aes::new(a), Aes::new(b)) {
                    (Aes::A128(a), Aes::A128(b)) => {
                        Inner::Xts128(Box::new(xts_mode::Xts128::new(a, b)))
                    }
                    (Aes::A192(a), Aes::A192(b)) => {
                        Inner::Xts192(Box::new(xts_mode::Xts128::new(a, b)))
                    }
                    (Aes::A256(a), Aes::A256(b)) => {
                        Inner::Xts256(Box::new(xts_mode::Xts128::new(a, b)))
                    }
                    // Both halves of one key have the same length.
                    (a, _) => Inner::Block(Box::new(a)),
                }
            }
            _ => Inner::Block(Box::new(Aes::new(key))),
        };
        let essiv = match spec.ivgen {
            IvGen::Essiv(h) => {
                let k = Zeroizing::new(h.digest(&[key]));
                Some(Aes::new(&k))
            }
            _ => None,
        };
        SectorCipher { spec, inner, essiv }
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.spec.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 | IvGen::Essiv(_) => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        }
        if let Some(e) = &self.essiv {
            e.encrypt_block(&mut iv);
        }
        iv
    }

    /// Encrypts (`enc`) or decrypts `buf` in place, a whole number of sectors, the first
    /// being sector `first` of its area.
    pub fn apply(&self, first: u64, buf: &mut [u8], enc: bool) {
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let iv = self.iv(first.wrapping_add(i as u64));
            match &self.inner {
                Inner::Xts128(x) => xts(x, iv, s, enc),
                Inner::Xts192(x) => xts(x, iv, s, enc),
                Inner::Xts256(x) => xts(x, iv, s, enc),
                Inner::Block(c) => match (self.spec.mode, &**c) {
                    (Mode::Ecb, Aes::A128(c)) => ecb(c, s, enc),
                    (Mode::Ecb, Aes::A192(c)) => ecb(c, s, enc),
                    (Mode::Ecb, Aes::A256(c)) => ecb(c, s, enc),
                    (_, Aes::A128(c)) => cbc(c, &iv, s, enc),
                    (_, Aes::A192(c)) => cbc(c, &iv, s, enc),
                    (_, Aes::A256(c)) => cbc(c, &iv, s, enc),
                },
            }
        }
    }
}

/// The anti-forensic information splitter's diffusion (LUKS1 spec section 2.4, `H1`):
/// hash `buf` in digest-sized blocks, each prefixed with its big-endian index.
fn diffuse(hash: Hash, buf: &mut [u8]) {
    let n = hash.digest_len();
    for (i, block) in buf.chunks_mut(n).enumerate() {
        let d = hash.digest(&[&(i as u32).to_be_bytes(), block]);
        let len = block.len();
        block.copy_from_slice(&d[..len]);
    }
}

/// AFmerge (LUKS1 spec section 2.4): recovers the `key_len`-byte key from `stripes`
/// stripes of `split` (which is `key_len * stripes` bytes long).
pub fn af_merge(hash: Hash, split: &[u8], key_len: usize, stripes: usize) -> Zeroizing<Vec<u8>> {
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    for (i, s) in split.chunks_exact(key_len).take(stripes).enumerate() {
        for (a, b) in d.iter_mut().zip(s) {
            *a ^= b;
        }
        if i + 1 < stripes {
            diffuse(hash, &mut d);
        }
    }
    d
}

/// AFsplit (LUKS1 spec section 2.4): spreads `key` over `stripes` stripes, all but the last
/// random.
pub fn af_split(hash: Hash, key: &[u8], stripes: usize) -> crate::Result<Zeroizing<Vec<u8>>> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    random(&mut out[..n * (stripes - 1)])?;
    let mut d = Zeroizing::new(vec![0u8; n]);
    for s in out[..n * (stripes - 1)].chunks_exact(n) {
        for (a, b) in d.iter_mut().zip(s) {
            *a ^= b;
        }
        diffuse(hash, &mut d);
    }
    let last = &mut out[n * (stripes - 1)..];
    for ((o, a), k) in last.iter_mut().zip(d.iter()).zip(key) {
        *o = a ^ k;
    }
    Ok(out)
}

/// Fills `buf` from the operating system's random source.
pub fn random(buf: &mut [u8]) -> crate::Result<()> {
    getrandom::fill(buf).map_err(|e| {
        crate::Error::io(
            "read random bytes for the LUKS keys",
            std::io::Error::other(e.to_string()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn af_round_trip() {
        let key: Vec<u8> = (0..64u8).collect();
        for h in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            let s = af_split(h, &key, 4000).unwrap();
            assert_eq!(&af_merge(h, &s, 64, 4000)[..], &key[..]);
            let mut t = s.to_vec();
            t[5] ^= 1;
            assert_ne!(&af_merge(h, &t, 64, 4000)[..], &key[..]);
        }
    }

    #[test]
    fn xts_plain64_is_ieee1619_vector() {
        // IEEE 1619-2007 annex B vector 4 (AES-128-XTS, data unit 0, 512 bytes of 0..255
        // twice): the first 16 bytes of the ciphertext.
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(
            &hex("2718281828459045235360287471352631415926535897932384626433832795")[..16],
        );
        key[16..].copy_from_slice(
            &hex("2718281828459045235360287471352631415926535897932384626433832795")[16..],
        );
        let spec = CipherSpec::new("aes", 32, Mode::Xts, IvGen::Plain64).unwrap();
        let c = SectorCipher::new(spec, &key);
        let mut buf: Vec<u8> = (0..512).map(|i| i as u8).collect();
        c.apply(0, &mut buf, true);
        assert_eq!(&buf[..16], &hex("27a7479befa1d476489f308cd4cfa6e2")[..]);
        c.apply(0, &mut buf, false);
        assert!(buf.iter().enumerate().all(|(i, b)| *b == i as u8));
    }

    #[test]
    fn cbc_essiv_round_trip_and_iv_depends_on_sector() {
        let spec = CipherSpec::new("aes", 16, Mode::Cbc, IvGen::Essiv(Hash::Sha256)).unwrap();
        let c = SectorCipher::new(spec, &[7u8; 16]);
        let mut a = vec![0u8; 1024];
        c.apply(3, &mut a, true);
        assert_ne!(a[..512], a[512..]);
        c.apply(3, &mut a, false);
        assert!(a.iter().all(|b| *b == 0));
    }

    #[test]
    fn unsupported_names() {
        assert!(CipherSpec::new("serpent", 64, Mode::Xts, IvGen::Plain64).is_err());
        assert!(CipherSpec::new("aes", 20, Mode::Cbc, IvGen::Plain64).is_err());
        assert!(CipherSpec::new("aes", 16, Mode::Cbc, IvGen::Essiv(Hash::Sha1)).is_err());
        assert!(IvGen::from_spec("essiv").is_err());
        assert_eq!(IvGen::from_spec("plain64:sha1").unwrap(), IvGen::Plain64);
        assert!(Hash::from_name("md5").is_err());
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
