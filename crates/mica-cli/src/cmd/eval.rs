//! `mica eval`: metrics for any predictions CSV, and McNemar's test between two of them.
//!
//! All parsing and scoring lives in `mica-eval` (`PredictionsCsv`, `evaluate`, `mcnemar`), so
//! the web server gives the same numbers; this module only checks paths and prints.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use mica_eval::{mcnemar, EvalOptions, EvalReport, McNemar, PredictionsCsv};

use crate::exit::usage;

#[derive(clap::Args)]
#[command(after_help = "\
Predictions CSV: a header row with `label` (true class) and `prediction` columns, optional \
`prob_<class>` columns with probabilities (they enable ROC AUC and ECE); other columns are \
ignored. The label set is the sorted union of the `label` values and the prob_ classes. A \
prediction outside it is an error; an empty prediction, `refused`, `unparseable` or `failed` means no \
answer and counts as wrong.")]
pub struct EvalArgs {
    /// CSV with columns label,prediction and optional prob_<class> columns.
    pub predictions: PathBuf,
    /// A second predictions file on the same images: McNemar's test between the two.
    #[arg(long)]
    pub versus: Option<PathBuf>,
    /// Print the report(s) as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Bootstrap resamples for the 95 % confidence intervals (0 turns them off).
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// Seed of the bootstrap, for reproducible intervals.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let opts = EvalOptions {
        bootstrap_resamples: args.resamples,
        seed: args.seed,
        ..Default::default()
    };
    let a = read(&args.predictions)?;
    match &args.versus {
        None => {
            let labels = a.label_set()?;
            let report = a.encode(&labels)?.evaluate(&opts)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render_report(&args.predictions, &report));
                println!();
                println!("{DISCLAIMER}");
            }
        }
        Some(b_path) => {
            let b = read(b_path)?;
            let (ea, eb) = PredictionsCsv::paired(&a, &b)?;
            let ra = ea.evaluate(&opts)?;
            let rb = eb.evaluate(&opts)?;
            let m = mcnemar(&ea.y_true, &ea.y_pred, &eb.y_pred)?;
            if args.json {
                let out = serde_json::json!({
                    "a": { "file": args.predictions.display().to_string(), "report": ra },
                    "b": { "file": b_path.display().to_string(), "report": rb },
                    "mcnemar": m,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", render_report(&args.predictions, &ra));
                println!();
                print!("{}", render_report(b_path, &rb));
                println!();
                print!("{}", render_mcnemar(&args.predictions, b_path, &m));
                println!();
                println!("{DISCLAIMER}");
            }
        }
    }
    Ok(())
}

const DISCLAIMER: &str =
    "These are metrics of model predictions for decision support, not diagnoses.";

/// A missing or non-file path is a usage error (exit 2); what is wrong inside the file is a
/// data error (exit 1) with the file and line named by `mica-eval`.
fn read(path: &Path) -> anyhow::Result<PredictionsCsv> {
    if !path.exists() {
        return Err(usage(format!("{}: no such file", path.display())));
    }
    if path.is_dir() {
        return Err(usage(format!(
            "{}: is a folder, expected a predictions CSV file",
            path.display()
        )));
    }
    // The library's errors already name the file (and line), so they go out unwrapped.
    Ok(PredictionsCsv::read(path)?)
}

fn fmt_ci(ci: Option<mica_eval::ConfidenceInterval>, level: f64) -> String {
    match ci {
        Some(c) => format!("   {:.0}% CI {:.4} - {:.4}", level * 100.0, c.lower, c.upper),
        None => String::new(),
    }
}

