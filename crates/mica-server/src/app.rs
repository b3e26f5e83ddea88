//! The router, its shared state, the middleware (authentication, headers, request log) and
//! the JSON API handlers. Pages live in [`crate::pages`] and call the same API from the
//! browser.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use mica_report::cases::{CasePrediction, CaseRecord, Decision};
use mica_report::Store;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::panel::Panel;
use crate::time::{from_unix, now_unix};
use mica_core::time::iso_utc;
use crate::{pages, ServerError};

/// Multipart framing around the file (boundaries, part headers) allowed on top of the upload
/// limit before the body itself is refused.
const MULTIPART_SLACK: usize = 64 * 1024;
/// Default memory for recent cases' images and overlays (see `ServeOptions::image_cache_bytes`);
/// older cases keep their record in the store but not their pixels.
pub const IMAGE_CACHE_BYTES: usize = 256 << 20;
/// The decision-support notice every case carries.
pub const NOTICE: &str = "Suggested labels are model outputs for decision support. The physician decides; nothing here is a diagnosis.";

/// Settings that are not classifiers.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_upload_bytes: usize,
    /// Confidence below which a suggestion sends the case to physician review.
    pub review_threshold: f64,
    /// Bearer token required on every page and API call, when set.
    pub token: Option<String>,
}

struct CaseImages {
    image_png: Vec<u8>,
    overlays: BTreeMap<usize, Vec<u8>>,
    /// The task the case was classified for (shown while the case is held).
    task: String,
}

impl CaseImages {
    fn bytes(&self) -> usize {
        self.image_png.len() + self.overlays.values().map(Vec::len).sum::<usize>()
    }
}

pub(crate) struct Inner {
    pub(crate) panel: Arc<Panel>,
    /// Every task; the first is `panel`'s.
    pub(crate) tasks: Vec<crate::tasks::Task>,
    pub(crate) options: crate::intake::ServeOptions,
    /// Cases being classified now (bounded by `options.max_concurrent_cases`).
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    pub(crate) live: crate::intake::Live,
    pub(crate) store: Arc<Mutex<Store>>,
    pub(crate) settings: Settings,
    images: Mutex<VecDeque<(String, CaseImages)>>,
    /// Host/origin checks, identity and sessions ([`crate::signin`]).
    pub(crate) guard: crate::signin::Guard,
}

/// The state every handler shares.
#[derive(Clone)]
pub struct App(pub(crate) Arc<Inner>);

impl App {
    /// One task (named after the panel's modality) with the default limits.
    pub fn new(panel: Panel, store: Store, settings: Settings) -> Result<App, ServerError> {
        let name = panel.modality.as_str().to_string();
        let tasks = vec![crate::tasks::Task { name, panel: Arc::new(panel) }];
        App::with_tasks(tasks, store, settings, crate::intake::ServeOptions::default())
    }

    /// Several tasks in one server (the first is the default page's), with explicit limits.
    pub fn with_tasks(
        tasks: Vec<crate::tasks::Task>,
        store: Store,
        settings: Settings,
        options: crate::intake::ServeOptions,
    ) -> Result<App, ServerError> {
        let Some(first) = tasks.first() else {
            return Err(ServerError::Config("no task configured".into()));
        };
        if options.max_concurrent_cases == 0 {
            return Err(ServerError::Config("the concurrent-case limit must be above 0".into()));
        }
        let panel = first.panel.clone();
        if !(0.0..=1.0).contains(&settings.review_threshold) {
            return Err(ServerError::Config(format!(
                "review threshold {} must be between 0 and 1",
                settings.review_threshold
            )));
        }
        if settings.max_upload_bytes == 0 {
            return Err(ServerError::Config("the upload limit must be above 0".into()));
        }
        if let Some(t) = settings.token.as_deref() {
            crate::security::check_token(t).map_err(ServerError::Config)?;
        }
        let guard = crate::signin::Guard::new(Default::default(), settings.token.clone()).map_err(ServerError::Config)?;
        Ok(App(Arc::new(Inner {
            panel,
            permits: Arc::new(tokio::sync::Semaphore::new(options.max_concurrent_cases)),
            tasks,
            options,
            live: Default::default(),
            store: Arc::new(Mutex::new(store)),
            settings,
            images: Mutex::new(VecDeque::new()),
            guard,
        })))
    }

