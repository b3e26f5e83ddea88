//! The panel: every configured classifier, loaded once at start-up, asked about one image at a
//! time.
//!
//! CNNs run one case at a time behind a lock: inference needs `&mut` access anyway, and the
//! CPU-time energy estimate is per process, so two overlapping windows would each count the
//! other's work. LLM calls run concurrently with the CNNs and with each other; their energy is
//! spent on the provider's machines and is recorded as not measured.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image::GrayImage;
use mica_cnn::CnnClassifier;
use mica_core::{Classifier, ImageSource, LabelSet, Modality, Outcome, Prediction, Sample};
use mica_eval::cascade::{combine, first_answers, CascadeThresholds};
use mica_energy::{MeterConfig, MeterSet, Method};
use mica_llm::{LlmRunner, WorkItem};
use mica_run::ClassifierSpec;
use mica_report::cases::CasePrediction;

use crate::ServerError;

/// How LLM providers are reached (the API key itself stays in the environment variable).
#[derive(Debug, Clone)]
pub struct LlmOptions {
    /// Environment variable holding the API key; read once, never sent anywhere but the
    /// provider.
    pub api_key_env: String,
    pub timeout: Duration,
    pub max_attempts: u32,
    /// Cascades tell their LLM the first model's top two labels (`--cascade-context`).
    pub cascade_context: bool,
}

impl Default for LlmOptions {
    fn default() -> Self {
        LlmOptions {
            api_key_env: "OPENAI_API_KEY".into(),
            timeout: Duration::from_secs(60),
            max_attempts: 3,
            cascade_context: false,
        }
    }
}

/// An LLM runner as the panel asks it, with its version string and whether it is remote.
/// Label validation only: the review threshold of the page decides what goes to a physician,
/// the same way for every classifier. No cache: every upload is new.
fn llm_runner(
    l: &mica_run::LlmSpec,
    labels: &LabelSet,
    modality: Modality,
    llm: &LlmOptions,
) -> Result<(mica_run::llm::Ready, String, bool), ServerError> {
    let mut cfg = mica_run::ClassifierConfig::from_spec(&ClassifierSpec::Llm(l.clone()));
    cfg.filter = Some("validate".into());
    cfg.llm.api_key_env = Some(llm.api_key_env.clone());
    cfg.llm.request_timeout = Some(llm.timeout.as_secs_f64());
    cfg.llm.max_attempts = Some(llm.max_attempts.max(1));
    cfg.llm.no_cache = Some(true);
    let name = format!("llm:{}", redact_url(&l.to_string()));
    let task = mica_run::llm::Task {
        name: &name,
        modality,
        labels,
        seed: None,
        dataset: None,
        split: mica_core::Split::Test,
    };
    let ready = mica_run::llm::runner(&cfg, l, &task, &mut |e| {
        if let mica_run::Event::Notice(m) = e {
            tracing::info!("{m}")
        }
    })
    .map_err(|e| ServerError::Config(redact_url(&e.to_string())))?;
    let model_version = mica_run::llm::version(&ready.provider);
    let remote = mica_energy::LocalServer::from_base_url(&ready.provider.base_url).is_none();
    Ok((ready, model_version, remote))
}

enum Engine {
    Cnn { clf: Box<Mutex<CnnClassifier>>, run_dir: PathBuf },
    /// A model trained elsewhere; runs on this machine like a CNN (same lock, same meters).
    Onnx { clf: Box<Mutex<mica_onnx::OnnxClassifier>> },
    Llm { runner: Arc<LlmRunner> },
    /// A cascade: member `first` (a CNN or ONNX model of the panel, on its own card and
    /// answering at once) decides, and the LLM is asked only when it is unsure. The rule is
    /// `mica_eval::cascade::combine`, the one `mica classify` uses.
    Cascade {
        first: usize,
        runner: Arc<LlmRunner>,
        second_name: String,
        thresholds: CascadeThresholds,
        /// Tell the LLM the first model's top two labels (`--cascade-context`).
        context: bool,
    },
}

