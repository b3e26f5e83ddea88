//! `mica audit verify|export`: the web app's audit trail (cases, suggestions, physicians'
//! decisions) as recorded in the results store. Both open the store read-only: checking must
//! not repair, migrate or re-protect what it is meant to check.
use std::path::PathBuf;

use anyhow::Context;
use mica_report::cases::{audit, ChainReport};

use crate::exit::usage;

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Walk the hash chain over cases, suggestions and decisions; exit 1 naming the first row
    /// that does not hold, or if an append-only trigger is missing.
    Verify {
        /// Results store, as given to `mica serve` [default: $MICA_STORE or
        /// ~/.local/share/mica/runs.sqlite].
        #[arg(long, value_name = "PATH")]
        store: Option<PathBuf>,
        /// A head hash printed by an earlier verify: fail if no row carries it any more (the
        /// newest rows were removed).
        #[arg(long, value_name = "SHA256")]
        expect_head: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write every decision with its case, the suggestions shown, the user and the hashes.
    Export {
        #[arg(long, value_name = "PATH")]
        store: Option<PathBuf>,
        #[arg(long, value_parser = ["csv", "json"])]
        format: String,
        /// Write here instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// The same store `mica serve` uses by default.
fn store_path(p: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let p = p
        .clone()
        .or_else(mica_report::default_store_path)
        .ok_or_else(|| usage("no results store: give --store PATH or set MICA_STORE"))?;
    if !p.is_file() {
        return Err(usage(format!("{}: no such results store", p.display())));
    }
    Ok(p)
}

fn print_report(r: &ChainReport) {
    let counts = format!(
        "{} rows ({} cases, {} suggestions, {} decisions)",
        r.rows, r.cases, r.predictions, r.decisions
    );
    match &r.broken {
        None => println!("chain: {counts}, intact; head {} {}", r.head_seq, r.head_sha256),
        Some(b) => {
            println!(
                "chain BROKEN at {} {} (chain_seq {}): {}",
                b.table,
                b.row,
                b.chain_seq.map(|s| s.to_string()).unwrap_or_else(|| "none".into()),
                b.problem
            );
            println!("  expected: {}", b.expected);
            println!("  found:    {}", b.found);
            println!(
                "  ({counts} in the store; the chain holds up to chain_seq {})",
                r.head_seq
            );
        }
    }
    if let Some(started) = r.chain_started_unix {
        println!("chain started at unix time {started}");
    }
    if r.chained_at_migration > 0 {
        println!(
            "note: the first {} rows existed before this store had a hash chain and were chained when it was migrated: they were not protected when written",
            r.chained_at_migration
        );
    }
    if !r.missing_triggers.is_empty() {
        println!(
            "append-only triggers MISSING: {} (something with write access dropped them)",
            r.missing_triggers.join(", ")
        );
    }
    if let Some(h) = &r.expected_head_missing {
        println!("expected head {h} is not in the chain: rows were removed from its end, or this is another store");
    }
}

pub fn run(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Verify {
            store,
            expect_head,
            json,
        } => {
            let path = store_path(&store)?;
            let st = mica_report::Store::open_read_only(&path)?;
            let r = st.verify_chain(expect_head.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_report(&r);
            }
            if r.ok {
                if !json {
                    println!("OK");
                }
                Ok(())
            } else {
                Err(anyhow::anyhow!("the audit trail in {} does not verify", path.display()))
            }
        }
        AuditCommand::Export { store, format, out } => {
            let path = store_path(&store)?;
            let st = mica_report::Store::open_read_only(&path)?;
            let report = st.verify_chain(None)?;
            if !report.ok {
                eprintln!(
                    "warning: the audit trail in {} does not verify (run `mica audit verify`); exporting it as it is",
                    path.display()
                );
            }
            let entries = st.audit_entries()?;
            let mut buf = Vec::new();
            if format == "csv" {
                audit::write_csv(&entries, &mut buf)?;
            } else {
                let doc = serde_json::json!({
                    "store": path.display().to_string(),
                    "chain": report,
                    "decisions": entries,
                });
                serde_json::to_writer_pretty(&mut buf, &doc)?;
                buf.push(b'\n');
            }
            match out {
                Some(f) => {
                    std::fs::write(&f, &buf).with_context(|| format!("cannot write {}", f.display()))?;
                    eprintln!("wrote {} decision(s) to {}", entries.len(), f.display());
                }
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(&buf)?;
                }
            }
            Ok(())
        }
    }
}
