//! Cross-check against scikit-learn, statsmodels, scipy and plain numpy, over a randomized but
//! seeded sweep of a few hundred cases.
//!
//! When `python3` with `venv` is available, a virtual environment is created once under
//! cargo's target tmp dir (reused afterwards; packages missing from an older one are added)
//! with `pip install scikit-learn numpy scipy statsmodels`; the inputs generated here are
//! scored by both sides and must agree to 1e-9. Without Python or network the test prints
//! SKIPPED and passes, unless `MICA_REQUIRE_SKLEARN=1` (set that in CI so a broken environment
//! cannot pass silently).
//!
//! What each number is compared with:
//! - classification metrics, confusion matrix, ROC AUC: scikit-learn;
//! - McNemar: statsmodels' `mcnemar(table, exact=b+c<25, correction=True)`, mica's rule;
//! - Holm: statsmodels' `multipletests(p, method="holm")`;
//! - ECE and AURC: an independent numpy implementation in the script (scikit-learn has
//!   neither); Brier: numpy and `sklearn.metrics.brier_score_loss` (multi-class with
//!   `scale_by_half=False`, and binary for the confidence-only kind);
//! - bootstrap intervals: the exact resample indices mica draws ([`stratified_resamples`]) go
//!   to Python, which recomputes every statistic on every resample with scikit-learn, applies
//!   mica's skip rule (undefined kappa/AUC dropped; no interval with fewer than half of the
//!   resamples defined) and takes `np.quantile(..., method="linear")` at `a = (1-level)/2` and
//!   `1-a`. scipy's own `bootstrap` draws its resamples from its generator, which cannot be
//!   made to produce stratified ChaCha8 draws, so it is handed mica's indices through a
//!   `numpy.random.Generator` subclass whose `integers` returns them; with
//!   `method="percentile"` its interval for accuracy and macro F1 must then equal mica's too.
//!   This checks the interval rule and the statistics, not the randomness of the draws, which
//!   the unit tests of `stratified_resamples` cover (class counts, within-class uniformity,
//!   seeding);
//! - run-level coverage and accepted-accuracy intervals: numpy on the same resamples;
//! - latency percentiles: numpy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mica_core::{LabelSet, Outcome, Prediction};
use mica_eval::{
    evaluate, evaluate_with, holm, latency_summary, mcnemar, stratified_resamples, ConfidenceInterval, EvalOptions,
    RunMetrics, NO_ANSWER,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const TOL: f64 = 1e-9;

/// Number of random cases in the sweep (plus a few fixed edge cases).
const SWEEP: usize = 400;

/// Packages the reference script imports; recorded in the venv's marker file so an older venv
/// (scikit-learn and numpy only) is topped up instead of trusted.
const PACKAGES: [&str; 4] = ["scikit-learn", "numpy", "scipy", "statsmodels"];

const SCRIPT: &str = r#"
import gc, json, math, multiprocessing, os, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np
import scipy, sklearn, statsmodels
from scipy.stats import bootstrap, rankdata
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, brier_score_loss,
                             cohen_kappa_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, precision_score, recall_score,
                             roc_auc_score)
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

# Speed only: the inputs are finite and well-formed.
sklearn.set_config(assume_finite=True, skip_parameter_validation=True)

