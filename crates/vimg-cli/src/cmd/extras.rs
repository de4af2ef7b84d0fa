//! Shell completions and the man page, generated from the clap definitions so they never
//! drift from the real flags. Install with:
//!   vimg completion bash > /usr/share/bash-completion/completions/vimg
//!   vimg man --dir /usr/local/share/man/man1   (vimg.1 and vimg-<subcommand>.1)

use clap::CommandFactory;

use crate::args::{Cli, CompletionArgs, ManArgs};
use crate::{CmdResult, Failure};

pub fn completion(a: CompletionArgs) -> CmdResult {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "vimg", &mut out);
    crate::print_out(&String::from_utf8_lossy(&out))?;
    Ok(0)
}

/// `vimg man`: the top page; `vimg man convert`: a subcommand's page (every flag);
/// `vimg man --dir DIR`: all of them as files, named as the top page's SEE ALSO names them.
pub fn man(a: ManArgs) -> CmdResult {
    let cmd = Cli::command();
    if let Some(dir) = &a.dir {
        std::fs::create_dir_all(dir)
            .and_then(|_| clap_mangen::generate_to(cmd, dir))
            .map_err(|e| Failure::new(format!("write man pages to '{}': {e}", dir.display()), 1))?;
        return Ok(0);
    }
    let page = match &a.subcommand {
        None => cmd,
        Some(name) => {
            let mut cmd = cmd;
            cmd.build();
            let sub = cmd
                .find_subcommand(name)
                .ok_or_else(|| Failure::new(format!("Command not found: {name}"), 1))?
                .clone();
            // Built, the subcommand is displayed as `vimg-NAME`, as generate_to names it.
            sub
        }
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(|e| Failure::new(format!("render man page: {e}"), 1))?;
    crate::print_out(&String::from_utf8_lossy(&out))?;
    Ok(0)
}
