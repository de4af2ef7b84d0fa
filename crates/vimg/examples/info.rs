//! Prints what an image is and what an image service needs to register it.
//!
//! `cargo run -p vimg --example info -- disk.qcow2.xz`

use vimg::glance::ImageServiceInfo;
use vimg::{Image, ImageInfo, OpenOptions};

/// The report for the image at `path`, as JSON.
pub fn run(path: &str) -> Result<String, vimg::Error> {
    let image = Image::open(path, &OpenOptions::default())?;
    let report = serde_json::json!({
        "info": ImageInfo::of(&image),
        "origin": image.origin(),
        "image-service": ImageServiceInfo::of(&image, None),
    });
    Ok(serde_json::to_string_pretty(&report).unwrap_or_default())
}

#[allow(dead_code)]
fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: info IMAGE");
        std::process::exit(2);
    };
    match run(&path) {
        Ok(text) => println!("{text}"),
        Err(e) => {
            eprintln!("info: {path}: {e}");
            std::process::exit(1);
        }
    }
}
