//! `mica users add`: named users for `mica serve --users FILE`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use mica_server::auth::{self, Role};

use crate::exit::usage;

#[derive(clap::Subcommand, Debug)]
pub enum UsersCommand {
    /// Add a user to a users file (created if missing, readable by its owner only). The secret
    /// is read from standard input (one line), never from the command line, and only its
    /// argon2id hash is written.
    Add(AddArgs),
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The users file (`mica serve --users FILE`).
    pub file: PathBuf,
    /// The user's name, recorded with each of their decisions.
    #[arg(long)]
    pub name: String,
    /// `physician` (records decisions) or `viewer` (reads only).
    #[arg(long, value_parser = |s: &str| s.parse::<Role>())]
    pub role: Role,
}

pub fn run(c: UsersCommand) -> anyhow::Result<()> {
    match c {
        UsersCommand::Add(a) => add(a),
    }
}

fn add(a: AddArgs) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("secret for {} (at least {} characters, shown as typed): ", a.name, auth::MIN_SECRET_CHARS);
        let _ = std::io::stderr().flush();
    }
    let mut secret = String::new();
    stdin.lock().read_line(&mut secret)?;
    let secret = secret.trim_end_matches(['\n', '\r']);
    let existing = match std::fs::read_to_string(&a.file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(usage(format!("{}: {e}", a.file.display()))),
    };
    let text = auth::add_user(&existing, &a.name, a.role, secret).map_err(|e| usage(e.to_string()))?;
    let tmp = a.file.with_extension("toml.tmp");
    {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let mut f = o.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &a.file)?;
    eprintln!("added {} ({}) to {}", a.name, a.role.as_str(), a.file.display());
    Ok(())
}
