//! `vimg commit`: qemu-img commit's command line. The top image's data (and that of the
//! images between it and `-b BASE`) is written into the base image
//! ([`vimg::inplace::commit`]); then, unless `-d` or `-b`, the top image is emptied (its
//! clusters unmapped, so it reads through to the base).

use clap::Args;

use crate::args::SafetyArgs;
use crate::{CmdResult, Failure};

#[derive(Args, Debug)]
pub struct CommitArgs {
    /// Image format (probed from the content when absent).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Cache mode (accepted; vimg flushes each step).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// The backing image to commit into (implies -d).
    #[arg(short = 'b', value_name = "BASE")]
    pub base: Option<String>,
    /// Leave the top image as it is.
    #[arg(short = 'd')]
    pub drop: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Rate limit in bytes per second.
    #[arg(short = 'r', long = "rate-limit", value_name = "RATE")]
    pub rate: Option<String>,
    #[command(flatten)]
    pub safety: SafetyArgs,
    /// The image.
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

pub fn run(a: CommitArgs) -> CmdResult {
    let file = super::one_image("commit", &a.files)?;
    let (path, driver) = super::in_place_file(file)?;
    let path = path.as_path();
    let format = match (a.format.as_deref(), driver) {
        (None, Some(d)) => d,
        (f, _) => super::image_format(path.to_str().unwrap_or(file), f)?,
    };
    let rate = match &a.rate {
        Some(r) => vimg::options::parse_size(r)
            .map_err(|_| Failure::new(format!("Invalid rate limit specified: '{r}'."), 1))?,
        None => 0,
    };
    let pace = crate::progress::RateLimit::new(rate);
    let policy = crate::trust::policy(&a.safety);
    let reporter = crate::progress::Reporter::new(
        (a.progress && !a.quiet).then_some(crate::args::ProgressMode::Auto),
        false,
    );
    let opts = vimg::inplace::CommitOptions {
        base: a.base.as_deref(),
        drop: a.drop,
    };
    let r = vimg::inplace::commit(path, format, policy, opts, &|p| {
        reporter.update(p);
        pace.pace(p.done);
    });
    reporter.finish(r.is_ok());
    match r {
        Ok(()) => {
            if !a.quiet {
                crate::print_out("Image committed.\n")?;
            }
            Ok(0)
        }
        Err(e) if e.is_refusal() => Err(Failure::new(e.message().to_string(), 1)),
        Err(e) if e.message().is::<vimg::inplace::EmptyFailed>() => Err(Failure::new(
            format!("Failed to empty {file}: {}", vimg::blkdebug::error_text(&e)),
            1,
        )),
        Err(e) if e.kind() == vimg::ErrorKind::Io && e.path().is_none() => {
            Err(Failure::open(file, &e))
        }
        Err(e) => Err(Failure::new(
            format!("Could not commit '{file}': {}", e.message()),
            1,
        )),
    }
}
