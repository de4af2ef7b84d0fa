//! Shell completions and the man page, generated from the clap definitions so they never
//! drift from the real flags. Install with:
//!   vimg completion bash > /usr/share/bash-completion/completions/vimg
//!   vimg man > /usr/local/share/man/man1/vimg.1

use clap::CommandFactory;

use crate::args::{Cli, CompletionArgs};
use crate::{CmdResult, Failure};

pub fn completion(a: CompletionArgs) -> CmdResult {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "vimg", &mut out);
    crate::print_out(&String::from_utf8_lossy(&out))?;
    Ok(0)
}

pub fn man() -> CmdResult {
    let cmd = Cli::command();
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut out)
        .map_err(|e| Failure::new(format!("render man page: {e}"), 1))?;
    crate::print_out(&String::from_utf8_lossy(&out))?;
    Ok(0)
}
