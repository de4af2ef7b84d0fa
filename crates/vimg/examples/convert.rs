//! Converts an image, printing progress to stderr and the output's sha256.
//!
//! `cargo run -p vimg --example convert -- SRC DST [FORMAT]`

use std::io::Write;
use std::sync::Arc;

use vimg::{ConvertOptions, Format, HashAlg, Image, OpenOptions, Progress};

/// Converts `src` to `dst` in `format`; `progress` gets each update. Returns the sha256 of
/// the output file.
pub fn run(
    src: &str,
    dst: &str,
    format: Format,
    progress: impl Fn(Progress) + Send + Sync + 'static,
) -> Result<String, vimg::Error> {
    let image = Image::open(src, &OpenOptions::default())?;
    let mut opts = ConvertOptions::new(format);
    opts.copy.progress = Some(Arc::new(progress));
    opts.checksum = Some(HashAlg::Sha256);
    let report = vimg::convert_report(&image, dst, &opts)?;
    Ok(report.checksum.map(|c| c.hex).unwrap_or_default())
}

#[allow(dead_code)]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: convert SRC DST [FORMAT]");
        std::process::exit(2);
    }
    let format = match args.get(2).map(|f| f.parse::<Format>()).transpose() {
        Ok(f) => f.unwrap_or(Format::Raw),
        Err(e) => {
            eprintln!("convert: {e}");
            std::process::exit(2);
        }
    };
    let show = |p: Progress| {
        let pct = (p.done * 100).checked_div(p.total).unwrap_or(100);
        eprint!("\r{pct:3}%");
        let _ = std::io::stderr().flush();
    };
    match run(&args[0], &args[1], format, show) {
        Ok(sum) => {
            eprintln!();
            println!("{sum}  {}", args[1]);
        }
        Err(e) => {
            eprintln!("\nconvert: {e}");
            std::process::exit(1);
        }
    }
}
