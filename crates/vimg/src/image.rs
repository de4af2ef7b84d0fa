//! An opened image: a format reader plus its backing chain, with positional reads through
//! the mapping. This is the one generic read layer every format goes through.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::codec;
use crate::error::{Error, ErrorKind, Result};
use crate::escape::escape_control;
use crate::formats::{registry, Format, OpenContext};
use crate::gate::ExternalPolicy;
use crate::mapping::{Extent, GuestOffset, ImageReader, MapKind, ParentLink};
use crate::source::{self, Origin, Source, SourceOptions};
use crate::storage::{FileStorage, Storage};

mod filter;

/// Backing chains longer than this are refused (a loop, or a hostile chain).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// How to open an image: [`Default`] probes the format, opens the backing chain and lets the
/// image name files in its own folder only; the builder methods change one setting each.
///
/// ```
/// use vimg::{ExternalPolicy, Format, OpenOptions};
/// let opts = OpenOptions::with_format(Some(Format::Qcow2))
///     .policy(ExternalPolicy::scoped(["/var/lib/images/_base"]))
///     .open_backing(false);
/// assert_eq!(opts.format, Some(Format::Qcow2));
/// # let _ = opts;
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OpenOptions {
    /// The format; `None` probes the content.
    pub format: Option<Format>,
    /// The policy for files the image names.
    pub policy: ExternalPolicy,
    /// Open the backing chain (`info` does not need it; reading does).
    pub open_backing: bool,
    /// Format of the backing image, overriding what the image says (`-F`).
    pub backing_format: Option<Format>,
    /// How the top image's source is unpacked (compressed containers, OVAs, streams).
    pub source: SourceOptions,
    /// The top image's name is a `--image-opts` option string (`driver=qcow2,file.filename=x`)
    /// rather than a file name; see [`crate::source::cmdline`].
    pub image_opts: bool,
    /// The `key-secret` / `encrypt.key-secret` of the top image (an id of a
    /// [`crate::secret`]), from `--image-opts`/`json:` or set by the caller.
    pub key_secret: Option<String>,
    /// Open for metadata only (`info`): encrypted images open without their secret.
    pub metadata_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            policy: ExternalPolicy::SameFolder,
            open_backing: true,
            backing_format: None,
            source: SourceOptions::default(),
            image_opts: false,
            key_secret: None,
            metadata_only: false,
        }
    }
}

impl OpenOptions {
    /// Default options with `format` set.
    pub fn with_format(format: Option<Format>) -> OpenOptions {
        OpenOptions {
            format,
            ..OpenOptions::default()
        }
    }

    /// Sets [`OpenOptions::policy`].
    pub fn policy(mut self, policy: ExternalPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets [`OpenOptions::open_backing`].
    pub fn open_backing(mut self, open: bool) -> Self {
        self.open_backing = open;
        self
    }

    /// Sets [`OpenOptions::backing_format`].
    pub fn backing_format(mut self, format: Option<Format>) -> Self {
        self.backing_format = format;
        self
    }

    /// Sets [`OpenOptions::source`].
    pub fn source(mut self, source: SourceOptions) -> Self {
        self.source = source;
        self
    }

    /// Sets [`OpenOptions::image_opts`].
    pub fn image_opts(mut self, image_opts: bool) -> Self {
        self.image_opts = image_opts;
        self
    }
}

/// An opened image and its backing chain: any format, read through one interface.
///
/// ```
/// use vimg::{Image, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.img");
/// # std::fs::write(&path, vec![3u8; 1 << 16])?;
/// let image = Image::open(&path, &OpenOptions::default())?;
/// assert_eq!(image.format(), vimg::Format::Raw);
/// let mut sector = [0u8; 512];
/// image.read_at(&mut sector, 0)?;
/// assert_eq!(sector, [3u8; 512]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Image {
    reader: Box<dyn ImageReader>,
    backing: Option<Box<Image>>,
    filename: String,
    path: Option<PathBuf>,
    storage: Arc<dyn Storage>,
    origin: Origin,
    /// The image below a blkdebug layer above an image (`image/filter.rs`).
    filtered: Option<Arc<Image>>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("filename", &self.filename)
            .field("format", &self.format())
            .field("virtual_size", &self.virtual_size())
            .field("backing", &self.backing)
            .finish()
    }
}

