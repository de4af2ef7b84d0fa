//! `vimg info`: qemu-img info's output, human and JSON.

use serde_json::{json, Value};
use vimg::glance::ImageServiceInfo;
use vimg::{Checksum, Image, ImageInfo, Source};

use super::{apply_source_args, open_options, parse_checksum, parse_format_opt};
use crate::args::{InfoArgs, OutputFormat};
use crate::human::{dump_value, esc, qemu_json, size_to_str};
use crate::{CmdResult, Failure};

/// Decoded bytes `info` reads to count a raw stream whose container does not record its
/// size: 4 GiB, about 1 s of gzip'd zeros on an idle core.
const INFO_COUNT_BUDGET: u64 = 4 << 30;

pub fn run(a: InfoArgs) -> CmdResult {
    let format = parse_format_opt(a.format.as_deref())?;
    let mut opts = open_options(format, &a.safety);
    opts.open_backing = a.backing_chain;
    // qemu-img info opens without I/O: an encrypted image shows its header unlocked.
    opts.metadata_only = true;
    apply_source_args(&mut opts, &a.source)?;
    // A raw disk in a container that does not record its size is counted at most this far
    // (a decompression bomb costs seconds, not minutes).
    opts.source.count_budget = Some(INFO_COUNT_BUDGET);
    let alg = parse_checksum(a.checksum.as_deref())?;
    let src = Source::from_arg(&a.filename);
    if alg.is_some() && src == Source::Stdin {
        return Err(Failure::new(
            "--checksum hashes a file as stored; stdin cannot be read twice",
            1,
        ));
    }
    let image = Image::open_source(&src, &opts).map_err(|e| open_failure(&a.filename, &e))?;
    if image.filtered().is_some() {
        // qemu-img describes the filter node and its children; vimg has no words for a
        // blkdebug layer above an image and says so rather than call it raw.
        return Err(Failure::new(
            format!(
                "'{}': vimg's info does not describe a blkdebug layer above an image; name \
                 the image itself (or put blkdebug between the format and its file)",
                a.filename
            ),
            1,
        ));
    }
    let checksum = match alg {
        Some(alg) => Some(
            vimg::checksum::hash_file(&a.filename, alg)
                .map_err(|e| Failure::open(&a.filename, &e))?,
        ),
        None => None,
    };
    let layers: Vec<&Image> = if a.backing_chain {
        image.chain()
    } else {
        vec![&image]
    };
    let text = match a.output {
        OutputFormat::Json => {
            let values: Vec<Value> = layers
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let mut v = info_json(l);
                    if crate::trust::qemu_mode() {
                        // Invoked as qemu-img: qemu-img's keys only (iotest 043).
                        if let Value::Object(m) = &mut v {
                            m.retain(|k, _| !k.starts_with("vimg-"));
                        }
                    } else {
                        add_vimg_json(&mut v, l, if i == 0 { checksum.as_ref() } else { None });
                    }
                    v
                })
                .collect();
            if a.backing_chain {
                qemu_json(&Value::Array(values))
            } else {
                qemu_json(&values[0])
            }
        }
        OutputFormat::Human => layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let mut t = info_human(l);
                add_vimg_human(&mut t, l, if i == 0 { checksum.as_ref() } else { None });
                t
            })
            .collect::<Vec<_>>()
            .join("\n"),
    };
    crate::print_out(&text)?;
    Ok(0)
}

/// One image's JSON (`children` included: the library's [`ImageInfo`] carries it).
pub fn info_json(image: &Image) -> Value {
    let mut v = serde_json::to_value(ImageInfo::of(image)).unwrap_or(Value::Null);
    // qemu inserts `children` last; it shares a QDict bucket with `backing-filename-format`
    // and the later key of a bucket is printed first (see `qemu_json`).
    if let Value::Object(m) = &mut v {
        if let Some(children) = m.shift_remove("children") {
            m.insert("children".into(), children);
        }
    }
    v
}