/// One classifier as the page and the audit trail name it.
pub struct Member {
    pub name: String,
    /// `cnn`, `onnx` or `llm`.
    pub family: &'static str,
    pub model_version: String,
    /// True when this classifier sends the image off this machine (an LLM whose endpoint is
    /// not a loopback address): the page says so on its card, and an image with burned-in
    /// annotation is not sent.
    pub remote: bool,
    engine: Engine,
}

/// What a classifier said about one image, with the Grad-CAM overlay (PNG) where there is one.
pub struct Answer {
    pub prediction: CasePrediction,
    pub gradcam_png: Option<Vec<u8>>,
}

/// Classifiers at work on one image (see [`Panel::start`]).
pub struct Running {
    /// `(member index, answer)`, each as soon as it is in.
    pub answers: tokio::sync::mpsc::UnboundedReceiver<(usize, Answer)>,
    /// The LLM calls in flight, by member index.
    pub llm_tasks: Vec<(usize, tokio::task::AbortHandle)>,
}

/// Every configured classifier, sharing one label set.
pub struct Panel {
    pub members: Vec<Member>,
    pub labels: LabelSet,
    pub modality: Modality,
    meters: MeterSet,
    /// Serialises CNN work (see the module documentation).
    cnn_lock: Mutex<()>,
}

pub use mica_llm::spec::redact_url;

