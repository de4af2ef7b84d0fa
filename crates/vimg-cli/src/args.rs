//! Command-line definitions, spelled as qemu-img spells them, so scripts written for
//! `qemu-img` run with `vimg` substituted.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Read, write and convert virtual disk images (raw, qcow2, vmdk, vhd/vpc, vhdx, vdi).
/// A drop-in for qemu-img's command line that is safe on untrusted images.
#[derive(Parser, Debug)]
#[command(name = "vimg", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
    /// The image names are option strings, as qemu-img's --image-opts
    /// (`driver=qcow2,file.filename=disk.qcow2`); `json:{...}` and `file:` names are read
    /// without it.
    #[arg(long = "image-opts", global = true)]
    pub image_opts: bool,
    /// Define an object, as qemu-img's --object: `secret,id=ID,data=VALUE[,format=base64]`
    /// or `secret,id=ID,file=PATH` (repeatable).
    #[arg(long = "object", value_name = "OBJECTDEF", global = true)]
    pub objects: Vec<String>,
}

/// Parses the command line like `Cli::parse`, but as qemu-img ends a bad command line:
/// exit status 1 (clap's is 2), "Not enough arguments" without a subcommand, and "Command
/// not found: X" for an unknown one. Help and version go out as clap prints them.
pub fn parse() -> Cli {
    use clap::error::{ContextKind, ErrorKind};
    let e = match Cli::try_parse() {
        Ok(cli) => return cli,
        Err(e) => e,
    };
    if crate::trust::qemu_mode() {
        let argv: Vec<String> = std::env::args_os()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if let Some(msg) = crate::qemu_usage::message(&e, &argv) {
            eprintln!("{msg}");
            std::process::exit(1)
        }
    }
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => e.exit(),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            eprintln!(
                "{}: Not enough arguments\nTry '{} --help' for more info",
                crate::trust::prefix(),
                crate::trust::prefix()
            );
        }
        ErrorKind::InvalidSubcommand => {
            let name = e
                .get(ContextKind::InvalidSubcommand)
                .map(|v| v.to_string())
                .unwrap_or_default();
            eprintln!(
                "{}: Command not found: {name}\nTry '{} --help' for more info",
                crate::trust::prefix(),
                crate::trust::prefix()
            );
        }
        _ => {
            let _ = e.print();
        }
    }
    std::process::exit(1)
}

// One value per run, parsed once: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Convert an image to another format (qemu-img convert).
    ///
    /// Where the output goes: a new or regular file is written as a hidden temporary and
    /// renamed into place when complete (all or nothing; a replaced file keeps its owner,
    /// group and mode). Block devices, character devices (/dev/null), FIFOs and /dev/stdout
    /// are written in place and never replaced: a device gets the image with every zero
    /// range zeroed (nothing of its old content shows through), a character device or
    /// FIFO is streamed to (one-pass formats only). A device cannot be all or nothing: on an
    /// error or signal vimg reports how far it got. A directory is refused before any work.
    Convert(ConvertArgs),
    /// Show information about an image (qemu-img info).
    Info(InfoArgs),
    /// Create a new empty image (qemu-img create).
    Create(CreateArgs),
    /// Check an image's metadata for consistency (qemu-img check).
    Check(CheckArgs),
    /// Compare the content of two images (qemu-img compare).
    Compare(CompareArgs),
    /// Compute the size a new image needs (qemu-img measure).
    Measure(MeasureArgs),
    /// Show the allocation of an image (qemu-img map).
    Map(MapArgs),
    /// Change the virtual size of a qcow2 or raw image in place (qemu-img resize).
    Resize(crate::cmd::resize::ResizeArgs),
    /// Change a qcow2 image's compat level or lazy_refcounts in place (qemu-img amend).
    Amend(crate::cmd::amend::AmendArgs),
    /// List, create, apply or delete a qcow2 image's internal snapshots (qemu-img snapshot).
    Snapshot(crate::cmd::snapshot::SnapshotArgs),
    /// Add, remove, clear, enable, disable or merge a qcow2 image's persistent dirty
    /// bitmaps in place (qemu-img bitmap).
    Bitmap(crate::cmd::bitmap::BitmapArgs),
    /// Copy a range of an image into a new image (qemu-img dd): bs=, count=, skip=, if=, of=.
    Dd(crate::cmd::dd::DdArgs),
    /// Change a qcow2 image's backing file in place (qemu-img rebase; -u: the reference only).
    Rebase(crate::cmd::rebase::RebaseArgs),
    /// Write an image's data into its backing file and empty it (qemu-img commit).
    Commit(crate::cmd::commit::CommitArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completion(CompletionArgs),
    /// Print the man page (roff) to stdout: vimg's, or a subcommand's; with --dir, write
    /// every page (vimg.1, vimg-convert.1, ...) into a folder.
    Man(ManArgs),
}

