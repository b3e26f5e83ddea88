//! `mica runs list|show`: the results store, so results accumulate over time.
use std::path::PathBuf;

use crate::exit::usage;

#[derive(clap::Subcommand, Debug)]
pub enum RunsCommand {
    /// List indexed runs, newest first.
    List {
        /// Results store (default $MICA_STORE or ~/.local/share/mica/runs.sqlite).
        #[arg(long, value_name = "PATH")]
        store: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one run's headline results, by id or name.
    Show {
        id: String,
        #[arg(long, value_name = "PATH")]
        store: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Index a finished run directory (done automatically by `mica compare`).
    Add {
        run_dir: PathBuf,
        #[arg(long, value_name = "PATH")]
        store: Option<PathBuf>,
    },
}

fn store_path(p: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    p.clone()
        .or_else(mica_report::default_store_path)
        .ok_or_else(|| usage("no results store: give --store PATH or set MICA_STORE"))
}

fn pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1} %", x * 100.0)).unwrap_or_else(|| "–".into())
}

fn opt(v: Option<f64>, d: usize) -> String {
    v.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "–".into())
}

pub fn run(cmd: RunsCommand) -> anyhow::Result<()> {
    match cmd {
        RunsCommand::List { store, json } => {
            let path = store_path(&store)?;
            let st = mica_report::Store::open(&path)?;
            let runs = st.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
                return Ok(());
            }
            if runs.is_empty() {
                println!("no runs in {} yet (mica compare indexes every finished run)", path.display());
                return Ok(());
            }
            println!("{:>4}  {:<24} {:>11}  {:<40} {:>9}  {}", "id", "name", "classifiers", "best", "accuracy", "run directory");
            for r in runs {
                println!(
                    "{:>4}  {:<24} {:>11}  {:<40} {:>9}  {}{}",
                    r.id,
                    r.name,
                    r.classifiers,
                    r.best_classifier.unwrap_or_default(),
                    pct(r.best_accuracy),
                    r.run_dir,
                    if r.simulated { "  [SIMULATED]" } else { "" }
                );
            }
            Ok(())
        }
        RunsCommand::Show { id, store, json } => {
            let path = store_path(&store)?;
            let st = mica_report::Store::open(&path)?;
            let run = st
                .find(&id)?
                .ok_or_else(|| usage(format!("no run `{id}` in {} (see mica runs list)", path.display())))?;
            let results = st.results(run.id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({"run": run, "results": results}))?);
                return Ok(());
            }
            println!("run {} `{}`: {}", run.id, run.name, run.run_dir);
            if let Some(d) = &run.dataset {
                println!("dataset: {d}");
            }
            if let Some(h) = &run.split_hash {
                println!("split: {h}");
            }
            if run.simulated {
                println!("SIMULATED: at least one classifier answered from the LLM simulator");
            }
            println!(
                "{:<44} {:>7} {:>9} {:>8} {:>9} {:>10} {:>9} {:>11} {:>9}",
                "classifier", "images", "accuracy", "macro F1", "coverage", "p50 ms", "img/s", "Wh/1k img", "$/1k img"
            );
            for r in results {
                println!(
                    "{:<44} {:>7} {:>9} {:>8.3} {:>9} {:>10} {:>9} {:>11} {:>9}{}",
                    r.classifier,
                    r.images,
                    pct(Some(r.accuracy)),
                    r.macro_f1,
                    pct(r.coverage),
                    opt(r.latency_p50_ms, 1),
                    opt(r.images_per_s, 1),
                    opt(r.wh_per_1000, 4),
                    opt(r.usd_per_1000, 2),
                    if r.simulated { " [SIMULATED]" } else { "" }
                );
            }
            Ok(())
        }
        RunsCommand::Add { run_dir, store } => {
            if !run_dir.is_dir() {
                return Err(usage(format!("{}: run directory not found", run_dir.display())));
            }
            let path = store_path(&store)?;
            let (run, cmp) = mica_report::load(&run_dir)?;
            let mut st = mica_report::Store::open(&path)?;
            let id = st.index(&run, &cmp)?;
            println!("indexed {} as run {id} in {}", run_dir.display(), path.display());
            Ok(())
        }
    }
}