    /// Sets how people are identified (named users, a trusted proxy) and the deployment checks
    /// (allowed host names, `Secure` cookies). Call it right after [`App::new`], before the app
    /// is shared.
    pub fn with_access(mut self, access: crate::signin::AccessConfig) -> Result<App, ServerError> {
        let token = self.0.settings.token.clone();
        let guard = crate::signin::Guard::new(access, token).map_err(ServerError::Config)?;
        let inner = Arc::get_mut(&mut self.0)
            .ok_or_else(|| ServerError::Config("with_access must be called before the app is shared".into()))?;
        inner.guard = guard;
        Ok(self)
    }

    /// True when some authentication (token, users or proxy) is configured.
    pub fn authenticated(&self) -> bool {
        self.0.guard.enabled()
    }

    pub fn settings(&self) -> &Settings {
        &self.0.settings
    }

    pub fn panel(&self) -> &Panel {
        &self.0.panel
    }

    /// Runs `f` on the store off the async threads.
    pub(crate) async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, mica_report::ReportError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.0.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut st = store.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut st)
        })
        .await
        .map_err(|e| ApiError::internal(format!("store task failed: {e}")))?
        .map_err(|e| {
            tracing::error!("results store: {e}");
            ApiError::internal("the results store failed (see the server log)")
        })
    }

    /// Holds a new case's image; the oldest cases' images go once the cache is over its
    /// byte budget (the newest case is always kept).
    pub(crate) fn keep_image(&self, id: &str, task: &str, image_png: Vec<u8>) {
        let mut q = self.0.images.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back((id.to_string(), CaseImages { image_png, overlays: BTreeMap::new(), task: task.to_string() }));
        self.trim_images(&mut q);
    }

    /// Adds a Grad-CAM overlay to a held case (dropped when the case's image is gone).
    pub(crate) fn add_overlay(&self, id: &str, index: usize, png: Vec<u8>) {
        let mut q = self.0.images.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = q.iter_mut().find(|(k, _)| k == id) {
            c.overlays.insert(index, png);
        }
        self.trim_images(&mut q);
    }

    fn trim_images(&self, q: &mut VecDeque<(String, CaseImages)>) {
        let budget = self.0.options.image_cache_bytes;
        let mut total: usize = q.iter().map(|(_, c)| c.bytes()).sum();
        while total > budget && q.len() > 1 {
            if let Some((_, c)) = q.pop_front() {
                total -= c.bytes();
            }
        }
    }

    /// Bytes held by the image cache now.
    pub fn image_cache_bytes(&self) -> usize {
        let q = self.0.images.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().map(|(_, c)| c.bytes()).sum()
    }

    fn with_images<T>(&self, id: &str, f: impl FnOnce(&CaseImages) -> Option<T>) -> Option<T> {
        let q = self.0.images.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().find(|(k, _)| k == id).and_then(|(_, v)| f(v))
    }

    fn has_image(&self, id: &str) -> bool {
        self.with_images(id, |_| Some(())).is_some()
    }
}

/// A JSON error: `{"error": {"status", "code", "message"}}`, with a message a person can act on.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    fn too_large(max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload_too_large",
            format!(
                "the upload is larger than the limit of {} (the server's --max-upload-mb)",
                human_bytes(max)
            ),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"status": self.status.as_u16(), "code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

pub fn human_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MB", n >> 20)
    } else if n >= 1 << 20 {
        format!("{:.1} MB", n as f64 / (1 << 20) as f64)
    } else if n >= 1024 {
        format!("{:.0} KB", n as f64 / 1024.0)
    } else {
        format!("{n} bytes")
    }
}

/// One route of the router: what the OpenAPI file must document (for `/api/v1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteInfo {
    pub method: &'static str,
    pub path: &'static str,
}

/// Builds the router and, alongside, the list of what it routes, so the list cannot drift
/// from the router (the OpenAPI test reads it).
struct Routes {
    router: Router<App>,
    table: Vec<RouteInfo>,
}

