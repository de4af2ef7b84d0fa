//! dmg read: the corpus sample gives its digest, images built here (raw, zero, ignored and
//! zlib chunks over several mish blocks) read byte-identically to qemu-img, and chunk
//! tables vimg cannot read right are refused before anything is written.

mod common;

use std::fs;
use std::path::Path;

use common::*;

fn b64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for (i, c) in data.chunks(3).enumerate() {
        if i > 0 && i % 13 == 0 {
            s.push_str("\n\t\t\t");
        }
        let n = c.len();
        let v = u32::from(c[0]) << 16
            | u32::from(*c.get(1).unwrap_or(&0)) << 8
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            s.push(if k <= n {
                A[(v >> (18 - 6 * k) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    s
}

/// One chunk: type, sectors and the bytes it stores (for raw and zlib).
struct C {
    kind: u32,
    sectors: u64,
    data: Vec<u8>,
}

/// A dmg whose mish blocks each hold `blocks[i]` chunks, in order; returns the sectors.
fn dmg_image(path: &Path, blocks: &[Vec<C>]) -> u64 {
    let mut fork = Vec::new();
    let mut datas = Vec::new();
    let mut sector = 0u64;
    for b in blocks {
        let first = sector;
        let data_offset = fork.len() as u64;
        let mut mish = vec![0u8; 204];
        mish[..4].copy_from_slice(b"mish");
        mish[8..16].copy_from_slice(&first.to_be_bytes());
        mish[0x18..0x20].copy_from_slice(&data_offset.to_be_bytes());
        let mut rel = 0u64;
        for c in b {
            let mut e = vec![0u8; 40];
            e[..4].copy_from_slice(&c.kind.to_be_bytes());
            e[8..16].copy_from_slice(&rel.to_be_bytes());
            e[16..24].copy_from_slice(&c.sectors.to_be_bytes());
            e[24..32].copy_from_slice(&(fork.len() as u64 - data_offset).to_be_bytes());
            e[32..40].copy_from_slice(&(c.data.len() as u64).to_be_bytes());
            fork.extend_from_slice(&c.data);
            mish.extend_from_slice(&e);
            rel += c.sectors;
        }
        let mut end = vec![0u8; 40];
        end[..4].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
        end[8..16].copy_from_slice(&rel.to_be_bytes());
        mish.extend_from_slice(&end);
        sector += rel;
        datas.push(mish);
    }
    let mut plist = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\">\n<dict>\n\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n");
    for (i, m) in datas.iter().enumerate() {
        plist.push_str(&format!(
            "\t\t\t<dict>\n\t\t\t\t<key>ID</key>\n\t\t\t\t<string>{i}</string>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n\t\t\t{}\n\t\t\t\t</data>\n\t\t\t</dict>\n",
            b64(m)
        ));
    }
    plist.push_str("\t\t</array>\n\t</dict>\n</dict>\n</plist>\n");
    let mut f = fork.clone();
    let plist_at = f.len() as u64;
    f.extend_from_slice(plist.as_bytes());
    let mut k = vec![0u8; 512];
    k[..4].copy_from_slice(b"koly");
    k[4..8].copy_from_slice(&4u32.to_be_bytes());
    k[8..12].copy_from_slice(&512u32.to_be_bytes());
    k[0x20..0x28].copy_from_slice(&(fork.len() as u64).to_be_bytes());
    k[0xd8..0xe0].copy_from_slice(&plist_at.to_be_bytes());
    k[0xe0..0xe8].copy_from_slice(&(plist.len() as u64).to_be_bytes());
    k[0x1ec..0x1f4].copy_from_slice(&sector.to_be_bytes());
    f.extend_from_slice(&k);
    fs::write(path, f).unwrap();
    sector
}

fn zlib(data: &[u8]) -> Vec<u8> {
    vimg::codec::zlib_compress(data, 6, data.len() * 2 + 64).unwrap()
}

fn bz2(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// UDBZ chunks (bzip2, as `hdiutil convert -format UDBZ` writes) between raw and zero
/// ones read as the bytes compressed, and as qemu-img reads them where its dmg-bz2 module
/// is installed.
#[test]
fn bzip2_chunks_read() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bz.dmg");
    let a = pattern(64 << 10, 9);
    let t: Vec<u8> = b"bzip2 chunk "
        .iter()
        .cycle()
        .take(128 << 10)
        .copied()
        .collect();
    let blocks = vec![
        vec![
            C {
                kind: 0x8000_0006,
                sectors: 128,
                data: bz2(&a),
            },
            C {
                kind: 2,
                sectors: 16,
                data: vec![],
            },
        ],
        vec![
            C {
                kind: 1,
                sectors: 1,
                data: vec![0x5a; 512],
            },
            C {
                kind: 0x8000_0006,
                sectors: 256,
                data: bz2(&t),
            },
        ],
    ];
    let sectors = dmg_image(&img, &blocks);
    let mut want = a.clone();
    want.extend_from_slice(&[0; 16 * 512]);
    want.extend_from_slice(&[0x5a; 512]);
    want.extend_from_slice(&t);
    assert_eq!(want.len() as u64, sectors * 512);
    let v = dir.path().join("v.raw");
    vimg(&["convert", "-O", "raw", s(&img), s(&v)]);
    assert_eq!(fs::read(&v).unwrap(), want);
    if have("qemu-img") {
        let q = dir.path().join("q.raw");
        let r = run_cmd(
            "qemu-img",
            &["convert", "-f", "dmg", "-O", "raw", s(&img), s(&q)],
        );
        if r.status.success() {
            assert_same_file(&q, &v);
        } else {
            eprintln!(
                "SKIPPED qemu-img comparison: {}",
                String::from_utf8_lossy(&r.stderr).trim()
            );
        }
    }
}

fn sample(seed: u64) -> Vec<Vec<C>> {
    let a = pattern(64 << 10, seed);
    let t: Vec<u8> = b"dmg chunk "
        .iter()
        .cycle()
        .take(256 << 10)
        .copied()
        .collect();
    vec![
        vec![
            C {
                kind: 0x8000_0005,
                sectors: 128,
                data: zlib(&a),
            },
            C {
                kind: 2,
                sectors: 64,
                data: vec![],
            },
        ],
        vec![C {
            kind: 1,
            sectors: 8,
            data: pattern(4096, seed + 1),
        }],
        vec![
            C {
                kind: 0,
                sectors: 1000,
                data: vec![],
            },
            C {
                kind: 0x8000_0005,
                sectors: 512,
                data: zlib(&t),
            },
            C {
                kind: 0x7fff_fffe,
                sectors: 0,
                data: vec![],
            },
            C {
                kind: 1,
                sectors: 1,
                data: vec![0x5a; 512],
            },
        ],
    ]
}

#[test]
fn corpus_sample_gives_its_digest() {
    let Some(corpus) = corpus_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Row> = corpus_rows(&corpus, &[""])
        .into_iter()
        .filter(|r| r.format == "dmg")
        .collect();
    assert!(!rows.is_empty());
    for row in rows {
        let img = corpus_file(&corpus, &row, dir.path());
        let image = open_image(&img, None).unwrap();
        assert_eq!(image.format(), vimg::Format::Dmg);
        assert_eq!(Some(image.virtual_size()), row.virtual_size);
        assert_eq!(
            image_digest(&image),
            corpus_digest(&corpus, &row.file).unwrap()
        );
        if let Some(sha) = &row.sha256 {
            assert_eq!(&vimg_raw_sha256(&img, None, dir.path()), sha);
        }
    }
}

#[test]
fn reads_like_qemu() {
    if !qemu_available("dmg reads_like_qemu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.dmg");
    let sectors = dmg_image(&img, &sample(5));
    assert_reads_like_qemu(&img, "dmg", dir.path());
    let info: serde_json::Value =
        serde_json::from_str(&vimg(&["info", "--output=json", s(&img)])).unwrap();
    assert_eq!(info["format"], "dmg");
    assert_eq!(info["virtual-size"], sectors * 512);
}

#[test]
fn hostile_chunk_tables_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("h.dmg");
    let out = d.join("out.raw");
    let refuse = |blocks: Vec<Vec<C>>, want: &str| {
        dmg_image(&img, &blocks);
        let err = assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&out)]);
        assert!(err.contains(want), "{err}");
        assert!(!out.exists());
    };
    // A bzip2 chunk that is not a bzip2 stream, or decodes short.
    refuse(
        vec![vec![C {
            kind: 0x8000_0006,
            sectors: 8,
            data: vec![1; 100],
        }]],
        "Bzip2 data is corrupt",
    );
    refuse(
        vec![vec![C {
            kind: 0x8000_0006,
            sectors: 8,
            data: bz2(&[7; 4095]),
        }]],
        "Bzip2 data decodes to 4095 bytes",
    );
    refuse(
        vec![vec![C {
            kind: 0x8000_0007,
            sectors: 8,
            data: vec![1; 100],
        }]],
        "lzfse",
    );
    refuse(
        vec![vec![C {
            kind: 1,
            sectors: 8,
            data: vec![1; 1000],
        }]],
        "raw chunk",
    );
    // A sector in no chunk: a comment in place of data.
    refuse(
        vec![vec![
            C {
                kind: 2,
                sectors: 8,
                data: vec![],
            },
            C {
                kind: 0x7fff_fffe,
                sectors: 8,
                data: vec![],
            },
        ]],
        "no chunk",
    );
    // A zlib chunk that does not inflate to its sectors fails when read; nothing is left.
    dmg_image(
        &img,
        &[vec![C {
            kind: 0x8000_0005,
            sectors: 16,
            data: zlib(&[7; 4096]),
        }]],
    );
    assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&out)]);
    assert!(!out.exists());
    // A chunk offset past the end of the file.
    dmg_image(
        &img,
        &[vec![C {
            kind: 1,
            sectors: 1,
            data: vec![1; 512],
        }]],
    );
    let mut b = fs::read(&img).unwrap();
    let n = b.len();
    b[n - 512 + 0x18..n - 512 + 0x20].copy_from_slice(&((n - 600) as u64).to_be_bytes());
    fs::write(&img, b).unwrap();
    assert_vimg_fails(&["convert", "-O", "raw", s(&img), s(&out)]);
    assert!(!out.exists());
    assert_vimg_fails(&["create", "-f", "dmg", s(&d.join("new.dmg")), "1M"]);
}