impl Command {
    /// The safety flags of a command that opens images.
    pub fn safety(&self) -> Option<&SafetyArgs> {
        match self {
            Command::Convert(a) => Some(&a.safety),
            Command::Info(a) => Some(&a.safety),
            Command::Check(a) => Some(&a.safety),
            Command::Compare(a) => Some(&a.safety),
            Command::Measure(a) => Some(&a.safety),
            Command::Map(a) => Some(&a.safety),
            Command::Resize(a) => Some(&a.safety),
            Command::Amend(a) => Some(&a.safety),
            Command::Snapshot(a) => Some(&a.safety),
            Command::Bitmap(a) => Some(&a.safety),
            Command::Dd(a) => Some(&a.safety),
            Command::Rebase(a) => Some(&a.safety),
            Command::Commit(a) => Some(&a.safety),
            _ => None,
        }
    }
}

/// Output format of a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

/// How `convert` reports progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// A bar on a terminal, qemu-img's `(12.34/100%)` lines otherwise (what `-p` does).
    Auto,
    /// A bar with rate and ETA.
    Bar,
    /// qemu-img's `    (12.34/100%)` lines.
    Plain,
    /// One JSON object per update on stderr: {"done": bytes, "total": bytes, "percent": x,
    /// "rate": bytes per second}.
    Json,
}

/// vimg's pipeline flags for the image a command reads: which disk of an OVA, and the size
/// of a streamed source.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// OVA source: the disk to open, numbered from 0 in the OVF's order (as `info` lists
    /// them). Default: the first.
    #[arg(long = "disk", value_name = "N")]
    pub disk: Option<usize>,
    /// The decoded size of a source read from a pipe (`-`), when known: a raw stream then
    /// goes through without a temporary file. Without it, a stream whose container does not
    /// record its size is first decoded into a sparse temporary file in $TMPDIR.
    #[arg(long = "source-size", value_name = "SIZE")]
    pub source_size: Option<String>,
}

