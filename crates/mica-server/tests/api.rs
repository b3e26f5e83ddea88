//! The JSON API and pages, exercised in process (`tower::ServiceExt::oneshot`) and over a real
//! loopback socket, with an untrained CNN checkpoint written here and the LLM simulator.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use mica_core::{LabelSet, Modality, Outcome, Prediction};
use mica_llm::sim::{SimConfig, SimServer, TruthTable};
use mica_server::{App, LlmOptions, Panel, Settings};
use serde_json::{json, Value};
use tower::ServiceExt;

const PATIENT_NAME: &str = "DOE^JANE-SECRETNAME";
const PATIENT_ID: &str = "MRN-0042-SECRETID";

struct Fixture {
    _tmp: tempfile::TempDir,
    store: PathBuf,
    router: Router,
    app: App,
    sim: SimServer,
}

struct Opts {
    token: Option<&'static str>,
    max_upload: usize,
    key_env: &'static str,
    llm: bool,
    url_secret: Option<&'static str>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { token: None, max_upload: 1 << 20, key_env: "MICA_SERVER_TEST_UNSET_KEY", llm: true, url_secret: None }
    }
}

async fn fixture(o: Opts) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("cnn-run");
    common::write_checkpoint(&run, Modality::Mri);
    let sim = SimServer::start(SimConfig::default(), TruthTable::new(), "127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let mut specs = vec![format!("cnn:{}", run.display())];
    if o.llm {
        let url = match o.url_secret {
            Some(s) => sim.url().replace("http://", &format!("http://user:{s}@")),
            None => sim.url(),
        };
        specs.push(format!("llm:openai-compatible/sim-vision@{url}"));
    }
    let llm = LlmOptions { api_key_env: o.key_env.into(), ..LlmOptions::default() };
    let meter = mica_energy::MeterConfig { try_nvml: false, ..Default::default() };
    let panel = Panel::load(&specs, None, &llm, &meter).unwrap();
    let store = tmp.path().join("store.sqlite");
    let st = mica_report::Store::open(&store).unwrap();
    let app = App::new(
        panel,
        st,
        Settings { max_upload_bytes: o.max_upload, review_threshold: 0.7, token: o.token.map(String::from) },
    )
    .unwrap();
    let router = mica_server::router(app.clone());
    Fixture { _tmp: tmp, store, router, app, sim }
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The `message` of a JSON error.
    fn message(&self) -> String {
        self.json()["error"]["message"].as_str().unwrap_or_default().to_string()
    }
}

async fn send(router: &Router, req: Request<Body>) -> Resp {
    let r = router.clone().oneshot(req).await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes().to_vec();
    Resp { status, headers, body }
}

async fn get(router: &Router, uri: &str) -> Resp {
    send(router, Request::get(uri).body(Body::empty()).unwrap()).await
}

const BOUNDARY: &str = "mica-test-boundary-7f3a";

