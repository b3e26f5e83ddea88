//! Taking a case in: `POST /api/v1/classify` answers at once with the new case, and every
//! classifier then works on it in its own task. The case is held in memory while any
//! classifier is still pending, each answer is put on it the moment it arrives, and the case
//! goes to the results store (append-only) once every classifier has answered, failed or run
//! past its deadline. `GET /api/v1/cases/{id}` shows the case at any point, with one state per
//! classifier:
//!
//! - `pending`: still working;
//! - `answered`: an answer is in (including a refusal or a deferral, which are answers);
//! - `failed`: the classifier gave no usable answer;
//! - `timed-out`: no answer within its deadline (`--cnn-deadline`, `--llm-deadline`);
//! - `not-sent`: the image was not sent to it (burned-in annotation and a provider off this
//!   machine);
//! - `not-asked`: the image does not belong to the task (a modality mismatch), so no
//!   classifier was asked; an explicit `override_modality=true` classifies anyway and records
//!   that it did.
//!
//! Why this shape: a CNN answers in milliseconds and an LLM can take a minute or more
//! (retries, back-off); a physician must see the fast answer at once and know which answers
//! are still to come. The store only ever receives a finished case, so its rows are never
//! updated (the audit trail is append-only).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Multipart, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mica_report::cases::CaseRecord;
use serde::Deserialize;

use crate::app::{case_view, new_case_id, read_upload, upload_error, ApiError, App};
use crate::panel::review_reasons;
use crate::tasks::route;
use crate::time::now_unix;

/// Limits and deadlines of the case intake (what `mica serve` sets from its flags).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How long a CNN may take on one image before its card says `timed-out`.
    pub cnn_deadline: Duration,
    /// How long an LLM may take on one image, retries and back-off included.
    pub llm_deadline: Duration,
    /// Cases classified at the same time; the next upload is refused with 503 until one ends.
    pub max_concurrent_cases: usize,
    /// Memory for recent cases' images and overlays, in bytes; the oldest go first.
    pub image_cache_bytes: usize,
    /// Longest time any request may take (reading the upload included) before 408.
    pub request_timeout: Duration,
    /// Time a client has to send its request line and headers before the connection is
    /// closed (slow-header clients).
    pub header_read_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            cnn_deadline: Duration::from_secs(60),
            llm_deadline: Duration::from_secs(180),
            max_concurrent_cases: 4,
            image_cache_bytes: 256 << 20,
            request_timeout: Duration::from_secs(120),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// The per-classifier state shown on a case (see the module documentation).
pub fn state_of(outcome: &str) -> &'static str {
    match outcome {
        "pending" => "pending",
        "failed" => "failed",
        "timed-out" => "timed-out",
        "not-sent" => "not-sent",
        "not-asked" => "not-asked",
        _ => "answered",
    }
}

/// A case while its classifiers are still at work.
pub(crate) struct LiveCase {
    pub(crate) record: CaseRecord,
    pub(crate) task: String,
    done: tokio::sync::watch::Receiver<bool>,
    /// Every classifier is done but the store refused the case (kept here to stay visible).
    unrecorded: bool,
}

/// The cases in progress, by id.
#[derive(Default)]
pub(crate) struct Live {
    cases: Mutex<HashMap<String, LiveCase>>,
}

impl Live {
    pub(crate) fn get(&self, id: &str) -> Option<(CaseRecord, String)> {
        let m = self.cases.lock().unwrap_or_else(|p| p.into_inner());
        m.get(id).map(|c| (c.record.clone(), c.task.clone()))
    }