/// [`crate::formats::OpenNamed`]: the image the user named at `path`, probed, without its
/// backing chain.
pub(crate) fn open_named(path: &Path) -> Result<Box<dyn ImageReader>> {
    let opts = OpenOptions {
        format: None,
        open_backing: false,
        ..Default::default()
    };
    Ok(Image::open(path, &opts)?.reader)
}

/// The name qemu-img gives an image opened with a secret: the secret option is one of the
/// driver's "strong" runtime options (QEMU's block.c `bdrv_refresh_filename`; qcow2's
/// `encrypt.key-secret`, luks's `key-secret`), so the plain file name no longer says how
/// to open it and the name is the options as `json:{...}` (iotest 198), in qemu's order
/// and spacing.
fn keyed_name(u: &source::cmdline::UserName, format: Format) -> Option<String> {
    let id = u.key_secret.as_deref()?;
    let key = match format {
        Format::Qcow2 => "encrypt.key-secret",
        Format::Luks => "key-secret",
        _ => return None,
    };
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    if format == Format::Luks {
        // qemu's dictionary order differs by key: the secret last here.
        return Some(format!(
            "json:{{\"driver\": \"luks\", \"file\": {{\"driver\": \"file\", \"filename\": {}}}, {}: {}}}",
            q(&u.path.to_string_lossy()),
            q(key),
            q(id)
        ));
    }
    Some(format!(
        "json:{{{}: {}, \"driver\": {}, \"file\": {{\"driver\": \"file\", \"filename\": {}}}}}",
        q(key),
        q(id),
        q(format.name()),
        q(&u.path.to_string_lossy())
    ))
}

/// The user's `backing.` options against the chain opened: each names the file (and, with
/// `driver`, the format) of the backing image at its depth. vimg opens the backing file the
/// image names; options naming another file are refused rather than ignored.
fn check_backing_options(img: &Image, mut opts: Option<&source::cmdline::UserName>) -> Result<()> {
    let mut layer = img;
    while let Some(o) = opts {
        let Some(b) = layer.backing.as_deref() else {
            return Err(Error::unsupported(format!(
                "the image options name a backing file ('{}') where the image has none",
                o.path.display()
            )));
        };
        let named = FileStorage::open(&o.path)
            .map_err(|e| Error::io(format_args!("open '{}'", o.path.display()), e))?;
        if named.identity().is_none() || named.identity() != b.storage.identity() {
            return Err(Error::unsupported(format!(
                "the image options name '{}' as the backing file, but the image's backing file is '{}'; vimg opens the backing file the image names",
                o.path.display(),
                b.filename
            )));
        }
        if let Some(f) = o.format.filter(|f| *f != b.format()) {
            return Err(Error::invalid_argument(format!(
                "the image options name the backing file's driver '{}', but it is {}",
                f.name(),
                b.format().name()
            )));
        }
        layer = b;
        opts = o.backing.as_deref();
    }
    Ok(())
}

/// qemu-img's `full-backing-filename`: the stored name joined to the image's folder (no
/// symlink resolution), or the name itself when absolute or when the image has no path.
pub fn full_backing_name(image_path: Option<&Path>, name: &str) -> String {
    let named = Path::new(name);
    if named.is_absolute() || crate::gate::is_protocol_path(name) {
        return name.to_string();
    }
    match image_path.and_then(Path::parent) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(named).display().to_string(),
        _ => name.to_string(),
    }
}