fn multipart(field: &str, filename: &str, bytes: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    write!(
        b,
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .unwrap();
    b.extend_from_slice(bytes);
    write!(b, "\r\n--{BOUNDARY}--\r\n").unwrap();
    b
}

fn upload_request(body: Vec<u8>) -> Request<Body> {
    Request::post("/api/v1/classify?wait=true")
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .unwrap()
}

async fn upload(router: &Router, filename: &str, bytes: &[u8]) -> Resp {
    send(router, upload_request(multipart("file", filename, bytes))).await
}

fn png(seed: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(48, 40, |x, y| image::Luma([((x * 5 + y * 3 + seed * 17) % 256) as u8]));
    mica_data::image::png_bytes(&img)
}

fn jpeg() -> Vec<u8> {
    let img = image::GrayImage::from_fn(32, 32, |x, y| image::Luma([((x * 8) ^ (y * 8)) as u8]));
    let mut out = Vec::new();
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .unwrap();
    out
}

/// A DICOM Part 10 file made with dicom-rs, carrying patient identifiers; with or without a
/// PixelData element.
fn dicom(with_pixels: bool) -> Vec<u8> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::{tags, uids};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    let mut obj = InMemDicomObject::new_empty();
    let mut put = |tag, vr, v: PrimitiveValue| {
        obj.put(DataElement::new(tag, vr, v));
    };
    put(tags::SOP_CLASS_UID, VR::UI, uids::SECONDARY_CAPTURE_IMAGE_STORAGE.into());
    put(tags::SOP_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.2.1125.42.1".into());
    put(tags::PATIENT_NAME, VR::PN, PATIENT_NAME.into());
    put(tags::PATIENT_ID, VR::LO, PATIENT_ID.into());
    put(tags::PATIENT_BIRTH_DATE, VR::DA, "19700101".into());
    put(tags::INSTITUTION_NAME, VR::LO, "General Hospital".into());
    put(tags::MODALITY, VR::CS, "MR".into());
    if with_pixels {
        let (w, h) = (32u16, 24u16);
        put(tags::SAMPLES_PER_PIXEL, VR::US, 1u16.into());
        put(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2".into());
        put(tags::ROWS, VR::US, h.into());
        put(tags::COLUMNS, VR::US, w.into());
        put(tags::BITS_ALLOCATED, VR::US, 8u16.into());
        put(tags::BITS_STORED, VR::US, 8u16.into());
        put(tags::HIGH_BIT, VR::US, 7u16.into());
        put(tags::PIXEL_REPRESENTATION, VR::US, 0u16.into());
        let px: Vec<u8> = (0..w as usize * h as usize).map(|i| (i * 7 % 256) as u8).collect();
        put(tags::PIXEL_DATA, VR::OB, px.into());
    }
    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .unwrap();
    let mut out = Vec::new();
    file.write_all(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_upload_gets_a_clear_message() {
    let f = fixture(Opts { max_upload: 64 * 1024, llm: false, ..Opts::default() }).await;
    let r = &f.router;

    // An empty request body.
    let resp = send(r, upload_request(Vec::new())).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{}", resp.text());
    assert!(resp.message().contains("the upload is empty"), "{}", resp.message());

    // A multipart body with no parts at all.
    let resp = send(r, upload_request(format!("--{BOUNDARY}--\r\n").into_bytes())).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{}", resp.text());
    assert!(resp.message().contains("empty"), "{}", resp.message());

    // A part under another name.
    let resp = send(r, upload_request(multipart("picture", "x.png", &png(1)))).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert!(resp.message().contains("no `file` field"), "{}", resp.message());

    // A 0-byte file.
    let resp = upload(r, "empty.png", b"").await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(resp.json()["error"]["code"], "empty_file");
    assert!(resp.message().contains("0 bytes"), "{}", resp.message());

    // Oversized: declared by Content-Length, and streamed without one.
    let big = vec![0x89u8; 200 * 1024];
    let resp = upload(r, "big.png", &big).await;
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", resp.text());
    assert!(resp.message().contains("larger than the limit of 64 KB"), "{}", resp.message());
    let body = multipart("file", "big.png", &vec![0x89u8; 100 * 1024]);
    let req = Request::post("/api/v1/classify")
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(Body::from(body))
        .unwrap();
    let resp = send(r, req).await;
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "upload_too_large");

    // A text file renamed .png.
    let resp = upload(r, "scan.png", b"Patient looks fine, see attached notes.\n").await;
    assert_eq!(resp.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", resp.text());
    let m = resp.message();
    assert!(m.contains("not a PNG, JPEG or DICOM image") && m.contains("\"Patient "), "{m}");

    // A PNG that breaks off halfway.
    let p = png(2);
    let resp = upload(r, "cut.png", &p[..p.len() / 2]).await;
    assert_eq!(resp.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", resp.text());
    assert!(resp.message().contains("cannot decode the png"), "{}", resp.message());

    // A DICOM file without pixel data; its patient name never appears in the answer.
    let resp = upload(r, "report.dcm", &dicom(false)).await;
    assert_eq!(resp.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "dicom_without_pixels");
    assert!(resp.message().contains("no pixel data"), "{}", resp.message());
    assert!(!resp.text().contains("SECRET"));

    // Not multipart at all.
    let req = Request::post("/api/v1/classify").header(header::CONTENT_TYPE, "image/png").body(Body::from(png(3))).unwrap();
    let resp = send(r, req).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert!(resp.message().contains("multipart/form-data"), "{}", resp.message());

    // None of it created a case, and a good upload still works afterwards.
    let m = get(r, "/api/v1/monitoring").await.json();
    assert_eq!(m["cases"], 0);
    let resp = upload(r, "ok.jpg", &jpeg()).await;
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.text());
    assert_eq!(resp.json()["image"]["format"], "jpeg");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keeps_serving_on_a_real_socket_after_bad_uploads() {
    let f = fixture(Opts { max_upload: 64 * 1024, llm: false, ..Opts::default() }).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mica_server::serve(listener, f.app.clone(), async {
        let _ = rx.await;
    }));
    let client = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        client
            .post(format!("http://{addr}/api/v1/classify"))
            .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
            .body(body)
            .send()
    };
    let bad: Vec<(&str, Vec<u8>, u16)> = vec![
        ("empty body", Vec::new(), 400),
        ("0-byte file", multipart("file", "a.png", b""), 400),
        ("text renamed .png", multipart("file", "a.png", b"just some text"), 415),
        ("DICOM without pixels", multipart("file", "a.dcm", &dicom(false)), 422),
        ("truncated PNG", multipart("file", "a.png", &png(4)[..40]), 422),
        ("oversized", multipart("file", "a.png", &vec![7u8; 100 * 1024]), 413),
    ];
    for (what, body, status) in bad {
        let resp = post(body).await.unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let v: Value = resp.json().await.unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.len() > 15, "{what}: {v}");
        // After each one the server still answers.
        let h = client.get(format!("http://{addr}/api/v1/health")).send().await.unwrap();
        assert_eq!(h.status().as_u16(), 200, "after {what}");
    }
    let ok = post(multipart("file", "ok.png", &png(5))).await.unwrap();
    assert_eq!(ok.status().as_u16(), 201);
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_answers_side_by_side_with_energy_gradcam_and_rationale() {
    let f = fixture(Opts::default()).await;
    let r = &f.router;
    let resp = upload(r, "brain.png", &png(6)).await;
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.text());
    let c = resp.json();
    let id = c["id"].as_str().unwrap().to_string();
    assert_eq!(resp.headers.get(header::LOCATION).unwrap(), &format!("/api/v1/cases/{id}"));
    assert!(c["notice"].as_str().unwrap().contains("not a diagnosis") || c["notice"].as_str().unwrap().contains("nothing here is a diagnosis"));
    assert_eq!(c["labels"].as_array().unwrap().len(), 4);
    assert_eq!(c["image"]["format"], "png");
    assert_eq!((c["image"]["width"].as_u64(), c["image"]["height"].as_u64()), (Some(48), Some(40)));
    assert_eq!(c["image"]["sha256"].as_str().unwrap().len(), 64);
    let preds = c["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2, "{c}");

    let cnn = &preds[0];
    assert_eq!(cnn["classifier"], "cnn:small");
    assert_eq!(cnn["family"], "cnn");
    assert!(cnn["model_version"].as_str().unwrap().contains("weights fnv64:"), "{cnn}");
    assert_eq!(cnn["outcome"], "answered");
    let label = cnn["suggested_label"].as_str().unwrap();
    assert!(c["labels"].as_array().unwrap().iter().any(|l| l == label));
    let probs = cnn["probabilities"].as_object().unwrap();
    assert_eq!(probs.len(), 4);
    let sum: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-3, "{sum}");
    assert!(cnn["latency_ms"].as_f64().unwrap() > 0.0);
    let method = cnn["energy_method"].as_str().unwrap();
    assert!(method.starts_with("measured:") || method.starts_with("estimated:"), "{method}");
    assert!(cnn["energy_wh"].as_f64().unwrap() >= 0.0);
    let gradcam = cnn["gradcam_url"].as_str().unwrap();
    let g = get(r, gradcam).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.headers.get(header::CONTENT_TYPE).unwrap(), "image/png");
    let overlay = image::load_from_memory(&g.body).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (48, 40), "overlay at the image's own size");

    let llm = &preds[1];
    assert_eq!(llm["family"], "llm");
    assert!(llm["classifier"].as_str().unwrap().starts_with("llm:openai-compatible/sim-vision@http://127.0.0.1:"));
    assert_eq!(llm["energy_method"], "not-measured:remote-api");
    assert!(llm["energy_wh"].is_null());
    assert_eq!(llm["simulated"], true);
    assert!(llm["rationale"].as_str().unwrap().len() > 5, "{llm}");
    assert!(llm["gradcam_url"].is_null());

    // The review flag follows the rule: any suggestion below 0.7, a missing answer, or a
    // disagreement.
    let labels: Vec<&str> = preds.iter().filter_map(|p| p["suggested_label"].as_str()).collect();
    let low = preds.iter().any(|p| p["confidence"].as_f64().is_none_or(|c| c < 0.7));
    let disagree = labels.len() == 2 && labels[0] != labels[1];
    assert_eq!(c["needs_review"].as_bool().unwrap(), low || disagree || labels.len() < 2, "{c}");
    assert_eq!(c["review_reasons"].as_array().unwrap().is_empty(), !c["needs_review"].as_bool().unwrap());

    // The case reads back the same, with its image while it is held.
    let back = get(r, &format!("/api/v1/cases/{id}")).await;
    assert_eq!(back.status, StatusCode::OK);
    let b = back.json();
    assert_eq!(b["predictions"], c["predictions"]);
    assert!(b["decision"].is_null());
    let img = get(r, b["image"]["url"].as_str().unwrap()).await;
    assert_eq!(img.status, StatusCode::OK);
    let decoded = image::load_from_memory(&img.body).unwrap().to_luma8();
    assert_eq!(decoded, image::load_from_memory(&png(6)).unwrap().to_luma8());

    // Unknown or malformed ids are plain 404s; nothing is read from a path.
    for bad in ["0123456789abcdef0123456789abcdef", "..%2F..%2Fetc%2Fpasswd", "ABCDEF"] {
        let resp = get(r, &format!("/api/v1/cases/{bad}")).await;
        assert_eq!(resp.status, StatusCode::NOT_FOUND, "{bad}");
        assert!(resp.json()["error"]["message"].is_string());
    }
    assert_eq!(get(r, &format!("/api/v1/cases/{id}/gradcam/1")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(r, &format!("/api/v1/cases/{id}/gradcam/x")).await.status, StatusCode::NOT_FOUND);
    f.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicom_uploads_are_classified_without_their_patient_fields() {
    let f = fixture(Opts::default()).await;
    let resp = upload(&f.router, "scan.dcm", &dicom(true)).await;
    assert_eq!(resp.status, StatusCode::CREATED, "{}", resp.text());
    let c = resp.json();
    assert_eq!(c["image"]["format"], "dicom");
    assert_eq!((c["image"]["width"].as_u64(), c["image"]["height"].as_u64()), (Some(32), Some(24)));
    let removed: Vec<&str> = c["image"]["deidentified"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for k in ["PatientName", "PatientID", "PatientBirthDate", "InstitutionName"] {
        assert!(removed.contains(&k), "{removed:?}");
    }
    let id = c["id"].as_str().unwrap();
    let d = send(
        &f.router,
        Request::post(format!("/api/v1/cases/{id}/decision"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json!({"final_label": "glioma", "reviewer": "Dr Who"}).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(d.status, StatusCode::CREATED, "{}", d.text());
    // Neither any answer nor the store holds the identifiers.
    for uri in [format!("/api/v1/cases/{id}"), "/api/v1/monitoring".into()] {
        let t = get(&f.router, &uri).await.text();
        assert!(!t.contains("SECRET") && !t.contains("General Hospital"), "{uri}: {t}");
    }
    assert!(!resp.text().contains("SECRET"));
    drop(f.app);
    let raw = std::fs::read(&f.store).unwrap();
    let wal = std::fs::read(f.store.with_extension("sqlite-wal")).unwrap_or_default();
    for bytes in [raw, wal] {
        let s = String::from_utf8_lossy(&bytes);
        assert!(!s.contains(PATIENT_NAME) && !s.contains(PATIENT_ID) && !s.contains("General Hospital"));
    }
    f.sim.shutdown().await;
}

async fn decide(r: &Router, id: &str, body: Value) -> Resp {
    send(
        r,
        Request::post(format!("/api/v1/cases/{id}/decision"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_form_an_audit_trail_in_the_store() {
    let f = fixture(Opts::default()).await;
    let r = &f.router;
    let c = upload(r, "a.png", &png(7)).await.json();
    let id = c["id"].as_str().unwrap();

    let bad = decide(r, id, json!({"final_label": "fracture", "reviewer": "Dr A"})).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(bad.message().contains("not one of this case's labels") && bad.message().contains("glioma"), "{}", bad.message());
    let bad = decide(r, id, json!({"final_label": "glioma", "reviewer": "  "})).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(bad.message().contains("reviewer"));
    let bad = decide(r, id, json!({"final_label": "glioma"})).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let bad = decide(r, id, json!({"final_label": "glioma", "reviewer": "A", "note": "x".repeat(5000)})).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let ghost = decide(r, "0123456789abcdef0123456789abcdef", json!({"final_label": "glioma", "reviewer": "A"})).await;
    assert_eq!(ghost.status, StatusCode::NOT_FOUND);

    let first = decide(r, id, json!({"final_label": "meningioma", "reviewer": "Dr A", "note": "first read"})).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let d1 = first.json();
    assert_eq!(d1["decision"]["reviewer"], "Dr A");
    assert!(d1["decision"]["decided"].as_str().unwrap().ends_with('Z'));
    let second = decide(r, id, json!({"final_label": "glioma", "reviewer": "Dr B"})).await.json();
    assert_eq!(second["case"]["decisions"].as_array().unwrap().len(), 2);
    assert_eq!(second["case"]["decision"]["final_label"], "glioma");
    assert_eq!(second["case"]["decision"]["reviewer"], "Dr B");

    // The store has who, when, what, and the model versions the physician saw.
    let st = mica_report::Store::open(&f.store).unwrap();
    let rec = st.case(id).unwrap().unwrap();
    assert_eq!(rec.predictions.len(), 2);
    assert!(rec.predictions[0].model_version.contains("small epoch 1 weights fnv64:"));
    assert!(rec.predictions[1].model_version.contains("sim-vision"));
    let trail = st.decisions(id).unwrap();
    assert_eq!(trail.len(), 2);
    assert_eq!((trail[0].reviewer.as_str(), trail[0].final_label.as_str(), trail[0].note.as_deref()), ("Dr A", "meningioma", Some("first read")));
    assert!(trail[1].decided_unix >= trail[0].decided_unix && trail[0].decided_unix > 1_600_000_000);
    f.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_reports_each_models_agreement_with_the_physicians() {
    let f = fixture(Opts::default()).await;
    let r = &f.router;
    let mut expected: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    let finals = ["glioma", "pituitary", "no_tumor"];
    for (k, fin) in finals.iter().enumerate() {
        let c = upload(r, "m.png", &png(10 + k as u32)).await.json();
        let id = c["id"].as_str().unwrap();
        for p in c["predictions"].as_array().unwrap() {
            let e = expected.entry(p["classifier"].as_str().unwrap().to_string()).or_default();
            e.0 += 1;
            e.1 += u64::from(p["suggested_label"].as_str() == Some(fin));
        }
        assert_eq!(decide(r, id, json!({"final_label": fin, "reviewer": "Dr M"})).await.status, StatusCode::CREATED);
    }
    // One more case, undecided.
    upload(r, "m.png", &png(20)).await;
    let m = get(r, "/api/v1/monitoring").await.json();
    assert_eq!((m["cases"].as_u64(), m["decided"].as_u64()), (Some(4), Some(3)));
    let models = m["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    for x in models {
        let (n, agreed) = expected[x["classifier"].as_str().unwrap()];
        assert_eq!(x["decided"].as_u64(), Some(n));
        assert_eq!(x["agreed"].as_u64(), Some(agreed), "{x}");
        assert!((x["agreement"].as_f64().unwrap() - agreed as f64 / n as f64).abs() < 1e-12);
        let days = x["days"].as_array().unwrap();
        assert_eq!(days.len(), 1);
        assert_eq!(days[0]["day"].as_str().unwrap(), &mica_core::time::iso_utc(std::time::SystemTime::now())[..10]);
    }
    let recent = m["recent_decisions"].as_array().unwrap();
    assert_eq!(recent.len(), 3);
    assert_eq!(recent[0]["decision"]["final_label"], "no_tumor");
    assert_eq!(recent[0]["suggestions"].as_array().unwrap().len(), 2);
    // The page exists and loads its data from the same API.
    let page = get(r, "/monitoring").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text().contains("/api/v1/monitoring"));
    f.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_is_off_without_a_token_and_required_with_one() {
    let open = fixture(Opts { llm: false, ..Opts::default() }).await;
    assert_eq!(get(&open.router, "/api/v1/health").await.json()["auth_required"], false);
    assert_eq!(get(&open.router, "/").await.status, StatusCode::OK);

    let token = "t0k3n-for-api-tests";
    let f = fixture(Opts { token: Some(token), llm: false, ..Opts::default() }).await;
    let r = &f.router;
    for uri in ["/api/v1/health", "/api/v1/runs", "/api/v1/monitoring", "/api/v1/openapi.yaml", "/api/v1/cases/0123456789abcdef0123456789abcdef"] {
        let resp = get(r, uri).await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(resp.headers.get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
        assert!(resp.message().contains("bearer token"), "{uri}");
    }
    let resp = upload(r, "a.png", &png(1)).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "uploads are refused before they are read");
    let wrong = send(r, Request::get("/api/v1/health").header(header::AUTHORIZATION, "Bearer nope").body(Body::empty()).unwrap()).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let ok = send(r, Request::get("/api/v1/health").header(header::AUTHORIZATION, format!("Bearer {token}")).body(Body::empty()).unwrap()).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json()["auth_required"], true);
    let mut req = upload_request(multipart("file", "a.png", &png(1)));
    req.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    assert_eq!(send(r, req).await.status, StatusCode::CREATED);

    // Pages: a sign-in form that POSTs the token; a token in the address does nothing. The
    // POST sets a session cookie and goes back to the page asked for.
    for uri in ["/", "/monitoring", "/runs"] {
        let resp = get(r, uri).await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{uri}");
        let t = resp.text();
        assert!(t.contains("name=\"token\"") && t.contains("method=\"post\""), "{uri}");
    }
    let resp = get(r, &format!("/monitoring?token={token}")).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "a GET never signs in");
    assert!(resp.headers.get(header::SET_COOKIE).is_none());
    let sign_in = |body: String| {
        Request::post("/sign-in").header(header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(Body::from(body)).unwrap()
    };
    assert_eq!(send(r, sign_in("token=wrong-token-of-20c&next=%2Fmonitoring".into())).await.status, StatusCode::UNAUTHORIZED);
    let resp = send(r, sign_in(format!("token={token}&next=%2Fmonitoring"))).await;
    assert_eq!(resp.status, StatusCode::SEE_OTHER);
    assert_eq!(resp.headers.get(header::LOCATION).unwrap(), "/monitoring");
    let cookie = resp.headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(!cookie.contains(token), "the cookie holds a random session id, not the token");
    let pair = cookie.split(';').next().unwrap().to_string();
    for uri in ["/monitoring", "/api/v1/monitoring"] {
        let resp = send(r, Request::get(uri).header(header::COOKIE, &pair).body(Body::empty()).unwrap()).await;
        assert_eq!(resp.status, StatusCode::OK, "{uri}");
    }
    // The token in a query string does not open the API.
    assert_eq!(get(r, &format!("/api/v1/health?token={token}")).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_api_key_reaches_any_response() {
    const KEY: &str = "sk-mica-server-test-NEVER-SHOWN-91c2";
    const URL_SECRET: &str = "urlpass-NEVER-SHOWN-77";
    // A variable name only this test uses, set before anything reads it.
    std::env::set_var("MICA_SERVER_TEST_API_KEY", KEY);
    let f = fixture(Opts { key_env: "MICA_SERVER_TEST_API_KEY", url_secret: Some(URL_SECRET), ..Opts::default() }).await;
    let r = &f.router;
    let c = upload(r, "k.png", &png(30)).await;
    assert_eq!(c.status, StatusCode::CREATED, "{}", c.text());
    let id = c.json()["id"].as_str().unwrap().to_string();
    let d = decide(r, &id, json!({"final_label": "glioma", "reviewer": "Dr K"})).await;
    let mut bodies = vec![c.text(), d.text()];
    for uri in [
        "/api/v1/health".to_string(),
        format!("/api/v1/cases/{id}"),
        "/api/v1/monitoring".into(),
        "/api/v1/runs".into(),
        "/api/v1/openapi.yaml".into(),
        "/".into(),
        format!("/cases/{id}"),
        "/monitoring".into(),
        "/runs".into(),
    ] {
        let resp = get(r, &uri).await;
        assert_eq!(resp.status, StatusCode::OK, "{uri}");
        bodies.push(resp.text());
    }
    for b in &bodies {
        assert!(!b.contains(KEY) && !b.contains("NEVER-SHOWN"), "{b}");
    }
    // The LLM really was asked (through the URL with credentials) and answered.
    let llm = &c.json()["predictions"][1];
    assert_eq!(llm["outcome"], "answered", "{llm}");
    assert!(f.sim.stats().requests() >= 1);
    f.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_listed_from_the_store_and_their_reports_rendered() {
    let f = fixture(Opts { llm: false, ..Opts::default() }).await;
    let r = &f.router;
    assert_eq!(get(r, "/api/v1/runs").await.json()["runs"], json!([]));

    // A one-classifier run directory, indexed as `mica runs add` would.
    let run = f.store.parent().unwrap().join("runs/demo-run");
    let slug = run.join("cnn-small");
    std::fs::create_dir_all(&slug).unwrap();
    let labels = LabelSet::new(["a", "b"].iter().map(|s| s.to_string()).collect()).unwrap();
    let preds: Vec<Prediction> = (0..20)
        .map(|i| {
            let mut p = Prediction::new(format!("img{i}.png"), "cnn:small", Outcome::Answered);
            p.true_label = Some(["a", "b"][i % 2].into());
            p.predicted = Some(["a", "b"][(i % 2 + usize::from(i % 5 == 0)) % 2].into());
            p.confidence = Some(0.8);
            p.latency_ms = 2.0;
            p
        })
        .collect();
    let (mut log, _) = mica_core::PredictionLog::open(slug.join("predictions.jsonl")).unwrap();
    for p in &preds {
        log.append(p).unwrap();
    }
    let m = mica_eval::RunMetrics::from_predictions("cnn:small", "data/x", "test", &labels, &preds, 1.0, &mica_eval::EvalOptions::default()).unwrap();
    m.write(slug.join("metrics.json")).unwrap();
    {
        let mut st = mica_report::Store::open(&f.store).unwrap();
        // A folder of runs indexes each run in it; the run itself indexes just itself (again:
        // the same run, not a second one).
        let (n, notes) = mica_server::index_runs_dir(&mut st, run.parent().unwrap()).unwrap();
        assert_eq!(n, 1, "{notes:?}");
        let (n, notes) = mica_server::index_runs_dir(&mut st, &run).unwrap();
        assert_eq!(n, 1, "{notes:?}");
        assert_eq!(st.list().unwrap().len(), 1);
    }
    let list = get(r, "/api/v1/runs").await.json();
    let runs = list["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["name"], "demo-run");
    assert!(runs[0].get("run_dir").is_none(), "server paths stay on the server");
    let id = runs[0]["id"].as_i64().unwrap();
    let one = get(r, &format!("/api/v1/runs/{id}")).await.json();
    assert_eq!(one["results"][0]["classifier"], "cnn:small");
    assert!((one["results"][0]["accuracy"].as_f64().unwrap() - 0.8).abs() < 1e-9);
    let page = get(r, &format!("/runs/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    let html = page.text();
    assert!(html.contains("mica comparison") && html.contains("all runs") && html.contains("<svg"), "{}", &html[..html.len().min(400)]);
    for bad in ["999", "abc", "..%2F..%2Fetc"] {
        assert_eq!(get(r, &format!("/api/v1/runs/{bad}")).await.status, StatusCode::NOT_FOUND, "{bad}");
        assert_eq!(get(r, &format!("/runs/{bad}")).await.status, StatusCode::NOT_FOUND, "{bad}");
    }
    let page = get(r, "/runs").await;
    assert!(page.text().contains("/api/v1/runs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_self_contained_and_speak_of_suggestions() {
    let f = fixture(Opts { llm: false, ..Opts::default() }).await;
    for uri in ["/", "/monitoring", "/runs", "/cases/0123456789abcdef0123456789abcdef"] {
        let p = get(&f.router, uri).await;
        assert_eq!(p.status, StatusCode::OK, "{uri}");
        let t = p.text();
        assert!(!t.contains("http://") && !t.contains("https://") && !t.contains("//cdn"), "{uri}: no external resource");
        assert!(!t.to_lowercase().contains("diagnosis:"), "{uri}");
        assert!(p.headers.get("content-security-policy").is_some());
    }
    let home = get(&f.router, "/").await.text();
    assert!(home.contains("suggested label") && home.contains("not a diagnosis"));
    assert!(home.contains("/api/v1/classify") && home.contains("dragover"));
    assert_eq!(get(&f.router, "/cases/not-a-case").await.status, StatusCode::NOT_FOUND);
    let nf = get(&f.router, "/api/v1/nothing").await;
    assert_eq!(nf.status, StatusCode::NOT_FOUND);
    assert!(nf.message().contains("openapi"));
}

/// The paths and methods of `openapi.yaml` (a plain scan of its `paths:` block: two-space
/// indented paths, four-space indented methods).
fn openapi_routes() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_paths = false;
    let mut path = String::new();
    for line in mica_server::OPENAPI.lines() {
        if !line.starts_with(' ') {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  ").filter(|l| !l.starts_with(' ')) {
            path = p.trim_end().trim_end_matches(':').to_string();
        } else if let Some(m) = line.strip_prefix("    ").filter(|l| !l.starts_with(' ')) {
            let m = m.trim_end().trim_end_matches(':');
            if ["get", "post", "put", "delete", "patch"].contains(&m) {
                out.push((m.to_string(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn every_api_route_is_in_the_openapi_file_and_nothing_else_is() {
    let documented = openapi_routes();
    assert!(documented.len() >= 10, "{documented:?}");
    let routed: Vec<(String, String)> = mica_server::route_table()
        .into_iter()
        .filter(|r| r.path.starts_with("/api/"))
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    for r in &routed {
        assert!(documented.contains(r), "route {r:?} is missing from openapi.yaml");
    }
    for d in &documented {
        assert!(routed.contains(d), "openapi.yaml documents {d:?}, which the router does not serve");
    }
    assert!(mica_server::OPENAPI.starts_with("openapi: 3."));
}

/// The response codes the OpenAPI file documents for each operation.
fn openapi_statuses() -> Vec<((String, String), Vec<u16>)> {
    let mut out: Vec<((String, String), Vec<u16>)> = Vec::new();
    let mut in_paths = false;
    let (mut path, mut in_responses) = (String::new(), false);
    for line in mica_server::OPENAPI.lines() {
        if !line.starts_with(' ') {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  ").filter(|l| !l.starts_with(' ')) {
            path = p.trim_end().trim_end_matches(':').to_string();
        } else if let Some(m) = line.strip_prefix("    ").filter(|l| !l.starts_with(' ')) {
            out.push(((m.trim_end().trim_end_matches(':').to_string(), path.clone()), Vec::new()));
            in_responses = false;
        } else if let Some(l) = line.strip_prefix("      ").filter(|l| !l.starts_with(' ')) {
            in_responses = l.trim_end() == "responses:";
        } else if let Some(code) = line.strip_prefix("        \"").filter(|_| in_responses) {
            if let Some(n) = code.split('"').next().and_then(|c| c.parse().ok()) {
                out.last_mut().unwrap().1.push(n);
            }
        }
    }
    out
}

/// Every operation lists the answers every route can give (a refused Host, no or a wrong
/// identity, a refused origin or role, a wrong method, a request timeout, a server failure),
/// POSTs the body limit, and each route the statuses its handler returns.
#[test]
fn every_route_documents_every_status_it_returns() {
    let documented = openapi_statuses();
    assert_eq!(documented.len(), openapi_routes().len());
    let handler_statuses: &[(&str, &str, &[u16])] = &[
        ("get", "/api/v1/health", &[200]),
        ("get", "/api/v1/openapi.yaml", &[200]),
        ("post", "/api/v1/classify", &[201, 400, 413, 415, 422, 503]),
        ("get", "/api/v1/cases/{id}", &[200, 404]),
        ("post", "/api/v1/cases/{id}/decision", &[201, 404, 409, 413, 422]),
        ("get", "/api/v1/cases/{id}/image.png", &[200, 404]),
        ("get", "/api/v1/cases/{id}/gradcam/{index}", &[200, 404]),
        ("get", "/api/v1/runs", &[200]),
        ("get", "/api/v1/runs/{id}", &[200, 404]),
        ("get", "/api/v1/monitoring", &[200]),
    ];
    for r in mica_server::route_table().into_iter().filter(|r| r.path.starts_with("/api/")) {
        let codes = &documented
            .iter()
            .find(|((m, p), _)| m == r.method && p == r.path)
            .unwrap_or_else(|| panic!("{r:?} is not in openapi.yaml"))
            .1;
        let mut needed = vec![400, 401, 403, 405, 408, 500];
        if r.method == "post" {
            needed.push(413);
        }
        let own = handler_statuses
            .iter()
            .find(|(m, p, _)| *m == r.method && *p == r.path)
            .unwrap_or_else(|| panic!("{r:?}: add its handler's statuses to this test"));
        needed.extend_from_slice(own.2);
        for n in needed {
            assert!(codes.contains(&n), "{} {} does not document {n} (documents {codes:?})", r.method, r.path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_is_a_json_405() {
    let f = fixture(Opts { llm: false, ..Opts::default() }).await;
    for (method, uri) in [("GET", "/api/v1/classify"), ("DELETE", "/api/v1/health"), ("PUT", "/api/v1/cases/0123456789abcdef0123456789abcdef/decision"), ("GET", "/sign-out")] {
        let r = send(&f.router, Request::builder().method(method).uri(uri).body(Body::empty()).unwrap()).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        assert_eq!(r.json()["error"]["code"], "method_not_allowed", "{method} {uri}");
        assert!(r.message().contains(method), "{}", r.message());
        assert!(r.headers.get(header::ALLOW).is_some(), "{method} {uri}: the Allow header stays");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_file_is_served() {
    let f = fixture(Opts { llm: false, ..Opts::default() }).await;
    let r = get(&f.router, "/api/v1/openapi.yaml").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get(header::CONTENT_TYPE).unwrap().to_str().unwrap().starts_with("application/yaml"));
    assert_eq!(r.text(), mica_server::OPENAPI);
}
