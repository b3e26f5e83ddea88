//! An ONNX model as a member of the web app's panel, next to a CNN: it answers an upload
//! through the JSON API like the CNN does, in the panel's label order, with an occlusion-map
//! overlay that says what it is.

mod common;

use std::io::Write as _;
use std::path::Path;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use mica_core::Modality;
use mica_onnx::testing::{self, Dim};
use mica_server::{App, LlmOptions, Panel, Settings};
use serde_json::Value;
use tower::ServiceExt;

const BOUNDARY: &str = "mica-onnx-test-boundary";

/// logits = w_k * m + b_k over the mean brightness `m`: bright images are `pituitary`,
/// dark ones `glioma`. Output order differs from mica's MRI order.
const OUTPUT_LABELS: [&str; 4] = ["pituitary", "notumor", "meningioma", "glioma"];
const W: [f32; 4] = [8.0, 0.0, 0.0, -8.0];
const B: [f32; 4] = [-4.0, -1.0, -1.0, 4.0];

fn write_onnx(dir: &Path, sidecar_labels: &[&str]) -> std::path::PathBuf {
    let m = testing::mean_linear(false, &[Dim::Param("N"), Dim::Fixed(1), Dim::Fixed(20), Dim::Fixed(20)], 4, &W, &B, false);
    let p = dir.join("vendor.onnx");
    testing::write(&p, &m);
    let labels: Vec<String> = sidecar_labels.iter().map(|l| format!("\"{l}\"")).collect();
    testing::write_sidecar(&p, &format!("labels = [{}]\nscale = 255.0\nmean = [0.0]\nstd = [1.0]\noutput = \"logits\"\n", labels.join(", ")));
    p
}

#[tokio::test]
async fn an_onnx_member_answers_an_upload_like_a_cnn() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("cnn-run");
    common::write_checkpoint(&run, Modality::Mri);
    let onnx = write_onnx(tmp.path(), &OUTPUT_LABELS);
    let specs = vec![format!("cnn:{}", run.display()), format!("onnx:{}", onnx.display())];
    let meter = mica_energy::MeterConfig { try_nvml: false, ..Default::default() };
    let panel = Panel::load(&specs, None, &LlmOptions::default(), &meter).unwrap();
    assert_eq!(panel.members[1].family, "onnx");
    assert!(panel.members[1].model_version.contains("sha256:") && panel.members[1].model_version.contains("tract-onnx"));
    let store = mica_report::Store::open(tmp.path().join("store.sqlite")).unwrap();
    let app = App::new(panel, store, Settings { max_upload_bytes: 1 << 20, review_threshold: 0.7, token: None }).unwrap();
    let router = mica_server::router(app);

    // A bright image: mean 0.9, so logits 0.9 w + b put `pituitary` first.
    let img = image::GrayImage::from_pixel(40, 30, image::Luma([230]));
    let png = mica_data::image::png_bytes(&img);
    let mut body = Vec::new();
    write!(body, "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.png\"\r\nContent-Type: application/octet-stream\r\n\r\n").unwrap();
    body.extend_from_slice(&png);
    write!(body, "\r\n--{BOUNDARY}--\r\n").unwrap();
    let req = Request::post("/api/v1/classify?wait=true")
        .header(header::CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let c: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let preds = c["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2, "{c}");
    let o = &preds[1];
    assert_eq!(o["family"], "onnx");
    assert_eq!(o["classifier"], "onnx:vendor");
    assert_eq!(o["outcome"], "answered", "{o}");
    // By hand: m = 230/255; softmax(W m + B).
    let m = 230.0f32 / 255.0;
    let z: Vec<f32> = (0..4).map(|k| W[k] * m + B[k]).collect();
    let e: Vec<f32> = z.iter().map(|v| v.exp()).collect();
    let s: f32 = e.iter().sum();
    let want = ["pituitary", "no_tumor", "meningioma", "glioma"];
    for (k, l) in want.iter().enumerate() {
        let got = o["probabilities"][l].as_f64().unwrap() as f32;
        assert!((got - e[k] / s).abs() < 1e-4, "{l}: {got} vs {}", e[k] / s);
    }
    assert_eq!(o["suggested_label"], "pituitary");
    let method = o["energy_method"].as_str().unwrap();
    assert!(method.starts_with("measured:") || method.starts_with("estimated:"), "{method}");
    assert_eq!(o["overlay_method"], "occlusion map (ONNX model: no gradients)");
    assert_eq!(preds[0]["overlay_method"], "Grad-CAM");
    let url = o["gradcam_url"].as_str().unwrap();
    let g = router.clone().oneshot(Request::get(url).body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(g.status(), StatusCode::OK);
    let overlay = image::load_from_memory(&g.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (40, 30), "overlay at the image's own size");
}

#[test]
fn an_onnx_member_with_other_labels_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("cnn-run");
    common::write_checkpoint(&run, Modality::Mri);
    let onnx = write_onnx(tmp.path(), &["covid", "normal", "lung_opacity", "viral_pneumonia"]);
    let specs = vec![format!("cnn:{}", run.display()), format!("onnx:{}", onnx.display())];
    let meter = mica_energy::MeterConfig { try_nvml: false, ..Default::default() };
    let e = Panel::load(&specs, None, &LlmOptions::default(), &meter).err().unwrap().to_string();
    assert!(e.contains("not the task's labels") && e.contains("one server compares classifiers on one task"), "{e}");
}