impl Routes {
    fn get<H: Handler<T, App>, T: 'static>(mut self, path: &'static str, h: H) -> Self {
        self.router = self.router.route(path, axum::routing::get(h));
        self.table.push(RouteInfo { method: "get", path });
        self
    }
    fn post<H: Handler<T, App>, T: 'static>(mut self, path: &'static str, h: H) -> Self {
        self.router = self.router.route(path, axum::routing::post(h));
        self.table.push(RouteInfo { method: "post", path });
        self
    }
}

fn routes() -> Routes {
    Routes { router: Router::new(), table: Vec::new() }
        // The JSON API (documented in openapi.yaml).
        .get("/api/v1/health", health)
        .get("/api/v1/openapi.yaml", openapi)
        .post("/api/v1/classify", crate::intake::classify)
        .get("/api/v1/cases/{id}", get_case)
        .post("/api/v1/cases/{id}/decision", post_decision)
        .get("/api/v1/cases/{id}/image.png", case_image)
        .get("/api/v1/cases/{id}/gradcam/{index}", case_gradcam)
        .get("/api/v1/runs", list_runs)
        .get("/api/v1/runs/{id}", get_run)
        .get("/api/v1/monitoring", monitoring)
        // Pages.
        .get("/", pages::case_page)
        .get("/cases/{id}", pages::case_page_for)
        .get("/monitoring", pages::monitoring_page)
        .get("/runs", pages::runs_page)
        .get("/runs/{id}", pages::run_report_page)
        // Sign-in and sign-out (open: the guard lets them through unauthenticated).
        .get("/sign-in", crate::signin::sign_in_form)
        .post("/sign-in", crate::signin::sign_in)
        .post("/sign-out", crate::signin::sign_out)
}

/// Every route the router serves.
pub fn route_table() -> Vec<RouteInfo> {
    routes().table
}

/// The whole application: routes, upload limit, authentication and response headers.
pub fn router(app: App) -> Router {
    let limit = app.0.settings.max_upload_bytes.saturating_add(MULTIPART_SLACK);
    routes()
        .router
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(app.clone(), crate::intake::request_timeout))
        .layer(middleware::from_fn_with_state(app.clone(), crate::signin::guard))
        .layer(middleware::from_fn(headers_and_log))
        .with_state(app)
}

/// axum's own 405 has an empty body; API clients get the usual JSON error instead.
async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {} (see /api/v1/openapi.yaml)", req.method(), truncate(req.uri().path(), 120)),
    )
    .into_response()
}

async fn not_found(req: Request) -> Response {
    if req.uri().path().starts_with("/api/") {
        ApiError::not_found("no such API route (see /api/v1/openapi.yaml)").into_response()
    } else {
        pages::not_found_page().into_response()
    }
}

