//! End-to-end tests of ONNX models ("bring your own model") through the `mica` binary:
//! `classify`, `compare` next to the baseline, `explain`, and the sidecar errors a user meets.
//!
//! The model is written here (mica_onnx::testing) so that what it must answer is known: a
//! nearest-brightness classifier (GlobalAveragePool, Flatten, Gemm, as PyTorch exports a linear
//! head) whose logits are `s * (c_k * m - c_k^2 / 2)` for the image's mean brightness `m` and a
//! centre `c_k` per class. Every image of the dataset has a known mean, so every probability in
//! predictions.jsonl is checked against the same formula evaluated here.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use mica_onnx::testing::{self, Dim};
use sha2::Digest;

fn mica() -> Command {
    let mut c = Command::cargo_bin("mica").unwrap();
    c.env("MICA_DEVICE", "cpu");
    c
}

/// The dataset's classes (mica's MRI names) and each class's brightness centre (0..255).
const CLASSES: [(&str, f32); 4] = [("glioma", 40.0), ("meningioma", 90.0), ("pituitary", 140.0), ("no_tumor", 190.0)];
/// The model's output order differs from the dataset's, and uses a Kaggle spelling.
const OUTPUTS: [(&str, &str); 4] = [("notumor", "no_tumor"), ("glioma", "glioma"), ("meningioma", "meningioma"), ("pituitary", "pituitary")];
const SHARPNESS: f32 = 40.0;

fn centre(label: &str) -> f32 {
    CLASSES.iter().find(|(l, _)| *l == label).unwrap().1 / 255.0
}

/// The model's probabilities for an image of mean brightness `m` (0..1), by mica label name.
fn by_hand(m: f32) -> Vec<(&'static str, f32)> {
    let z: Vec<f32> = OUTPUTS.iter().map(|(_, l)| SHARPNESS * (centre(l) * m - centre(l) * centre(l) / 2.0)).collect();
    let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|v| (v - max).exp()).collect();
    let s: f32 = e.iter().sum();
    OUTPUTS.iter().zip(e).map(|((_, l), v)| (*l, v / s)).collect()
}

/// Writes the model and its sidecar; `sidecar` replaces the default one.
fn model(dir: &Path, sidecar: Option<&str>) -> PathBuf {
    let weights: Vec<f32> = OUTPUTS.iter().map(|(_, l)| SHARPNESS * centre(l)).collect();
    let bias: Vec<f32> = OUTPUTS.iter().map(|(_, l)| -SHARPNESS * centre(l) * centre(l) / 2.0).collect();
    let m = testing::mean_linear(false, &[Dim::Param("batch_size"), Dim::Fixed(1), Dim::Fixed(16), Dim::Fixed(16)], 4, &weights, &bias, false);
    let path = dir.join("brightness.onnx");
    testing::write(&path, &m);
    let labels: Vec<String> = OUTPUTS.iter().map(|(o, _)| format!("\"{o}\"")).collect();
    let default = format!("labels = [{}]\nmodality = \"mri\"\nscale = 255.0\nmean = [0.0]\nstd = [1.0]\noutput = \"logits\"\n", labels.join(", "));
    testing::write_sidecar(&path, sidecar.unwrap_or(&default));
    path
}

/// An image folder whose class-`c` images are uniform at the class centre plus a per-image
/// offset within +-20, so the nearest centre is always the true class.
fn dataset(root: &Path, per_class: usize) -> PathBuf {
    for (c, (name, level)) in CLASSES.iter().enumerate() {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for k in 0..per_class {
            let v = (*level as i32 + ((k * 7 + c * 3) % 41) as i32 - 20) as u8;
            image::GrayImage::from_pixel(16, 16, image::Luma([v])).save(d.join(format!("{name}_{k:03}.png"))).unwrap();
        }
    }
    root.to_path_buf()
}

fn mean_of(path: &str) -> f32 {
    let g = image::open(path).unwrap().to_luma8();
    g.pixels().map(|p| p.0[0] as f32).sum::<f32>() / (g.width() * g.height()) as f32 / 255.0
}

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every prediction is what the graph must output for its image, and names its true class.
fn check_predictions(preds: &[serde_json::Value], data: &Path) {
    assert!(!preds.is_empty());
    for p in preds {
        let id = p["sample_id"].as_str().unwrap();
        let file = walk(data).into_iter().find(|f| f.file_stem().unwrap().to_string_lossy() == Path::new(id).file_stem().unwrap().to_string_lossy()).unwrap_or_else(|| panic!("no file for {id}"));
        let want = by_hand(mean_of(file.to_str().unwrap()));
        for (label, v) in &want {
            let got = p["probabilities"][label].as_f64().unwrap() as f32;
            assert!((got - v).abs() < 1e-5, "{id} {label}: {got} vs {v}");
        }
        let best = want.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
        assert_eq!(p["predicted"], best.0, "{id}");
        assert_eq!(p["predicted"], p["true_label"], "{id}: the dataset was built so the nearest centre is the class");
        assert!((p["confidence"].as_f64().unwrap() as f32 - best.1).abs() < 1e-5);
    }
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// stderr ends in exactly one `error: ...` line, with no panic.
fn error_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    errors[0].to_string()
}