impl Panel {
    /// Loads classifiers from spec strings: `cnn:RUN_DIR` (a `mica train` run directory) or
    /// `llm:PROVIDER/MODEL[@URL]`. All CNNs must share one label set; LLMs are asked with it,
    /// or with the canonical labels of `modality` when there is no CNN.
    pub fn load(
        specs: &[String],
        modality: Option<Modality>,
        llm: &LlmOptions,
        meter: &MeterConfig,
    ) -> Result<Panel, ServerError> {
        if specs.is_empty() {
            return Err(ServerError::Config(
                "no classifier: give at least one --classifier cnn:RUN_DIR or llm:PROVIDER/MODEL".into(),
            ));
        }
        let mut parsed = Vec::new();
        let mut cascades = Vec::new();
        // Which member answers for a spec: a cascade finds its first stage here.
        let mut member_of: Vec<(ClassifierSpec, usize)> = Vec::new();
        for s in specs {
            let spec: ClassifierSpec = s.parse().map_err(|e: mica_run::SpecError| ServerError::Config(e.to_string()))?;
            if let ClassifierSpec::Cascade { first, second, .. } = &spec {
                if !matches!(**first, ClassifierSpec::Cnn { .. } | ClassifierSpec::Onnx { .. })
                    || !matches!(**second, ClassifierSpec::Llm(_))
                {
                    return Err(ServerError::Config(format!(
                        "`{}`: the web app runs a cascade of a trained CNN or ONNX model (first) and an LLM (second), e.g. cascade:cnn:RUN_DIR,llm:PROVIDER/MODEL@0.8",
                        redact_url(&spec.to_string())
                    )));
                }
                // The first stage is a member of its own: its card shows its answer at once.
                if !parsed.iter().any(|p: &ClassifierSpec| p == &**first) {
                    parsed.push((**first).clone());
                }
                cascades.push(spec);
                continue;
            }
            if !matches!(spec, ClassifierSpec::Cnn { .. } | ClassifierSpec::Llm(_) | ClassifierSpec::Onnx { .. }) {
                return Err(ServerError::Config(format!(
                    "`{spec}`: the web app runs trained CNNs (cnn:RUN_DIR), ONNX models (onnx:PATH.onnx), LLMs (llm:PROVIDER/MODEL) and cascades (cascade:cnn:RUN_DIR,llm:PROVIDER/MODEL@0.8)"
                )));
            }
            parsed.push(spec);
        }
        let mut members = Vec::new();
        let mut labels: Option<(LabelSet, Modality, String)> = None;
        for spec in &parsed {
            let ClassifierSpec::Cnn { run: dir } = spec else { continue };
            let spec_parsed = spec;
            let dir = dir.clone();
            let spec = spec.to_string();
            if !dir.is_dir() {
                return Err(ServerError::Config(format!("{}: no such CNN run directory", dir.display())));
            }
            let clf = CnnClassifier::load(&dir, &mut |m| tracing::info!("{m}"))
                .map_err(|e| ServerError::Config(e.to_string()))?;
            let meta = clf.meta().clone();
            match &labels {
                Some((l, _, first)) if l != &meta.labels => {
                    return Err(ServerError::Config(format!(
                        "{spec}: its labels [{}] differ from {first}'s [{}]; one server compares classifiers on one task",
                        meta.labels.names().join(", "),
                        l.names().join(", ")
                    )))
                }
                Some(_) => {}
                None => labels = Some((meta.labels.clone(), meta.modality, spec.clone())),
            }
            let mut name = format!("cnn:{}", meta.arch);
            if members.iter().any(|m: &Member| m.name == name) {
                let base = dir
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "run".into());
                name = format!("cnn:{}:{base}", meta.arch);
                let mut k = 2;
                while members.iter().any(|m: &Member| m.name == name) {
                    name = format!("cnn:{}:{base}#{k}", meta.arch);
                    k += 1;
                }
            }
            let model_version = mica_run::cnn::version(&meta);
            let clf = clf.with_name(name.clone());
            member_of.push((spec_parsed.clone(), members.len()));
            members.push(Member {
                name,
                family: "cnn",
                model_version,
                remote: false,
                engine: Engine::Cnn { clf: Box::new(Mutex::new(clf)), run_dir: dir },
            });
        }
        for spec in &parsed {
            let ClassifierSpec::Onnx { path } = spec else { continue };
            let spec = spec.to_string();
            let mut clf = mica_run::onnx::load(path, &spec).map_err(|e| ServerError::Config(e.to_string()))?;
            // An ONNX model's outputs may come in any order; the panel answers in one order
            // (the first CNN's, else the task's canonical one), so its labels are aligned to it.
            match &labels {
                Some((l, _, first)) => clf.align_labels(l).map_err(|e| {
                    ServerError::Config(format!("{spec}: {e} (the labels of {first}); one server compares classifiers on one task"))
                })?,
                None => {
                    let l = clf.modality().canonical_labels().unwrap_or_else(|| clf.model_labels().clone());
                    clf.align_labels(&l).map_err(|e| ServerError::Config(format!("{spec}: {e}")))?;
                    labels = Some((l, clf.modality(), spec.clone()));
                }
            }
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
            let mut name = format!("onnx:{stem}");
            let mut k = 2;
            while members.iter().any(|m: &Member| m.name == name) {
                name = format!("onnx:{stem}#{k}");
                k += 1;
            }
            let model_version = mica_run::onnx::version(&clf);
            let clf = clf.with_name(name.clone());
            member_of.push((ClassifierSpec::Onnx { path: path.clone() }, members.len()));
            members.push(Member {
                name,
                family: "onnx",
                model_version,
                remote: false,
                engine: Engine::Onnx { clf: Box::new(Mutex::new(clf)) },
            });
        }
        let (labels, modality) = match (labels, modality) {
            (Some((l, m, first)), Some(asked)) => {
                let canon = asked.canonical_labels();
                if canon.as_ref().is_some_and(|c| c != &l) {
                    return Err(ServerError::Config(format!(
                        "--modality {asked} does not match {first}, whose labels are [{}]",
                        l.names().join(", ")
                    )));
                }
                (l, if m == Modality::Other { asked } else { m })
            }
            (Some((l, m, _)), None) => (l, m),
            (None, Some(m)) => {
                let l = m.canonical_labels().ok_or_else(|| {
                    ServerError::Config(format!("--modality {m} has no built-in labels; add a CNN to take labels from"))
                })?;
                (l, m)
            }
            (None, None) => {
                return Err(ServerError::Config(
                    "LLM classifiers need the task: give --modality xray|mri|ct, or a CNN whose labels they share".into(),
                ))
            }
        };
        let mut llms = Vec::new();
        for spec in &parsed {
            let ClassifierSpec::Llm(l) = spec else { continue };
            let (ready, model_version, remote) = llm_runner(l, &labels, modality, llm)?;
            let name = redact_url(&ready.provider.canonical());
            let ready_runner = ready.runner.with_name(name.clone());
            llms.push(Member {
                name,
                family: "llm",
                model_version,
                remote,
                engine: Engine::Llm { runner: Arc::new(ready_runner) },
            });
        }
        members.extend(llms);
        for spec in &cascades {
            let ClassifierSpec::Cascade { first, second, threshold, second_threshold } = spec else { continue };
            let ClassifierSpec::Llm(l) = &**second else { continue };
            let first_index = member_of
                .iter()
                .find(|(s, _)| s == &**first)
                .map(|(_, i)| *i)
                .ok_or_else(|| ServerError::Config(format!("{first}: the cascade's first stage did not load")))?;
            let (ready, llm_version, remote) = llm_runner(l, &labels, modality, llm)?;
            let second_name = redact_url(&ready.provider.canonical());
            let first_member = &members[first_index];
            let mut name = format!("cascade:{},{second_name}@{threshold}", first_member.name);
            if let Some(t2) = second_threshold {
                name.push_str(&format!("/{t2}"));
            }
            if llm.cascade_context {
                name.push_str("+context");
            }
            let model_version = format!(
                "{} first; {} when its confidence is below {threshold}",
                first_member.model_version, llm_version
            );
            members.push(Member {
                name,
                family: "cascade",
                model_version,
                remote,
                engine: Engine::Cascade {
                    first: first_index,
                    runner: Arc::new(ready.runner.with_name(second_name.clone())),
                    second_name,
                    thresholds: CascadeThresholds { first: *threshold, second: *second_threshold },
                    context: llm.cascade_context,
                },
            });
        }
        Ok(Panel {
            members,
            labels,
            modality,
            meters: MeterSet::auto(meter),
            cnn_lock: Mutex::new(()),
        })
    }

    /// The energy meters in use, one line each (for the start-up banner).
    pub fn meter_lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.meters.meters().iter().map(|m| m.describe()).collect();
        v.extend(self.meters.unavailable().iter().map(|u| format!("{} not used: {}", u.meter, u.reason)));
        v
    }

    /// Asks every classifier about the image stored (de-identified, as PNG) at `png`; answers
    /// come back in the configured order once all are in. `case_id` keys the predictions;
    /// `original` is the same image in memory, for the overlays.
    pub async fn classify(self: &Arc<Self>, case_id: &str, png: &Path, original: &GrayImage) -> Vec<Answer> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        let mut running = self.start(case_id, ImageSource::file(png), Arc::new(original.clone()), &all);
        let mut slots: Vec<Option<Answer>> = (0..self.members.len()).map(|_| None).collect();
        while let Some((i, a)) = running.answers.recv().await {
            slots[i] = Some(a);
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(i, a)| a.unwrap_or_else(|| self.stopped(i)))
            .collect()
    }

    /// Starts the classifiers numbered in `which`, each in its own task, and returns at once:
    /// every answer is sent on `answers` the moment it is in (the CNN's in milliseconds, an
    /// LLM's when the provider answers), so a slow model never holds back a fast one. The
    /// channel closes when every started classifier has answered or stopped; `llm_tasks`
    /// lets the caller abandon an LLM call that is past its deadline.
    ///
    /// `source` is the de-identified image: in memory for uploads (no file is written), or a
    /// file.
    pub fn start(self: &Arc<Self>, case_id: &str, source: ImageSource, original: Arc<GrayImage>, which: &[usize]) -> Running {
        let png = source.path().to_path_buf();
        let sample = Sample {
            id: case_id.to_string(),
            source,
            label: usize::MAX,
            split: None,
            context: None,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cnns: Vec<usize> = which
            .iter()
            .copied()
            .filter(|&i| matches!(self.members.get(i).map(|m| &m.engine), Some(Engine::Cnn { .. } | Engine::Onnx { .. })))
            .collect();
        // Each cascade waits for its first stage's answer, handed over as it goes to the page.
        let mut llm_tasks = Vec::new();
        let mut firsts: Vec<(usize, tokio::sync::oneshot::Sender<CasePrediction>)> = Vec::new();
        for &i in which {
            let Some(Engine::Cascade { first, .. }) = self.members.get(i).map(|m| &m.engine) else { continue };
            let (first_tx, first_rx) = tokio::sync::oneshot::channel();
            firsts.push((*first, first_tx));
            let (me, s, tx) = (self.clone(), sample.clone(), tx.clone());
            let h = tokio::spawn(async move {
                let a = me.cascade_answer(i, &s, first_rx).await;
                let _ = tx.send((i, a));
            });
            llm_tasks.push((i, h.abort_handle()));
        }
        if !cnns.is_empty() {
            let (me, s, tx) = (self.clone(), sample.clone(), tx.clone());
            // CPU-heavy (inference, Grad-CAM, PNG encoding): on a blocking thread.
            tokio::task::spawn_blocking(move || {
                let mut firsts: Vec<(usize, Option<tokio::sync::oneshot::Sender<CasePrediction>>)> =
                    firsts.into_iter().map(|(k, t)| (k, Some(t))).collect();
                me.classify_cnns(&s, &original, &cnns, &mut |i, a| {
                    for (_, t) in firsts.iter_mut().filter(|(k, _)| *k == i) {
                        if let Some(t) = t.take() {
                            let _ = t.send(a.prediction.clone());
                        }
                    }
                    let _ = tx.send((i, a));
                })
            });
        }
        for &i in which {
            let Some(m) = self.members.get(i) else { continue };
            if let Engine::Llm { runner } = &m.engine {
                let (me, runner, tx) = (self.clone(), runner.clone(), tx.clone());
                let item = WorkItem { sample: sample.clone(), true_label: None };
                let png = png.clone();
                let h = tokio::spawn(async move {
                    let p = runner.classify_one(&item).await;
                    let a = Answer { prediction: me.llm_answer(&me.members[i], p, &png), gradcam_png: None };
                    let _ = tx.send((i, a));
                });
                llm_tasks.push((i, h.abort_handle()));
            }
        }
        Running { answers: rx, llm_tasks }
    }

    /// The answer recorded for a classifier that stopped without one.
    pub fn stopped(&self, i: usize) -> Answer {
        Answer {
            prediction: failed(&self.members[i], "the classifier stopped unexpectedly (see the server log)"),
            gradcam_png: None,
        }
    }

    /// A prediction without an answer: `outcome` (`failed`, `pending`, `not-asked`) and why.
    pub fn no_answer(&self, i: usize, outcome: &str, message: &str) -> CasePrediction {
        let mut p = failed(&self.members[i], message);
        p.outcome = outcome.to_string();
        if outcome != "failed" {
            p.energy_method = "not-measured:not-run".to_string();
        }
        p
    }

    fn classify_cnns(&self, sample: &Sample, original: &GrayImage, which: &[usize], out: &mut dyn FnMut(usize, Answer)) {
        let _one_at_a_time = self.cnn_lock.lock().unwrap_or_else(|p| p.into_inner());
        let png = sample.source.path().to_path_buf();
        for &i in which {
            let m = &self.members[i];
            let (result, energy) = match &m.engine {
                Engine::Cnn { clf, .. } => {
                    let mut clf = clf.lock().unwrap_or_else(|p| p.into_inner());
                    let window = self.meters.start();
                    let result = clf.classify(std::slice::from_ref(sample)).pop();
                    (result, window.and_then(|w| w.stop()))
                }
                Engine::Onnx { clf } => {
                    let mut clf = clf.lock().unwrap_or_else(|p| p.into_inner());
                    let window = self.meters.start();
                    let result = clf.classify(std::slice::from_ref(sample)).pop();
                    (result, window.and_then(|w| w.stop()))
                }
                Engine::Llm { .. } | Engine::Cascade { .. } => continue,
            };
            let p = match result {
                Some(Ok(p)) => p,
                Some(Err(e)) => {
                    out(i, Answer { prediction: failed(m, &scrub(&e.message, &png)), gradcam_png: None });
                    continue;
                }
                None => {
                    out(i, Answer { prediction: failed(m, "no result"), gradcam_png: None });
                    continue;
                }
            };
            let (energy_wh, method) = match energy {
                Ok(meas) => (Some(meas.total_joules() / 3600.0), meas.method_label()),
                Err(e) => {
                    tracing::warn!("energy measurement failed: {e}");
                    (None, format!("not-measured:meter-error ({e})"))
                }
            };
            let gradcam_png = match &m.engine {
                Engine::Cnn { run_dir, .. } => gradcam(m, run_dir, sample, original, &png),
                Engine::Onnx { clf } => occlusion_overlay(m, clf, sample, original, &png),
                Engine::Llm { .. } | Engine::Cascade { .. } => None,
            };
            let mut cp = base(m, &p);
            cp.energy_wh = energy_wh;
            cp.energy_method = method;
            cp.has_gradcam = gradcam_png.is_some();
            out(i, Answer { prediction: cp, gradcam_png });
        }
    }

    /// A cascade's answer: its first stage's (received on `first`) when that is confident,
    /// else the LLM's, with `cascade` saying which and why.
    async fn cascade_answer(&self, i: usize, sample: &Sample, first: tokio::sync::oneshot::Receiver<CasePrediction>) -> Answer {
        let m = &self.members[i];
        let Engine::Cascade { first: first_index, runner, second_name, thresholds: t, context } = &m.engine else {
            return self.stopped(i);
        };
        let first_name = &self.members[*first_index].name;
        let Ok(first_cp) = first.await else {
            let mut cp = failed(m, &format!("{first_name} (the first stage) gave no answer"));
            cp.cascade = Some(format!("{first_name} gave no answer: {second_name} not asked"));
            return Answer { prediction: cp, gradcam_png: None };
        };
        let first_p = prediction_of(&sample.id, &first_cp);
        let conf = first_p.confidence.map(|c| format!("{c:.2}")).unwrap_or_else(|| "none".into());
        let short = if first_cp.family == "onnx" { "model" } else { "CNN" };
        if first_answers(&first_p, t) {
            let mut cp = base(m, &combine(&first_p, None, t));
            cp.energy_wh = first_cp.energy_wh;
            cp.energy_method = first_cp.energy_method.clone();
            cp.cascade = Some(format!("{short} confident ({conf} >= {:.2}): {second_name} not asked", t.first));
            return Answer { prediction: cp, gradcam_png: None };
        }
        let why = if first_p.outcome != Outcome::Answered || first_p.confidence.is_none() {
            format!("{short} gave no confident answer ({})", first_cp.outcome)
        } else {
            format!("{short} confidence {conf} below {:.2}", t.first)
        };
        let note = context.then(|| mica_run::cascade::suggestion(&first_p)).flatten();
        let item = WorkItem { sample: sample.clone(), true_label: None };
        let second = runner.classify_one_with_note(&item, note.as_deref()).await;
        let p = combine(&first_p, Some(&second), t);
        let png = sample.source.path().to_path_buf();
        let mut cp = self.llm_answer(m, p, &png);
        let settled = match cp.outcome.as_str() {
            "answered" => "its answer stands".to_string(),
            "deferred" => "both unsure: for the physician".to_string(),
            other => format!("no usable answer ({other})"),
        };
        cp.cascade = Some(format!("{why}: asked {second_name}; {settled}"));
        Answer { prediction: cp, gradcam_png: None }
    }

    fn llm_answer(&self, m: &Member, p: Prediction, png: &Path) -> CasePrediction {
        let mut cp = base(m, &p);
        cp.energy_wh = None;
        cp.energy_method = Method::NotMeasuredRemoteApi.label().to_string();
        cp.error = cp.error.map(|e| redact_url(&scrub(&e, png)));
        cp
    }
}

