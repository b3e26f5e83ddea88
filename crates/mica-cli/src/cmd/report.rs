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
    /// API budget in USD per 1,000 images: the "Cost of a pilot" section then prices the most
    /// accurate cascade threshold within it (by default, the cheapest that reaches the LLM's
    /// accuracy).
    #[arg(long, value_name = "USD_PER_1000")]
    pub budget: Option<f64>,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let format: mica_report::Format = args.format.parse().map_err(usage)?;
    if !args.run_dir.is_dir() {
        return Err(usage(format!("{}: run directory not found", args.run_dir.display())));
    }
    if let Some(b) = args.budget {
        if !(b.is_finite() && b >= 0.0) {
            return Err(usage(format!("--budget {b}: expected USD per 1,000 images, 0 or more")));
        }
    }
    let options = mica_report::pilot::PilotOptions { budget_usd_per_1000: args.budget };
    let (run, cmp) = mica_report::load_with(&args.run_dir, options)?;
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
