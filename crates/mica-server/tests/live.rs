//! Answers as they arrive, several tasks in one server, and the limits of the case intake:
//! a case is created at once and filled in by each classifier on its own, a slow LLM never
//! holds back the CNN, an image whose DICOM header contradicts its task is flagged and not
//! classified, and an image with burned-in annotation never leaves this machine.
//!
//! The slow LLM is the test HTTP stub (`mica_llm::testing`) held on a gate the test opens,
//! so the assertions are about states, never about how long anything took.

mod common;

use std::io::Write as _;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use mica_core::Modality;
use mica_server::{App, LlmOptions, ServeOptions, Settings, TaskSpec};
use serde_json::{json, Value};
use tower::ServiceExt;

/// A rationale that would run script if the page put it in as HTML.
const XSS: &str = "</blockquote><img src=x onerror=\"document.title='pwned'\"><script>alert(1)</script>";

/// A gate the stub LLM waits on before answering.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn wait(&self) {
        let (m, c) = &*self.0;
        let mut open = m.lock().unwrap();
        while !*open {
            open = c.wait(open).unwrap();
        }
    }
    fn open(&self) {
        let (m, c) = &*self.0;
        *m.lock().unwrap() = true;
        c.notify_all();
    }
}

/// An OpenAI-compatible model server that answers `glioma` with [`XSS`] as its rationale,
/// once `gate` is open.
fn slow_llm(gate: Gate) -> mica_llm::testing::Server {
    mica_llm::testing::Server::start_routed(move |r| {
        if !r.path.contains("chat") {
            return (200, json!({"object": "list", "data": [{"id": "stub-vision", "object": "model"}]}).to_string());
        }
        gate.wait();
        let content = json!({"label": "glioma", "confidence": 0.91, "rationale": XSS}).to_string();
        let body = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000, "model": "stub-vision-2026-01-01",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}
        });
        (200, body.to_string())
    })
}

struct Fx {
    _tmp: tempfile::TempDir,
    router: Router,
    app: App,
}

fn settings() -> Settings {
    Settings { max_upload_bytes: 1 << 20, review_threshold: 0.7, token: None }
}

/// A server with the given tasks (`NAME=SPECS` with `{mri}`/`{xray}` standing for CNN runs).
fn server(tasks: &[&str], options: ServeOptions) -> Fx {
    let tmp = tempfile::tempdir().unwrap();
    let mri = tmp.path().join("mri-run");
    let xray = tmp.path().join("xray-run");
    common::write_checkpoint(&mri, Modality::Mri);
    common::write_checkpoint(&xray, Modality::Xray);
    let specs: Vec<TaskSpec> = tasks
        .iter()
        .map(|t| {
            let t = t.replace("{mri}", &format!("cnn:{}", mri.display())).replace("{xray}", &format!("cnn:{}", xray.display()));
            TaskSpec::parse(&t).unwrap()
        })
        .collect();
    let llm = LlmOptions { api_key_env: "MICA_LIVE_TEST_UNSET_KEY".into(), max_attempts: 1, ..LlmOptions::default() };
    let meter = mica_energy::MeterConfig { try_nvml: false, ..Default::default() };
    let loaded = mica_server::load_tasks(&specs, &llm, &meter).unwrap();
    let store = mica_report::Store::open(tmp.path().join("store.sqlite")).unwrap();
    let app = App::with_tasks(loaded, store, settings(), options).unwrap();
    Fx { router: mica_server::router(app.clone()), app, _tmp: tmp }
}