/// The overlay's method as the page and the API name it, by family.
pub fn overlay_method(family: &str) -> &'static str {
    if family == "onnx" {
        mica_onnx::occlusion::METHOD
    } else {
        "Grad-CAM"
    }
}

/// An ONNX model's occlusion map over the upload, as PNG (tract gives no gradients for
/// Grad-CAM). None, with the reason logged, when it cannot be drawn.
fn occlusion_overlay(
    m: &Member,
    clf: &Mutex<mica_onnx::OnnxClassifier>,
    sample: &Sample,
    original: &GrayImage,
    png: &Path,
) -> Option<Vec<u8>> {
    let clf = clf.lock().unwrap_or_else(|p| p.into_inner());
    let map = mica_onnx::occlusion(&clf, &sample.source, None, None)
        .map_err(|e| tracing::warn!("{}: no occlusion map: {}", m.name, scrub(&e.to_string(), png)))
        .ok()?;
    mica_run::onnx::overlay_png(&map, &image::DynamicImage::ImageLuma8(original.clone()))
        .map_err(|e| tracing::warn!("{}: occlusion overlay not encoded: {e}", m.name))
        .ok()
}

/// A CNN's Grad-CAM over the upload, as PNG; None, with the reason logged, when it fails.
fn gradcam(m: &Member, run_dir: &Path, sample: &Sample, original: &GrayImage, png: &Path) -> Option<Vec<u8>> {
    match mica_cnn::gradcam::explain_source(run_dir, &sample.source, None) {
        Ok(e) => {
            let over = mica_cnn::gradcam::overlay(&image::DynamicImage::ImageLuma8(original.clone()), &e, 0.5);
            let mut bytes = Vec::new();
            match over.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png) {
                Ok(()) => Some(bytes),
                Err(e) => {
                    tracing::warn!("{}: Grad-CAM overlay not encoded: {e}", m.name);
                    None
                }
            }
        }
        Err(e) => {
            tracing::warn!("{}: no Grad-CAM: {}", m.name, scrub(&e.to_string(), png));
            None
        }
    }
}

