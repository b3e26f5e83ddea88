//! `mica report`: render a run directory (merging shards first) as md, html, json or csv.
use std::path::PathBuf;

use crate::exit::usage;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    pub run_dir: PathBuf,
    /// md, html, json or csv.
    #[arg(long, default_value = "html")]
    pub format: String,
    /// Also index the run in the results store at this path.
    #[arg(long, value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// Print the headline table.
    #[arg(long)]
    pub table: bool,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let format: mica_report::Format = args.format.parse().map_err(usage)?;
    if !args.run_dir.is_dir() {
        return Err(usage(format!("{}: run directory not found", args.run_dir.display())));
    }
    let (run, cmp) = mica_report::load(&args.run_dir)?;
    let path = mica_report::render::write_report(&run, &cmp, format)?;
    if let Some(store) = &args.store {
        let mut st = mica_report::Store::open(store)?;
        let id = st.index(&run, &cmp)?;
        eprintln!("indexed as run {id} in {}", store.display());
    }
    if args.table {
        print!("{}", mica_report::headline_text(&cmp));
    }
    for s in &cmp.skipped {
        eprintln!("note: left out: {s}");
    }
    println!("{}", path.display());
    Ok(())
}