/// A failed open. Invoked as qemu-img, a backing loop is reported in qemu-img's words
/// alone, as its `info` walks the chain itself (iotest 043).
fn open_failure(file: &str, e: &vimg::Error) -> Failure {
    let msg = e.message().to_string();
    if crate::trust::qemu_mode() && msg.ends_with("creates an infinite loop.") {
        if let Some(i) = msg.rfind("Backing file '") {
            return Failure::new(&msg[i..], 1);
        }
    }
    Failure::open(file, e)
}

/// vimg's additions to the JSON: the container and OVA the image came from, its checksum,
/// and what an image service needs (`image-service`).
fn add_vimg_json(v: &mut Value, image: &Image, checksum: Option<&Checksum>) {
    let Value::Object(m) = v else { return };
    let origin = image.origin();
    if let Some(c) = &origin.container {
        m.insert(
            "vimg-container".into(),
            serde_json::to_value(c).unwrap_or(Value::Null),
        );
    }
    if let Some(o) = &origin.ova {
        m.insert(
            "vimg-ova".into(),
            serde_json::to_value(o).unwrap_or(Value::Null),
        );
    }
    if let Some(c) = checksum {
        m.insert(
            "vimg-checksum".into(),
            json!({"algorithm": c.alg.name(), "value": c.hex}),
        );
    }
    m.insert(
        "image-service".into(),
        serde_json::to_value(ImageServiceInfo::of(image, checksum)).unwrap_or(Value::Null),
    );
}

fn add_vimg_human(s: &mut String, image: &Image, checksum: Option<&Checksum>) {
    let origin = image.origin();
    if let Some(c) = &origin.container {
        let access = match c.access {
            vimg::container::Access::Stream => "read as a stream",
            vimg::container::Access::TemporaryFile => "decoded into a temporary file",
        };
        s.push_str(&format!(
            "container: {}, {} compressed bytes, {access}\n",
            c.compression,
            c.compressed_size
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into())
        ));
    }
    if let Some(o) = &origin.ova {
        s.push_str(&format!("OVA: descriptor {}, disks:\n", esc(&o.ovf)));
        for (i, d) in o.disks.iter().enumerate() {
            let mark = if i == o.selected { " (opened)" } else { "" };
            s.push_str(&format!(
                "    [{i}] {} in '{}' ({} bytes){mark}\n",
                esc(&d.disk_id),
                esc(&d.file),
                d.member_size
            ));
        }
    }
    let refs = image.reader().external_refs();
    if !refs.is_empty() {
        s.push_str("External references:\n");
        for r in &refs {
            s.push_str(&format!("    {}: {}\n", esc(&r.field), esc(&r.name)));
        }
    }
    let svc = ImageServiceInfo::of(image, checksum);
    if svc.disk_format == "iso" {
        s.push_str("content: ISO 9660 file system (converted as raw)\n");
    }
    // A plain, self-contained image prints exactly what qemu-img prints.
    let plain = origin.container.is_none()
        && origin.ova.is_none()
        && svc.disk_format != "iso"
        && svc.safe
        && checksum.is_none();
    if plain {
        return;
    }
    s.push_str(&format!(
        "image service: disk_format={} container_format={} min_disk={} safe={}\n",
        svc.disk_format,
        svc.container_format,
        svc.min_disk,
        if svc.safe { "yes" } else { "no" }
    ));
    for r in &svc.unsafe_reasons {
        s.push_str(&format!("    unsafe: {}\n", esc(r)));
    }
    if let (Some(input), Some(cmd)) = (svc.input_container_format, &svc.convert_command) {
        s.push_str(&format!(
            "    input: container_format={input}, not usable as uploaded; upload the image inside, written by: {cmd}\n"
        ));
    }
    if let Some(c) = checksum {
        s.push_str(&format!("{}: {}\n", c.alg, c.hex));
    }
}