/// Security headers on every response, and one log line per request (method, path, status,
/// time: never a body, a query string or a header value).
async fn headers_and_log(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let t0 = std::time::Instant::now();
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    if path.starts_with("/api/") {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    tracing::info!(
        "{method} {path} -> {} ({:.1} ms)",
        r.status().as_u16(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    r
}

/// Case ids are 32 lowercase hex digits made by the server; anything else is not a case.
pub fn valid_case_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) fn new_case_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// API handlers.

async fn health(State(app): State<App>, who: Option<axum::Extension<crate::auth::Principal>>) -> Json<Value> {
    let p = &app.0.panel;
    let g = &app.0.guard;
    let who = who.map(|w| w.0);
    Json(json!({
        "status": "ok",
        "service": "mica",
        "version": env!("CARGO_PKG_VERSION"),
        "notice": NOTICE,
        "modality": p.modality.as_str(),
        "labels": p.labels.names(),
        "classifiers": p.members.iter().map(|m| json!({
            "name": m.name, "family": m.family, "model_version": m.model_version,
        })).collect::<Vec<_>>(),
        "tasks": app.0.tasks.iter().map(|t| json!({
            "name": t.name,
            "modality": t.panel.modality.as_str(),
            "labels": t.panel.labels.names(),
            "classifiers": t.panel.members.iter().map(|m| json!({
                "name": m.name, "family": m.family, "model_version": m.model_version,
                "sends_image_off_machine": m.remote,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "review_threshold": app.0.settings.review_threshold,
        "max_upload_bytes": app.0.settings.max_upload_bytes,
        "auth_required": g.enabled(),
        "auth": {
            "mode": g.mode(),
            "identity": g.identity(),
            "signed_in": who.as_ref().is_some_and(|w| matches!(w.method, crate::auth::AuthMethod::Password | crate::auth::AuthMethod::Token)),
            "user": who.as_ref().and_then(|w| w.name.clone()),
            "role": who.as_ref().map(|w| w.role.as_str()),
            "auth_method": who.as_ref().map(|w| w.method.as_str()),
        },
    }))
}

pub const OPENAPI: &str = include_str!("../openapi.yaml");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml; charset=utf-8")], OPENAPI).into_response()
}

fn multipart_error(e: axum::extract::multipart::MultipartError, max: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(max)
    } else {
        ApiError::bad_request("bad_multipart", format!("the upload could not be read as multipart/form-data: {}", e.body_text()))
    }
}

pub(crate) fn upload_error(e: mica_data::upload::UploadError) -> ApiError {
    use mica_data::upload::UploadError as U;
    let (status, code) = match &e {
        U::Empty => (StatusCode::BAD_REQUEST, "empty_file"),
        U::NotAnImage(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_an_image"),
        U::NoPixelData => (StatusCode::UNPROCESSABLE_ENTITY, "dicom_without_pixels"),
        U::TooLarge { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "image_too_large"),
        U::Undecodable { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "undecodable"),
        U::UnsupportedTransferSyntax { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "unsupported_transfer_syntax"),
        U::LimitExceeded { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "upload_limit_exceeded"),
    };
    ApiError::new(status, code, e.to_string())
}

/// Reads the `file` part of a multipart upload, refusing it as soon as it passes the limit.
pub(crate) async fn read_upload(
    headers: &HeaderMap,
    mp: Result<Multipart, axum::extract::multipart::MultipartRejection>,
    max: usize,
) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared == Some(0) {
        return Err(ApiError::bad_request("empty_upload", "the upload is empty: send multipart/form-data with the image in a `file` field"));
    }
    if declared.is_some_and(|n| n > max.saturating_add(MULTIPART_SLACK)) {
        return Err(ApiError::too_large(max));
    }
    let mut mp = mp.map_err(|e| {
        ApiError::bad_request(
            "not_multipart",
            format!("expected multipart/form-data with the image in a `file` field ({})", e.body_text()),
        )
    })?;
    let mut parts = 0;
    loop {
        let mut field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e, max)),
        };
        parts += 1;
        if field.name() != Some("file") {
            continue;
        }
        let mut buf = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, max))? {
            if buf.len() + chunk.len() > max {
                // Read (and drop) the rest, at most up to the body limit, so the client gets
                // this answer instead of a reset connection.
                while let Ok(Some(_)) = field.chunk().await {}
                drop(field);
                while let Ok(Some(mut more)) = mp.next_field().await {
                    while let Ok(Some(_)) = more.chunk().await {}
                }
                return Err(ApiError::too_large(max));
            }
            buf.extend_from_slice(&chunk);
        }
        if buf.is_empty() {
            return Err(ApiError::bad_request("empty_file", "the uploaded file is empty (0 bytes)"));
        }
        return Ok(buf);
    }
    Err(ApiError::bad_request(
        "empty_upload",
        if parts == 0 {
            "the upload is empty: send multipart/form-data with the image in a `file` field".to_string()
        } else {
            "the upload has no `file` field: send the image as the `file` part of multipart/form-data".to_string()
        },
    ))
}

/// The JSON of a case: the record, links to its images while they are held, and decisions.
#[derive(Serialize)]
pub(crate) struct CaseView {
    id: String,
    /// The task the case was classified for, while the server holds the case in memory.
    task: Option<String>,
    /// False until every classifier is done and the case is recorded (poll until it is true;
    /// a decision can be recorded from then on).
    complete: bool,
    /// Why the image was not classified by its task's classifiers, when its DICOM header
    /// says it is another kind of study.
    modality_mismatch: Option<String>,
    created: String,
    created_unix: i64,
    notice: &'static str,
    image: ImageView,
    labels: Vec<String>,
    review_threshold: f64,
    needs_review: bool,
    review_reasons: Vec<String>,
    predictions: Vec<PredictionView>,
    decision: Option<DecisionView>,
    decisions: Vec<DecisionView>,
}

#[derive(Serialize)]
struct ImageView {
    format: String,
    width: u32,
    height: u32,
    frames: u32,
    sha256: String,
    deidentified: Vec<String>,
    /// While the server still holds the image in memory.
    url: Option<String>,
}

#[derive(Serialize)]
struct PredictionView {
    #[serde(flatten)]
    p: CasePrediction,
    /// `pending`, `answered`, `failed`, `timed-out`, `not-sent` or `not-asked`.
    state: &'static str,
    /// The classifier sends the image off this machine (a provider not on a loopback address).
    sends_image_off_machine: bool,
    gradcam_url: Option<String>,
    /// How the overlay at `gradcam_url` was made: Grad-CAM for mica's CNNs, an occlusion map
    /// for ONNX models (their runtime gives no gradients). `None` without an overlay.
    overlay_method: Option<&'static str>,
}

#[derive(Serialize)]
#[derive(Clone)]
struct DecisionView {
    id: i64,
    decided: String,
    decided_unix: i64,
    reviewer: String,
    final_label: String,
    note: Option<String>,
    /// The authenticated user who decided (`None` without named identities).
    user_id: Option<String>,
    /// `users-file`, `proxy-header`, `token` or `none`; `None` for decisions recorded before
    /// mica kept it.
    auth_method: Option<String>,
}

impl From<Decision> for DecisionView {
    fn from(d: Decision) -> Self {
        DecisionView {
            id: d.id,
            decided: iso_utc(from_unix(d.decided_unix)),
            decided_unix: d.decided_unix,
            reviewer: d.reviewer,
            final_label: d.final_label,
            note: d.note,
            user_id: d.user_id,
            auth_method: d.auth_method,
        }
    }
}

/// Whether classifier `name` sends images off this machine: as configured now, else (a
/// classifier no longer configured) any LLM, to be safe.
fn sends_off_machine(app: &App, p: &CasePrediction) -> bool {
    app.0
        .tasks
        .iter()
        .flat_map(|t| t.panel.members.iter())
        .find(|m| m.name == p.classifier)
        .map(|m| m.remote)
        .unwrap_or(p.family == "llm")
}

pub(crate) fn case_view(app: &App, c: CaseRecord, decisions: Vec<Decision>) -> CaseView {
    let held = app.has_image(&c.id);
    let id = c.id.clone();
    let task = app.with_images(&id, |i| Some(i.task.clone())).or_else(|| app.0.live.get(&id).map(|(_, t)| t));
    let complete = !c.predictions.iter().any(|p| p.outcome == "pending") && !app.0.live.in_progress(&id);
    let modality_mismatch = c.review_reasons.iter().find(|r| r.starts_with("modality mismatch")).cloned();
    let decisions: Vec<DecisionView> = decisions.into_iter().map(DecisionView::from).collect();
    CaseView {
        task,
        complete,
        modality_mismatch,
        created: iso_utc(from_unix(c.created_unix)),
        created_unix: c.created_unix,
        notice: NOTICE,
        image: ImageView {
            format: c.image_format,
            width: c.width,
            height: c.height,
            frames: c.frames,
            sha256: c.image_sha256,
            deidentified: c.deidentified,
            url: held.then(|| format!("/api/v1/cases/{id}/image.png")),
        },
        labels: c.labels,
        review_threshold: c.review_threshold,
        needs_review: c.needs_review,
        review_reasons: c.review_reasons,
        predictions: c
            .predictions
            .into_iter()
            .enumerate()
            .map(|(i, p)| PredictionView {
                gradcam_url: (held && p.has_gradcam).then(|| format!("/api/v1/cases/{id}/gradcam/{i}")),
                overlay_method: (held && p.has_gradcam).then(|| crate::panel::overlay_method(&p.family)),
                state: crate::intake::state_of(&p.outcome),
                sends_image_off_machine: sends_off_machine(app, &p),
                p,
            })
            .collect(),
        decision: None,
        decisions,
        id,
    }
    .with_latest()
}

impl CaseView {
    fn with_latest(mut self) -> Self {
        self.decision = self.decisions.last().cloned();
        self
    }
}

async fn load_case(app: &App, id: &str) -> Result<(CaseRecord, Vec<Decision>), ApiError> {
    if !valid_case_id(id) {
        return Err(ApiError::not_found(format!("no case `{}`", truncate(id, 40))));
    }
    let key = id.to_string();
    let found = app
        .with_store(move |st| {
            let c = st.case(&key)?;
            let d = if c.is_some() { st.decisions(&key)? } else { Vec::new() };
            Ok(c.map(|c| (c, d)))
        })
        .await?;
    match found {
        Some(f) => Ok(f),
        None if app.0.live.get(id).is_some() => Err(ApiError::new(
            StatusCode::CONFLICT,
            "case_pending",
            "the case's classifiers are still at work: decide once every classifier has answered, failed or timed out",
        )),
        None => Err(ApiError::not_found(format!("no case `{id}`"))),
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).filter(|c| !c.is_control()).collect()
}

async fn get_case(State(app): State<App>, Path(id): Path<String>) -> Result<Json<CaseView>, ApiError> {
    if let Some((rec, _)) = app.0.live.get(&id) {
        return Ok(Json(case_view(&app, rec, Vec::new())));
    }
    let (c, d) = load_case(&app, &id).await?;
    Ok(Json(case_view(&app, c, d)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionIn {
    final_label: String,
    /// Required without named identities; with them the signed-in user is recorded and a
    /// different name here is refused.
    #[serde(default)]
    reviewer: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

const MAX_REVIEWER: usize = 120;
const MAX_NOTE: usize = 4000;

async fn post_decision(
    State(app): State<App>,
    Path(id): Path<String>,
    who: Option<axum::Extension<crate::auth::Principal>>,
    body: Result<Json<DecisionIn>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(d) = body.map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_decision",
            format!("expected JSON {{\"final_label\", \"reviewer\", \"note\"?}}: {}", e.body_text()),
        )
    })?;
    let (case, _) = load_case(&app, &id).await?;
    let label = d.final_label.trim().to_string();
    if !case.labels.contains(&label) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_label",
            format!("`{}` is not one of this case's labels: {}", truncate(&label, 60), case.labels.join(", ")),
        ));
    }
    let principal = who.map(|w| w.0).unwrap_or_else(crate::auth::Principal::open);
    let given = d.reviewer.as_deref().map(str::trim).filter(|r| !r.is_empty());
    let reviewer = match (&principal.name, given) {
        (Some(name), Some(g)) if g != name => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "reviewer_mismatch",
                format!("you are signed in as `{name}`: the decision is recorded under that name (leave `reviewer` out)"),
            ))
        }
        (Some(name), _) => name.clone(),
        (None, g) => g.unwrap_or_default().to_string(),
    };
    if reviewer.is_empty() || reviewer.chars().count() > MAX_REVIEWER || reviewer.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_reviewer",
            format!("the reviewer's name is required (1 to {MAX_REVIEWER} characters, one line)"),
        ));
    }
    let note = d.note.map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
    if note.as_ref().is_some_and(|n| n.chars().count() > MAX_NOTE) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "note_too_long",
            format!("the note is longer than {MAX_NOTE} characters"),
        ));
    }
    let key = id.clone();
    let (decision, decisions) = app
        .with_store(move |st| {
            let d = st.record_decision(&mica_report::cases::NewDecision {
                case_id: &key,
                decided_unix: now_unix(),
                reviewer: &reviewer,
                final_label: &label,
                note: note.as_deref(),
                user_id: principal.name.as_deref(),
                auth_method: principal.method.stored(),
            })?;
            let all = st.decisions(&key)?;
            Ok((d, all))
        })
        .await?;
    tracing::info!("case {id}: decision {} recorded", decision.id);
    let view = case_view(&app, case, decisions);
    Ok((StatusCode::CREATED, Json(json!({"decision": DecisionView::from(decision), "case": view}))).into_response())
}

