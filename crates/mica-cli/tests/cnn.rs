//! End-to-end tests of `mica train`, `mica classify --classifier cnn:...` and `mica explain` on
//! a tiny 16 px image folder (seconds per command), including the bad inputs the CNN arm must
//! answer with one clear error line.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn mica() -> Command {
    let mut c = Command::cargo_bin("mica").unwrap();
    c.env("MICA_DEVICE", "cpu");
    c
}

const CLASSES: [&str; 4] = ["glioma", "meningioma", "pituitary", "no_tumor"];

/// An image-folder dataset: class `c` has a bright block in quadrant `c` over noise.
fn dataset(root: &Path, per_class: usize, classes: &[&str]) -> PathBuf {
    for (c, name) in classes.iter().enumerate() {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for k in 0..per_class {
            let mut img = image::GrayImage::new(16, 16);
            let mut s = (c * 7919 + k * 104729 + 1) as u64;
            for p in img.pixels_mut() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                p.0[0] = 30 + ((s >> 33) % 60) as u8;
            }
            let (ox, oy) = ((c % 2) as u32 * 8 + 1, (c / 2) as u32 * 8 + 1);
            for y in 0..6 {
                for x in 0..6 {
                    img.put_pixel(ox + x, oy + y, image::Luma([200]));
                }
            }
            img.save(d.join(format!("{name}_{k:03}.png"))).unwrap();
        }
    }
    root.to_path_buf()
}

/// stderr ends in exactly one `error: ...` line, with no panic.
fn error_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    errors[0].to_string()
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut c = mica();
    c.arg("train");
    if !extra.contains(&"--batch") {
        c.args(["--batch", "8"]);
    }
    if !extra.contains(&"--model") {
        c.args(["--model", "small"]);
    }
    if !extra.contains(&"--epochs") {
        c.args(["--epochs", "3"]);
    }
    c.arg("--dataset")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn train_classify_explain_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("mri"), 10, &CLASSES);
    let run = tmp.path().join("run");
    let out = train(&data, &run, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("best epoch") && stdout.contains("images/s"), "{stdout}");
    assert!(run.join("checkpoint.json").is_file());
    let log = std::fs::read_to_string(run.join("train_log.csv")).unwrap();
    assert_eq!(log.lines().count(), 4, "{log}");

    let cls = tmp.path().join("cls");
    let out = mica()
        .args(["classify", "--dataset"])
        .arg(&data)
        .arg("--classifier")
        .arg(format!("cnn:{}", run.display()))
        .arg("--out")
        .arg(&cls)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("p50") && stdout.contains("images/s"), "{stdout}");
    let preds = mica_core::read_predictions(cls.join("predictions.jsonl")).unwrap();
    assert_eq!(preds.len(), 8, "two test images per class");
    for p in &preds {
        assert!(p.probabilities.as_ref().unwrap().len() == 4);
        assert_eq!(p.needs_review, p.confidence.unwrap() < 0.6, "flagged below --review-below 0.6");
        assert!(p.latency_ms > 0.0);
    }
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cls.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["images"], 8);

    // Running it again resumes: nothing is classified twice.
    let out = mica()
        .args(["classify", "--dataset"])
        .arg(&data)
        .arg("--classifier")
        .arg(format!("cnn:{}", run.display()))
        .arg("--out")
        .arg(&cls)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(mica_core::read_predictions(cls.join("predictions.jsonl")).unwrap().len(), 8);

    let png = tmp.path().join("cam.png");
    let out = mica()
        .args(["explain", "--classifier"])
        .arg(format!("cnn:{}", run.display()))
        .arg(data.join("pituitary/pituitary_000.png"))
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not a diagnosis"));
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));

    // A killed or finished run is continued with --resume, never silently overwritten.
    let out = train(&data, &run, &[]);
    assert!(error_line(&out).contains("--resume"));
    let out = train(&data, &run, &["--resume", "--epochs", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = std::fs::read_to_string(run.join("train_log.csv")).unwrap();
    assert_eq!(log.lines().count(), 5, "{log}");

    // A checkpoint from another label set is refused.
    let other = dataset(&tmp.path().join("other"), 6, &["covid", "lung_opacity", "viral_pneumonia", "normal"]);
    let out = mica()
        .args(["classify", "--dataset"])
        .arg(&other)
        .arg("--classifier")
        .arg(format!("cnn:{}", run.display()))
        .arg("--out")
        .arg(tmp.path().join("cls2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(error_line(&out).contains("do not match"));

    // A corrupt checkpoint is an error naming the file.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("checkpoint.json")).unwrap()).unwrap();
    let weights = run.join(meta["weights_file"].as_str().unwrap());
    std::fs::write(&weights, b"garbage").unwrap();
    let out = mica()
        .args(["explain", "--classifier"])
        .arg(format!("cnn:{}", run.display()))
        .arg(data.join("glioma/glioma_000.png"))
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let line = error_line(&out);
    assert!(line.contains("corrupt") && line.contains(".mpk"), "{line}");
}

#[test]
fn bad_training_input_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dataset(&tmp.path().join("mri"), 6, &CLASSES);

    let out = train(&data, &tmp.path().join("r0"), &["--epochs", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(error_line(&out).contains("--epochs"));

    let out = train(&data, &tmp.path().join("r1"), &["--model", "vgg"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(error_line(&out).contains("unknown model"));

    let out = train(&tmp.path().join("nope"), &tmp.path().join("r2"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(error_line(&out).contains("nope"));

    let out = train(&data, &tmp.path().join("r3"), &["--batch", "1000000000", "--size", "512"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(error_line(&out).contains("try --batch"));

    let out = mica()
        .args(["classify", "--dataset"])
        .arg(&data)
        .args(["--classifier", "cnn:/no/such/run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(error_line(&out).contains("/no/such/run"));
}