fn info_human(image: &Image) -> String {
    let info = ImageInfo::of(image);
    let mut s = String::new();
    s.push_str(&format!("image: {}\n", esc(&info.filename)));
    s.push_str(&format!("file format: {}\n", info.format));
    s.push_str(&format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(info.virtual_size),
        info.virtual_size
    ));
    s.push_str(&format!(
        "disk size: {}\n",
        info.actual_size
            .map(size_to_str)
            .unwrap_or_else(|| "unavailable".into())
    ));
    if info.encrypted == Some(true) {
        s.push_str("encrypted: yes\n");
    }
    if let Some(c) = info.cluster_size {
        s.push_str(&format!("cluster_size: {c}\n"));
    }
    if let Some(b) = &info.backing_filename {
        s.push_str(&format!("backing file: {}", esc(b)));
        match &info.full_backing_filename {
            Some(full) if full != b => s.push_str(&format!(" (actual path: {})\n", esc(full))),
            Some(_) => s.push('\n'),
            // No folder to resolve the name against (an image over a quorum node).
            None => s.push_str(" (cannot determine actual path)\n"),
        }
        if let Some(f) = &info.backing_filename_format {
            s.push_str(&format!("backing file format: {f}\n"));
        }
    }
    if info.dirty_flag == Some(true) {
        s.push_str("cleanly shut down: no\n");
    }
    if !info.snapshots.is_empty() {
        s.push_str(&snapshot_list(&info.snapshots));
    }
    if let Some(fs) = &info.format_specific {
        s.push_str("Format specific information:\n");
        dump_value(&Value::Object(fs.data.clone()), 1, &mut s);
    }
    child_nodes(&info.children, "", 1, &mut s);
    s
}

/// qemu-img's "Child node" blocks: a node without children of its own is a protocol node
/// (filename, protocol type, file length); one with children (a quorum) is shown as an
/// image, its children below it, one level deeper.
fn child_nodes(children: &[vimg::info::ChildInfo], path: &str, depth: usize, s: &mut String) {
    let ind = "    ".repeat(depth);
    for c in children {
        let child_path = format!("{path}/{}", c.name);
        s.push_str(&format!(
            "{}Child node '{child_path}':\n",
            "    ".repeat(depth - 1)
        ));
        let i = &c.info;
        let protocol = i.children.is_empty();
        let [name, kind, size] = if protocol {
            ["filename", "protocol type", "file length"]
        } else {
            ["image", "file format", "virtual size"]
        };
        s.push_str(&format!("{ind}{name}: {}\n", esc(&i.filename)));
        s.push_str(&format!("{ind}{kind}: {}\n", i.format));
        // qemu's file driver counts whole sectors.
        s.push_str(&format!(
            "{ind}{size}: {} ({} bytes)\n",
            size_to_str(i.virtual_size),
            i.virtual_size
        ));
        s.push_str(&format!("{ind}disk size: {}\n", size_to_str(i.actual_size)));
        child_nodes(&i.children, &child_path, depth + 1, s);
    }
}

/// Local date and time as qemu prints snapshot dates (`2026-11-25 20:18:21`).
/// qemu-img's "Snapshot list:" table (info and snapshot -l).
pub(crate) fn snapshot_list(snaps: &[vimg::info::SnapshotJson]) -> String {
    let mut s = String::new();
    s.push_str("Snapshot list:\n");
    s.push_str(&format!(
        "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    ));
    for sn in snaps {
        let secs = sn.vm_clock_sec;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            sn.vm_clock_nsec / 1_000_000
        );
        s.push_str(&format!(
            "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}\n",
            esc(&sn.id),
            esc(&sn.name),
            size_to_str(sn.vm_state_size),
            fmt_date(sn.date_sec),
            clock,
            sn.icount
        ));
    }
    s
}

fn fmt_date(secs: u64) -> String {
    let t = secs as libc::time_t;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r writes only into `tm`.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}