def clean(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x

def present_labels(yt, yp):
    return sorted((set(yt.tolist()) | set(yp.tolist())) - {-1})

def auc_sklearn(yt, pr, k):
    try:
        if k == 2:
            return clean(roc_auc_score(yt, pr[:, 1]))
        return clean(roc_auc_score(yt, pr, multi_class="ovr", average="macro", labels=list(range(k))))
    except ValueError:
        return None

# numpy twins of the scikit-learn metrics, fast enough for every bootstrap resample; they are
# checked against scikit-learn on the first resamples of every case (see "resample_check").
def stats_numpy(t, q, k):
    cm = np.bincount(t * (k + 1) + np.where(q < 0, k, q), minlength=k * (k + 1)).reshape(k, k + 1)
    support = cm.sum(axis=1)
    predicted = cm[:, :k].sum(axis=0)
    tp = np.diag(cm[:, :k])
    n = support.sum()
    denom = predicted + support
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    present = (support > 0) | (predicted > 0)
    cols = np.append(predicted, cm[:, k].sum()).astype(float)
    off = 1 - np.eye(k + 1)[:k]
    expected = (off * np.outer(support, cols) / n).sum()
    kappa = None if expected == 0 else float(1 - (off * cm).sum() / expected)
    return {"accuracy": tp.sum() / n, "macro_f1": f1[present].mean(),
            "weighted_f1": (f1 * support).sum() / n, "kappa": kappa}

def stats_sklearn(t, q):
    pres = present_labels(t, q)
    return {"accuracy": accuracy_score(t, q),
            "macro_f1": f1_score(t, q, labels=pres, average="macro"),
            "weighted_f1": f1_score(t, q, labels=pres, average="weighted"),
            "kappa": clean(cohen_kappa_score(t, q))}

def auc_numpy(t, pr, k):
    # Mann-Whitney form with average ranks for ties.
    vals = []
    for c in ([1] if k == 2 else range(k)):
        pos = t == c
        npos = pos.sum(); nneg = len(t) - npos
        if npos == 0 or nneg == 0:
            return None
        r = rankdata(pr[:, c])
        vals.append((r[pos].sum() - npos * (npos + 1) / 2) / (npos * nneg))
    return float(np.mean(vals))

def ece_numpy(conf, correct, bins):
    # Bin b holds (b/bins, (b+1)/bins]; 0 goes to the first bin.
    uppers = np.array([(b + 1) / bins for b in range(bins)])
    idx = np.minimum(np.searchsorted(uppers, conf, side="left"), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() / len(conf) * abs(correct[m].mean() - conf[m].mean())
    return total

def aurc_numpy(conf, correct):
    # Mean over m of the expected error rate among the m most confident cases, with the
    # errors of a run of equal confidences spread evenly over the run.
    n = len(conf)
    wrong = ~correct
    s = np.sort(conf)[::-1]
    total = 0.0
    for m in range(1, n + 1):
        c = s[m - 1]
        above = conf > c
        tied = conf == c
        expected = wrong[above].sum() + (m - above.sum()) * wrong[tied].sum() / tied.sum()
        total += expected / m
    return total / n

def interval(values, attempted, level):
    if len(values) == 0 or 2 * len(values) < attempted:
        return None
    a = (1 - level) / 2
    lo, hi = np.quantile(np.array(values, dtype=float), [a, 1 - a], method="linear")
    return [float(lo), float(hi)]

class Replay(np.random.Generator):
    """Hands scipy.stats.bootstrap mica's resample indices instead of drawing its own."""
    def __init__(self, rows):
        super().__init__(np.random.PCG64(0))
        self.rows = rows
        self.pos = 0
    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        out = self.rows[self.pos:self.pos + size[0]]
        self.pos += size[0]
        assert out.shape == tuple(size), (out.shape, size)
        return out

def scipy_interval(rows, statistic, level, vectorized):
    n = rows.shape[1]
    res = bootstrap((np.arange(n),), statistic, n_resamples=rows.shape[0], rng=Replay(rows),
                    method="percentile", confidence_level=level, vectorized=vectorized)
    ci = res.confidence_interval
    return [float(ci.low), float(ci.high)]

def score(c):
    k = c["k"]
    yt = np.array(c["y_true"]); yp = np.array(c["y_pred"])
    labels = list(range(k))
    present = present_labels(yt, yp)
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=labels, zero_division="warn")
    res = {
        "accuracy": accuracy_score(yt, yp),
        "balanced_accuracy": balanced_accuracy_score(yt, yp),
        "precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": s.tolist(),
        "macro_f1": f1_score(yt, yp, labels=present, average="macro"),
        "macro_precision": precision_score(yt, yp, labels=present, average="macro"),
        "macro_recall": recall_score(yt, yp, labels=present, average="macro"),
        "weighted_f1": f1_score(yt, yp, labels=present, average="weighted"),
        "kappa": clean(cohen_kappa_score(yt, yp)),
        "confusion": confusion_matrix(yt, yp, labels=labels + [-1]).tolist(),
    }
    if -1 not in yp.tolist():
        # Without "no answer" the rule above is exactly scikit-learn's default.
        res["macro_f1_default"] = f1_score(yt, yp, average="macro")
    pr = np.array(c["probs"]) if c["probs"] is not None else None
    if pr is not None:
        res["auc"] = auc_sklearn(yt, pr, k)

    # Calibration over the answered cases.
    ans = yp != -1
    conf = None
    if pr is not None:
        conf = pr.max(axis=1)
    elif c["conf"] is not None:
        conf = np.array([np.nan if v is None else v for v in c["conf"]], dtype=float)
    if conf is not None and ans.any():
        cf = conf[ans]; ok = (yp == yt)[ans]
        res["ece"] = ece_numpy(cf, ok, c["bins"])
        res["aurc"] = aurc_numpy(cf, ok)
        if pr is not None:
            onehot = np.eye(k)[yt[ans]]
            res["brier"] = float(np.mean(np.sum((pr[ans] - onehot) ** 2, axis=1)))
            res["brier_kind"] = "multiclass"
            try:
                res["brier_sklearn"] = float(brier_score_loss(yt[ans], pr[ans], labels=labels, scale_by_half=False))
            except ValueError:
                res["brier_sklearn"] = None
        else:
            res["brier"] = float(np.mean((cf - ok.astype(float)) ** 2))
            res["brier_kind"] = "confidence"
            try:
                res["brier_sklearn"] = float(brier_score_loss(ok.astype(int), cf, pos_label=1))
            except ValueError:
                res["brier_sklearn"] = None

    pb = np.array(c["pred_b"])
    a_ok = yp == yt; b_ok = pb == yt
    table = [[int(np.sum(a_ok & b_ok)), int(np.sum(a_ok & ~b_ok))],
             [int(np.sum(~a_ok & b_ok)), int(np.sum(~a_ok & ~b_ok))]]
    b, cc = table[0][1], table[1][0]
    m = mcnemar(table, exact=(b + cc < 25), correction=True)
    res["mcnemar"] = {"b": b, "c": cc, "statistic": float(m.statistic), "p_value": float(m.pvalue)}
    res["holm"] = multipletests(np.array(c["p_values"]), method="holm")[1].tolist()
    lat = np.array(c["latency"])
    res["latency"] = {"mean": lat.mean(), "p50": np.percentile(lat, 50), "p90": np.percentile(lat, 90),
                      "p99": np.percentile(lat, 99), "min": lat.min(), "max": lat.max()}

    bs = c["boot"]
    if bs is not None:
        rows = np.array(bs["resamples"], dtype=np.int64).reshape(len(bs["resamples"]), len(yt))
        B, level = rows.shape[0], bs["level"]
        auc_defined = pr is not None and res.get("auc") is not None
        vals = {"accuracy": [], "macro_f1": [], "weighted_f1": [], "kappa": [], "auc": []}
        check = {"compared": 0, "max_diff": 0.0, "undefined_mismatch": 0}
        for j, ix in enumerate(rows):
            t, q = yt[ix], yp[ix]
            st = stats_numpy(t, q, k)
            if auc_defined:
                st["auc"] = auc_numpy(t, pr[ix], k)
            if j < 3:
                ref = stats_sklearn(t, q)
                if auc_defined:
                    ref["auc"] = auc_sklearn(t, pr[ix], k)
                for key, v in ref.items():
                    check["compared"] += 1
                    if (v is None) != (st[key] is None):
                        check["undefined_mismatch"] += 1
                    elif v is not None:
                        check["max_diff"] = max(check["max_diff"], abs(v - st[key]))
            for key, v in st.items():
                if v is not None:
                    vals[key].append(v)
        res["ci"] = {key: interval(v, B, level) for key, v in vals.items()}
        if not auc_defined:
            res["ci"]["auc"] = None
        res["kappa_skipped"] = B - len(vals["kappa"])
        res["resample_check"] = check
        if len(yt) >= 2:
            right = (yt == yp).astype(float)
            res["scipy_ci"] = {
                "accuracy": scipy_interval(rows, lambda i, axis=-1: right[i].mean(axis=axis), level, True),
                "macro_f1": scipy_interval(rows, lambda i: stats_numpy(yt[i], yp[i], k)["macro_f1"], level, False),
            }
        accepted = np.array(bs["accepted"], dtype=bool)
        cov, aacc = [], []
        for ix in rows:
            a = accepted[ix]
            cov.append(a.mean())
            if a.any():
                aacc.append((yt[ix] == yp[ix])[a].mean())
        res["run_ci"] = {"coverage": interval(cov, B, level), "accepted_accuracy": interval(aacc, B, level)}
    return res

if __name__ == "__main__":
    cases = json.load(open(sys.argv[1]))
    # statsmodels' Holm runs gc.collect() on every call; frozen objects make that cheap.
    gc.freeze()
    workers = min(len(os.sched_getaffinity(0)), 8)
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            out = pool.map(score, cases, chunksize=4)
    else:
        out = [score(c) for c in cases]
    json.dump({"versions": {"scikit-learn": sklearn.__version__, "scipy": scipy.__version__,
                            "statsmodels": statsmodels.__version__, "numpy": np.__version__},
               "results": out}, open(sys.argv[2], "w"))
"#;

struct Boot {
    resamples: usize,
    seed: u64,
    level: f64,
    /// Outcome of each case for the run-level intervals (no answer: unparseable, refused or
    /// failed; otherwise answered or deferred).
    outcomes: Vec<Outcome>,
}

struct Case {
    name: String,
    k: usize,
    y_true: Vec<usize>,
    y_pred: Vec<usize>,
    pred_b: Vec<usize>,
    probs: Option<Vec<Vec<f64>>>,
    /// Stated confidences (used only without `probs`); NaN for cases without an answer.
    conf: Option<Vec<f64>>,
    bins: usize,
    latency: Vec<f64>,
    p_values: Vec<f64>,
    boot: Option<Boot>,
}

/// A noisy classifier: right with probability `skill`, else a random class (or no answer).
fn predict(rng: &mut ChaCha8Rng, y_true: &[usize], k: usize, skill: f64, no_answer: f64, never: Option<usize>) -> Vec<usize> {
    y_true
        .iter()
        .map(|&t| {
            if rng.random_bool(no_answer) {
                return NO_ANSWER;
            }
            let mut p = if rng.random_bool(skill) { t } else { rng.random_range(0..k) };
            if Some(p) == never {
                p = (p + 1) % k;
            }
            p
        })
        .collect()
}

fn probs_for(rng: &mut ChaCha8Rng, y_true: &[usize], k: usize, round: bool) -> Vec<Vec<f64>> {
    y_true
        .iter()
        .map(|&t| {
            let mut v: Vec<f64> = (0..k).map(|j| rng.random::<f64>() + if j == t { 0.6 } else { 0.0 }).collect();
            let s: f64 = v.iter().sum();
            v.iter_mut().for_each(|x| *x /= s);
            if round {
                // Coarse values make ties, which the AUC must count as halves.
                v.iter_mut().for_each(|x| *x = (*x * 10.0).round() / 10.0);
                let s: f64 = v.iter().sum();
                if s > 0.0 {
                    v.iter_mut().for_each(|x| *x /= s);
                }
            }
            v
        })
        .collect()
}

/// Stated confidences with ties, exact bin edges, 0 and 1 mixed in.
fn confidences(rng: &mut ChaCha8Rng, y_pred: &[usize], bins: usize) -> Vec<f64> {
    let coarse = rng.random_bool(0.5);
    y_pred
        .iter()
        .map(|&p| {
            if p == NO_ANSWER {
                return f64::NAN;
            }
            match rng.random_range(0..10) {
                0 => rng.random_range(0..=bins) as f64 / bins as f64,
                1 => [0.0, 1.0][rng.random_range(0..2)],
                _ if coarse => (rng.random::<f64>() * 10.0).round() / 10.0,
                _ => rng.random::<f64>(),
            }
        })
        .collect()
}

fn p_values(rng: &mut ChaCha8Rng) -> Vec<f64> {
    let m = rng.random_range(1..=8);
    let mut v: Vec<f64> = Vec::with_capacity(m);
    for _ in 0..m {
        let x = match rng.random_range(0..10) {
            0 if !v.is_empty() => v[rng.random_range(0..v.len())],
            1 => 0.0,
            2 => 1.0,
            3 => rng.random::<f64>() * 1e-4,
            _ => rng.random::<f64>(),
        };
        v.push(x);
    }
    v
}

fn random_case(rng: &mut ChaCha8Rng, idx: usize) -> Case {
    let k = rng.random_range(2..=6);
    let n = match rng.random_range(0..20) {
        0..=4 => rng.random_range(1..=5),
        5..=14 => rng.random_range(6..=60),
        15..=18 => rng.random_range(61..=300),
        _ => rng.random_range(500..=1500),
    };
    let truth_mode = rng.random_range(0..10);
    let absent = rng.random_range(0..k);
    let weights: Vec<f64> = (0..k).map(|_| rng.random::<f64>().powi(2) + 0.02).collect();
    let (y_true, truth_kind): (Vec<usize>, &str) = match truth_mode {
        0 => (vec![absent; n], "one class"),
        1 | 2 => (
            (0..n)
                .map(|_| loop {
                    let t = rng.random_range(0..k);
                    if t != absent {
                        break t;
                    }
                })
                .collect(),
            "a class absent",
        ),
        3 | 4 => {
            let total: f64 = weights.iter().sum();
            let draw = |rng: &mut ChaCha8Rng| {
                let mut u = rng.random::<f64>() * total;
                for (j, w) in weights.iter().enumerate() {
                    if u < *w {
                        return j;
                    }
                    u -= w;
                }
                k - 1
            };
            ((0..n).map(|_| draw(rng)).collect(), "skewed")
        }
        _ => ((0..n).map(|_| rng.random_range(0..k)).collect(), "uniform"),
    };
    let no_answer = if rng.random_bool(0.3) { rng.random_range(0.05..0.3) } else { 0.0 };
    let skill: f64 = rng.random_range(0.2..0.95);
    let skill_b = (skill + rng.random_range(-0.2..0.2f64)).clamp(0.05, 0.99);
    let never = rng.random_range(0..k);
    let (y_pred, pred_kind): (Vec<usize>, &str) = match rng.random_range(0..10) {
        0 => (vec![rng.random_range(0..k); n], "all the same"),
        1 if rng.random_bool(0.3) => (vec![NO_ANSWER; n], "all without an answer"),
        2 | 3 => (predict(rng, &y_true, k, skill, no_answer, Some(never)), "never one class"),
        _ => (predict(rng, &y_true, k, skill, no_answer, None), "noisy"),
    };
    let pred_b = predict(rng, &y_true, k, skill_b, no_answer, None);
    let bins = [5, 10, 15, 20][rng.random_range(0..4)];
    let (probs, conf, score_kind) = match rng.random_range(0..10) {
        0..=5 => {
            let ties = rng.random_bool(0.35);
            (Some(probs_for(rng, &y_true, k, ties)), None, if ties { "tied probabilities" } else { "probabilities" })
        }
        6..=8 => (None, Some(confidences(rng, &y_pred, bins)), "confidences"),
        _ => (None, None, "no scores"),
    };
    let latency = (0..n).map(|_| rng.random_range(5.0..500.0)).collect();
    let p_values = p_values(rng);
    let boot = (idx.is_multiple_of(4) && n <= 300).then(|| {
        let outcomes = y_pred
            .iter()
            .map(|&p| {
                if p == NO_ANSWER {
                    [Outcome::Unparseable, Outcome::Refused, Outcome::Failed][rng.random_range(0..3)]
                } else if rng.random_bool(0.7) {
                    Outcome::Answered
                } else {
                    Outcome::Deferred
                }
            })
            .collect();
        Boot {
            resamples: rng.random_range(20..=50),
            seed: rng.random(),
            level: [0.8, 0.9, 0.95, 0.99][rng.random_range(0..4)],
            outcomes,
        }
    });
    Case {
        name: format!("case {idx} (k={k}, n={n}, truth {truth_kind}, predictions {pred_kind}, {score_kind})"),
        k,
        y_true,
        y_pred,
        pred_b,
        probs,
        conf,
        bins,
        latency,
        p_values,
        boot,
    }
}

fn cases() -> Vec<Case> {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let mut out: Vec<Case> = (0..SWEEP).map(|i| random_case(&mut rng, i)).collect();
    // Fixed edge cases the sweep is not guaranteed to draw.
    let fixed = |name: &str, k, y_true: Vec<usize>, y_pred: Vec<usize>, pred_b: Vec<usize>| Case {
        name: name.to_string(),
        k,
        latency: (0..y_true.len()).map(|i| i as f64 + 1.0).collect(),
        y_true,
        y_pred,
        pred_b,
        probs: None,
        conf: None,
        bins: 15,
        p_values: vec![0.01, 0.04, 0.03, 0.005],
        boot: None,
    };
    out.push(fixed("single class, all right", 3, vec![1; 5], vec![1; 5], vec![1, 1, 0, 1, 1]));
    out.push(fixed("one case", 4, vec![2], vec![2], vec![NO_ANSWER]));
    let mut c = fixed("one class with a rare miss, bootstrapped", 3, vec![0; 12], vec![0; 12], vec![0; 12]);
    c.y_pred[5] = 2;
    c.conf = Some((0..12).map(|i| (i % 4) as f64 / 4.0).collect());
    c.boot = Some(Boot { resamples: 200, seed: 11, level: 0.95, outcomes: vec![Outcome::Answered; 12] });
    out.push(c);
    out
}

fn skip(why: &str) {
    if std::env::var("MICA_REQUIRE_SKLEARN").is_ok_and(|v| v == "1") {
        panic!("scikit-learn cross-check required (MICA_REQUIRE_SKLEARN=1) but unavailable: {why}");
    }
    eprintln!("SKIPPED scikit-learn cross-check: {why}");
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        ))
    }
}