pub fn render_report(path: &Path, r: &EvalReport) -> String {
    let mut s = String::new();
    let level = r.bootstrap.map(|b| b.level).unwrap_or(0.95);
    let _ = writeln!(s, "{}", path.display());
    let _ = writeln!(
        s,
        "  {} images, {} classes ({}){}",
        r.n,
        r.labels.len(),
        r.labels.join(", "),
        if r.no_answer > 0 {
            format!(", {} without an answer (counted as wrong)", r.no_answer)
        } else {
            String::new()
        }
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "  {:<21}{:.4}{}", "accuracy", r.accuracy, fmt_ci(r.accuracy_ci, level));
    let _ = writeln!(s, "  {:<21}{:.4}", "balanced accuracy", r.balanced_accuracy);
    let _ = writeln!(s, "  {:<21}{:.4}{}", "macro F1", r.macro_f1, fmt_ci(r.macro_f1_ci, level));
    let _ = writeln!(s, "  {:<21}{:.4}", "weighted F1", r.weighted_f1);
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "n/a".into());
    let _ = writeln!(s, "  {:<21}{}", "Cohen's kappa", opt(r.cohen_kappa));
    let _ = writeln!(s, "  {:<21}{}", "ROC AUC (OvR macro)", opt(r.roc_auc_macro));
    let _ = writeln!(s, "  {:<21}{}", format!("ECE ({} bins)", if r.reliability.is_empty() { 15 } else { r.reliability.len() }), opt(r.ece));
    if let Some(b) = r.bootstrap {
        let _ = writeln!(
            s,
            "  (intervals: percentile bootstrap, {} resamples, seed {})",
            b.resamples, b.seed
        );
    }
    let _ = writeln!(s);

    let w = r.labels.iter().map(|l| l.len()).max().unwrap_or(0).max(11);
    let _ = writeln!(s, "  {:<w$}  {:>9}  {:>7}  {:>7}  {:>7}", "class", "precision", "recall", "f1", "support");
    for (label, m) in r.per_class.iter() {
        let _ = writeln!(
            s,
            "  {:<w$}  {:>9.4}  {:>7.4}  {:>7.4}  {:>7}",
            label, m.precision, m.recall, m.f1, m.support
        );
    }
    let _ = writeln!(
        s,
        "  {:<w$}  {:>9.4}  {:>7.4}  {:>7.4}  {:>7}",
        "macro avg", r.macro_precision, r.macro_recall, r.macro_f1, r.n
    );
    let _ = writeln!(s);

    let _ = writeln!(s, "  confusion matrix (rows = true, columns = predicted)");
    let mut cols: Vec<&str> = r.labels.iter().map(|l| l.as_str()).collect();
    let show_none = r.no_answer > 0;
    if show_none {
        cols.push("no answer");
    }
    let widths: Vec<usize> = cols.iter().map(|c| c.len().max(5)).collect();
    let mut head = format!("  {:<w$}", "");
    for (c, cw) in cols.iter().zip(&widths) {
        let _ = write!(head, "  {c:>cw$}");
    }
    let _ = writeln!(s, "{}", head.trim_end());
    for (i, label) in r.labels.iter().enumerate() {
        let mut line = format!("  {label:<w$}");
        for (j, cw) in widths.iter().enumerate() {
            let v = if j < r.labels.len() { r.confusion.matrix[i][j] } else { r.confusion.no_answer[i] };
            let _ = write!(line, "  {v:>cw$}");
        }
        let _ = writeln!(s, "{line}");
    }
    for n in &r.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    s
}

fn render_mcnemar(a: &Path, b: &Path, m: &McNemar) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "McNemar's test: A = {} vs B = {} on {} paired images", a.display(), b.display(), m.n);
    let _ = writeln!(s, "  A right, B wrong   {}", m.b);
    let _ = writeln!(s, "  A wrong, B right   {}", m.c);
    let _ = writeln!(s, "  accuracy A - B     {:+.4}", m.accuracy_difference());
    let method = if m.exact {
        "exact binomial, since fewer than 25 discordant pairs"
    } else {
        "chi-squared with continuity correction"
    };
    let _ = writeln!(s, "  statistic          {:.4} ({method})", m.statistic);
    let p = if m.p_value < 1e-4 { format!("{:.3e}", m.p_value) } else { format!("{:.4}", m.p_value) };
    let _ = writeln!(s, "  p-value            {p}");
    let verdict = if m.p_value < 0.05 {
        "the two differ significantly at the 5% level"
    } else {
        "no significant difference at the 5% level"
    };
    let _ = writeln!(s, "  -> {verdict}");
    s
}
