//! Token prices, so every run states what it cost (or would cost) in dollars.
//!
//! Prices change and differ between snapshots of one model (`gpt-4o-2024-05-13` costs twice
//! what `gpt-4o-2024-08-06` does), so the built-in table is keyed by provider and exact
//! snapshot, every entry carries the date it was read and its source, and a lookup never
//! matches by prefix. Lookup order, first hit wins:
//!
//! 1. `provider/model` exactly (`openai/gpt-4o-2024-05-13`);
//! 2. the bare `model` exactly (keys of older price files, `[models."gpt-4o"]`);
//! 3. the alias map (`openai/gpt-4o` → `openai/gpt-4o-2024-08-06`, the snapshot the alias
//!    points to at the table's date), then that snapshot's entry;
//! 4. `provider/*` (`ollama/*`: local models have no per-token price).
//!
//! An `openai-compatible` spec (a proxy in front of OpenAI) is also looked up under `openai/`.
//! Anything else is unknown: its cost is reported as missing, never as zero.
//!
//! The whole table can be replaced or extended from a TOML file (`--prices FILE`):
//!
//! ```toml
//! [models."openai/gpt-4o-2024-08-06"]
//! input_per_million = 2.50
//! output_per_million = 10.00
//! as_of = "2026-03"
//! source = "https://openai.com/api/pricing/"
//!
//! [aliases]
//! "openai/gpt-4o" = "openai/gpt-4o-2024-08-06"
//! ```
//!
//! Reasoning tokens (OpenAI's o-series, gpt-5) are billed as output and already counted in
//! `completion_tokens`, so [`PriceEntry::cost`] prices them once, as completion tokens.

use std::collections::BTreeMap;
use std::path::Path;

use mica_core::TokenUsage;
use serde::{Deserialize, Serialize};

use crate::{LlmError, ProviderKind, ProviderSpec};

/// When the built-in list prices were last checked against the vendors' pages.
pub const BUILTIN_AS_OF: &str = "2026-03";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceEntry {
    /// US dollars per million prompt (input) tokens.
    pub input_per_million: f64,
    /// US dollars per million completion (output) tokens, reasoning tokens included.
    pub output_per_million: f64,
    /// When the price was read (YYYY-MM or YYYY-MM-DD).
    pub as_of: String,
    #[serde(default)]
    pub source: String,
}

