//! End-to-end tests of `mica synth` and `mica dataset inspect`, including every bad dataset
//! input the CLI must answer with one clear error line (or a listed, skipped file).

use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn mica() -> Command {
    Command::cargo_bin("mica").unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../mica-data/tests/fixtures")
        .join(name)
}

fn synth(out: &Path, modality: &str, per_class: usize) {
    mica()
        .args(["synth", "--modality", modality, "--per-class"])
        .arg(per_class.to_string())
        .args(["--size", "32", "--out"])
        .arg(out)
        .assert()
        .success();
}

fn inspect_json(path: &Path) -> serde_json::Value {
    let out = mica().args(["dataset", "inspect", "--json"]).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// stderr is exactly one `error: ...` line.
fn one_error_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    err
}

#[test]
fn synth_all_then_inspect_recognises_the_three_layouts() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), "all", 10);
    for (dir, layout, modality, labels) in [
        ("covid19-radiography", "covid19-radiography", "xray", ["covid", "lung_opacity", "viral_pneumonia", "normal"]),
        ("brain-tumor-mri", "brain-tumor-mri", "mri", ["glioma", "meningioma", "pituitary", "no_tumor"]),
        ("chest-ct", "chest-ct", "ct", ["adenocarcinoma", "large_cell_carcinoma", "squamous_cell_carcinoma", "normal"]),
    ] {
        let r = inspect_json(&d.path().join(dir));
        assert_eq!(r["layout"], layout);
        assert_eq!(r["modality"], modality);
        assert_eq!(r["labels"], serde_json::json!(labels));
        assert_eq!(r["images"], 40);
        for c in r["counts"].as_array().unwrap() {
            assert_eq!(c["total"], 10, "{dir}: {c}");
        }
        assert_eq!(r["unreadable"].as_array().unwrap().len(), 0);
        assert_eq!(r["with_context"], 40);
    }
    // Official splits: MRI Training/Testing 80/20 (val carved from Training), CT train/valid/test.
    let mri = inspect_json(&d.path().join("brain-tumor-mri"));
    assert_eq!(mri["split_source"], "official");
    assert_eq!(mri["counts"][0]["test"], 2);
    let ct = inspect_json(&d.path().join("chest-ct"));
    assert_eq!((ct["counts"][3]["train"].clone(), ct["counts"][3]["val"].clone(), ct["counts"][3]["test"].clone()), (7.into(), 1.into(), 2.into()));

    let text = mica().args(["dataset", "inspect"]).arg(d.path().join("chest-ct")).output().unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("layout    chest-ct") && text.contains("large_cell_carcinoma"), "{text}");
}

#[test]
fn synth_is_byte_identical_for_a_seed() {
    let d = tempfile::tempdir().unwrap();
    synth(&d.path().join("a"), "xray", 6);
    synth(&d.path().join("b"), "xray", 6);
    let files = |root: &Path| {
        let mut v = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).unwrap() {
                let e = e.unwrap().path();
                if e.is_dir() {
                    stack.push(e);
                } else {
                    v.push((e.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&e).unwrap()));
                }
            }
        }
        v.sort();
        v
    };
    let (a, b) = (files(&d.path().join("a")), files(&d.path().join("b")));
    assert_eq!(a.len(), 6 * 4 + 2);
    assert!(a == b, "same seed produced different files");
}

#[test]
fn unreadable_files_are_listed_and_cross_split_copies_reported() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), "mri", 10);
    let root = d.path().join("brain-tumor-mri");
    // A training image copied into the test folder: leakage.
    std::fs::copy(root.join("Training/meningioma/Tr-me_0003.png"), root.join("Testing/meningioma/leak.png")).unwrap();
    let good = std::fs::read(root.join("Training/glioma/Tr-gl_0001.png")).unwrap();
    std::fs::write(root.join("Training/glioma/truncated.png"), &good[..good.len() / 2]).unwrap();
    std::fs::write(root.join("Training/glioma/notes.jpg"), "this is not a jpeg").unwrap();
    std::fs::copy(fixture("CT_small_no_pixels.dcm"), root.join("Testing/pituitary/scan.dcm")).unwrap();

    let out = mica().args(["dataset", "inspect"]).arg(&root).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("unreadable files (3)"), "{text}");
    assert!(text.contains("truncated.png: cannot decode image"), "{text}");
    assert!(text.contains("notes.jpg: not an image"), "{text}");
    assert!(text.contains("scan.dcm: DICOM file has no pixel data"), "{text}");
    assert!(text.contains("ACROSS SPLITS") && text.contains("Testing/meningioma/leak.png"), "{text}");

    let r = inspect_json(&root);
    assert_eq!(r["images"], 41);
    assert!(r["duplicate_pairs_across_splits"].as_u64().unwrap() >= 1);
}