struct Resp {
    status: StatusCode,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(router: &Router, req: Request<Body>) -> Resp {
    let r = router.clone().oneshot(req).await.unwrap();
    let status = r.status();
    let body = r.into_body().collect().await.unwrap().to_bytes().to_vec();
    Resp { status, body }
}

async fn get(router: &Router, uri: &str) -> Resp {
    send(router, Request::get(uri).body(Body::empty()).unwrap()).await
}

const BOUNDARY: &str = "mica-live-boundary";

async fn upload(router: &Router, query: &str, filename: &str, bytes: &[u8]) -> Resp {
    let mut b = Vec::new();
    write!(
        b,
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .unwrap();
    b.extend_from_slice(bytes);
    write!(b, "\r\n--{BOUNDARY}--\r\n").unwrap();
    let req = Request::post(format!("/api/v1/classify{query}"))
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
        .header(header::CONTENT_LENGTH, b.len())
        .body(Body::from(b))
        .unwrap();
    send(router, req).await
}

fn png(seed: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(48, 40, |x, y| image::Luma([((x * 5 + y * 3 + seed * 17) % 256) as u8]));
    mica_data::image::png_bytes(&img)
}

/// A DICOM file with this Modality (and BurnedInAnnotation = YES when asked).
fn dicom(modality: &str, burned_in: bool) -> Vec<u8> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::{tags, uids};
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    let mut obj = InMemDicomObject::new_empty();
    let mut put = |tag, vr, v: PrimitiveValue| {
        obj.put(DataElement::new(tag, vr, v));
    };
    put(tags::SOP_CLASS_UID, VR::UI, uids::SECONDARY_CAPTURE_IMAGE_STORAGE.into());
    put(tags::SOP_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.2.1125.42.7".into());
    put(tags::PATIENT_NAME, VR::PN, "DOE^JOHN".into());
    put(tags::PATIENT_ID, VR::LO, "MRN-77".into());
    put(tags::MODALITY, VR::CS, modality.into());
    if burned_in {
        put(tags::BURNED_IN_ANNOTATION, VR::CS, "YES".into());
    }
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
    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .unwrap();
    let mut out = Vec::new();
    file.write_all(&mut out).unwrap();
    out
}

fn states(c: &Value) -> Vec<(String, String)> {
    c["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["family"].as_str().unwrap().to_string(), p["state"].as_str().unwrap().to_string()))
        .collect()
}

fn state_of(c: &Value, family: &str) -> String {
    states(c).into_iter().find(|(f, _)| f == family).map(|(_, s)| s).unwrap_or_default()
}

/// Polls the case until `done` holds (the test fails if it never does).
async fn poll_until(router: &Router, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..1200 {
        let c = get(router, &format!("/api/v1/cases/{id}")).await;
        assert_eq!(c.status, StatusCode::OK, "{}", c.text());
        let c = c.json();
        if done(&c) {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("case {id} never reached the expected state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_llm_does_not_hold_back_the_cnns_answer() {
    let gate = Gate::default();
    let llm = slow_llm(gate.clone());
    let f = server(&[&format!("brain={{mri}},llm:openai-compatible/stub-vision@{}", llm.url)], ServeOptions::default());
    let r = &f.router;

    let created = upload(r, "", "brain.png", &png(1)).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let c = created.json();
    let id = c["id"].as_str().unwrap().to_string();
    assert_eq!(c["task"], "brain");
    // The LLM cannot have answered: its server is held shut.
    assert_eq!(state_of(&c, "llm"), "pending");
    assert_eq!(c["complete"], false);

    // The CNN's answer is on the case while the LLM is still working.
    let c = poll_until(r, &id, |c| state_of(c, "cnn") == "answered").await;
    assert_eq!(state_of(&c, "llm"), "pending", "{c:#}");
    assert_eq!(c["complete"], false);
    let cnn = c["predictions"].as_array().unwrap().iter().find(|p| p["family"] == "cnn").unwrap();
    assert!(cnn["suggested_label"].is_string(), "{cnn:#}");
    assert!(cnn["gradcam_url"].is_string(), "{cnn:#}");
    // A loopback model server keeps the image on this machine.
    let llm_card = c["predictions"].as_array().unwrap().iter().find(|p| p["family"] == "llm").unwrap();
    assert_eq!(llm_card["sends_image_off_machine"], false);
    // No decision on a case that is still being filled in.
    let d = send(
        r,
        Request::post(format!("/api/v1/cases/{id}/decision"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json!({"final_label": "glioma", "reviewer": "Dr. A"}).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(d.status, StatusCode::CONFLICT, "{}", d.text());

    gate.open();
    let c = poll_until(r, &id, |c| c["complete"] == true).await;
    assert_eq!(state_of(&c, "llm"), "answered", "{c:#}");
    let llm_card = c["predictions"].as_array().unwrap().iter().find(|p| p["family"] == "llm").unwrap();
    assert_eq!(llm_card["suggested_label"], "glioma");
    // The rationale is data: carried verbatim in JSON, never part of the page's HTML (the page
    // puts it in with textContent).
    assert_eq!(llm_card["rationale"], XSS);
    let page = get(r, &format!("/cases/{id}")).await.text();
    assert!(!page.contains("onerror=\"document.title"), "the page embeds model output as HTML");
    assert!(page.contains("p.rationale") && page.contains("el('blockquote'"), "the rationale is rendered by el() as text");
    assert!(!page.contains("innerHTML"), "no model output may go through innerHTML");
    // Complete cases are in the store and can be decided.
    let d = send(
        r,
        Request::post(format!("/api/v1/cases/{id}/decision"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json!({"final_label": "glioma", "reviewer": "Dr. A"}).to_string()))
            .unwrap(),
    )
    .await;
    assert_ne!(d.status, StatusCode::CONFLICT, "{}", d.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llm_past_its_deadline_is_timed_out_and_the_case_completes() {
    let gate = Gate::default();
    let llm = slow_llm(gate.clone());
    let options = ServeOptions { llm_deadline: Duration::from_millis(300), ..ServeOptions::default() };
    let f = server(&[&format!("brain={{mri}},llm:openai-compatible/stub-vision@{}", llm.url)], options);
    let r = &f.router;
    let c = upload(r, "", "brain.png", &png(2)).await.json();
    let id = c["id"].as_str().unwrap().to_string();
    let c = poll_until(r, &id, |c| c["complete"] == true).await;
    assert_eq!(state_of(&c, "cnn"), "answered", "{c:#}");
    assert_eq!(state_of(&c, "llm"), "timed-out", "{c:#}");
    let llm_card = c["predictions"].as_array().unwrap().iter().find(|p| p["family"] == "llm").unwrap();
    assert!(llm_card["error"].as_str().unwrap().contains("--llm-deadline"), "{llm_card:#}");
    assert_eq!(c["needs_review"], true);
    gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_refuses_more_cases_than_its_limit() {
    let gate = Gate::default();
    let llm = slow_llm(gate.clone());
    let options = ServeOptions { max_concurrent_cases: 1, ..ServeOptions::default() };
    let f = server(&[&format!("brain={{mri}},llm:openai-compatible/stub-vision@{}", llm.url)], options);
    let r = &f.router;
    let first = upload(r, "", "a.png", &png(3)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let second = upload(r, "", "b.png", &png(4)).await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE, "{}", second.text());
    assert_eq!(second.json()["error"]["code"], "busy");
    gate.open();
    let id = first.json()["id"].as_str().unwrap().to_string();
    poll_until(r, &id, |c| c["complete"] == true).await;
    // The permit is back once the first case is complete.
    let third = upload(r, "?wait=true", "c.png", &png(5)).await;
    assert_eq!(third.status, StatusCode::CREATED, "{}", third.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tasks_in_one_server_and_a_mismatched_modality_is_flagged_not_classified() {
    let f = server(&["xray={xray}", "brain={mri}"], ServeOptions::default());
    let r = &f.router;
    let h = get(r, "/api/v1/health").await.json();
    let names: Vec<&str> = h["tasks"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["xray", "brain"]);
    assert_eq!(h["tasks"][1]["modality"], "mri");

    let mr = dicom("MR", false);
    // An MR sent to the chest X-ray task: recorded, flagged, and no classifier asked.
    let c = upload(r, "?task=xray&wait=true", "head.dcm", &mr).await;
    assert_eq!(c.status, StatusCode::CREATED, "{}", c.text());
    let c = c.json();
    assert_eq!(c["task"], "xray");
    assert_eq!(c["complete"], true);
    let why = c["modality_mismatch"].as_str().expect("a mismatch flag");
    assert!(why.contains("Modality MR") && why.contains("xray"), "{why}");
    assert!(states(&c).iter().all(|(_, s)| s == "not-asked"), "{c:#}");
    assert!(c["predictions"].as_array().unwrap().iter().all(|p| p["suggested_label"].is_null()));
    assert_eq!(c["needs_review"], true);
    assert!(c["review_reasons"][0].as_str().unwrap().starts_with("modality mismatch"), "{c:#}");
    let mismatch_id = c["id"].as_str().unwrap().to_string();

    // No task named: the header picks the brain MRI task, which classifies it.
    let c = upload(r, "?wait=true", "head.dcm", &mr).await.json();
    assert_eq!(c["task"], "brain");
    assert_eq!(c["modality_mismatch"], Value::Null);
    assert_eq!(state_of(&c, "cnn"), "answered", "{c:#}");
    let brain_labels = Modality::Mri.canonical_labels().unwrap();
    assert!(brain_labels.names().iter().any(|l| c["predictions"][0]["suggested_label"] == l.as_str()));

    // An explicit override classifies with the chosen task and says so on the case.
    let c = upload(r, "?task=xray&override_modality=true&wait=true", "head.dcm", &mr).await.json();
    assert_eq!(state_of(&c, "cnn"), "answered", "{c:#}");
    assert!(c["review_reasons"].as_array().unwrap().iter().any(|x| x.as_str().unwrap().contains("override")), "{c:#}");

    // A PNG says nothing about itself: with two tasks one must be named.
    let p = upload(r, "", "x.png", &png(6)).await;
    assert_eq!(p.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", p.text());
    assert!(p.json()["error"]["message"].as_str().unwrap().contains("several tasks"));
    let p = upload(r, "?task=xray&wait=true", "x.png", &png(6)).await.json();
    assert_eq!(state_of(&p, "cnn"), "answered");

    // The flagged case is in the store with its flag (read back after the image is gone).
    let stored = get(r, &format!("/api/v1/cases/{mismatch_id}")).await.json();
    assert!(stored["modality_mismatch"].is_string(), "{stored:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burned_in_annotation_keeps_the_image_on_this_machine() {
    // A provider off this machine (TEST-NET address: nothing there, and nothing is sent).
    let f = server(&["brain={mri},llm:openai-compatible/remote-vision@http://192.0.2.10:8000"], ServeOptions::default());
    let r = &f.router;
    let h = get(r, "/api/v1/health").await.json();
    let remote = &h["tasks"][0]["classifiers"][1];
    assert_eq!(remote["sends_image_off_machine"], true, "{h:#}");
    let c = upload(r, "?wait=true", "burned.dcm", &dicom("MR", true)).await;
    assert_eq!(c.status, StatusCode::CREATED, "{}", c.text());
    let c = c.json();
    assert_eq!(c["complete"], true, "{c:#}");
    assert_eq!(state_of(&c, "cnn"), "answered");
    assert_eq!(state_of(&c, "llm"), "not-sent", "{c:#}");
    let card = c["predictions"].as_array().unwrap().iter().find(|p| p["family"] == "llm").unwrap();
    assert_eq!(card["sends_image_off_machine"], true);
    assert!(card["error"].as_str().unwrap().contains("BurnedInAnnotation"), "{card:#}");
    // The de-identified attributes are listed on the case.
    let removed = c["image"]["deidentified"].as_array().unwrap();
    assert!(removed.iter().any(|a| a == "PatientName"), "{removed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_cache_is_bounded_in_bytes() {
    let options = ServeOptions { image_cache_bytes: 1, ..ServeOptions::default() };
    let f = server(&["brain={mri}"], options);
    let r = &f.router;
    let a = upload(r, "?wait=true", "a.png", &png(7)).await.json();
    let b = upload(r, "?wait=true", "b.png", &png(8)).await.json();
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    // Over budget: only the newest case keeps its pixels.
    assert_eq!(get(r, &format!("/api/v1/cases/{a}/image.png")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(r, &format!("/api/v1/cases/{b}/image.png")).await.status, StatusCode::OK);
    let held = f.app.image_cache_bytes();
    assert!(held > 0, "the newest case is held");
    let one = get(r, &format!("/api/v1/cases/{b}/image.png")).await.body.len();
    assert!(held >= one && held < 2 * one + 64 * 1024, "held {held} bytes for one case of {one}");
    assert_eq!(get(r, &format!("/api/v1/cases/{a}")).await.json()["image"]["url"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let options = ServeOptions { header_read_timeout: Duration::from_millis(300), ..ServeOptions::default() };
    let f = server(&["brain={mri}"], options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let srv = tokio::spawn(mica_server::serve(listener, f.app.clone(), async {
        let _ = rx.await;
    }));
    // Half a request, then silence: the server closes the connection (it does not wait).
    let got = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut slow = std::net::TcpStream::connect(addr).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        slow.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
        let mut buf = Vec::new();
        slow.read_to_end(&mut buf).map(|_| String::from_utf8_lossy(&buf).into_owned())
    })
    .await
    .unwrap();
    let text = got.expect("the server kept a connection without headers open");
    assert!(!text.contains("200 OK"), "{text}");
    // A whole request on a fresh connection is served.
    let ok = reqwest::get(format!("http://{addr}/api/v1/health")).await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    tx.send(()).unwrap();
    srv.await.unwrap().unwrap();
}
