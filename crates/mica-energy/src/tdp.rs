//! CPU TDP lookup in CodeCarbon's `cpu_power.csv` (vendored, MIT; see `data/NOTICE.md`),
//! with CodeCarbon 3.3.2's matching rules and fallbacks so that both tools assume the same
//! TDP for the same CPU.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::util::{host_info, online_cpus, split_csv_line};

const CPU_POWER_CSV: &str = include_str!("../data/cpu_power.csv");

/// CodeCarbon's `DEFAULT_POWER_PER_CORE`: watts per thread for a CPU model it does not know.
pub const UNKNOWN_MODEL_W_PER_THREAD: f64 = 4.0;
/// CodeCarbon's `POWER_CONSTANT`: TDP when the CPU model cannot even be read.
pub const NO_MODEL_TDP_W: f64 = 85.0;

/// Where the assumed TDP came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum TdpSource {
    /// `--tdp W`.
    Override,
    /// A row of the table (the matched name, times the socket count).
    Table { matched: String, per_socket_w: f64 },
    /// Model read but not in the table: 4 W per thread.
    UnknownModel,
    /// Model not readable: 85 W.
    NoModel,
}

impl TdpSource {
    pub fn describe(&self) -> String {
        match self {
            TdpSource::Override => "given with --tdp".into(),
            TdpSource::Table {
                matched,
                per_socket_w,
            } => format!("CodeCarbon cpu_power.csv: {matched} = {per_socket_w} W per socket"),
            TdpSource::UnknownModel => format!(
                "model not in CodeCarbon's cpu_power.csv: {UNKNOWN_MODEL_W_PER_THREAD} W per thread (CodeCarbon's default)"
            ),
            TdpSource::NoModel => {
                format!("CPU model unreadable: generic {NO_MODEL_TDP_W} W (CodeCarbon's default)")
            }
        }
    }

    pub fn is_fallback(&self) -> bool {
        matches!(self, TdpSource::UnknownModel | TdpSource::NoModel)
    }
}

/// The CPU facts the estimate uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuSpec {
    pub model: String,
    /// Whole-machine TDP in watts (all sockets).
    pub tdp_w: f64,
    pub tdp_source: TdpSource,
    /// Logical CPUs the TDP is shared among.
    pub threads: usize,
    pub sockets: usize,
    /// A hypervisor flag was seen: the TDP belongs to the host chip, shared among the visible
    /// threads only, so the per-thread share may be too high.
    pub virtual_machine: bool,
    pub mem_total_gb: Option<f64>,
}

fn table() -> &'static [(String, f64)] {
    static TABLE: OnceLock<Vec<(String, f64)>> = OnceLock::new();
    TABLE.get_or_init(|| {
        CPU_POWER_CSV
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f = split_csv_line(l);
                let tdp = f.get(1)?.trim().parse::<f64>().ok()?;
                Some((f[0].trim().to_string(), tdp))
            })
            .collect()
    })
}

