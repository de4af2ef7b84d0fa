//! `vimg`: qemu-img's command line over the vimg library. The binary is thin: it parses
//! flags into checked options, calls the library, and maps errors to qemu-img's messages and
//! exit codes. No format logic lives here.

mod args;
mod cmd;
mod human;
mod objects;
mod progress;
mod qemu_usage;
mod qemu_words;
mod signals;
mod trust;

use std::io::Write;
use std::process::ExitCode;

use args::Command;

/// An error on its way out: the message to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
    /// Printed to stdout after the message: the end of a progress display that qemu-img
    /// closes only after its error (`amend -p`).
    pub then_stdout: Option<&'static str>,
}

impl Failure {
    pub fn new(message: impl Into<String>, code: u8) -> Failure {
        Failure {
            message: without_os_error(message.into()),
            code,
            then_stdout: None,
        }
    }

    /// qemu-img's "Could not open 'FILE': reason" for a failed open.
    pub fn open(file: &str, e: &vimg::Error) -> Failure {
        Failure::new(format!("Could not open '{file}': {}", e.message()), 1)
    }
}

impl From<vimg::Error> for Failure {
    fn from(e: vimg::Error) -> Failure {
        let code = match e.kind() {
            vimg::ErrorKind::Cancelled => 130,
            _ => 1,
        };
        // The CLI words its own messages around file names, as qemu-img does.
        Failure::new(e.message().to_string(), code)
    }
}

pub type CmdResult = Result<u8, Failure>;

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next();
    trust::init(argv0.as_deref());
    if trust::qemu_mode() {
        // `qemu-img --version` / `-V`: qemu-img's first line for version-parsing callers.
        let first = std::env::args_os().nth(1);
        if first
            .as_deref()
            .is_some_and(|a| a == "--version" || a == "-V")
        {
            return match print_out(&trust::qemu_version_text()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(1),
            };
        }
    }
    let cli = args::parse();
    // Lines format drivers print as they work go to stderr, as qemu-img's do.
    vimg::notice::set_sink(|l| eprintln!("{l}"));
    trust::set_image_opts(cli.image_opts);
    if let Err(f) = trust::init_policy(cli.cmd.safety()).and_then(|()| objects::init(&cli.objects))
    {
        eprintln!("{}: {}", trust::prefix(), f.message);
        return ExitCode::from(f.code);
    }
    let result = match cli.cmd {
        Command::Convert(a) => cmd::target_opts::resolve(a).and_then(cmd::convert::run),
        Command::Info(a) => cmd::info::run(a),
        Command::Create(a) => cmd::create::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Measure(a) => cmd::measure::run(a),
        Command::Map(a) => cmd::map::run(a),
        Command::Resize(a) => cmd::resize::run(a),
        Command::Amend(a) => cmd::amend::run(a),
        Command::Snapshot(a) => cmd::snapshot::run(a),
        Command::Bitmap(a) => cmd::bitmap::run(a),
        Command::Dd(a) => cmd::dd::run(a),
        Command::Rebase(a) => cmd::rebase::run(a),
        Command::Commit(a) => cmd::commit::run(a),
        Command::Completion(a) => cmd::extras::completion(a),
        Command::Man(a) => cmd::extras::man(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            let _ = std::io::stdout().flush();
            let message = if trust::qemu_mode() {
                qemu_words::plain(&f.message)
            } else {
                f.message
            };
            eprintln!("{}: {}", trust::prefix(), human::esc_message(&message));
            if let Some(t) = f.then_stdout {
                let _ = print_out(t);
            }
            ExitCode::from(f.code)
        }
    }
}

/// Prints to stdout; a closed pipe (`vimg info x | head -1`) is not an error.
pub fn print_out(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::new(format!("write to stdout: {e}"), 1)),
    }
}

/// Drops Rust's " (os error N)" after a system error's text: qemu-img prints the text alone
/// ("No such file or directory"), and scripts match on it.
fn without_os_error(mut msg: String) -> String {
    while let Some(i) = msg.find(" (os error ") {
        let Some(len) = msg[i..].find(')') else { break };
        if !msg[i + 11..i + len].bytes().all(|b| b.is_ascii_digit()) {
            break;
        }
        msg.replace_range(i..=i + len, "");
    }
    msg
}
