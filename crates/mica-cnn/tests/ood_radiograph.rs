//! The out-of-distribution check against a real image: a small CNN trained on synthetic chest
//! X-ray phantoms (32 px, a few epochs) must flag a real chest radiograph as unlike its
//! training data, and must not flag most of its own held-out test phantoms.
//!
//! The radiograph is `RG1_UNCR.dcm` from the `pydicom-data` package (a computed radiography
//! chest PA, 1955 x 1841, MONOCHROME1). When `python3` with `venv` is available, a virtual
//! environment is created once under cargo's target tmp dir (`pip install pydicom pydicom-data
//! numpy`, reused afterwards) and a small script writes the pixel data as an 8-bit PNG
//! (windowed to the 0.5-99.5 percentiles, MONOCHROME1 inverted so bone is bright, block-averaged
//! to about 256 px). Without Python or network the test prints SKIPPED and passes, unless
//! `MICA_REQUIRE_SKLEARN=1` (the switch the other Python cross-checks use), which makes it fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use mica_cnn::{train, Arch, CnnClassifier, OodVerdict, Progress, TrainConfig};
use mica_core::{Classifier, ImageSource, Modality, Sample, Split};

const PACKAGES: [&str; 3] = ["pydicom", "pydicom-data", "numpy"];

const EXPORT: &str = r#"
import struct, sys, zlib
import numpy as np
import pydicom
from pydicom.data import get_testdata_file

name, out, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
path = get_testdata_file(name)
if path is None:
    sys.exit(f"{name} is not in pydicom-data")
ds = pydicom.dcmread(path)
px = ds.pixel_array.astype(np.float64)
lo, hi = np.percentile(px, [0.5, 99.5])
v = np.clip((px - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
if ds.PhotometricInterpretation == "MONOCHROME1":
    v = 1.0 - v
h, w = v.shape
f = max(1, int(np.ceil(max(h, w) / side)))
h2, w2 = h // f, w // f
v = v[: h2 * f, : w2 * f].reshape(h2, f, w2, f).mean(axis=(1, 3))
img = np.round(v * 255).astype(np.uint8)
raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h2))

def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w2, h2, 8, 0, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
open(out, "wb").write(png)
print(ds.Modality, ds.get("BodyPartExamined"), h, w, "->", h2, w2)
"#;

fn skip(why: &str) {
    if std::env::var("MICA_REQUIRE_SKLEARN").is_ok_and(|v| v == "1") {
        panic!("real-radiograph OOD test required (MICA_REQUIRE_SKLEARN=1) but unavailable: {why}");
    }
    eprintln!("SKIPPED real-radiograph out-of-distribution test: {why}");
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        ))
    }
}

/// The venv's python, creating the venv on first use; a marker file lists the packages of a
/// finished install, so an interrupted install is redone rather than trusted.
fn pydicom_python() -> Result<PathBuf, String> {
    let dir = std::env::var_os("MICA_PYDICOM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("pydicom-venv"));
    let python = dir.join("bin").join("python");
    let marker = dir.join(".mica-installed");
    let wanted = PACKAGES.join(" ");
    if python.exists() && std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == wanted) {
        return Ok(python);
    }
    if !python.exists() {
        let base = std::env::var("MICA_PYTHON").unwrap_or_else(|_| "python3".into());
        Command::new(&base).arg("--version").output().map_err(|e| format!("no `{base}` on PATH ({e})"))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        run(Command::new(&base).args(["-m", "venv"]).arg(&dir))
            .map_err(|e| format!("cannot create a venv (python3-venv missing?): {e}"))?;
    }
    let _ = std::fs::remove_file(&marker);
    eprintln!("installing {wanted} into {} (once)", dir.display());
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--timeout", "60", "--retries", "2"])
        .args(PACKAGES))
    .map_err(|e| format!("pip install {wanted} failed (no network?): {e}"))?;
    std::fs::write(&marker, &wanted).map_err(|e| e.to_string())?;
    Ok(python)
}

/// Writes pydicom-data's real chest CR as a PNG.
fn real_radiograph(out: &Path) -> Result<(), String> {
    let python = pydicom_python()?;
    let script = out.with_extension("py");
    std::fs::write(&script, EXPORT).map_err(|e| e.to_string())?;
    let said = run(Command::new(&python).arg(&script).args(["RG1_UNCR.dcm"]).arg(out).arg("256"))?;
    eprintln!("exported {}: {}", out.display(), said.trim());
    Ok(())
}