impl Image {
    /// Opens the image at `path`. A compressed container (xz, gzip, zstd) or an OVA is
    /// looked into unless `opts.source.unpack` is off; see [`crate::source`].
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        Image::open_source(&Source::Path(path.as_ref().to_path_buf()), opts)
    }

    /// Opens a file or stdin, looking into compressed containers and OVAs.
    pub fn open_source(src: &Source, opts: &OpenOptions) -> Result<Image> {
        // The user's `file:`, `json:{...}` and `--image-opts` names: read as qemu-img reads
        // them (the command line is trusted), then opened as the file they name.
        if let Source::Path(p) = src {
            let name = p.to_string_lossy();
            // blkdebug (error injection), which the user names: see `crate::blkdebug`.
            if let Some(b) =
                crate::blkdebug::parse_name(&name, opts.image_opts).map_err(|e| e.with_path(p))?
            {
                return filter::open(&b, opts);
            }
            // quorum (votes over copies), which the user names: see `crate::quorum`.
            if let Some(q) =
                crate::quorum::parse_name(&name, opts.image_opts).map_err(|e| e.with_path(p))?
            {
                return filter::open_quorum(&q, opts).map_err(|e| e.with_path(p));
            }
            if opts.image_opts || source::cmdline::is_special(&name) {
                let u =
                    source::cmdline::parse(&name, opts.image_opts).map_err(|e| e.with_path(p))?;
                if let (Some(a), Some(b)) = (opts.format, u.format) {
                    if a != b {
                        return Err(Error::invalid_argument(format!(
                            "the format given with -f ({}) differs from the driver the image \
                             options name ({})",
                            a.name(),
                            b.name()
                        ))
                        .with_path(p));
                    }
                }
                if let Some((offset, size)) = u.window {
                    return Image::open_window(&u.path, offset, size, opts);
                }
                let inner = OpenOptions {
                    format: opts.format.or(u.format),
                    open_backing: opts.open_backing && u.open_backing,
                    image_opts: false,
                    key_secret: u.key_secret.clone().or(opts.key_secret.clone()),
                    ..opts.clone()
                };
                // The secrets the options give, bound to their files; the backing files
                // the options name must be the ones the chain opens.
                source::cmdline::bind_keys(&u);
                // Shown, as qemu-img shows it, by the file name the options give.
                let mut img = Image::open_source(&Source::Path(u.path.clone()), &inner)?;
                if inner.open_backing {
                    check_backing_options(&img, u.backing.as_deref())
                        .map_err(|e| e.with_path(p))?;
                }
                if let Some(name) = keyed_name(&u, img.format()) {
                    img.filename = name;
                }
                if u.direct && img.format() == Format::Raw && img.backing.is_none() {
                    // O_DIRECT changes what raw's block status reports (iotest 253).
                    img.reader =
                        Box::new(crate::formats::raw::RawReader::direct(img.storage.clone()));
                }
                return Ok(img);
            }
        }
        let with_src = |e: Error| match src {
            Source::Path(p) => e.with_path(p),
            Source::Stdin => e.with_path("-"),
        };
        let opened = source::open_top(
            src,
            &source::TopOptions {
                format: opts.format,
                source: &opts.source,
            },
        )
        .map_err(with_src)?;
        let mut image = Image::open_chain(
            opened.storage,
            opened.path.as_deref(),
            src.name(),
            opts,
            opened.format,
            0,
            &mut Vec::new(),
        )
        .map_err(with_src)?;
        image.origin = opened.origin;
        // The name the user gave, also where names inside are not resolved (stdin, a disk
        // inside an OVA).
        image.filename = src.name();
        Ok(image)
    }

    /// The raw driver's window (`driver=raw,offset=O,size=S` from the user's image options):
    /// bytes `[O, O + S)` of the file at `path` (to its end without `size`), read as raw.
    fn open_window(
        path: &Path,
        offset: u64,
        size: Option<u64>,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let file =
            FileStorage::open(path).map_err(|e| Error::new(ErrorKind::Io, e).with_path(path))?;
        let real = file.len();
        if offset > real {
            return Err(Error::invalid_argument(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({real})"
            ))
            .with_path(path));
        }
        let len = match size {
            Some(s) if s > real - offset => {
                return Err(Error::invalid_argument(format!(
                    // qemu-img's text, its double space included.
                    "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to \
                     the  actual size of the containing file ({real})"
                ))
                .with_path(path));
            }
            Some(s) => s,
            None => real - offset,
        };
        let slice = crate::storage::SliceStorage::new(Arc::new(file), offset, len, path)
            .map_err(|e| Error::new(ErrorKind::Io, e).with_path(path))?;
        let raw = OpenOptions {
            format: Some(Format::Raw),
            image_opts: false,
            ..opts.clone()
        };
        Image::open_storage(Arc::new(slice), Some(path), &raw)
    }

    /// Opens an image held in `storage` (a [`crate::blkdebug`] layer over the file at `path`,
    /// which locates the files it names), shown as `filename`.
    pub(crate) fn open_shown(
        storage: Arc<dyn Storage>,
        path: &Path,
        filename: String,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let shown = PathBuf::from(&filename);
        // Backing names resolve against the file (QEMU's `bdrv_dirname` through the
        // layer), however the user spelled the name of the whole.
        let mut image = Image::open_chain(
            storage,
            Some(path),
            path.display().to_string(),
            opts,
            opts.format,
            0,
            &mut Vec::new(),
        )
        .map_err(|e| e.with_path(&shown))?;
        image.filename = filename;
        Ok(image)
    }

    /// Opens an image held in `storage`; `path` locates the files it names.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let name = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".to_string());
        Image::open_chain(storage, path, name, opts, opts.format, 0, &mut Vec::new())
    }

    /// Opens one layer and, below it, its backing chain. `path` is where the layer is (for
    /// the gate); `filename` is how it is shown (for a backing file: the stored name joined
    /// to the overlay's shown name, as qemu-img shows it).
    fn open_chain(
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        filename: String,
        opts: &OpenOptions,
        format: Option<Format>,
        depth: usize,
        seen: &mut Vec<(u64, u64)>,
    ) -> Result<Image> {
        // Errors name the layer as it is shown (the user's name, or a backing name as the
        // image spelled it joined to it), never the path the gate resolved.
        let shown_path = PathBuf::from(&filename);
        let with_path = |e: Error| match path {
            Some(_) => e.with_path(&shown_path),
            None => e,
        };
        if let Some(id) = storage.identity() {
            if seen.contains(&id) {
                // qemu-img's words for it.
                return Err(with_path(Error::invalid(format!(
                    "Backing file '{filename}' creates an infinite loop."
                ))));
            }
            seen.push(id);
        }
        if depth > MAX_CHAIN_DEPTH {
            return Err(with_path(Error::invalid(format!(
                "Backing chain is longer than {MAX_CHAIN_DEPTH} images"
            ))));
        }
        let format = match format {
            Some(f) => f,
            None => registry::probe(&*storage).map_err(with_path)?,
        };
        let mut ctx = OpenContext::new(path, opts.policy);
        if depth == 0 {
            ctx.key_secret = opts.key_secret.clone();
        }
        // A key the user's options bound to this file (`backing.encrypt.key-secret`).
        if ctx.key_secret.is_none() {
            ctx.key_secret = storage.identity().and_then(crate::secret::file_key);
        }
        ctx.metadata_only = opts.metadata_only;
        ctx.quorum_node = storage.quorum_node().map(str::to_string);
        let reader = registry::driver(format)
            .open(storage.clone(), &ctx)
            .map_err(with_path)?;
        let storage_is_quorum = storage.quorum_node().is_some();
        let mut image = Image {
            reader,
            backing: None,
            filename,
            path: path.map(Path::to_path_buf),
            storage,
            origin: Origin::default(),
            filtered: None,
        };
        if opts.open_backing {
            if let Some(b) = image.reader.backing().cloned() {
                if storage_is_quorum && crate::quorum::dirname::needs_dirname(&b.name) {
                    return Err(Error::invalid(crate::quorum::dirname::NO_DIRNAME));
                }
                let names = std::iter::once(&b.name).chain(b.alternatives.iter());
                // The first name is the one the image prefers (a VHD's relative parent
                // locator); its error is the one worth reporting.
                let mut first_err = None;
                let mut opened = None;
                for name in names {
                    match crate::gate::open(path, &b.field, name, ctx.policy) {
                        Ok((bpath, file)) => {
                            // `-F` names the format of the top image's backing file only.
                            let bfmt = opts.backing_format.filter(|_| depth == 0).or(b.format);
                            let shown = full_backing_name(Some(Path::new(&image.filename)), name);
                            // Messages name the file as the image spelled it (joined to the
                            // name the user gave), never where it resolved.
                            let escaped = escape_control(&shown).into_owned();
                            let bstorage = FileStorage::from_file(file, &bpath).map_err(|e| {
                                Error::io(format_args!("stat backing file '{escaped}'"), e)
                            })?;
                            let sub = Image::open_chain(
                                Arc::new(bstorage),
                                Some(&bpath),
                                shown,
                                opts,
                                bfmt,
                                depth + 1,
                                seen,
                            )
                            .map_err(|e| {
                                chain_context(e, format!("{CHAIN_PREFIX}{escaped}'"), depth + 1)
                            })?;
                            if let Some(link) = &b.link {
                                check_link(&image, &sub, link).map_err(with_path)?;
                            }
                            opened = Some(sub);
                            break;
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                match opened {
                    Some(sub) => image.backing = Some(Box::new(sub)),
                    None => {
                        let e = first_err.unwrap_or_else(|| Error::invalid("no backing file name"));
                        let also = if b.alternatives.is_empty() {
                            String::new()
                        } else {
                            let alts: Vec<String> = b
                                .alternatives
                                .iter()
                                .map(|a| escape_control(a).into_owned())
                                .collect();
                            format!(" (nor its alternatives '{}')", alts.join("', '"))
                        };
                        return Err(with_path(chain_context(
                            e,
                            format!("{CHAIN_PREFIX}{}'{also}", escape_control(&b.name)),
                            depth + 1,
                        )));
                    }
                }
            }
        }
        Ok(image)
    }

    /// How the image was reached: the compressed container or OVA around it, if any.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// The format reader.
    pub fn reader(&self) -> &dyn ImageReader {
        &*self.reader
    }

    /// An image read through `reader` alone (no backing chain, no path), shown as
    /// `filename` and standing on `storage`: how a reader built over other images (a
    /// concatenation, [`Image::concat`]) becomes one.
    pub(crate) fn from_reader(
        reader: Box<dyn ImageReader>,
        filename: String,
        storage: Arc<dyn Storage>,
    ) -> Image {
        Image {
            reader,
            backing: None,
            filename,
            path: None,
            storage,
            origin: Origin::default(),
            filtered: None,
        }
    }

    /// The image below when this one is a filter (a [`crate::blkdebug`] layer the user put
    /// above an image): `map` reports its allocation, as qemu-img looks through filters.
    pub fn filtered(&self) -> Option<&Image> {
        self.filtered.as_deref()
    }

    /// Reads the top image as it was when an internal snapshot was taken (`convert -l`);
    /// see [`ImageReader::load_snapshot`].
    pub fn load_snapshot(&mut self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        self.reader.load_snapshot(id, name)
    }

    /// The backing image, if one was opened.
    pub fn backing(&self) -> Option<&Image> {
        self.backing.as_deref()
    }

    /// The file name as given when opening (or `-`).
    pub fn filename(&self) -> &str {
        &self.filename
    }

    /// The path, when opened from a file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The storage the image was opened from.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The format.
    pub fn format(&self) -> Format {
        self.reader.format()
    }

    /// Guest-visible size.
    pub fn virtual_size(&self) -> u64 {
        self.reader.virtual_size()
    }

    /// Every layer of the chain, top first.
    pub fn chain(&self) -> Vec<&Image> {
        let mut v = vec![self];
        let mut cur = self;
        while let Some(b) = cur.backing() {
            v.push(b);
            cur = b;
        }
        v
    }

    /// Maps `[offset, offset + max_len)` through the chain: the longest run whose content
    /// comes from one layer in one way. Returns the extent (whose file ids belong to the
    /// returned layer) and the depth of that layer (0 = this image). `Unallocated` (which
    /// reads as zeros) is returned only when no layer has the range: at the deepest layer, or
    /// at the layer whose backing image is shorter than the range's offset.
    pub fn map_flat(&self, offset: u64, max_len: u64) -> Result<(Extent, &Image, usize)> {
        let mut layer = self;
        let mut depth = 0;
        let mut len = max_len;
        loop {
            let e = checked_map(layer, offset, len)?;
            if e.kind != MapKind::Unallocated {
                return Ok((e, layer, depth));
            }
            let Some(b) = layer.backing() else {
                return Ok((e, layer, depth));
            };
            let bsize = b.virtual_size();
            if offset >= bsize {
                // Past the end of a shorter backing image: zero, and nothing deeper has it.
                return Ok((e, layer, depth));
            }
            len = e.len.min(bsize - offset);
            layer = b;
            depth += 1;
        }
    }

    /// Reads `buf.len()` guest bytes at `offset` through the whole chain. The range must lie
    /// inside the virtual size.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.virtual_size())
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "read of {} bytes at {offset:#x} is outside the virtual disk ({} bytes)",
                    buf.len(),
                    self.virtual_size()
                ))
            })?;
        // Mapping to read is no block-status request of a blkdebug layer's rules.
        let _reading = crate::blkdebug::Reading::enter();
        let mut pos = offset;
        while pos < end {
            let (e, layer, _) = self.map_flat(pos, end - pos)?;
            let start = (pos - offset) as usize;
            let dst = &mut buf[start..start + e.len as usize];
            layer.read_extent(&e, dst)?;
            pos = e.end();
        }
        Ok(())
    }

    /// Reads the bytes of one extent this image's reader returned into `dst`
    /// (`dst.len() == e.len`). An error names this image's file, as open errors do.
    pub fn read_extent(&self, e: &Extent, dst: &mut [u8]) -> Result<()> {
        self.read_extent_unnamed(e, dst)
            .map_err(|err| err.with_path(self.filename.as_str()))
    }

    fn read_extent_unnamed(&self, e: &Extent, dst: &mut [u8]) -> Result<()> {
        debug_assert_eq!(dst.len() as u64, e.len);
        match e.kind {
            MapKind::Zero | MapKind::Unallocated => {
                dst.fill(0);
                Ok(())
            }
            MapKind::Data { file, offset } => {
                let f = self.file_of(file)?;
                f.debug_event(crate::blkdebug::Event::ReadAio);
                f.read_exact_at(dst, offset.get()).map_err(|err| {
                    Error::io(
                        format_args!(
                            "read guest {} from host {} of '{}'",
                            e.start,
                            offset,
                            f.path()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default()
                        ),
                        err,
                    )
                })
            }
            MapKind::Compressed {
                file,
                offset,
                len,
                codec,
                unit_start,
                unit_len,
            } => {
                let f = self.file_of(file)?;
                f.debug_event(crate::blkdebug::Event::ReadCompressed);
                // Wrapping: a window (`Image::window`) may place a unit's start below 0;
                // a reader's bad unit wraps to a huge skip, refused just below.
                let skip = e.start.get().wrapping_sub(unit_start.get());
                if skip > unit_len
                    || skip.checked_add(e.len).is_none_or(|x| x > unit_len)
                    || unit_len > MAX_UNIT
                {
                    return Err(Error::corrupt(format!(
                        "compressed unit at guest {unit_start} has an invalid size {unit_len:#x}"
                    )));
                }
                let in_len = usize::try_from(len.min(MAX_UNIT * 2)).unwrap_or(0);
                SCRATCH.with(|s| {
                    let mut s = s.borrow_mut();
                    let (input, output) = &mut *s;
                    input.resize(in_len, 0);
                    // The encoded bytes may run past the end of the file (qcow2 rounds the
                    // length up to sectors); read what is there.
                    let mut got = 0;
                    while got < in_len {
                        match f.read_at(&mut input[got..], offset.get() + got as u64) {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(err) => {
                                return Err(Error::io(
                                    format_args!("read compressed data at host {offset}"),
                                    err,
                                ))
                            }
                        }
                    }
                    let whole = skip == 0 && e.len == unit_len;
                    let out: &mut [u8] = if whole {
                        &mut *dst
                    } else {
                        output.resize(unit_len as usize, 0);
                        &mut output[..]
                    };
                    codec::decompress(codec, &input[..got], out).map_err(|err| {
                        let kind = match err {
                            codec::CodecError::NotBuilt { .. } => ErrorKind::Unsupported,
                            _ => ErrorKind::Corrupt,
                        };
                        Error::new(kind, err).context(format!(
                            "compressed unit for guest {unit_start} at host {offset}"
                        ))
                    })?;
                    if !whole {
                        dst.copy_from_slice(&output[skip as usize..(skip + e.len) as usize]);
                    }
                    Ok(())
                })
            }
        }
    }

    fn file_of(&self, id: crate::mapping::FileId) -> Result<&Arc<dyn Storage>> {
        self.reader.file(id).ok_or_else(|| {
            Error::corrupt(format!(
                "{} reader referred to an unknown file #{}",
                self.format().name(),
                id.0
            ))
        })
    }
}