impl PriceEntry {
    /// Prompt tokens at the input price, completion tokens (which include any reasoning
    /// tokens) at the output price.
    pub fn cost(&self, usage: &TokenUsage) -> f64 {
        (usage.prompt as f64 * self.input_per_million
            + usage.completion as f64 * self.output_per_million)
            / 1e6
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceTable {
    /// Keyed by `provider/model-snapshot` (`openai/gpt-4o-2024-08-06`), `provider/*` for a
    /// whole provider (`ollama/*`), or a bare model name (price files only).
    #[serde(default)]
    pub models: BTreeMap<String, PriceEntry>,
    /// `provider/alias` → `provider/snapshot`: which snapshot an undated name is priced as.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
}

impl Default for PriceTable {
    fn default() -> Self {
        Self::builtin()
    }
}

const OPENAI_SOURCE: &str = "https://openai.com/api/pricing/ (list price, standard tier)";
const ANTHROPIC_SOURCE: &str = "https://www.anthropic.com/pricing#api (list price)";
const GEMINI_SOURCE: &str =
    "https://ai.google.dev/gemini-api/docs/pricing (paid tier, prompts up to 128k/200k tokens)";

/// (provider/snapshot, $ in, $ out per million tokens, as of, source).
const BUILTIN: &[(&str, f64, f64, &str, &str)] = &[
    (
        "openai/gpt-4o-2024-05-13",
        5.00,
        15.00,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "openai/gpt-4o-2024-08-06",
        2.50,
        10.00,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "openai/gpt-4o-2024-11-20",
        2.50,
        10.00,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "openai/gpt-4o-mini-2024-07-18",
        0.15,
        0.60,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "openai/gpt-4.1-2025-04-14",
        2.00,
        8.00,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "openai/gpt-4.1-mini-2025-04-14",
        0.40,
        1.60,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "openai/gpt-4.1-nano-2025-04-14",
        0.10,
        0.40,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "openai/o1-2024-12-17",
        15.00,
        60.00,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "openai/o3-mini-2025-01-31",
        1.10,
        4.40,
        "2026-03",
        OPENAI_SOURCE,
    ),
    ("openai/o3-2025-04-16", 2.00, 8.00, "2026-03", OPENAI_SOURCE),
    (
        "openai/o4-mini-2025-04-16",
        1.10,
        4.40,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "openai/gpt-5-2025-08-07",
        1.25,
        10.00,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "openai/gpt-5-mini-2025-08-07",
        0.25,
        2.00,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "openai/gpt-5-nano-2025-08-07",
        0.05,
        0.40,
        "2026-03",
        OPENAI_SOURCE,
    ),
    (
        "anthropic/claude-3-5-sonnet-20241022",
        3.00,
        15.00,
        "2025-11",
        ANTHROPIC_SOURCE,
    ),
    (
        "anthropic/claude-3-5-haiku-20241022",
        0.80,
        4.00,
        "2025-11",
        ANTHROPIC_SOURCE,
    ),
    (
        "anthropic/claude-3-7-sonnet-20250219",
        3.00,
        15.00,
        "2025-11",
        ANTHROPIC_SOURCE,
    ),
    (
        "anthropic/claude-sonnet-4-20250514",
        3.00,
        15.00,
        "2025-11",
        ANTHROPIC_SOURCE,
    ),
    (
        "anthropic/claude-opus-4-20250514",
        15.00,
        75.00,
        "2025-11",
        ANTHROPIC_SOURCE,
    ),
    (
        "anthropic/claude-opus-4-1-20250805",
        15.00,
        75.00,
        "2025-11",
        ANTHROPIC_SOURCE,
    ),
    (
        "anthropic/claude-sonnet-4-5-20250929",
        3.00,
        15.00,
        "2025-11",
        ANTHROPIC_SOURCE,
    ),
    (
        "anthropic/claude-haiku-4-5-20251001",
        1.00,
        5.00,
        "2025-11",
        ANTHROPIC_SOURCE,
    ),
    (
        "gemini/gemini-2.0-flash-001",
        0.10,
        0.40,
        "2025-11",
        GEMINI_SOURCE,
    ),
    (
        "gemini/gemini-2.0-flash-lite-001",
        0.075,
        0.30,
        "2025-11",
        GEMINI_SOURCE,
    ),
    (
        "gemini/gemini-2.5-pro",
        1.25,
        10.00,
        "2025-11",
        GEMINI_SOURCE,
    ),
    (
        "gemini/gemini-2.5-flash",
        0.30,
        2.50,
        "2025-11",
        GEMINI_SOURCE,
    ),
    (
        "gemini/gemini-2.5-flash-lite",
        0.10,
        0.40,
        "2025-11",
        GEMINI_SOURCE,
    ),
];

/// Undated names and the snapshot each pointed to when the table was dated. A new snapshot
/// behind an alias gets its own entry and the alias moves; old runs keep their own figures.
const BUILTIN_ALIASES: &[(&str, &str)] = &[
    ("openai/gpt-4o", "openai/gpt-4o-2024-08-06"),
    ("openai/chatgpt-4o-latest", "openai/gpt-4o-2024-11-20"),
    ("openai/gpt-4o-mini", "openai/gpt-4o-mini-2024-07-18"),
    ("openai/gpt-4.1", "openai/gpt-4.1-2025-04-14"),
    ("openai/gpt-4.1-mini", "openai/gpt-4.1-mini-2025-04-14"),
    ("openai/gpt-4.1-nano", "openai/gpt-4.1-nano-2025-04-14"),
    ("openai/o1", "openai/o1-2024-12-17"),
    ("openai/o3-mini", "openai/o3-mini-2025-01-31"),
    ("openai/o3", "openai/o3-2025-04-16"),
    ("openai/o4-mini", "openai/o4-mini-2025-04-16"),
    ("openai/gpt-5", "openai/gpt-5-2025-08-07"),
    ("openai/gpt-5-mini", "openai/gpt-5-mini-2025-08-07"),
    ("openai/gpt-5-nano", "openai/gpt-5-nano-2025-08-07"),
    (
        "anthropic/claude-3-5-sonnet-latest",
        "anthropic/claude-3-5-sonnet-20241022",
    ),
    (
        "anthropic/claude-3-5-haiku-latest",
        "anthropic/claude-3-5-haiku-20241022",
    ),
    (
        "anthropic/claude-3-7-sonnet-latest",
        "anthropic/claude-3-7-sonnet-20250219",
    ),
    (
        "anthropic/claude-sonnet-4-0",
        "anthropic/claude-sonnet-4-20250514",
    ),
    (
        "anthropic/claude-opus-4-0",
        "anthropic/claude-opus-4-20250514",
    ),
    (
        "anthropic/claude-opus-4-1",
        "anthropic/claude-opus-4-1-20250805",
    ),
    (
        "anthropic/claude-sonnet-4-5",
        "anthropic/claude-sonnet-4-5-20250929",
    ),
    (
        "anthropic/claude-haiku-4-5",
        "anthropic/claude-haiku-4-5-20251001",
    ),
    ("gemini/gemini-2.0-flash", "gemini/gemini-2.0-flash-001"),
    (
        "gemini/gemini-2.0-flash-lite",
        "gemini/gemini-2.0-flash-lite-001",
    ),
];

impl PriceTable {
    /// The built-in table: dated, sourced list prices per provider and snapshot, and zero
    /// for local Ollama servers, whose cost is electricity and is measured by the energy
    /// meter instead.
    pub fn builtin() -> Self {
        let mut models = BTreeMap::new();
        for (key, i, o, as_of, source) in BUILTIN {
            models.insert(
                key.to_string(),
                PriceEntry {
                    input_per_million: *i,
                    output_per_million: *o,
                    as_of: as_of.to_string(),
                    source: source.to_string(),
                },
            );
        }
        models.insert(
            "ollama/*".into(),
            PriceEntry {
                input_per_million: 0.0,
                output_per_million: 0.0,
                as_of: BUILTIN_AS_OF.into(),
                source: "local model: no per-token price; energy is metered separately".into(),
            },
        );
        let aliases = BUILTIN_ALIASES
            .iter()
            .map(|(a, s)| (a.to_string(), s.to_string()))
            .collect();
        PriceTable { models, aliases }
    }

    /// Reads a TOML price file and lays it over the built-in table (same keys are replaced).
    pub fn with_overrides_from(mut self, path: &Path) -> Result<Self, LlmError> {
        let text = std::fs::read_to_string(path).map_err(|e| LlmError::file(path, e))?;
        let over: PriceTable = toml::from_str(&text)
            .map_err(|e| LlmError::file(path, format!("bad price table: {e}")))?;
        for (k, v) in &over.models {
            if !(v.input_per_million >= 0.0 && v.output_per_million >= 0.0) {
                return Err(LlmError::file(path, format!("price of `{k}` must be >= 0")));
            }
        }
        self.models.extend(over.models);
        self.aliases.extend(over.aliases);
        Ok(self)
    }

    /// The entry for a spec and the key it was found under (see the module documentation
    /// for the order). `None` means unknown: the cost is reported as missing, never as zero.
    pub fn lookup(&self, spec: &ProviderSpec) -> Option<(String, PriceEntry)> {
        self.lookup_model(spec.kind, &spec.model)
    }

    /// [`Self::lookup`] for a model name the spec does not carry, such as the snapshot the
    /// server says answered (`resolved_model`).
    pub fn lookup_model(&self, kind: ProviderKind, model: &str) -> Option<(String, PriceEntry)> {
        let mut providers = vec![kind.as_str()];
        if kind == ProviderKind::OpenAiCompatible {
            providers.push(ProviderKind::OpenAi.as_str());
        }
        let exact = |key: &str| self.models.get(key).map(|e| (key.to_string(), e.clone()));
        for p in &providers {
            if let Some(hit) = exact(&format!("{p}/{model}")) {
                return Some(hit);
            }
        }
        if let Some(hit) = exact(model) {
            return Some(hit);
        }
        for p in &providers {
            if let Some(hit) = self
                .aliases
                .get(&format!("{p}/{model}"))
                .and_then(|t| exact(t))
            {
                return Some(hit);
            }
        }
        exact(&format!("{}/*", kind.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> ProviderSpec {
        ProviderSpec::parse(s).unwrap()
    }

    #[test]
    fn snapshots_are_priced_exactly_and_aliases_by_the_documented_map() {
        let t = PriceTable::builtin();
        let (key, e) = t.lookup(&spec("openai/gpt-4o")).unwrap();
        assert_eq!(key, "openai/gpt-4o-2024-08-06");
        assert_eq!(e.as_of, "2026-03");
        assert!(e.source.contains("openai.com"), "{}", e.source);
        let c = e.cost(&TokenUsage {
            prompt: 1_000_000,
            completion: 100_000,
        });
        assert!((c - 3.5).abs() < 1e-9, "{c}");
        // The May 2024 snapshot kept its own, higher price: never a later snapshot's.
        let (key, e) = t.lookup(&spec("openai/gpt-4o-2024-05-13")).unwrap();
        assert_eq!(key, "openai/gpt-4o-2024-05-13");
        assert_eq!((e.input_per_million, e.output_per_million), (5.0, 15.0));
        assert_eq!(
            t.lookup(&spec("openai/gpt-4o-2024-11-20")).unwrap().0,
            "openai/gpt-4o-2024-11-20"
        );
        assert_eq!(
            t.lookup(&spec("openai/gpt-4o-mini")).unwrap().0,
            "openai/gpt-4o-mini-2024-07-18"
        );
        assert_eq!(
            t.lookup(&spec("openai/o1")).unwrap().1.output_per_million,
            60.0
        );
        assert_eq!(
            t.lookup(&spec("openai/o3-mini"))
                .unwrap()
                .1
                .input_per_million,
            1.10
        );
        assert_eq!(
            t.lookup(&spec("openai/gpt-4.1"))
                .unwrap()
                .1
                .input_per_million,
            2.0
        );
        // No prefix matching: an unknown snapshot is unknown, not the alias's price.
        assert!(t.lookup(&spec("openai/gpt-4o-2025-01-01")).is_none());
        assert!(t.lookup(&spec("openai/gpt-4o-mini-2099-01-01")).is_none());
        assert!(t.lookup(&spec("openai/o9-preview")).is_none());
        // The provider is part of the key.
        let k = ProviderKind::Anthropic;
        assert!(t.lookup_model(k, "gpt-4o").is_none());
        assert_eq!(
            t.lookup_model(k, "claude-sonnet-4-5").unwrap().0,
            "anthropic/claude-sonnet-4-5-20250929"
        );
        assert_eq!(
            t.lookup_model(ProviderKind::Gemini, "gemini-2.0-flash")
                .unwrap()
                .1
                .input_per_million,
            0.10
        );
        // A proxy speaking OpenAI's protocol is priced as OpenAI.
        let q = spec("openai-compatible/gpt-4o@http://h:1");
        assert_eq!(t.lookup(&q).unwrap().0, "openai/gpt-4o-2024-08-06");
        assert_eq!(
            t.lookup(&spec("ollama/llama3.2-vision"))
                .unwrap()
                .1
                .input_per_million,
            0.0
        );
    }

    #[test]
    fn reasoning_tokens_are_priced_once_as_output() {
        // OpenAI's usage: 120 completion tokens of which 100 were reasoning. The completion
        // count already includes them, so the cost is 120 output tokens, not 220.
        let e = PriceTable::builtin()
            .lookup(&spec("openai/o3-mini"))
            .unwrap()
            .1;
        let c = e.cost(&TokenUsage {
            prompt: 1000,
            completion: 120,
        });
        assert!(
            (c - (1000.0 * 1.10 + 120.0 * 4.40) / 1e6).abs() < 1e-12,
            "{c}"
        );
    }

    #[test]
    fn toml_overrides_replace_and_extend() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("prices.toml");
        std::fs::write(
            &p,
            "[models.\"gpt-4o\"]\ninput_per_million = 5.0\noutput_per_million = 15.0\nas_of = \"2024-05\"\n\
             [models.\"openai-compatible/qwen\"]\ninput_per_million = 0.1\noutput_per_million = 0.2\nas_of = \"2026-01\"\n",
        )
        .unwrap();
        let t = PriceTable::builtin().with_overrides_from(&p).unwrap();
        assert_eq!(
            t.lookup(&spec("openai/gpt-4o"))
                .unwrap()
                .1
                .input_per_million,
            5.0
        );
        let q = spec("openai-compatible/qwen@http://h:1");
        assert_eq!(t.lookup(&q).unwrap().0, "openai-compatible/qwen");
        // An alias can be re-pointed from the file.
        std::fs::write(
            &p,
            "[aliases]\n\"openai/gpt-4o\" = \"openai/gpt-4o-2024-05-13\"\n",
        )
        .unwrap();
        let t = PriceTable::builtin().with_overrides_from(&p).unwrap();
        assert_eq!(
            t.lookup(&spec("openai/gpt-4o"))
                .unwrap()
                .1
                .input_per_million,
            5.0
        );
        std::fs::write(&p, "[models.x]\ninput_per_million = \"cheap\"\n").unwrap();
        let e = PriceTable::builtin()
            .with_overrides_from(&p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prices.toml") && e.contains("bad price table"),
            "{e}"
        );
    }
}