/// The venv's python, creating the venv on first use. A marker file lists the packages of a
/// finished install, so an interrupted install is redone rather than trusted, and a venv made
/// for fewer packages is topped up in place.
fn sklearn_python() -> Result<PathBuf, String> {
    let dir = std::env::var_os("MICA_SKLEARN_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("sklearn-venv"));
    let python = dir.join("bin").join("python");
    let marker = dir.join(".mica-installed");
    let wanted = PACKAGES.join(" ");
    if python.exists() && std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == wanted) {
        return Ok(python);
    }
    if !python.exists() {
        let base = std::env::var("MICA_PYTHON").unwrap_or_else(|_| "python3".into());
        Command::new(&base)
            .arg("--version")
            .output()
            .map_err(|e| format!("no `{base}` on PATH ({e})"))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        run(Command::new(&base).args(["-m", "venv"]).arg(&dir))
            .map_err(|e| format!("cannot create a venv (python3-venv missing?): {e}"))?;
    }
    let _ = std::fs::remove_file(&marker);
    eprintln!("installing {wanted} into {} (once)", dir.display());
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--timeout", "60", "--retries", "2"])
        .args(PACKAGES))
    .map_err(|e| format!("pip install {wanted} failed (no network?): {e}"))?;
    std::fs::write(&marker, &wanted).map_err(|e| e.to_string())?;
    Ok(python)
}

