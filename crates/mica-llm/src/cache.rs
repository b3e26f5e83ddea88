//! Deterministic-request response cache on disk: re-running the same command costs no calls.
//!
//! One JSON file per key, `<dir>/<key[..2]>/<key>.json`, written atomically. The key is the
//! SHA-256 of the provider, endpoint, model, generation parameters, prompt texts, label set and
//! the image's SHA-256 (never an API key). The endpoint is part of the key so answers from
//! `mica llm-sim` can never be served for a real model. Only deterministic requests are cached:
//! temperature 0, or a fixed seed (mica always sends one unless told not to).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::imgenc::sha256_hex;
use crate::provider::{ChatRequest, ChatResponse};
use crate::ProviderKind;

#[derive(Debug, Clone)]
pub struct ResponseCache {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    model: String,
    response: ChatResponse,
}

impl ResponseCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ResponseCache { dir: dir.into() }
    }

    /// `$MICA_CACHE_DIR/llm`, else `$XDG_CACHE_HOME/mica/llm`, else `~/.cache/mica/llm`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("MICA_CACHE_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("llm");
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("mica").join("llm");
        }
        match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(h) => PathBuf::from(h).join(".cache").join("mica").join("llm"),
            None => std::env::temp_dir().join("mica-cache").join("llm"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a request may be cached at all.
    pub fn cacheable(req: &ChatRequest) -> bool {
        req.params.temperature == 0.0 || req.params.seed.is_some()
    }

    pub fn key(
        kind: ProviderKind,
        base_url: &str,
        req: &ChatRequest,
        image_sha256: Option<&str>,
    ) -> String {
        let material = json!({
            "v": 1,
            "provider": kind.as_str(),
            "base_url": base_url,
            "model": req.model,
            "params": req.params,
            "system": req.system,
            "user": req.user,
            "labels": req.labels,
            "image_sha256": image_sha256,
        });
        sha256_hex(material.to_string().as_bytes())
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.json"))
    }

    /// A cached response; an unreadable or corrupt entry is treated as a miss (and rewritten).
    pub fn get(&self, key: &str) -> Option<ChatResponse> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        let e: Entry = serde_json::from_slice(&bytes).ok()?;
        (e.key == key).then_some(e.response)
    }

    pub fn put(
        &self,
        key: &str,
        model: &str,
        resp: &ChatResponse,
    ) -> Result<(), mica_core::CoreError> {
        let e = Entry {
            key: key.to_string(),
            model: model.to_string(),
            response: resp.clone(),
        };
        mica_core::write_atomic(
            self.path(key),
            serde_json::to_string(&e).expect("serialises").as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::GenParams;

    fn req() -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            system: "s".into(),
            user: "u".into(),
            image_b64: None,
            labels: vec!["a".into(), "b".into()],
            params: GenParams::default(),
        }
    }

    #[test]
    fn keys_depend_on_every_input_and_entries_round_trip() {
        let r = req();
        let k = ResponseCache::key(ProviderKind::Ollama, "http://h", &r, Some("abc"));
        assert_ne!(
            k,
            ResponseCache::key(ProviderKind::Ollama, "http://other", &r, Some("abc"))
        );
        assert_ne!(
            k,
            ResponseCache::key(ProviderKind::Ollama, "http://h", &r, Some("abd"))
        );
        let mut r2 = r.clone();
        r2.params.seed = Some(43);
        assert_ne!(
            k,
            ResponseCache::key(ProviderKind::Ollama, "http://h", &r2, Some("abc"))
        );
        let dir = tempfile::tempdir().unwrap();
        let c = ResponseCache::new(dir.path());
        assert!(c.get(&k).is_none());
        let resp = ChatResponse {
            content: "{\"label\":\"a\"}".into(),
            refusal: None,
            usage: None,
            simulated: true,
            logprob_confidence: None,
            timings: None,
            finish_reason: None,
            latency_ms: 3.0,
        };
        c.put(&k, "m", &resp).unwrap();
        assert_eq!(c.get(&k), Some(resp));
        std::fs::write(c.path(&k), "{torn").unwrap();
        assert!(c.get(&k).is_none());
    }
}