    /// True while the case is not yet in the store: a classifier is still at work, or the
    /// finished case is being recorded. A case is `complete` only once it is recorded, so a
    /// decision can always follow.
    pub(crate) fn in_progress(&self, id: &str) -> bool {
        let m = self.cases.lock().unwrap_or_else(|p| p.into_inner());
        m.get(id).is_some_and(|c| !c.unrecorded)
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut CaseRecord)) {
        let mut m = self.cases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get_mut(id) {
            f(&mut c.record);
        }
    }

    fn remove(&self, id: &str) {
        self.cases.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    fn done(&self, id: &str) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.cases.lock().unwrap_or_else(|p| p.into_inner()).get(id).map(|c| c.done.clone())
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct ClassifyQuery {
    /// The task to classify for (see `GET /api/v1/health` for the list).
    #[serde(default)]
    task: Option<String>,
    /// `true`: classify even though the DICOM header says the image is not the task's kind.
    #[serde(default)]
    override_modality: Option<String>,
    /// `true`: answer when every classifier is done (or the request timeout is near),
    /// instead of at once.
    #[serde(default)]
    wait: Option<String>,
}

fn truthy(v: &Option<String>) -> bool {
    matches!(v.as_deref().map(str::trim), Some("1" | "true" | "yes" | "on"))
}

pub(crate) async fn classify(
    State(app): State<App>,
    query: Result<Query<ClassifyQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    mp: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    // Refused before the body is read: a busy server does not buffer more uploads.
    let permit = app.0.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!(
                "{} cases are being classified right now (the server's limit); try again in a few seconds",
                app.0.options.max_concurrent_cases
            ),
        )
    })?;
    let max = app.0.settings.max_upload_bytes;
    let bytes = read_upload(&headers, mp, max).await?;
    // Sniff, strip DICOM identifiers, decode, encode and hash, off the async threads. The
    // original bytes (with any DICOM header) end here: only de-identified pixels go further.
    let decoded = tokio::task::spawn_blocking(move || {
        mica_data::upload::decode_upload(&bytes).map(|d| {
            let png = mica_data::image::png_bytes(&d.image);
            // The documented hash: over the decoded, de-identified pixels, not an encoding.
            let sha = d.pixel_sha256.clone();
            (d, png, sha)
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("decoder task failed: {e}")))?
    .map_err(upload_error)?;
    let (decoded, png, sha) = decoded;

    let kinds: Vec<(String, mica_core::Modality)> =
        app.0.tasks.iter().map(|t| (t.name.clone(), t.panel.modality)).collect();
    let body_part = decoded.body_part.as_deref();
    let routing = route(&kinds, q.task.as_deref(), decoded.dicom_modality.as_deref(), body_part)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "no_task", e.0))?;
    let task = &app.0.tasks[routing.task];
    let panel = task.panel.clone();
    let overridden = routing.mismatch.is_some() && truthy(&q.override_modality);
    // Text burned into the pixels survives de-identification: such an image stays here.
    let burned_in = decoded.burned_in_annotation == Some(true);

    let id = new_case_id();
    let threshold = app.0.settings.review_threshold;
    let mut predictions = Vec::with_capacity(panel.members.len());
    let mut asked = Vec::new();
    for (i, m) in panel.members.iter().enumerate() {
        predictions.push(match (&routing.mismatch, overridden) {
            (Some(why), false) => panel.no_answer(
                i,
                "not-asked",
                &format!("{why}; not classified (upload again with override_modality=true to classify anyway)"),
            ),
            _ if burned_in && m.remote => panel.no_answer(
                i,
                "not-sent",
                "not sent: the image has burned-in annotation (BurnedInAnnotation = YES), which may show patient identity, and this classifier is not on this machine",
            ),
            _ => {
                asked.push(i);
                panel.no_answer(i, "pending", "")
            }
        });
        if let Some(p) = predictions.last_mut() {
            if p.outcome == "pending" {
                p.error = None;
            }
        }
    }
    let mut reasons = Vec::new();
    if let Some(why) = &routing.mismatch {
        reasons.push(if overridden {
            format!("{why}; classified anyway on the uploader's explicit override")
        } else {
            format!("{why}; not classified")
        });
    }
    let record = CaseRecord {
        id: id.clone(),
        created_unix: now_unix(),
        image_sha256: sha,
        image_format: decoded.kind.as_str().to_string(),
        width: decoded.image.width(),
        height: decoded.image.height(),
        frames: decoded.frames,
        deidentified: decoded.removed.clone(),
        labels: panel.labels.names().to_vec(),
        review_threshold: threshold,
        needs_review: true,
        review_reasons: reasons,
        predictions,
    };
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    {
        let mut m = app.0.live.cases.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(id.clone(), LiveCase { record: record.clone(), task: task.name.clone(), done: done_rx, unrecorded: false });
    }
    app.keep_image(&id, &task.name, png.clone());

    // The classifiers read the de-identified pixels from memory: no file is ever written.
    let running = (!asked.is_empty()).then(|| {
        let source = decoded.memory_source(format!("upload-{id}"));
        panel.start(&id, source, Arc::new(decoded.image), &asked)
    });
    tracing::info!(
        "case {id}: {} {}x{} for task {}, {} classifiers asked",
        record.image_format,
        record.width,
        record.height,
        task.name,
        asked.len()
    );
    let collector = tokio::spawn(collect(app.clone(), id.clone(), routing.task, asked, running, permit, done_tx));
    drop(collector);

    if truthy(&q.wait) {
        if let Some(mut rx) = app.0.live.done(&id) {
            let limit = app.0.options.request_timeout.mul_f64(0.8);
            let _ = tokio::time::timeout(limit, rx.wait_for(|d| *d)).await;
        }
    }
    let view = current_view(&app, &id).await?;
    let mut r = (StatusCode::CREATED, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/cases/{id}")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

/// The case as it stands: from memory while in progress, else from the store.
async fn current_view(app: &App, id: &str) -> Result<crate::app::CaseView, ApiError> {
    if let Some((rec, _)) = app.0.live.get(id) {
        return Ok(case_view(app, rec, Vec::new()));
    }
    let key = id.to_string();
    let (c, d) = app
        .with_store(move |st| {
            let c = st.case(&key)?;
            let d = if c.is_some() { st.decisions(&key)? } else { Vec::new() };
            Ok(c.map(|c| (c, d)))
        })
        .await?
        .ok_or_else(|| ApiError::internal("the case was not recorded (see the server log)"))?;
    Ok(case_view(app, c, d))
}

/// Puts each answer on the case as it arrives, marks classifiers past their deadline, and
/// records the finished case in the store.
async fn collect(
    app: App,
    id: String,
    task: usize,
    asked: Vec<usize>,
    running: Option<crate::panel::Running>,
    permit: tokio::sync::OwnedSemaphorePermit,
    done: tokio::sync::watch::Sender<bool>,
) {
    let panel = app.0.tasks[task].panel.clone();
    let t0 = Instant::now();
    let deadline = |i: usize| {
        // ONNX models run on this machine like CNNs, under the same deadline.
        t0 + if matches!(panel.members[i].family, "cnn" | "onnx") { app.0.options.cnn_deadline } else { app.0.options.llm_deadline }
    };
    let mut pending: BTreeSet<usize> = asked.into_iter().collect();
    if let Some(mut running) = running {
        while !pending.is_empty() {
            let next = pending.iter().map(|&i| deadline(i)).min().unwrap_or(t0);
            tokio::select! {
                got = running.answers.recv() => match got {
                    Some((i, a)) => {
                        if !pending.remove(&i) {
                            continue;
                        }
                        if let Some(o) = a.gradcam_png {
                            app.add_overlay(&id, i, o);
                        }
                        let p = a.prediction;
                        app.0.live.update(&id, |r| r.predictions[i] = p);
                    }
                    None => {
                        for i in std::mem::take(&mut pending) {
                            let p = panel.stopped(i).prediction;
                            app.0.live.update(&id, |r| r.predictions[i] = p);
                        }
                    }
                },
                _ = tokio::time::sleep_until(next.into()) => {
                    let now = Instant::now();
                    let late: Vec<usize> = pending.iter().copied().filter(|&i| deadline(i) <= now).collect();
                    for i in late {
                        pending.remove(&i);
                        if let Some((_, h)) = running.llm_tasks.iter().find(|(k, _)| *k == i) {
                            h.abort();
                        }
                        let secs = (deadline(i) - t0).as_secs_f64();
                        let flag = if matches!(panel.members[i].family, "cnn" | "onnx") { "--cnn-deadline" } else { "--llm-deadline" };
                        let mut p = panel.no_answer(
                            i,
                            "timed-out",
                            &format!("no answer within {secs:.0} s (the server's {flag}); the other classifiers' answers stand"),
                        );
                        p.latency_ms = secs * 1e3;
                        app.0.live.update(&id, |r| r.predictions[i] = p);
                    }
                }
            }
        }
    }
    let Some((mut record, _)) = app.0.live.get(&id) else { return };
    let threshold = record.review_threshold;
    let mut reasons = std::mem::take(&mut record.review_reasons);
    let asked_preds: Vec<_> =
        record.predictions.iter().filter(|p| !matches!(p.outcome.as_str(), "not-sent" | "not-asked")).cloned().collect();
    reasons.extend(review_reasons(&asked_preds, threshold));
    for p in record.predictions.iter().filter(|p| p.outcome == "not-sent") {
        reasons.push(format!("{}: image not sent (burned-in annotation)", p.classifier));
    }
    if asked_preds.is_empty() && reasons.is_empty() {
        reasons.push("no classifier was asked".into());
    }
    record.needs_review = !reasons.is_empty();
    record.review_reasons = reasons;
    let rec = record.clone();
    match app.with_store(move |st| st.insert_case(&rec)).await {
        Ok(_) => app.0.live.remove(&id),
        Err(e) => {
            // Kept in memory so the page still shows it; the error is in the log.
            tracing::error!("case {id}: not recorded: {}", e.message);
            app.0.live.update(&id, |r| *r = record.clone());
            if let Some(c) = app.0.live.cases.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
                c.unrecorded = true;
            }
        }
    }
    tracing::info!("case {id}: complete in {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
    drop(permit);
    let _ = done.send(true);
}

/// Answers 408 when a request (reading its body included) takes longer than
/// `ServeOptions::request_timeout`, so a slow or stalled client cannot hold a worker forever.
pub(crate) async fn request_timeout(
    State(app): State<App>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = app.0.options.request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request took longer than {:.0} s (the server's --request-timeout)", limit.as_secs_f64()),
        )
        .into_response(),
    }
}