#[test]
fn dicom_class_folders_and_multi_frame_note() {
    let d = tempfile::tempdir().unwrap();
    for (class, f) in [("ct", "CT_small.dcm"), ("mr", "MR_small.dcm"), ("sc", "SC_rgb_rle_2frame.dcm")] {
        std::fs::create_dir_all(d.path().join(class)).unwrap();
        std::fs::copy(fixture(f), d.path().join(class).join(f)).unwrap();
    }
    let r = inspect_json(d.path());
    assert_eq!(r["layout"], "dicom");
    assert_eq!(r["images"], 3);
    assert!(r["notes"][0].as_str().unwrap().contains("(2 frames); only the first frame is used"), "{r}");
}

#[test]
fn missing_path_is_a_usage_error() {
    let out = mica().args(["dataset", "inspect", "/no/such/dataset"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = one_error_line(&out);
    assert!(e.contains("/no/such/dataset: no such file or folder"), "{e}");
}

#[test]
fn a_file_instead_of_a_folder_is_a_usage_error() {
    let out = mica().args(["dataset", "inspect"]).arg(fixture("README.md")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = one_error_line(&out);
    assert!(e.contains("README.md: is a file, not a dataset"), "{e}");
}

#[test]
fn unknown_layout_is_a_data_error() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("notes.txt"), "x").unwrap();
    let out = mica().args(["dataset", "inspect"]).arg(d.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = one_error_line(&out);
    assert!(e.contains(&d.path().display().to_string()) && e.contains("unknown dataset layout"), "{e}");
}

#[test]
fn empty_class_folder_is_a_data_error() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), "mri", 5);
    let root = d.path().join("brain-tumor-mri");
    std::fs::create_dir_all(root.join("Testing/astrocytoma")).unwrap();
    let out = mica().args(["dataset", "inspect"]).arg(&root).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = one_error_line(&out);
    assert!(e.contains("Testing/astrocytoma") && e.contains("contains no images"), "{e}");
}

#[test]
fn npz_without_expected_keys_is_a_data_error() {
    let d = tempfile::tempdir().unwrap();
    // An .npz is a zip of .npy files; one stored (uncompressed) member named x.npy is enough.
    let npy = {
        let header = "{'descr': '|u1', 'fortran_order': False, 'shape': (2,), }";
        let mut h = header.to_string();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(h.len() as u16).to_le_bytes());
        v.extend_from_slice(h.as_bytes());
        v.extend_from_slice(&[1, 2]);
        v
    };
    let p = d.path().join("weird.npz");
    std::fs::write(&p, stored_zip("x.npy", &npy)).unwrap();
    let out = mica().args(["dataset", "inspect"]).arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = one_error_line(&out);
    assert!(e.contains("weird.npz") && e.contains("missing MedMNIST arrays") && e.contains("found: x"), "{e}");

    std::fs::write(&p, "not a zip").unwrap();
    let out = mica().args(["dataset", "inspect"]).arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = one_error_line(&out);
    assert!(e.contains("weird.npz") && e.contains("not a readable .npz"), "{e}");
}

#[test]
fn csv_manifest_with_missing_column_is_a_data_error() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("manifest.csv");
    std::fs::write(&p, "path,diagnosis_text\na.png,x\n").unwrap();
    let out = mica().args(["dataset", "inspect"]).arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = one_error_line(&out);
    assert!(e.contains("manifest.csv") && e.contains("missing column `label`"), "{e}");
}

#[test]
fn bad_synth_flags_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = mica().args(["synth", "--modality", "pet", "--out"]).arg(d.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(one_error_line(&out).contains("--modality `pet`"));
    let out = mica().args(["synth", "--modality", "ct", "--size", "4", "--out"]).arg(d.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(one_error_line(&out).contains("--size 4 is out of range"));
}

/// A zip archive with one stored member (no compression), enough for an `.npz` test.
fn stored_zip(name: &str, data: &[u8]) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let crc = crc32(data);
    let mut out = Vec::new();
    let le16 = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let le32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    // Local file header.
    le32(&mut out, 0x0403_4b50);
    for x in [20u16, 0, 0, 0, 0] {
        le16(&mut out, x);
    }
    le32(&mut out, crc);
    le32(&mut out, data.len() as u32);
    le32(&mut out, data.len() as u32);
    le16(&mut out, name.len() as u16);
    le16(&mut out, 0);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(data);
    let cd_start = out.len() as u32;
    // Central directory.
    le32(&mut out, 0x0201_4b50);
    for x in [20u16, 20, 0, 0, 0, 0] {
        le16(&mut out, x);
    }
    le32(&mut out, crc);
    le32(&mut out, data.len() as u32);
    le32(&mut out, data.len() as u32);
    le16(&mut out, name.len() as u16);
    for x in [0u16, 0, 0, 0] {
        le16(&mut out, x);
    }
    le32(&mut out, 0);
    le32(&mut out, 0);
    out.extend_from_slice(name.as_bytes());
    let cd_len = out.len() as u32 - cd_start;
    // End of central directory.
    le32(&mut out, 0x0605_4b50);
    for x in [0u16, 0, 1, 1] {
        le16(&mut out, x);
    }
    le32(&mut out, cd_len);
    le32(&mut out, cd_start);
    le16(&mut out, 0);
    out
}