fn png_response(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "image/png"), (header::CACHE_CONTROL, "private, max-age=3600")], bytes).into_response()
}

fn image_gone(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "the image of case {id} is no longer held: mica keeps uploaded images in memory only, for the most recent cases (within a fixed memory budget), and never stores them"
    ))
}

async fn case_image(State(app): State<App>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if !valid_case_id(&id) {
        return Err(ApiError::not_found("no such case"));
    }
    app.with_images(&id, |c| Some(c.image_png.clone()))
        .map(png_response)
        .ok_or_else(|| image_gone(&id))
}

async fn case_gradcam(State(app): State<App>, Path((id, index)): Path<(String, String)>) -> Result<Response, ApiError> {
    let i: usize = index.parse().map_err(|_| ApiError::not_found("no such overlay"))?;
    if !valid_case_id(&id) {
        return Err(ApiError::not_found("no such case"));
    }
    app.with_images(&id, |c| c.overlays.get(&i).cloned())
        .map(png_response)
        .ok_or_else(|| ApiError::not_found(format!("no Grad-CAM overlay {i} for case {id} (only CNN answers have one, and only while the case's image is held)")))
}

/// A run as the API shows it (no server paths).
#[derive(Serialize)]
pub(crate) struct RunView {
    pub id: i64,
    pub name: String,
    pub created: Option<String>,
    pub indexed: String,
    pub dataset: Option<String>,
    pub split_hash: Option<String>,
    pub simulated: bool,
    pub classifiers: usize,
    pub best_classifier: Option<String>,
    pub best_accuracy: Option<f64>,
    pub report_url: String,
}