/// Flags shared by every command that opens images.
#[derive(Args, Debug, Clone)]
pub struct SafetyArgs {
    /// Let images name files outside their own folder. `--allow-external=DIR` (repeatable)
    /// trusts names that resolve under DIR; bare `--allow-external` trusts any regular file
    /// (only for trusted images). By default a name from an image must resolve to a regular
    /// file inside the image's folder. Folders are also read from $VIMG_ALLOW_EXTERNAL
    /// (colon-separated) and /etc/vimg/allow-external (one per line).
    #[arg(
        long = "allow-external",
        value_name = "DIR",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "",
        action = clap::ArgAction::Append
    )]
    pub allow_external: Vec<String>,
    /// Accepted for qemu-img compatibility (images are always opened read-only and shared).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source format (probed from the content when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub src_format: Option<String>,
    /// Output format (`host_device`: raw onto an existing device).
    #[arg(short = 'O', value_name = "OUTPUT_FMT", default_value = "raw")]
    pub out_format: String,
    /// Output options, key=value[,key=value...] (`-o help` lists them).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Compress the output (qcow2, streamOptimized vmdk).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Show progress (a bar on a terminal, qemu-img's percentage lines otherwise).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Show progress in the given form (implies -p).
    #[arg(
        long = "progress",
        value_enum,
        value_name = "MODE",
        require_equals = true
    )]
    pub progress_mode: Option<ProgressMode>,
    /// vimg: `--output=json` prints, when done, a JSON report of the file written: its name,
    /// format, checksum (with --checksum) and `image-service` block (what to register it
    /// with), instead of the checksum line. Progress then goes to stderr; refused when the
    /// image itself goes to stdout.
    #[arg(long = "output", value_enum)]
    pub output: Option<OutputFormat>,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Backing file of the output: only what the source's top image stores is copied, and
    /// its unallocated areas stay unallocated.
    #[arg(short = 'B', value_name = "BACKING_FILE")]
    pub backing: Option<String>,
    /// Format of the output's backing file.
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// Zero runs shorter than this are written as data; 0 writes everything. Default 4k.
    #[arg(short = 'S', value_name = "SPARSE_SIZE")]
    pub sparse_size: Option<String>,
    /// Parallel workers, 1 to 16 as qemu-img's coroutines (default: available cores).
    #[arg(short = 'm', value_name = "NUM", allow_hyphen_values = true)]
    pub workers: Option<String>,
    /// Allow out-of-order writes (vimg always does where the format allows).
    #[arg(short = 'W')]
    pub out_of_order: bool,
    /// Write into an existing target instead of creating one (in place: not atomic).
    #[arg(short = 'n')]
    pub no_create: bool,
    /// The output name is an option string (`driver=qcow2,file.filename=out.qcow2`), as
    /// qemu-img's --target-image-opts; needs -n.
    #[arg(long = "target-image-opts")]
    pub target_image_opts: bool,
    /// The `encrypt.key-secret` a `--target-image-opts` string gives (set by
    /// `target_opts::resolve`, not a flag).
    #[arg(skip)]
    pub target_key_secret: Option<String>,
    /// Cache mode of the target: none, writeback, writethrough, directsync or unsafe. As in
    /// qemu-img the default is `unsafe`: the output is renamed into place when complete but
    /// not flushed. Every other mode makes it durable (fsync) before renaming it into place.
    /// `none` and `directsync` open a block device target with O_DIRECT.
    #[arg(short = 't', value_name = "CACHE")]
    pub cache: Option<String>,
    /// Cache mode of the source (checked; vimg always reads through the page cache).
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    pub src_cache: Option<String>,
    /// Copy offloading (qemu-img's `copy_file_range` path). Accepted with qemu-img's
    /// checks; vimg copies the same bytes either way.
    #[arg(short = 'C')]
    pub copy_offload: bool,
    /// Rate limit of the copy, bytes per second (k, M, G suffixes; 0 = none).
    #[arg(short = 'r', value_name = "RATE_LIMIT")]
    pub rate_limit: Option<String>,
    /// Salvaging: a sector of the source that cannot be read is written as zeros with a
    /// warning, and the conversion goes on (as qemu-img's `--salvage`).
    #[arg(long = "salvage")]
    pub salvage: bool,
    /// Copy persistent bitmaps into a new qcow2 output (from a qcow2 source).
    #[arg(long = "bitmaps")]
    pub bitmaps: bool,
    /// With --bitmaps: skip bitmaps marked inconsistent.
    #[arg(long = "skip-broken-bitmaps")]
    pub skip_broken_bitmaps: bool,
    /// Convert from an internal snapshot: `snapshot.id=ID[,snapshot.name=NAME]`, or an ID
    /// or name (the ID is tried first).
    #[arg(short = 'l', value_name = "SNAPSHOT_PARAM")]
    pub snapshot: Option<String>,
    /// qemu-img's older spelling of `-l ID_OR_NAME`.
    #[arg(short = 's', value_name = "SNAPSHOT_ID_OR_NAME", hide = true)]
    pub snapshot_old: Option<String>,
    /// Assume the target reads as zeros already (with -n): zero ranges are not written.
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Print a checksum of the output file's bytes (sha256, sha512 or md5), as
    /// `sha256sum` prints it: `<hex>  <file>` (on stderr when the output goes to stdout).
    #[arg(long = "checksum", value_name = "ALG")]
    pub checksum: Option<String>,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// Source image(s) and the output file name.
    #[arg(value_name = "FILENAME", num_args = 0..)]
    pub files: Vec<String>,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Image format (probed from the content when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output format.
    #[arg(long = "output", value_enum, default_value = "human")]
    pub output: OutputFormat,
    /// Show every image of the backing chain.
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// Also hash the file as it is stored (sha256, sha512 or md5); JSON reports it under
    /// `vimg-checksum` and, for a bare image, as the image service's `os_hash_value`.
    #[arg(long = "checksum", value_name = "ALG")]
    pub checksum: Option<String>,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// The image.
    pub filename: String,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', value_name = "FMT", default_value = "raw")]
    pub format: String,
    /// Options, key=value[,key=value...] (`-o help` lists them).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Backing file of the new image.
    #[arg(short = 'b', value_name = "BACKING_FILE")]
    pub backing: Option<String>,
    /// Format of the backing file.
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// Do not open the backing file to check it (accepted; vimg does not open it).
    #[arg(short = 'u')]
    pub unsafe_backing: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The new image.
    pub filename: Option<String>,
    /// Virtual size, with optional k, M, G, T suffix.
    pub size: Option<String>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Image format (probed from the content when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output format.
    #[arg(long = "output", value_enum, default_value = "human")]
    pub output: OutputFormat,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Repair the image in place (qcow2): `leaks` fixes leaked clusters, `all` also
    /// refcounts that are too low and copied flags.
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    pub repair: Option<String>,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// The image.
    pub filename: String,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f', value_name = "FMT")]
    pub format_a: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F', value_name = "FMT")]
    pub format_b: Option<String>,
    /// Strict: images of different sizes differ.
    #[arg(short = 's')]
    pub strict: bool,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// First image.
    pub a: String,
    /// Second image.
    pub b: String,
}

#[derive(Args, Debug)]
pub struct MeasureArgs {
    /// Output format of the report.
    #[arg(long = "output", value_enum, default_value = "human")]
    pub output: OutputFormat,
    /// Format of the image to create.
    #[arg(short = 'O', value_name = "OUTPUT_FMT", default_value = "raw")]
    pub out_format: String,
    /// Options of the image to create.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Measure an empty image of this size instead of an existing image's content.
    #[arg(long = "size", value_name = "SIZE")]
    pub size: Option<String>,
    /// Format of the input image.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// The input image.
    pub filename: Option<String>,
}

#[derive(Args, Debug)]
pub struct MapArgs {
    /// Image format (probed from the content when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output format.
    #[arg(long = "output", value_enum, default_value = "human")]
    pub output: OutputFormat,
    /// First guest byte to map.
    #[arg(long = "start-offset", value_name = "OFFSET")]
    pub start_offset: Option<String>,
    /// Bytes to map.
    #[arg(long = "max-length", value_name = "LEN")]
    pub max_length: Option<String>,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// The image.
    pub filename: String,
}

#[derive(Args, Debug)]
pub struct CompletionArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write vimg.1 and one page per subcommand into this folder.
    #[arg(long = "dir", value_name = "DIR", conflicts_with = "subcommand")]
    pub dir: Option<std::path::PathBuf>,
    /// The subcommand whose page to print (default: vimg's own page).
    pub subcommand: Option<String>,
}
