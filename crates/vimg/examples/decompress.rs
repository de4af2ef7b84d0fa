//! Converts a compressed image (xz, gzip or zstd, found by its magic bytes) in one step, as
//! a cloud image pipeline does: `disk.qcow2.xz` in, raw out, sha512 for the image service.
//! `-` reads the compressed stream from stdin.
//!
//! `curl -s URL | cargo run -p vimg --example decompress -- - disk.raw`

use vimg::{ConvertOptions, Format, HashAlg, Image, OpenOptions, Source};

/// Converts `src` (a path or `-`) to a raw image at `dst`; returns a description of the
/// container and the output's sha512.
pub fn run(src: &str, dst: &str) -> Result<String, vimg::Error> {
    let image = Image::open_source(&Source::from_arg(src), &OpenOptions::default())?;
    let what = match &image.origin().container {
        Some(c) => format!(
            "{} inside {} ({:?})",
            image.format(),
            c.compression,
            c.access
        ),
        None => format!("{} (not compressed)", image.format()),
    };
    let mut opts = ConvertOptions::new(Format::Raw);
    opts.checksum = Some(HashAlg::Sha512);
    let report = vimg::convert_report(&image, dst, &opts)?;
    let sum = report.checksum.map(|c| c.hex).unwrap_or_default();
    Ok(format!("{what}\nos_hash_algo=sha512 os_hash_value={sum}"))
}

#[allow(dead_code)]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 {
        eprintln!("usage: decompress SRC DST");
        std::process::exit(2);
    }
    match run(&args[0], &args[1]) {
        Ok(text) => println!("{text}"),
        Err(e) => {
            eprintln!("decompress: {e}");
            std::process::exit(1);
        }
    }
}