impl From<mica_report::store::StoredRun> for RunView {
    fn from(r: mica_report::store::StoredRun) -> Self {
        RunView {
            id: r.id,
            report_url: format!("/runs/{}", r.id),
            name: r.name,
            created: r.created_unix.map(|t| iso_utc(from_unix(t))),
            indexed: iso_utc(from_unix(r.indexed_unix)),
            dataset: r.dataset,
            split_hash: r.split_hash,
            simulated: r.simulated,
            classifiers: r.classifiers,
            best_classifier: r.best_classifier,
            best_accuracy: r.best_accuracy,
        }
    }
}

async fn list_runs(State(app): State<App>) -> Result<Json<Value>, ApiError> {
    let runs = app.with_store(|st| st.list()).await?;
    let runs: Vec<RunView> = runs.into_iter().map(RunView::from).collect();
    Ok(Json(json!({ "runs": runs })))
}

/// Looks a run up by its numeric id in the store (never by a path).
pub(crate) async fn find_run(app: &App, id: &str) -> Result<mica_report::store::StoredRun, ApiError> {
    let n: i64 = id.parse().map_err(|_| ApiError::not_found(format!("no run `{}`", truncate(id, 40))))?;
    app.with_store(move |st| Ok(st.list()?.into_iter().find(|r| r.id == n)))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no run {n} in the results store")))
}

async fn get_run(State(app): State<App>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let run = find_run(&app, &id).await?;
    let rid = run.id;
    let results = app.with_store(move |st| st.results(rid)).await?;
    Ok(Json(json!({ "run": RunView::from(run), "results": results })))
}

async fn monitoring(State(app): State<App>) -> Result<Json<Value>, ApiError> {
    let (m, recent) = app.with_store(|st| Ok((st.monitoring()?, st.recent_decisions(50)?))).await?;
    let recent: Vec<Value> = recent
        .into_iter()
        .map(|(d, suggestions)| {
            json!({
                "case_id": d.case_id,
                "case_url": format!("/cases/{}", d.case_id),
                "decision": DecisionView::from(d),
                "suggestions": suggestions,
            })
        })
        .collect();
    Ok(Json(json!({
        "cases": m.cases,
        "decided": m.decided,
        "awaiting_review": m.awaiting_review,
        "models": m.models,
        "recent_decisions": recent,
    })))
}
