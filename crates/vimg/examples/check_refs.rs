//! Judges an untrusted image before anything it names is opened: lists the files it refers
//! to (backing files, extents, data files) and what the gate says about each.
//!
//! `cargo run -p vimg --example check_refs -- upload.qcow2`

use vimg::gate::{self, ExternalPolicy};
use vimg::{Image, OpenOptions};

/// `Ok(report)` when the image names no other file; `Err(report)` listing each reference
/// otherwise.
pub fn run(path: &str) -> Result<Result<String, String>, vimg::Error> {
    // Nothing the image names is opened: not even its backing file.
    let opts = OpenOptions::default().open_backing(false);
    let image = Image::open(path, &opts)?;
    let refs = image.reader().external_refs();
    if refs.is_empty() {
        return Ok(Ok(format!(
            "{path}: {} image, self-contained",
            image.format()
        )));
    }
    let mut lines = Vec::new();
    for r in refs {
        let verdict =
            match gate::resolve(image.path(), &r.field, &r.name, ExternalPolicy::SameFolder) {
                Ok(p) => format!("the gate would open {}", p.display()),
                Err(e) => format!("the gate refuses it: {e}"),
            };
        lines.push(format!(
            "{path}: {} names '{}' ({verdict})",
            r.field, r.name
        ));
    }
    Ok(Err(lines.join("\n")))
}

#[allow(dead_code)]
fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: check_refs IMAGE");
        std::process::exit(2);
    };
    match run(&path) {
        Ok(Ok(ok)) => println!("{ok}"),
        Ok(Err(refs)) => {
            println!("{refs}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("check_refs: {path}: {e}");
            std::process::exit(2);
        }
    }
}
