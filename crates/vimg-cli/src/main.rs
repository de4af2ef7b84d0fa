//! `vimg`: qemu-img's command line over the vimg library. The binary is thin: it parses
//! flags into checked options, calls the library, and maps errors to qemu-img's messages and
//! exit codes. No format logic lives here.

mod args;
mod cmd;
mod human;
mod progress;
mod signals;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use args::{Cli, Command};

/// An error on its way out: the message to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    pub fn new(message: impl Into<String>, code: u8) -> Failure {
        Failure {
            message: message.into(),
            code,
        }
    }

    /// qemu-img's "Could not open 'FILE': reason" for a failed open.
    pub fn open(file: &str, e: &vimg::Error) -> Failure {
        Failure::new(format!("Could not open '{file}': {e}"), 1)
    }
}

impl From<vimg::Error> for Failure {
    fn from(e: vimg::Error) -> Failure {
        let code = match e.kind() {
            vimg::ErrorKind::Cancelled => 130,
            _ => 1,
        };
        Failure::new(e.to_string(), code)
    }
}

pub type CmdResult = Result<u8, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Convert(a) => cmd::convert::run(a),
        Command::Info(a) => cmd::info::run(a),
        Command::Create(a) => cmd::create::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Measure(a) => cmd::measure::run(a),
        Command::Map(a) => cmd::map::run(a),
        Command::Completion(a) => cmd::extras::completion(a),
        Command::Man => cmd::extras::man(),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            let _ = std::io::stdout().flush();
            eprintln!("vimg: {}", human::esc_message(&f.message));
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