/// Server-internal paths never reach the page.
fn scrub(msg: &str, png: &Path) -> String {
    let mut s = msg.replace(&png.display().to_string(), "the uploaded image");
    if let Some(dir) = png.parent().filter(|d| !d.as_os_str().is_empty()) {
        s = s.replace(&dir.display().to_string(), "(server temp)");
    }
    s
}

/// The first stage's answer back as a prediction, for the cascade's rule.
fn prediction_of(case_id: &str, cp: &CasePrediction) -> Prediction {
    let outcome: Outcome = serde_json::from_value(serde_json::json!(cp.outcome)).unwrap_or(Outcome::Failed);
    let mut p = Prediction::new(case_id, &cp.classifier, outcome);
    p.predicted = cp.suggested_label.clone();
    p.confidence = cp.confidence;
    p.probabilities = cp.probabilities.clone().map(|m| m.into_iter().collect());
    p.latency_ms = cp.latency_ms;
    p.cost_usd = cp.cost_usd;
    p.simulated = cp.simulated;
    p
}

fn base(m: &Member, p: &Prediction) -> CasePrediction {
    CasePrediction {
        classifier: m.name.clone(),
        family: m.family.to_string(),
        model_version: m.model_version.clone(),
        outcome: p.outcome.as_str().to_string(),
        suggested_label: p.predicted.clone(),
        confidence: p.confidence,
        probabilities: p.probabilities.clone().map(|b| b.into_iter().collect::<BTreeMap<_, _>>()),
        latency_ms: p.latency_ms,
        energy_wh: None,
        energy_method: String::new(),
        rationale: p.rationale.clone(),
        error: p.error.clone(),
        simulated: p.simulated,
        tokens: p.tokens,
        cost_usd: p.cost_usd,
        has_gradcam: false,
        // The model that answered, as the provider reports it (not only the alias asked for).
        resolved_model: p.resolved_model.clone(),
        system_fingerprint: p.system_fingerprint.clone(),
        model_digest: p.model_digest.clone(),
        cascade: None,
    }
}

