//! Deterministic-request response cache on disk: re-running the same command costs no calls.
//!
//! One JSON file per key, `<dir>/<key[..2]>/<key>.json`, written atomically. The key is the
//! SHA-256 of the provider, endpoint, model, generation parameters, prompt texts, label set and
//! the image's SHA-256 (never an API key). The endpoint is part of the key so answers from
//! `mica llm-sim` can never be served for a real model. Only deterministic requests are cached:
//! temperature 0, or a fixed seed (mica always sends one unless told not to).
//!
//! # Snapshots: which cached answers may be replayed
//!
//! A model name is often an alias (`gpt-4o`, `llama3.2-vision`) whose weights change under it.
//! Two mechanisms keep answers of an old snapshot from replaying silently:
//!
//! * Where the server names the snapshot before answering (Ollama: the weights' digest from
//!   `/api/tags`), the digest is part of the key ([`ResponseCache::key_with_digest`]): a
//!   re-pulled model never finds the old answers. When the digest cannot be had, the key is
//!   the plain one, as for the OpenAI formats.
//! * Where the snapshot only shows in the answer (OpenAI formats: the response's `model`,
//!   e.g. `gpt-4o-2024-08-06`), the key stays the requested model string, every entry stores
//!   the answer's `resolved_model` and `system_fingerprint`, and the cache keeps per alias
//!   (provider, endpoint, requested model) the snapshot of the latest live answer,
//!   `<dir>/aliases/<sha256>.json`.
//!
//! The replay rule ([`SnapshotWatch`]): an entry is replayed only if its stored snapshot is the
//! latest one known for its alias: the one recorded in the cache when the runner first looks,
//! replaced by every live answer that reveals another (with one warning naming both). So a
//! fully cached rerun makes no chat request (an Ollama runner still asks `/api/tags` once) and
//! replays exactly the entries of the latest observed snapshot; the entries of an older
//! snapshot count as misses, are asked again and overwritten. An entry without a stored
//! snapshot (written before mica recorded them, or by a server that names none) is replayed
//! only while no snapshot is known for the alias. The `system_fingerprint` is recorded but
//! never invalidates an answer: it changes with serving configuration, not weights.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use std::sync::Mutex;

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
        Self::key_with_digest(kind, base_url, req, image_sha256, None)
    }

    /// [`ResponseCache::key`] bound to the weights' digest when the server reports one
    /// (Ollama), so answers of a re-pulled model are never replayed. Without a digest the key
    /// is exactly the plain one, so existing entries stay valid.
    pub fn key_with_digest(
        kind: ProviderKind,
        base_url: &str,
        req: &ChatRequest,
        image_sha256: Option<&str>,
        model_digest: Option<&str>,
    ) -> String {
        let mut material = json!({
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
        if let Some(d) = model_digest {
            material["model_digest"] = json!(d);
        }
        sha256_hex(material.to_string().as_bytes())
    }

    /// Names one alias: a requested model at one endpoint of one provider kind. The endpoint
    /// is hashed, never stored, so no URL credential reaches the cache directory.
    pub fn alias_key(kind: ProviderKind, base_url: &str, model: &str) -> String {
        let material = json!({"provider": kind.as_str(), "base_url": base_url, "model": model});
        sha256_hex(material.to_string().as_bytes())
    }

    fn alias_path(&self, alias_key: &str) -> PathBuf {
        self.dir.join("aliases").join(format!("{alias_key}.json"))
    }

    /// The snapshot of the latest live answer recorded for an alias (see the module docs).
    pub fn latest_snapshot(&self, alias_key: &str) -> Option<AliasSnapshot> {
        let bytes = std::fs::read(self.alias_path(alias_key)).ok()?;
        let s: AliasSnapshot = serde_json::from_slice(&bytes).ok()?;
        (s.alias_key == alias_key).then_some(s)
    }

    /// Records the snapshot a live answer revealed as the alias's latest.
    pub fn record_snapshot(&self, snap: &AliasSnapshot) -> Result<(), mica_core::CoreError> {
        mica_core::write_atomic(
            self.alias_path(&snap.alias_key),
            serde_json::to_string(snap).expect("serialises").as_bytes(),
        )
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

/// The latest snapshot observed for one alias, as stored in `<dir>/aliases/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasSnapshot {
    /// [`ResponseCache::alias_key`] of the alias.
    pub alias_key: String,
    /// The requested model (`gpt-4o`).
    pub model: String,
    /// The model the server said answered (`gpt-4o-2024-08-06`).
    pub resolved_model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

/// One runner's view of its alias's snapshot, applying the replay rule of the module docs:
/// which cached entries may be replayed, the latest snapshot seen live, and every snapshot
/// whose answers were used (replayed or live), so a run can tell that the model changed under
/// it.
#[derive(Debug)]
pub struct SnapshotWatch {
    alias_key: String,
    model: String,
    state: Mutex<WatchState>,
}

#[derive(Debug, Default)]
struct WatchState {
    /// The cache's record has been read (once, on first use).
    loaded: bool,
    latest: Option<String>,
    /// Snapshots whose answers were used, in first-use order.
    used: Vec<String>,
    /// (old, new) pairs already warned about, in order.
    warned: Vec<(String, String)>,
}

impl SnapshotWatch {
    pub fn new(kind: ProviderKind, base_url: &str, model: &str) -> Self {
        SnapshotWatch {
            alias_key: ResponseCache::alias_key(kind, base_url, model),
            model: model.to_string(),
            state: Mutex::new(WatchState::default()),
        }
    }

    fn lock(&self, cache: Option<&ResponseCache>) -> std::sync::MutexGuard<'_, WatchState> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.loaded {
            st.loaded = true;
            if st.latest.is_none() {
                st.latest = cache
                    .and_then(|c| c.latest_snapshot(&self.alias_key))
                    .map(|s| s.resolved_model);
            }
        }
        st
    }

    fn warn_once(&self, st: &mut WatchState, old: &str, new: &str) {
        let pair = (old.to_string(), new.to_string());
        if !st.warned.contains(&pair) {
            st.warned.push(pair);
            tracing::warn!(
                model = %self.model,
                "model snapshot changed: `{}` now answers as `{new}` (before: `{old}`); cached \
                 answers of `{old}` are not replayed",
                self.model
            );
        }
    }

    /// Whether a cached entry whose answer came from `entry_snapshot` may be replayed.
    pub fn admit(&self, cache: Option<&ResponseCache>, entry_snapshot: Option<&str>) -> bool {
        let mut st = self.lock(cache);
        match (st.latest.clone(), entry_snapshot) {
            (None, _) => true,
            (Some(latest), Some(e)) if latest == e => true,
            (Some(latest), Some(e)) => {
                self.warn_once(&mut st, e, &latest);
                false
            }
            // Unknown provenance, while a snapshot is known: asking again is the safe side.
            (Some(_), None) => false,
        }
    }

    /// A live answer came from `resolved` (`None`: the server named no model). Records it as
    /// the alias's latest, in the cache too when it differs from what the cache knew, and
    /// warns once per change.
    pub fn observe_live(
        &self,
        cache: Option<&ResponseCache>,
        resolved: Option<&str>,
        system_fingerprint: Option<&str>,
    ) {
        let Some(resolved) = resolved else { return };
        let mut st = self.lock(cache);
        if st.latest.as_deref() == Some(resolved) {
            return;
        }
        if let Some(old) = st.latest.clone() {
            self.warn_once(&mut st, &old, resolved);
        }
        st.latest = Some(resolved.to_string());
        if let Some(c) = cache {
            let snap = AliasSnapshot {
                alias_key: self.alias_key.clone(),
                model: self.model.clone(),
                resolved_model: resolved.to_string(),
                system_fingerprint: system_fingerprint.map(|s| s.to_string()),
            };
            if let Err(e) = c.record_snapshot(&snap) {
                tracing::warn!("response cache: {e}");
            }
        }
    }

    /// An answer from `resolved` went into a prediction (live or replayed).
    pub fn note_used(&self, resolved: Option<&str>) {
        let Some(r) = resolved else { return };
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.used.iter().any(|u| u == r) {
            st.used.push(r.to_string());
        }
    }

    /// Every snapshot whose answers were used so far, in first-use order: more than one means
    /// the model changed during the run (or a cached answer from another snapshot was
    /// replayed before a live answer revealed the change).
    pub fn used(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .used
            .clone()
    }

    /// The snapshot changes noticed, `(old, new)` in the order noticed, each once: a live
    /// answer from another snapshot than the latest known, or a cached entry skipped because
    /// a newer snapshot is known. Each was logged as a warning when noticed.
    pub fn changes(&self) -> Vec<(String, String)> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .warned
            .clone()
    }

    /// The latest snapshot known for the alias (from the cache's record or a live answer).
    pub fn latest(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .latest
            .clone()
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
            finish_reason: Some("stop".into()),
            resolved_model: Some("m-2024-08-06".into()),
            system_fingerprint: Some("fp_1".into()),
            model_digest: None,
            latency_ms: 3.0,
            reasoning_tokens: None,
        };
        c.put(&k, "m", &resp).unwrap();
        assert_eq!(c.get(&k), Some(resp));
        std::fs::write(c.path(&k), "{torn").unwrap();
        assert!(c.get(&k).is_none());
    }

    #[test]
    fn a_digest_changes_the_key_and_no_digest_keeps_the_old_one() {
        let r = req();
        let plain = ResponseCache::key(ProviderKind::Ollama, "http://h", &r, Some("abc"));
        let kd = |d| {
            ResponseCache::key_with_digest(ProviderKind::Ollama, "http://h", &r, Some("abc"), d)
        };
        assert_eq!(kd(None), plain);
        assert_ne!(kd(Some("d1")), plain);
        assert_ne!(kd(Some("d1")), kd(Some("d2")));
    }

    #[test]
    fn a_snapshot_change_is_named_once() {
        let dir = tempfile::tempdir().unwrap();
        let c = ResponseCache::new(dir.path());
        let w = SnapshotWatch::new(ProviderKind::OpenAi, "https://api", "gpt-4o");
        w.observe_live(Some(&c), Some("A"), None);
        assert!(w.changes().is_empty(), "a first snapshot is no change");
        w.observe_live(Some(&c), Some("B"), None);
        for _ in 0..3 {
            assert!(!w.admit(Some(&c), Some("A")));
            w.observe_live(Some(&c), Some("B"), None);
        }
        let ab = vec![("A".to_string(), "B".to_string())];
        assert_eq!(w.changes(), ab, "the same change is named once");
        // A rerun learns B from the cache and names the change when it skips A's entries.
        let w2 = SnapshotWatch::new(ProviderKind::OpenAi, "https://api", "gpt-4o");
        assert!(!w2.admit(Some(&c), Some("A")) && !w2.admit(Some(&c), Some("A")));
        assert_eq!(w2.changes(), ab);
        assert!(w2.admit(Some(&c), Some("B")));
    }

    #[test]
    fn entries_of_an_older_snapshot_stop_replaying_once_a_newer_one_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let c = ResponseCache::new(dir.path());
        let w = SnapshotWatch::new(ProviderKind::OpenAi, "https://api", "gpt-4o");
        // Nothing known yet: everything replays, including entries of unknown provenance.
        assert!(w.admit(Some(&c), Some("gpt-4o-2024-05-13")));
        assert!(w.admit(Some(&c), None));
        w.observe_live(Some(&c), Some("gpt-4o-2024-05-13"), Some("fp_a"));
        assert!(w.admit(Some(&c), Some("gpt-4o-2024-05-13")));
        assert!(
            !w.admit(Some(&c), None),
            "unknown provenance once a snapshot is known"
        );
        w.observe_live(Some(&c), Some("gpt-4o-2024-08-06"), Some("fp_b"));
        assert!(!w.admit(Some(&c), Some("gpt-4o-2024-05-13")));
        assert!(w.admit(Some(&c), Some("gpt-4o-2024-08-06")));
        // A server naming no model changes nothing.
        w.observe_live(Some(&c), None, None);
        assert_eq!(w.latest().as_deref(), Some("gpt-4o-2024-08-06"));
        // A later runner (a rerun) starts from the cache's record.
        let w2 = SnapshotWatch::new(ProviderKind::OpenAi, "https://api", "gpt-4o");
        assert!(!w2.admit(Some(&c), Some("gpt-4o-2024-05-13")));
        assert!(w2.admit(Some(&c), Some("gpt-4o-2024-08-06")));
        let rec = c
            .latest_snapshot(&ResponseCache::alias_key(
                ProviderKind::OpenAi,
                "https://api",
                "gpt-4o",
            ))
            .unwrap();
        assert_eq!(
            (
                rec.resolved_model.as_str(),
                rec.system_fingerprint.as_deref()
            ),
            ("gpt-4o-2024-08-06", Some("fp_b"))
        );
        // Another endpoint or alias has its own record.
        let other = SnapshotWatch::new(ProviderKind::OpenAi, "http://other", "gpt-4o");
        assert!(other.admit(Some(&c), Some("gpt-4o-2024-05-13")));
        // Snapshots used are kept in first-use order, once each.
        for s in ["b", "a", "b"] {
            w.note_used(Some(s));
        }
        w.note_used(None);
        assert_eq!(w.used(), vec!["b".to_string(), "a".to_string()]);
    }
}