#[test]
fn classify_records_answers_and_provenance() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("mri"), 10);
    let m = model(tmp.path(), None);
    let out = tmp.path().join("run");
    let o = mica()
        .args(["classify", "--dataset"])
        .arg(&data)
        .arg("--classifier")
        .arg(format!("onnx:{}", m.display()))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let preds = lines(&out.join("predictions.jsonl"));
    check_predictions(&preds, &data);
    let metrics: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["all"]["accuracy"].as_f64(), Some(1.0), "{}", metrics["all"]);
    let onnx = &metrics["extra"]["onnx"];
    let sha = format!("{:x}", sha2::Sha256::digest(std::fs::read(&m).unwrap()));
    assert_eq!(onnx["sha256"], sha.as_str());
    assert_eq!(onnx["producer_name"], "pytorch");
    assert_eq!(onnx["opsets"][0], "ai.onnx:17");
    assert!(onnx["runtime"].as_str().unwrap().starts_with("tract-onnx "));
    assert_eq!(onnx["preprocess"]["layout"], "nchw");
    assert_eq!(metrics["extra"]["family"], "onnx");
    assert!(metrics["extra"]["training"]["unknown"].as_str().unwrap().contains("not known"));
}

#[test]
fn compare_puts_the_model_next_to_the_baseline_in_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("mri"), 10);
    let m = model(tmp.path(), None);
    let out = tmp.path().join("cmp");
    let exp = tmp.path().join("exp.toml");
    std::fs::write(
        &exp,
        format!(
            "name = \"byom\"\noutput = \"{}\"\n\n[dataset]\npath = \"{}\"\n\n[[classifier]]\nspec = \"baseline\"\n\n[[classifier]]\nspec = \"onnx:{}\"\nbatch = 3\n",
            out.display(),
            data.display(),
            m.display()
        ),
    )
    .unwrap();
    let o = mica().args(["compare", "--no-store", "--config"]).arg(&exp).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = out.join("onnx-brightness");
    check_predictions(&lines(&dir.join("predictions.jsonl")), &data);
    let metrics: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["all"]["accuracy"].as_f64(), Some(1.0));
    assert_eq!(metrics["extra"]["onnx"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(metrics["extra"]["batch"], 3);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    let row = report.lines().find(|l| l.contains("onnx:") && l.contains("100.0")).unwrap_or_else(|| panic!("no ONNX row at 100 % in\n{report}"));
    assert!(row.starts_with('|'), "{row}");
    assert!(report.contains("unknown (trained outside mica)"), "{report}");
    assert!(report.contains("baseline"), "{report}");
}

#[test]
fn a_missing_sidecar_key_is_a_usage_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("mri"), 3);
    let m = model(tmp.path(), Some("labels = [\"notumor\", \"glioma\", \"meningioma\", \"pituitary\"]\nscale = 255.0\nmean = [0.0]\nstd = [1.0]\n"));
    let o = mica()
        .args(["classify", "--dataset"])
        .arg(&data)
        .arg("--classifier")
        .arg(format!("onnx:{}", m.display()))
        .arg("--out")
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    let e = error_line(&o);
    assert!(e.contains("missing key `output`") && e.contains("brightness.toml"), "{e}");
    // An unknown key is refused by name.
    testing::write_sidecar(&m, "labels = [\"notumor\", \"glioma\", \"meningioma\", \"pituitary\"]\nscale = 255.0\nmean = [0.0]\nstd = [1.0]\noutput = \"logits\"\nnormalize = true\n");
    let o = mica().args(["classify", "--dataset"]).arg(&data).arg("--classifier").arg(format!("onnx:{}", m.display())).arg("--out").arg(tmp.path().join("run2")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(error_line(&o).contains("normalize"));
}

#[test]
fn explain_draws_an_occlusion_map_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path(), None);
    // Bright left half, dark right half: mean 0.5 or so; hiding the bright half changes it most.
    let img = tmp.path().join("half.png");
    image::GrayImage::from_fn(16, 16, |x, _| image::Luma([if x < 8 { 230 } else { 20 }])).save(&img).unwrap();
    let png = tmp.path().join("x.png");
    let o = mica()
        .args(["explain", "--json", "--classifier"])
        .arg(format!("onnx:{}", m.display()))
        .arg(&img)
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["method"], "occlusion map (ONNX model: no gradients)");
    let want = by_hand(mean_of(img.to_str().unwrap()));
    let best = want.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(v["predicted"], best.0);
    let overlay = image::open(&png).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (16, 16));
    let o = mica().args(["explain", "--classifier"]).arg(format!("onnx:{}", m.display())).arg(&img).arg("--out").arg(&png).output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("occlusion map (ONNX model: no gradients)"));
}