fn check(errors: &mut Vec<String>, case: &str, what: &str, ours: Option<f64>, theirs: Option<f64>) {
    let ok = match (ours, theirs) {
        (Some(a), Some(b)) => (a - b).abs() <= TOL,
        (None, None) => true,
        _ => false,
    };
    if !ok {
        errors.push(format!("{case}: {what}: mica {ours:?} vs reference {theirs:?}"));
    }
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn enc(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| if x == NO_ANSWER { -1 } else { x as i64 }).collect()
}

fn predictions(c: &Case, b: &Boot) -> Vec<Prediction> {
    (0..c.y_true.len())
        .map(|i| {
            let mut p = Prediction::new(i.to_string(), "sweep", b.outcomes[i]);
            p.true_label = Some(format!("c{}", c.y_true[i]));
            if c.y_pred[i] != NO_ANSWER {
                p.predicted = Some(format!("c{}", c.y_pred[i]));
                p.confidence = c.conf.as_ref().map(|v| v[i]);
            }
            p.probabilities = c.probs.as_ref().map(|rows| {
                rows[i].iter().enumerate().map(|(j, &v)| (format!("c{j}"), v)).collect::<BTreeMap<_, _>>()
            });
            p.latency_ms = c.latency[i];
            p
        })
        .collect()
}

