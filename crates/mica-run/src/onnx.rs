//! The ONNX arm of the factory: a model trained elsewhere, fed as its sidecar says, with what
//! the file is (SHA-256, producer, opsets, runtime) recorded in `metrics.json` next to its
//! answers. Also the occlusion-map overlay that stands in for Grad-CAM.

use std::io::Cursor;
use std::path::Path;

use mica_core::ImageSource;
use mica_onnx::{OcclusionMap, OnnxClassifier};

use crate::experiment::ClassifierConfig;
use crate::factory::{BuildContext, Built};
use crate::RunError;

/// Default inference batch (graphs with a fixed batch of 1 run one image at a time anyway).
const BATCH: usize = 16;

/// The model version string the audit trail records for an ONNX model.
pub fn version(c: &OnnxClassifier) -> String {
    let p = &c.model().provenance;
    let producer = match (p.producer_name.as_str(), p.producer_version.as_str()) {
        ("", _) => "unknown producer".to_string(),
        (n, "") => n.to_string(),
        (n, v) => format!("{n} {v}"),
    };
    format!(
        "{} sha256:{} ({producer}, opset {}, run by {})",
        Path::new(&p.path).file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        &p.sha256[..16.min(p.sha256.len())],
        p.opsets.join(" "),
        p.runtime
    )
}

/// Loads `path` and its sidecar; a problem with either is the user's input (exit status 2).
pub fn load(path: &Path, name: &str) -> Result<OnnxClassifier, RunError> {
    if !path.is_file() {
        return Err(RunError::Invalid(format!("{name}: {}: no such ONNX model file", path.display())));
    }
    OnnxClassifier::load(path)
        .map(|c| c.with_name(name))
        .map_err(|e| RunError::Invalid(format!("{name}: {e}")))
}

/// The provenance `metrics.json` records (`extra.onnx`), and how inputs were prepared.
pub fn provenance(c: &OnnxClassifier) -> serde_json::Value {
    let mut v = serde_json::to_value(&c.model().provenance).expect("provenance serialises");
    v["preprocess"] = serde_json::to_value(&c.model().pre).expect("preprocess serialises");
    v["labels_in_output_order"] = serde_json::json!(c.model_labels().names());
    v["modality"] = serde_json::json!(c.modality().as_str());
    v
}

pub(crate) fn build(cfg: &ClassifierConfig, path: &Path, ctx: &BuildContext) -> Result<Built, RunError> {
    let name = ctx.name;
    let mut c = load(path, name)?;
    c.align_labels(&ctx.ds.labels).map_err(|e| RunError::Invalid(format!("{name}: {e}")))?;
    c.batch = cfg.batch.unwrap_or(BATCH);
    c.review_below = cfg.review_below;
    let batch = c.model().max_batch(c.batch);
    let mut extra = serde_json::Map::new();
    extra.insert("onnx".into(), provenance(&c));
    extra.insert("model_version".into(), serde_json::json!(version(&c)));
    extra.insert("batch".into(), serde_json::json!(batch));
    // Not made by mica: what training it cost is not known, and the report says so rather
    // than counting it as zero.
    extra.insert(
        "training".into(),
        serde_json::json!({ "unknown": "trained outside mica (ONNX model): its training cost is not known" }),
    );
    let mut b = Built::new(Box::new(c), batch);
    b.extra = extra;
    b.cost_basis = "no-api-fee";
    b.latency_kind = if batch == 1 {
        mica_eval::LatencyKind::PerImage
    } else {
        mica_eval::LatencyKind::PerImageAmortised { batch }
    };
    Ok(b)
}

/// The occlusion map blended over `original` (the image at its own resolution) the way
/// Grad-CAM overlays are, as PNG bytes.
pub fn overlay_png(map: &OcclusionMap, original: &image::DynamicImage) -> Result<Vec<u8>, String> {
    // The Grad-CAM overlay samples a square map by relative position; the occlusion map is
    // `height x width`, so it is resampled (nearest) onto a square grid of the longer side.
    let s = map.height.max(map.width);
    let mut cam = vec![0.0f32; s * s];
    for y in 0..s {
        for x in 0..s {
            let my = (y * map.height / s).min(map.height - 1);
            let mx = (x * map.width / s).min(map.width - 1);
            cam[y * s + x] = map.map[my * map.width + mx];
        }
    }
    let e = mica_cnn::gradcam::Explanation {
        label: map.label.clone(),
        predicted: map.predicted.clone(),
        confidence: map.confidence,
        probabilities: map.probabilities.clone(),
        cam,
        cam_size: s,
        feature_size: (map.height, map.width),
    };
    let img = mica_cnn::gradcam::overlay(original, &e, 0.5);
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// `mica explain` for an ONNX model: the occlusion map of `image`, its overlay written to
/// `out`. The original is decoded the way the model's input is (DICOM windowed).
pub fn explain_to_png(model: &Path, image: &Path, target: Option<&str>, out: &Path) -> Result<OcclusionMap, RunError> {
    let c = load(model, &format!("onnx:{}", model.display()))?;
    let source = ImageSource::file(image);
    let map = mica_onnx::occlusion(&c, &source, target, None).map_err(|e| match e {
        mica_onnx::OnnxError::Usage(m) => RunError::Invalid(m),
        e => RunError::Invalid(e.to_string()),
    })?;
    let original = mica_data::image::load_gray(&source)?;
    let bytes = overlay_png(&map, &image::DynamicImage::ImageLuma8(original)).map_err(|m| RunError::Invalid(format!("{}: {m}", out.display())))?;
    mica_core::write_atomic(out, &bytes)?;
    Ok(map)
}
