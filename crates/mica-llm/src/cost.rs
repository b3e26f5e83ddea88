//! Token prices, so every run states what it cost (or would cost) in dollars.
//!
//! Prices change; every entry carries the date it was taken from the vendor's list price, and
//! the whole table can be replaced or extended from a TOML file:
//!
//! ```toml
//! [models."gpt-4o"]
//! input_per_million = 2.50
//! output_per_million = 10.00
//! as_of = "2024-10"
//! source = "OpenAI list price"
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use mica_core::TokenUsage;
use serde::{Deserialize, Serialize};

use crate::{LlmError, ProviderSpec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceEntry {
    /// US dollars per million prompt (input) tokens.
    pub input_per_million: f64,
    /// US dollars per million completion (output) tokens.
    pub output_per_million: f64,
    /// When the price was read (YYYY-MM or YYYY-MM-DD).
    pub as_of: String,
    #[serde(default)]
    pub source: String,
}

impl PriceEntry {
    pub fn cost(&self, usage: &TokenUsage) -> f64 {
        (usage.prompt as f64 * self.input_per_million
            + usage.completion as f64 * self.output_per_million)
            / 1e6
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceTable {
    /// Keyed by model name (`gpt-4o`) or `provider/*` for a whole provider (`ollama/*`).
    pub models: BTreeMap<String, PriceEntry>,
}

impl Default for PriceTable {
    fn default() -> Self {
        Self::builtin()
    }
}

impl PriceTable {
    /// The built-in table: OpenAI list prices (dated) and zero for local servers, whose cost is
    /// electricity and is measured by the energy meter instead.
    pub fn builtin() -> Self {
        let mut models = BTreeMap::new();
        let e = |i: f64, o: f64, as_of: &str, source: &str| PriceEntry {
            input_per_million: i,
            output_per_million: o,
            as_of: as_of.into(),
            source: source.into(),
        };
        models.insert(
            "gpt-4o".into(),
            e(
                2.50,
                10.00,
                "2024-10",
                "OpenAI list price (gpt-4o-2024-08-06)",
            ),
        );
        models.insert(
            "gpt-4o-mini".into(),
            e(
                0.15,
                0.60,
                "2024-10",
                "OpenAI list price (gpt-4o-mini-2024-07-18)",
            ),
        );
        models.insert(
            "ollama/*".into(),
            e(
                0.0,
                0.0,
                "2024-10",
                "local model: no per-token price; energy is metered separately",
            ),
        );
        PriceTable { models }
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
        Ok(self)
    }

    /// The entry for a model: exact `provider/model`, exact model, the longest model-name
    /// prefix (so the dated snapshot `gpt-4o-2024-08-06` gets `gpt-4o`'s price), then
    /// `provider/*`. `None` means unknown: the cost is reported as missing, never as zero.
    pub fn lookup(&self, spec: &ProviderSpec) -> Option<(String, PriceEntry)> {
        let full = format!("{}/{}", spec.kind.as_str(), spec.model);
        if let Some(e) = self.models.get(&full) {
            return Some((full, e.clone()));
        }
        if let Some(e) = self.models.get(&spec.model) {
            return Some((spec.model.clone(), e.clone()));
        }
        let prefix = self
            .models
            .iter()
            .filter(|(k, _)| !k.contains('/') && spec.model.starts_with(k.as_str()))
            .max_by_key(|(k, _)| k.len());
        if let Some((k, e)) = prefix {
            // Only a separator may follow the prefix: `gpt-4o-mini` must not get `gpt-4o`'s price
            // when it has an entry of its own (handled above), nor `gpt-4oX`.
            let next = spec.model[k.len()..].chars().next();
            if matches!(next, Some('-') | Some(':') | Some('@')) {
                return Some((k.clone(), e.clone()));
            }
        }
        let wildcard = format!("{}/*", spec.kind.as_str());
        if let Some(e) = self.models.get(&wildcard) {
            return Some((wildcard, e.clone()));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> ProviderSpec {
        ProviderSpec::parse(s).unwrap()
    }

    #[test]
    fn gpt4o_list_price_is_the_default_and_dated() {
        let t = PriceTable::builtin();
        let (key, e) = t.lookup(&spec("openai/gpt-4o")).unwrap();
        assert_eq!(key, "gpt-4o");
        assert_eq!(e.as_of, "2024-10");
        let c = e.cost(&TokenUsage {
            prompt: 1_000_000,
            completion: 100_000,
        });
        assert!((c - 3.5).abs() < 1e-9, "{c}");
        assert_eq!(
            t.lookup(&spec("openai/gpt-4o-2024-08-06")).unwrap().0,
            "gpt-4o"
        );
        assert_eq!(
            t.lookup(&spec("openai/gpt-4o-mini")).unwrap().0,
            "gpt-4o-mini"
        );
        assert_eq!(
            t.lookup(&spec("ollama/llama3.2-vision"))
                .unwrap()
                .1
                .input_per_million,
            0.0
        );
        assert!(t.lookup(&spec("openai/o9-preview")).is_none());
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