fn sample(id: &str, path: PathBuf) -> Sample {
    // A label index past the label set: no true label.
    Sample { id: id.into(), source: ImageSource::file(path), label: usize::MAX, split: None, context: None }
}

#[test]
fn a_real_chest_radiograph_is_flagged_by_a_model_of_synthetic_phantoms() {
    let tmp = tempfile::tempdir().unwrap();
    let cr = tmp.path().join("rg1_chest_cr.png");
    if let Err(why) = real_radiograph(&cr) {
        return skip(&why);
    }
    let img = image::open(&cr).expect("the exported radiograph decodes");
    assert!(img.width() >= 200 && img.height() >= 200, "{}x{}", img.width(), img.height());

    let cfg = mica_data::synth::SynthConfig { per_class: 50, size: 32, seed: 11 };
    let root = mica_data::synth::generate(&tmp.path().join("synth"), Modality::Xray, &cfg).unwrap();
    let mut ds = mica_data::load(&root).unwrap();
    // 70 / 10 / 20 per class, seeded (the X-ray layout has no split folders).
    mica_data::split::assign(&mut ds, &mica_data::split::SplitConfig::default()).unwrap();
    let mut tc = TrainConfig::new(Arch::Small);
    tc.epochs = 6;
    tc.batch = 16;
    tc.size = Some(32);
    tc.seed = 3;
    let run_dir = tmp.path().join("run");
    train(&ds, &tc, &run_dir, &mut |_: Progress| {}).unwrap();
    assert!(run_dir.join(mica_cnn::ood::OOD_FILE).is_file(), "train writes ood.json");

    let mut clf = CnnClassifier::load(&run_dir, &mut |m| panic!("unexpected notice: {m}")).unwrap();
    let stats = clf.ood_stats().expect("statistics of the run").clone();
    assert_eq!(stats.method, mica_cnn::ood::METHOD);
    assert_eq!(stats.threshold, stats.margin * stats.train_distance.p99);
    assert!(stats.train_flag_rate <= 0.01, "{}", stats.train_flag_rate);

    let test: Vec<Sample> = ds.split(Split::Test).cloned().collect();
    assert!(test.len() >= 20, "{} test images", test.len());
    let preds = clf.classify(&test);
    let verdicts: Vec<OodVerdict> =
        preds.iter().map(|p| OodVerdict::from_prediction(p.as_ref().unwrap()).expect("every prediction has a verdict")).collect();
    assert!(verdicts.iter().all(|v| v.available));
    let flagged = verdicts.iter().filter(|v| v.flagged).count();
    let mut scores: Vec<f64> = verdicts.iter().map(|v| v.score.unwrap()).collect();
    scores.sort_by(f64::total_cmp);

    let cr_pred = clf.classify(&[sample("rg1_chest_cr.png", cr.clone())]).pop().unwrap().unwrap();
    let v = OodVerdict::from_prediction(&cr_pred).unwrap();
    eprintln!(
        "threshold {:.3} (train p99 {:.3}, val flag rate {:?}); test phantoms flagged {flagged}/{} (max score {:.3}); real CR score {:.3}",
        stats.threshold,
        stats.train_distance.p99,
        stats.val_flag_rate,
        test.len(),
        scores.last().unwrap(),
        v.score.unwrap()
    );
    assert!(v.flagged, "the real radiograph is not flagged: {v:?}");
    assert!(cr_pred.needs_review, "a flagged image needs a physician's review");
    assert!(v.message.starts_with("unlike the training data"), "{}", v.message);
    assert!(
        flagged as f64 <= 0.1 * test.len() as f64,
        "{flagged} of {} held-out phantoms flagged; scores {scores:?}, threshold {}",
        test.len(),
        stats.threshold
    );
    // Not a borderline call: the real image is past every held-out phantom but a few. (Over
    // training seeds 1-6 it scored 1.3-2.1 times the threshold, the held-out maximum 0.8-0.95.)
    assert!(v.score.unwrap() > scores[scores.len() * 9 / 10], "{v:?} vs {scores:?}");
}