/// How a failed backing file is introduced. An error that already starts with it names the
/// layer that failed; the layers above pass it on unwrapped, so a deep chain gives one line
/// that says where it broke, not one nested clause per layer.
const CHAIN_PREFIX: &str = "Could not open backing file '";

/// Wraps the error of the backing file at `depth` (1: the top image's backing file) unless a
/// deeper layer already did; past the first layer the message says which layer it was.
fn chain_context(e: Error, what: String, depth: usize) -> Error {
    if e.message().to_string().starts_with(CHAIN_PREFIX) {
        return e;
    }
    if depth > 1 {
        e.context(format!("{what} (layer {depth} of the backing chain)"))
    } else {
        e.context(what)
    }
}

/// Refuses a parent whose identity is not the one its child recorded when it was made (see
/// [`ParentLink`]): the parent was written to since, and the child's blocks no longer fit
/// over it.
fn check_link(child: &Image, parent: &Image, link: &ParentLink) -> Result<()> {
    let got = parent.reader.link_identity(link.identity);
    if got
        .as_deref()
        .is_some_and(|g| link.expected.iter().any(|(_, v)| v == g))
    {
        return Ok(());
    }
    let recorded = link
        .expected
        .iter()
        .map(|(field, v)| format!("{field} {v}"))
        .collect::<Vec<_>>()
        .join(" and ");
    let has = match got {
        Some(g) => format!("has {} {g}", link.identity),
        None => format!(
            "is a {} image, which has no {}",
            parent.format().name(),
            link.identity
        ),
    };
    Err(Error::corrupt(format!(
        "Backing chain mismatch: '{}' records {recorded}, but its parent '{}' {has}; \
         the parent was changed after the child was made",
        escape_control(&child.filename),
        escape_control(&parent.filename)
    )))
}