fn failed(m: &Member, message: &str) -> CasePrediction {
    let mut p = Prediction::new("", &m.name, Outcome::Failed);
    p.error = Some(message.to_string());
    let mut cp = base(m, &p);
    cp.energy_method = if m.family == "llm" {
        Method::NotMeasuredRemoteApi.label().to_string()
    } else {
        "not-measured:failed".to_string()
    };
    cp
}

/// Why a case needs a physician's review: a suggestion below the threshold, a classifier
/// without a usable answer, or classifiers that disagree. Empty when none applies.
pub fn review_reasons(preds: &[CasePrediction], threshold: f64) -> Vec<String> {
    let mut reasons = Vec::new();
    for p in preds {
        match (p.outcome.as_str(), &p.suggested_label, p.confidence) {
            ("refused", _, _) => reasons.push(format!(
                "{} declined to answer: no usable answer",
                p.classifier
            )),
            ("failed" | "unparseable", _, _) | (_, None, _) => {
                reasons.push(format!("{} gave no usable answer", p.classifier))
            }
            (_, Some(_), Some(c)) if c < threshold => reasons.push(format!(
                "{}: confidence {:.2} is below the review threshold {:.2}",
                p.classifier, c, threshold
            )),
            (_, Some(_), None) => reasons.push(format!("{} stated no confidence", p.classifier)),
            _ => {}
        }
        if p.outcome == "deferred" {
            reasons.push(format!("{}'s filter deferred the case", p.classifier));
        }
    }
    let mut labels: Vec<(&str, &str)> = preds
        .iter()
        .filter_map(|p| p.suggested_label.as_deref().map(|l| (p.classifier.as_str(), l)))
        .collect();
    labels.sort_by(|a, b| a.1.cmp(b.1));
    let distinct = {
        let mut l: Vec<&str> = labels.iter().map(|x| x.1).collect();
        l.dedup();
        l.len()
    };
    if distinct > 1 {
        labels.sort_by(|a, b| a.0.cmp(b.0));
        let list: Vec<String> = labels.iter().map(|(c, l)| format!("{c}: {l}")).collect();
        reasons.push(format!("the classifiers disagree ({})", list.join("; ")));
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, label: Option<&str>, conf: Option<f64>, outcome: &str) -> CasePrediction {
        CasePrediction {
            classifier: name.into(),
            family: "cnn".into(),
            model_version: "v".into(),
            outcome: outcome.into(),
            suggested_label: label.map(String::from),
            confidence: conf,
            probabilities: None,
            latency_ms: 1.0,
            energy_wh: None,
            energy_method: "x".into(),
            rationale: None,
            error: None,
            simulated: false,
            tokens: None,
            cost_usd: None,
            has_gradcam: false,
            resolved_model: None,
            system_fingerprint: None,
            model_digest: None,
            cascade: None,
        }
    }

    #[test]
    fn confident_agreement_needs_no_review_and_each_problem_is_named() {
        let ok = [p("a", Some("x"), Some(0.9), "answered"), p("b", Some("x"), Some(0.8), "answered")];
        assert!(review_reasons(&ok, 0.7).is_empty());
        let low = [p("a", Some("x"), Some(0.65), "answered")];
        let r = review_reasons(&low, 0.7);
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("0.65") && r[0].contains("0.70"), "{r:?}");
        let disagree = [p("a", Some("x"), Some(0.9), "answered"), p("b", Some("y"), Some(0.95), "answered")];
        let r = review_reasons(&disagree, 0.7);
        assert_eq!(r, ["the classifiers disagree (a: x; b: y)"]);
        let failed = [p("a", None, None, "failed"), p("b", Some("y"), Some(0.95), "deferred")];
        let r = review_reasons(&failed, 0.7);
        assert!(r.iter().any(|s| s == "a gave no usable answer"), "{r:?}");
        assert!(r.iter().any(|s| s.contains("b's filter deferred")), "{r:?}");
        let refused = [p("llm", None, None, "refused"), p("cnn", Some("y"), Some(0.95), "answered")];
        let r = review_reasons(&refused, 0.7);
        assert_eq!(r, ["llm declined to answer: no usable answer"]);
    }

    #[test]
    fn urls_lose_credentials_and_queries() {
        assert_eq!(redact_url("http://u:secret@host:1/v1?key=k"), "http://host:1/v1");
        assert_eq!(
            redact_url("llm:openai-compatible/m@http://tok@127.0.0.1:9 failed"),
            "llm:openai-compatible/m@http://127.0.0.1:9 failed"
        );
        assert_eq!(redact_url("no url here"), "no url here");
    }
}