#[derive(Default)]
struct Tally {
    values: usize,
    boot_cases: usize,
    scipy_cases: usize,
    kappa_skips: usize,
    brier_sklearn: usize,
    resample_checks: usize,
}

#[test]
fn metrics_equal_scikit_learn() {
    let python = match sklearn_python() {
        Ok(p) => p,
        Err(why) => return skip(&why),
    };
    let cases = cases();
    let resamples: Vec<Option<Vec<Vec<usize>>>> = cases
        .iter()
        .map(|c| c.boot.as_ref().map(|b| stratified_resamples(&c.y_true, c.k, b.resamples, b.seed)))
        .collect();
    let input: Vec<Value> = cases
        .iter()
        .zip(&resamples)
        .map(|(c, rs)| {
            let conf: Option<Vec<Option<f64>>> =
                c.conf.as_ref().map(|v| v.iter().map(|&x| (!x.is_nan()).then_some(x)).collect());
            let boot = c.boot.as_ref().map(|b| {
                json!({"resamples": rs.as_ref().unwrap(), "level": b.level,
                       "accepted": b.outcomes.iter().map(|&o| o == Outcome::Answered).collect::<Vec<_>>()})
            });
            json!({"k": c.k, "y_true": enc(&c.y_true), "y_pred": enc(&c.y_pred), "pred_b": enc(&c.pred_b),
                   "probs": c.probs, "conf": conf, "bins": c.bins, "latency": c.latency,
                   "p_values": c.p_values, "boot": boot})
        })
        .collect();
    // MICA_SKLEARN_DUMP=<dir> keeps the script and its input and output there, for debugging.
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("MICA_SKLEARN_DUMP").map(PathBuf::from).unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let (inp, outp, script) = (dir.join("in.json"), dir.join("out.json"), dir.join("check.py"));
    std::fs::write(&inp, serde_json::to_vec(&input).unwrap()).unwrap();
    std::fs::write(&script, SCRIPT).unwrap();
    if let Err(e) = run(Command::new(&python).arg(&script).arg(&inp).arg(&outp)) {
        return skip(&format!("reference script failed: {e}"));
    }
    let out: Value = serde_json::from_slice(&std::fs::read(&outp).unwrap()).unwrap();
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), cases.len());

    let mut errors = Vec::new();
    // Mismatches that are not a number against a number.
    let mut other_errors = Vec::new();
    let mut tally = Tally::default();
    for (c, r) in cases.iter().zip(results) {
        let labels = LabelSet::new((0..c.k).map(|i| format!("c{i}")).collect()).unwrap();
        let opts = match &c.boot {
            Some(b) => EvalOptions { bootstrap_resamples: b.resamples, seed: b.seed, confidence_level: b.level, ece_bins: c.bins, ..Default::default() },
            None => EvalOptions { bootstrap_resamples: 0, ece_bins: c.bins, ..Default::default() },
        };
        let rep = if c.probs.is_some() {
            evaluate(&labels, &c.y_true, &c.y_pred, c.probs.as_deref(), &opts).unwrap()
        } else {
            evaluate_with(&labels, &c.y_true, &c.y_pred, None, c.conf.as_deref(), &opts).unwrap()
        };
        let n = &c.name;
        let mut chk = |what: &str, ours: Option<f64>, theirs: Option<f64>| {
            tally.values += 1;
            check(&mut errors, n, what, ours, theirs)
        };
        chk("accuracy", Some(rep.accuracy), f(&r["accuracy"]));
        chk("balanced_accuracy", Some(rep.balanced_accuracy), f(&r["balanced_accuracy"]));
        chk("macro_f1", Some(rep.macro_f1), f(&r["macro_f1"]));
        if !r["macro_f1_default"].is_null() {
            chk("macro_f1 (sklearn default labels)", Some(rep.macro_f1), f(&r["macro_f1_default"]));
        }
        chk("macro_precision", Some(rep.macro_precision), f(&r["macro_precision"]));
        chk("macro_recall", Some(rep.macro_recall), f(&r["macro_recall"]));
        chk("weighted_f1", Some(rep.weighted_f1), f(&r["weighted_f1"]));
        chk("cohen_kappa", rep.cohen_kappa, f(&r["kappa"]));
        for (i, (_, m)) in rep.per_class.iter().enumerate() {
            chk(&format!("precision[{i}]"), Some(m.precision), f(&r["precision"][i]));
            chk(&format!("recall[{i}]"), Some(m.recall), f(&r["recall"][i]));
            chk(&format!("f1[{i}]"), Some(m.f1), f(&r["f1"][i]));
            chk(&format!("support[{i}]"), Some(m.support as f64), f(&r["support"][i]));
        }
        for i in 0..c.k {
            for j in 0..=c.k {
                let ours = if j == c.k { rep.confusion.no_answer[i] } else { rep.confusion.matrix[i][j] };
                chk(&format!("confusion[{i}][{j}]"), Some(ours as f64), f(&r["confusion"][i][j]));
            }
        }
        if c.probs.is_some() {
            chk("roc_auc_macro", rep.roc_auc_macro, f(&r["auc"]));
        }

        chk("ece", rep.ece, f(&r["ece"]));
        chk("aurc", rep.aurc, f(&r["aurc"]));
        chk("brier", rep.brier, f(&r["brier"]));
        if rep.brier_kind.as_deref() != r["brier_kind"].as_str() {
            other_errors.push(format!("{n}: brier_kind: mica {:?} vs reference {}", rep.brier_kind, r["brier_kind"]));
        }
        if let Some(theirs) = f(&r["brier_sklearn"]) {
            tally.brier_sklearn += 1;
            chk("brier (sklearn brier_score_loss)", rep.brier, Some(theirs));
        }

        let m = mcnemar(&c.y_true, &c.y_pred, &c.pred_b).unwrap();
        let rm = &r["mcnemar"];
        chk("mcnemar b", Some(m.b as f64), f(&rm["b"]));
        chk("mcnemar c", Some(m.c as f64), f(&rm["c"]));
        chk("mcnemar statistic", Some(m.statistic), f(&rm["statistic"]));
        chk("mcnemar p", Some(m.p_value), f(&rm["p_value"]));

        for (i, (ours, theirs)) in holm(&c.p_values).iter().zip(r["holm"].as_array().unwrap()).enumerate() {
            chk(&format!("holm[{i}]"), Some(*ours), f(theirs));
        }

        let l = latency_summary(&c.latency).unwrap();
        let rl = &r["latency"];
        for (what, ours) in [("mean", l.mean), ("p50", l.p50), ("p90", l.p90), ("p99", l.p99), ("min", l.min), ("max", l.max)] {
            chk(&format!("latency {what}"), Some(ours), f(&rl[what]));
        }

        let Some(b) = &c.boot else { continue };
        tally.boot_cases += 1;
        // The script's numpy statistics (fast enough for every resample) against scikit-learn
        // on the first resamples.
        let rc = &r["resample_check"];
        chk("resample statistics: numpy vs scikit-learn", f(&rc["max_diff"]), Some(0.0));
        chk("resample statistics: defined in one only", f(&rc["undefined_mismatch"]), Some(0.0));
        tally.resample_checks += rc["compared"].as_u64().unwrap() as usize;
        tally.kappa_skips += r["kappa_skipped"].as_u64().unwrap() as usize;
        let mut ci = |what: &str, ours: Option<ConfidenceInterval>, theirs: &Value| {
            let t = |i: usize| theirs.as_array().and_then(|a| a[i].as_f64());
            chk(&format!("{what} lower"), ours.map(|c| c.lower), t(0));
            chk(&format!("{what} upper"), ours.map(|c| c.upper), t(1));
        };
        let rc = &r["ci"];
        ci("accuracy_ci", rep.accuracy_ci, &rc["accuracy"]);
        ci("macro_f1_ci", rep.macro_f1_ci, &rc["macro_f1"]);
        ci("weighted_f1_ci", rep.weighted_f1_ci, &rc["weighted_f1"]);
        ci("cohen_kappa_ci", rep.cohen_kappa_ci, &rc["kappa"]);
        if c.probs.is_some() {
            ci("roc_auc_macro_ci", rep.roc_auc_macro_ci, &rc["auc"]);
        }
        if !r["scipy_ci"].is_null() {
            ci("accuracy_ci (scipy.stats.bootstrap)", rep.accuracy_ci, &r["scipy_ci"]["accuracy"]);
            ci("macro_f1_ci (scipy.stats.bootstrap)", rep.macro_f1_ci, &r["scipy_ci"]["macro_f1"]);
        }
        let preds = predictions(c, b);
        let run = RunMetrics::from_predictions("sweep", "d", "test", &labels, &preds, 1.0, &opts).unwrap();
        ci("coverage_ci", run.coverage_ci, &r["run_ci"]["coverage"]);
        ci("accepted_accuracy_ci", run.accepted_accuracy_ci, &r["run_ci"]["accepted_accuracy"]);
        // The run's `all` view draws the same resamples as `evaluate` did.
        if (run.all.accuracy_ci, run.all.macro_f1_ci, run.all.cohen_kappa_ci) != (rep.accuracy_ci, rep.macro_f1_ci, rep.cohen_kappa_ci) {
            other_errors.push(format!("{n}: the run's `all` intervals differ from evaluate's on the same cases"));
        }
        if !r["scipy_ci"].is_null() {
            tally.scipy_cases += 1;
        }
    }
    errors.extend(other_errors);
    assert!(errors.is_empty(), "{} mismatches against the references:\n{}", errors.len(), errors.join("\n"));
    // The cases must have exercised what they claim to.
    assert!(results.iter().any(|r| r.get("auc") == Some(&Value::Null)), "no undefined-AUC case");
    assert!(results.iter().any(|r| r["kappa"].is_null()), "no undefined-kappa case");
    assert!(results.iter().any(|r| r["mcnemar"]["b"].as_u64().unwrap() + r["mcnemar"]["c"].as_u64().unwrap() >= 25));
    assert!(results.iter().any(|r| r["brier_kind"] == "multiclass") && results.iter().any(|r| r["brier_kind"] == "confidence"));
    assert!(results.iter().any(|r| r["ci"]["auc"].is_array()), "no AUC interval compared");
    assert!(tally.kappa_skips > 0, "no resample with an undefined kappa");
    assert!(tally.brier_sklearn > 50, "brier_score_loss compared only {} times", tally.brier_sklearn);
    assert!(tally.resample_checks >= 1000, "only {} resample statistics checked against scikit-learn", tally.resample_checks);
    assert!(tally.boot_cases >= 80 && tally.scipy_cases >= 70, "{} bootstrap cases, {} with scipy", tally.boot_cases, tally.scipy_cases);
    eprintln!(
        "mica-eval agrees with {} on {} values over {} cases ({} bootstrapped, {} also through scipy.stats.bootstrap; tolerance {TOL:e})",
        out["versions"],
        tally.values,
        cases.len(),
        tally.boot_cases,
        tally.scipy_cases
    );
}