/// rapidfuzz's `default_process`: lower case, non-alphanumerics to spaces, then tokens.
fn tokens(s: &str) -> std::collections::BTreeSet<String> {
    s.to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// CodeCarbon's cleanup before the second exact match: drop `(R)`, anything from ` CPU @ `,
/// ` CPU` and ` @ 2.10GHz`.
fn clean_model(raw: &str) -> String {
    let mut m = raw.replace("(R)", "");
    if let Some(i) = m.find(" CPU @ ") {
        if i > 0 {
            m.truncate(i);
        }
    }
    m = m.replace(" CPU", "");
    if let Some(at) = m.find(" @") {
        let rest = m[at + 2..].trim_start();
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_end > 0 && rest[num_end..].starts_with("GHz") {
            let consumed = m.len() - rest.len() + num_end + 3;
            m.replace_range(at..consumed, "");
        }
    }
    m
}

/// Finds the table row for a CPU model name, as CodeCarbon 3.3.2 does: an exact
/// (case-insensitive) match, then the same after cleanup, then a token-set match that must be
/// unique (an ambiguous name like `AMD EPYC` matches nothing rather than a random SKU).
pub fn lookup(model: &str) -> Option<(&'static str, f64)> {
    let t = table();
    let exact = |m: &str| {
        let lm = m.to_lowercase();
        t.iter().find(|(n, _)| n.to_lowercase() == lm)
    };
    if let Some((n, w)) = exact(model) {
        return Some((n.as_str(), *w));
    }
    let cleaned = clean_model(model);
    if let Some((n, w)) = exact(&cleaned) {
        return Some((n.as_str(), *w));
    }
    let want = tokens(&cleaned);
    if want.is_empty() {
        return None;
    }
    let mut hits = t.iter().filter(|(n, _)| {
        let have = tokens(n);
        !have.is_empty() && (have.is_subset(&want) || want.is_subset(&have))
    });
    let first = hits.next()?;
    if hits.next().is_some() {
        return None;
    }
    Some((first.0.as_str(), first.1))
}

/// The CPU facts for this machine: model from `/proc/cpuinfo` (or the override), TDP from the
/// override, else the table (times sockets), else CodeCarbon's fallbacks.
pub fn resolve_cpu(model_override: Option<&str>, tdp_override: Option<f64>) -> CpuSpec {
    let host = host_info();
    let threads = online_cpus();
    let model = model_override
        .map(str::to_string)
        .or(host.cpu_model.clone());
    resolve_cpu_with(
        model,
        tdp_override,
        threads,
        host.sockets,
        host.hypervisor,
        host.mem_total_gb,
    )
}

pub(crate) fn resolve_cpu_with(
    model: Option<String>,
    tdp_override: Option<f64>,
    threads: usize,
    sockets: usize,
    virtual_machine: bool,
    mem_total_gb: Option<f64>,
) -> CpuSpec {
    let threads = threads.max(1);
    let sockets = sockets.max(1);
    let (tdp_w, tdp_source) = match (tdp_override, model.as_deref()) {
        (Some(w), _) => (w, TdpSource::Override),
        (None, Some(m)) => match lookup(m) {
            Some((matched, w)) => (
                w * sockets as f64,
                TdpSource::Table {
                    matched: matched.to_string(),
                    per_socket_w: w,
                },
            ),
            None => (
                UNKNOWN_MODEL_W_PER_THREAD * threads as f64,
                TdpSource::UnknownModel,
            ),
        },
        (None, None) => (NO_MODEL_TDP_W, TdpSource::NoModel),
    };
    CpuSpec {
        model: model.unwrap_or_else(|| "unknown".into()),
        tdp_w,
        tdp_source,
        threads,
        sockets,
        virtual_machine,
        mem_total_gb,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_complete() {
        // 4,918 rows, of which 4 old Celerons have malformed TDPs ("27.29.5") and are skipped.
        assert_eq!(table().len(), 4914);
    }

    #[test]
    fn exact_and_cleaned_matches() {
        assert_eq!(lookup("AMD EPYC 9124"), Some(("AMD EPYC 9124", 200.0)));
        assert_eq!(lookup("amd epyc 9124"), Some(("AMD EPYC 9124", 200.0)));
        let intel = lookup("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz");
        assert!(
            intel.is_some_and(|(n, w)| n.contains("6248") && w > 100.0),
            "{intel:?}"
        );
    }

    #[test]
    fn ambiguous_or_unknown_names_do_not_match() {
        // "AMD EPYC" is a subset of hundreds of rows: CodeCarbon refuses to guess, so do we.
        assert_eq!(lookup("AMD EPYC"), None);
        assert_eq!(lookup("Frobnicator 9000 Ultra"), None);
        assert_eq!(lookup(""), None);
    }

    #[test]
    fn fallbacks_follow_codecarbon() {
        let s = resolve_cpu_with(Some("AMD EPYC".into()), None, 2, 1, true, None);
        assert_eq!(s.tdp_w, 8.0);
        assert_eq!(s.tdp_source, TdpSource::UnknownModel);
        let s = resolve_cpu_with(None, None, 16, 1, false, None);
        assert_eq!(s.tdp_w, 85.0);
        let s = resolve_cpu_with(Some("AMD EPYC 9124".into()), None, 64, 2, false, None);
        assert_eq!(s.tdp_w, 400.0);
        let s = resolve_cpu_with(Some("AMD EPYC 9124".into()), Some(55.0), 64, 2, false, None);
        assert_eq!((s.tdp_w, s.tdp_source), (55.0, TdpSource::Override));
    }

    #[test]
    fn cleanup_strips_frequency_and_marks() {
        assert_eq!(
            clean_model("Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz"),
            "Intel Core(TM) i7-8650U"
        );
        assert_eq!(clean_model("Foo X @ 3.2GHz"), "Foo X");
    }
}