/// Largest decoded unit the read layer accepts (qcow2's 2 MiB clusters are the biggest).
const MAX_UNIT: u64 = 64 << 20;

thread_local! {
    static SCRATCH: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Calls the layer's reader and checks the answer against the trait's contract, so a buggy or
/// hostile mapping can never make the caller loop or read out of range. An error (a table
/// found corrupt or unreadable while mapping) names the layer's file.
pub(crate) fn checked_map(layer: &Image, offset: u64, len: u64) -> Result<Extent> {
    let e = layer.reader.map(GuestOffset(offset), len);
    let e = e.map_err(|err| err.with_path(layer.filename.as_str()))?;
    if e.start.get() != offset || e.len == 0 || e.len > len {
        return Err(Error::corrupt(format!(
            "{} mapping at {offset:#x} returned an invalid extent ({:#x}+{:#x})",
            layer.format().name(),
            e.start.get(),
            e.len
        ))
        .with_path(layer.filename.as_str()));
    }
    Ok(e)
}

/// Checks the metadata of `image`'s top layer, as `qemu-img check` does (backing files are
/// not checked; open with [`OpenOptions::open_backing`](crate::OpenOptions::open_backing)
/// off to leave them closed). An image whose tables contradict themselves does not open at
/// all; [`CheckReport::from_open_error`](crate::CheckReport::from_open_error) turns that refusal into the report.
///
/// ```
/// use vimg::{Format, Image, OpenOptions};
/// # let dir = tempfile::tempdir()?;
/// let path = dir.path().join("new.qcow2");
/// vimg::create(&path, Format::Qcow2, Some(1 << 20), &vimg::CreateOptions::new())?;
/// let image = Image::open(&path, &OpenOptions::default().open_backing(false))?;
/// let report = vimg::check(&image)?;
/// assert_eq!((report.corruptions, report.leaks), (0, 0));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn check(image: &Image) -> Result<crate::check::CheckReport> {
    image.reader().check()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_backing_names() {
        assert_eq!(
            full_backing_name(Some(Path::new("tmp/ov.qcow2")), "x.qcow2"),
            "tmp/x.qcow2"
        );
        assert_eq!(
            full_backing_name(Some(Path::new("ov.qcow2")), "x.qcow2"),
            "x.qcow2"
        );
        assert_eq!(
            full_backing_name(Some(Path::new("a/ov")), "/abs/x"),
            "/abs/x"
        );
    }
}
