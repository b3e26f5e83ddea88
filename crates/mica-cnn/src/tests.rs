//! Tests that train real (tiny) networks: learning, reproducibility, resume, checkpoints,
//! bad input, transfer learning and Grad-CAM. Images are 16 px and runs a few epochs, so each
//! test takes seconds.

use std::path::Path;

use mica_core::{Classifier, Dataset, ImageSource, LabelSet, Layout, Modality, Sample, Split};

use crate::checkpoint::CheckpointMeta;
use crate::train::{train, Progress, TrainConfig};
use crate::{Arch, Checkpoint, CnnClassifier, CnnError, CpuBackend, Net};

const SIZE: u32 = 16;

/// Class `c` has a bright 6x6 block in quadrant `c` over noise: learnable in a few epochs.
fn toy_image(class: usize, k: usize) -> image::GrayImage {
    let mut img = image::GrayImage::new(SIZE, SIZE);
    let mut state = (class * 7919 + k * 104729 + 1) as u64;
    for p in img.pixels_mut() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        p.0[0] = 30 + ((state >> 33) % 60) as u8;
    }
    let (ox, oy) = ((class % 2) as u32 * 8 + 1, (class / 2) as u32 * 8 + 1);
    let jitter = (k % 2) as u32;
    for y in 0..6 {
        for x in 0..6 {
            img.put_pixel(ox + x + jitter, oy + y, image::Luma([200]));
        }
    }
    img
}

fn labels() -> LabelSet {
    Modality::Mri.canonical_labels().unwrap()
}

/// Writes a 4-class dataset of `train` + `val` images per class.
fn toy_dataset(dir: &Path, train: usize, val: usize) -> Dataset {
    let mut samples = Vec::new();
    for c in 0..4 {
        for k in 0..train + val {
            let split = if k < train { Split::Train } else { Split::Val };
            let id = format!("{}/{c}_{k}.png", split.as_str());
            let path = dir.join(&id);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            toy_image(c, k).save(&path).unwrap();
            samples.push(Sample {
                id,
                source: ImageSource::file(path),
                label: c,
                split: Some(split),
                context: None,
            });
        }
    }
    Dataset {
        root: dir.to_path_buf(),
        layout: Layout::ImageFolder,
        modality: Modality::Mri,
        labels: labels(),
        samples,
        skipped: vec![],
        context_columns: Vec::new(),
        label_like_context: Vec::new(),
    }
}

fn quiet(_: Progress) {}

fn small_cfg(epochs: usize) -> TrainConfig {
    let mut cfg = TrainConfig::new(Arch::Small);
    cfg.epochs = epochs;
    cfg.batch = 8;
    cfg.lr = 3e-3;
    cfg.seed = 5;
    cfg.patience = 100;
    cfg
}

#[test]
fn small_cnn_learns_a_tiny_set() {
    let dir = tempfile::tempdir().unwrap();
    let ds = toy_dataset(&dir.path().join("data"), 8, 3);
    let mut cfg = small_cfg(12);
    cfg.augment = false;
    let s = train(&ds, &cfg, &dir.path().join("run"), &mut quiet).unwrap();
    let first = &s.history[0];
    let last = s.history.last().unwrap();
    assert!(last.train_loss < 0.5 * first.train_loss, "loss did not fall: {:?}", s.history);
    assert!(last.train_accuracy >= 0.9, "tiny set not fitted: {:?}", s.history);
    assert!(s.best_val_accuracy >= 0.75, "does not generalise: {:?}", s.history);
    let log = std::fs::read_to_string(dir.path().join("run/train_log.csv")).unwrap();
    assert_eq!(log.lines().count(), 13);
    assert!(log.starts_with("epoch,lr,train_loss"));
}

#[test]
fn same_seed_same_run_and_resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ds = toy_dataset(&dir.path().join("data"), 4, 2);
    let cfg = small_cfg(3);
    let a = train(&ds, &cfg, &dir.path().join("a"), &mut quiet).unwrap();
    let b = train(&ds, &cfg, &dir.path().join("b"), &mut quiet).unwrap();
    let strip = |h: &[crate::EpochStats]| {
        h.iter()
            .map(|e| (e.epoch, e.train_loss, e.train_accuracy, e.val_loss, e.val_macro_f1))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&a.history), strip(&b.history));

    // A run stopped after one epoch and resumed ends exactly where the uninterrupted one did.
    let mut first = cfg.clone();
    first.stop_after_epochs = Some(1);
    let c1 = train(&ds, &first, &dir.path().join("c"), &mut quiet).unwrap();
    assert_eq!(c1.epochs_run, 1);
    // Without --resume an existing run is never overwritten.
    let err = train(&ds, &cfg, &dir.path().join("c"), &mut quiet).unwrap_err();
    assert!(err.to_string().contains("--resume"), "{err}");
    let mut again = cfg.clone();
    again.resume = true;
    let c = train(&ds, &again, &dir.path().join("c"), &mut quiet).unwrap();
    assert_eq!(c.resumed_from_epoch, Some(1));
    assert_eq!(strip(&c.history), strip(&a.history));
}

#[test]
fn checkpoint_round_trip_and_classifier() {
    let dir = tempfile::tempdir().unwrap();
    let ds = toy_dataset(&dir.path().join("data"), 6, 2);
    let run = dir.path().join("run");
    let s = train(&ds, &small_cfg(4), &run, &mut quiet).unwrap();
    let meta = CheckpointMeta::read(&run).unwrap();
    assert_eq!(meta.arch, Arch::Small);
    assert_eq!(meta.labels, ds.labels);
    assert_eq!(meta.input_size, SIZE as usize);
    assert_eq!(meta.epoch, s.best_epoch);
    let ck = Checkpoint::<CpuBackend>::load(&run, &Default::default()).unwrap();
    assert_eq!(ck.model.arch(), Arch::Small);

    let mut clf = CnnClassifier::load(&run, &mut |_| {}).unwrap();
    clf.review_below = Some(0.99);
    let val: Vec<Sample> = ds.split(Split::Val).cloned().collect();
    let preds = clf.classify(&val);
    assert_eq!(preds.len(), val.len());
    let mut correct = 0;
    for p in &preds {
        let p = p.as_ref().unwrap();
        let probs = p.probabilities.as_ref().unwrap();
        assert!((probs.values().sum::<f64>() - 1.0).abs() < 1e-4);
        assert_eq!(p.confidence, probs.values().cloned().reduce(f64::max));
        assert_eq!(p.needs_review, p.confidence.unwrap() < 0.6);
        correct += (p.predicted == p.true_label) as usize;
    }
    // The reloaded weights reproduce the validation accuracy recorded at the best epoch.
    let acc = correct as f64 / val.len() as f64;
    assert!((acc - meta.val_accuracy).abs() < 1e-9, "{acc} vs {}", meta.val_accuracy);

    // On the CPU the classifier runs the fused engine, and its probabilities are burn's.
    assert_eq!(clf.engine(), "fused-cpu");
    let cache = crate::data::ImageCache::load(ds.split(Split::Val), SIZE as usize, 1).unwrap();
    let fused = clf.probabilities(&cache);
    let burn = crate::train::predict(&ck.model, &cache, &meta.normalization, 32, &Default::default());
    for (f, b) in fused.iter().flatten().zip(burn.iter().flatten()) {
        assert!((f - b).abs() < 1e-5, "fused {f} vs burn {b}");
    }

    // An unreadable image is its own failure, not a failed batch.
    let mut bad = val[0].clone();
    bad.id = "missing.png".into();
    bad.source = ImageSource::file(dir.path().join("missing.png"));
    let r = clf.classify(&[bad, val[1].clone()]);
    assert!(r[0].is_err() && r[1].is_ok());
}

#[test]
fn checkpoints_carry_ood_statistics_and_old_ones_still_load() {
    use crate::ood::{OodStats, OodVerdict, METHOD, OOD_FILE};
    let dir = tempfile::tempdir().unwrap();
    let ds = toy_dataset(&dir.path().join("data"), 6, 2);
    let run = dir.path().join("run");
    let mut cfg = small_cfg(3);
    cfg.augment = false;
    train(&ds, &cfg, &run, &mut quiet).unwrap();
    let meta = CheckpointMeta::read(&run).unwrap();
    let stats: OodStats = serde_json::from_slice(&std::fs::read(run.join(OOD_FILE)).unwrap()).unwrap();
    assert_eq!(stats.weights_fnv64, meta.weights_fnv64, "statistics of the best weights");
    assert_eq!(stats.epoch, meta.epoch);
    assert_eq!((stats.train_images, stats.val_images), (24, 8));
    assert_eq!(stats.feature_width, 2 * 128);
    assert!(stats.threshold > 0.0 && stats.val_flag_rate.is_some());

    let mut clf = CnnClassifier::load(&run, &mut |m| panic!("unexpected notice: {m}")).unwrap();
    assert_eq!(clf.ood_stats().unwrap(), &stats);
    let val: Vec<Sample> = ds.split(Split::Val).cloned().collect();
    let preds = clf.classify(&val);
    let cache = crate::ImageCache::load(&val, SIZE as usize, 1).unwrap();
    let direct = clf.ood_verdicts(&cache);
    for (p, d) in preds.iter().zip(&direct) {
        let p = p.as_ref().unwrap();
        let v = OodVerdict::from_prediction(p).unwrap();
        assert_eq!(&v, d, "classify and ood_verdicts agree");
        assert!(v.available && v.method.as_deref() == Some(METHOD));
        assert_eq!(v.flagged, v.score.unwrap() > stats.threshold);
        if v.flagged {
            assert!(p.needs_review, "a flagged image needs review");
        }
    }
    // An image nothing like the toy set (a uniform white square) is flagged and needs review.
    let white = dir.path().join("white.png");
    image::GrayImage::from_pixel(SIZE, SIZE, image::Luma([255])).save(&white).unwrap();
    let mut s = val[0].clone();
    s.id = "white.png".into();
    s.source = ImageSource::file(&white);
    let p = clf.classify(&[s.clone()]).pop().unwrap().unwrap();
    let v = OodVerdict::from_prediction(&p).unwrap();
    assert!(v.flagged && p.needs_review, "{v:?}");
    clf.ood_review = false;
    let p = clf.classify(&[s.clone()]).pop().unwrap().unwrap();
    assert!(OodVerdict::from_prediction(&p).unwrap().flagged);
    assert_eq!(p.needs_review, false, "ood_review off: the flag alone does not mark review");

    // A checkpoint from before the check (no ood.json) loads and says so on every answer.
    std::fs::remove_file(run.join(OOD_FILE)).unwrap();
    let mut notes = Vec::new();
    let mut old = CnnClassifier::load(&run, &mut |m| notes.push(m.to_string())).unwrap();
    assert!(notes.iter().any(|n| n.contains("not available for this checkpoint")), "{notes:?}");
    assert!(old.ood_stats().unwrap_err().contains("no ood.json"));
    let p = old.classify(&[s]).pop().unwrap().unwrap();
    let v = OodVerdict::from_prediction(&p).unwrap();
    assert!(!v.available && !v.flagged && v.message.contains("not available for this checkpoint"), "{v:?}");
    // Statistics of other weights are refused, not misapplied.
    let mut wrong = stats.clone();
    wrong.weights_fnv64 = "0123456789abcdef".into();
    wrong.write(&run).unwrap();
    let old = CnnClassifier::load(&run, &mut |_| {}).unwrap();
    assert!(old.ood_stats().unwrap_err().contains("other weights"));
}

#[test]
fn bad_checkpoints_and_mismatches_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ds = toy_dataset(&dir.path().join("data"), 2, 1);
    let run = dir.path().join("run");
    train(&ds, &small_cfg(1), &run, &mut quiet).unwrap();
    let meta = CheckpointMeta::read(&run).unwrap();

    let other = LabelSet::new(vec!["a".into(), "b".into()]).unwrap();
    let err = meta.check_labels(&other, &run).unwrap_err().to_string();
    assert!(err.contains("do not match") && err.contains("glioma"), "{err}");

    // Corrupt weights: caught by the hash before burn reads them.
    let w = run.join(&meta.weights_file);
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&w, &bytes).unwrap();
    let err = Checkpoint::<CpuBackend>::load(&run, &Default::default()).err().unwrap().to_string();
    assert!(err.contains("corrupt"), "{err}");

    // Garbage whose hash is "right" (someone edited the JSON): burn's decoder must not panic.
    std::fs::write(&w, b"not msgpack at all").unwrap();
    let mut m2 = meta.clone();
    m2.weights_fnv64 = crate::checkpoint::fnv64(b"not msgpack at all");
    std::fs::write(run.join("checkpoint.json"), serde_json::to_vec(&m2).unwrap()).unwrap();
    let err = Checkpoint::<CpuBackend>::load(&run, &Default::default()).err().unwrap().to_string();
    assert!(err.contains("decode"), "{err}");

    std::fs::write(run.join("checkpoint.json"), b"{ truncated").unwrap();
    let err = CnnClassifier::load(&run, &mut |_| {}).err().unwrap().to_string();
    assert!(err.contains("checkpoint.json") && err.contains("not a checkpoint"), "{err}");

    let err = CnnClassifier::load(dir.path(), &mut |_| {}).err().unwrap().to_string();
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn bad_configurations_and_empty_splits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut ds = toy_dataset(&dir.path().join("data"), 1, 1);
    let err = train(&ds, &small_cfg(0), &dir.path().join("r0"), &mut quiet).unwrap_err();
    assert!(matches!(err, CnnError::Config(_)), "{err}");
    assert!(err.to_string().contains("epochs"));

    let mut huge = small_cfg(1);
    huge.batch = 1 << 40;
    huge.size = Some(1024);
    let err = train(&ds, &huge, &dir.path().join("r1"), &mut quiet).unwrap_err();
    assert!(matches!(err, CnnError::OutOfMemory { .. }), "{err}");
    assert!(err.to_string().contains("try --batch"), "{err}");

    for s in &mut ds.samples {
        s.split = Some(Split::Test);
    }
    let err = train(&ds, &small_cfg(1), &dir.path().join("r2"), &mut quiet).unwrap_err();
    assert!(matches!(err, CnnError::EmptySplit(_)), "{err}");
}

#[test]
fn missing_validation_split_is_held_out_from_train() {
    let dir = tempfile::tempdir().unwrap();
    let mut ds = toy_dataset(&dir.path().join("data"), 4, 0);
    ds.samples.truncate(16);
    let mut notes = Vec::new();
    let s = train(&ds, &small_cfg(1), &dir.path().join("run"), &mut |p| {
        if let Progress::Notice(m) = p {
            notes.push(m.to_string())
        }
    })
    .unwrap();
    assert_eq!(s.train_images + s.val_images, 16);
    assert!(s.val_images >= 4);
    assert!(notes.iter().any(|n| n.contains("holding out")), "{notes:?}");
}

fn write_torchvision_resnet18(path: &Path, classes: usize) -> std::collections::HashMap<String, Vec<f32>> {
    use safetensors::{tensor::TensorView, Dtype};
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("conv1.weight".into(), vec![64, 3, 7, 7])];
    let bn = |name: &str, c: usize, v: &mut Vec<(String, Vec<usize>)>| {
        for k in ["weight", "bias", "running_mean", "running_var"] {
            v.push((format!("{name}.{k}"), vec![c]));
        }
    };
    bn("bn1", 64, &mut shapes);
    let cfg = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)];
    for (li, (cin, cout, stride)) in cfg.iter().enumerate() {
        for b in 0..2 {
            let p = format!("layer{}.{b}", li + 1);
            let c_in = if b == 0 { *cin } else { *cout };
            shapes.push((format!("{p}.conv1.weight"), vec![*cout, c_in, 3, 3]));
            bn(&format!("{p}.bn1"), *cout, &mut shapes);
            shapes.push((format!("{p}.conv2.weight"), vec![*cout, *cout, 3, 3]));
            bn(&format!("{p}.bn2"), *cout, &mut shapes);
            if b == 0 && (*stride != 1 || cin != cout) {
                shapes.push((format!("{p}.downsample.0.weight"), vec![*cout, *cin, 1, 1]));
                bn(&format!("{p}.downsample.1"), *cout, &mut shapes);
            }
        }
    }
    shapes.push(("fc.weight".into(), vec![classes, 512]));
    shapes.push(("fc.bias".into(), vec![classes]));
    let mut values = std::collections::HashMap::new();
    let mut bytes = Vec::new();
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|j| {
                let x = ((i * 31 + j * 17) % 101) as f32 / 101.0;
                if name.ends_with("running_var") { 0.5 + x } else { (x - 0.5) * 0.1 }
            })
            .collect();
        bytes.push(v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>());
        values.insert(name.clone(), v);
    }
    let views: Vec<(String, TensorView)> = shapes
        .iter()
        .zip(&bytes)
        .map(|((name, shape), b)| (name.clone(), TensorView::new(Dtype::F32, shape.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
    values
}

#[test]
fn resnet18_imports_torchvision_weights_and_fine_tunes() {
    let dir = tempfile::tempdir().unwrap();
    let wpath = dir.path().join("resnet18.safetensors");
    let values = write_torchvision_resnet18(&wpath, 1000);
    let device = Default::default();
    let mut net: Net<CpuBackend> = Net::seeded(Arch::Resnet18, 1, 4, 1, &device);
    let report = crate::transfer::load_resnet18(&mut net, &wpath, &device).unwrap();
    assert!(report.contains("averaged") && report.contains("kept fresh"), "{report}");
    let crate::model::Backbone::Resnet18(r) = &net.backbone else { panic!("not a resnet") };
    let conv1: Vec<f32> = r.conv1.weight.val().into_data().to_vec().unwrap();
    let src = &values["conv1.weight"];
    // Output filter 5, position 10: mean of the three RGB taps.
    let want = (src[(5 * 3) * 49 + 10] + src[(5 * 3 + 1) * 49 + 10] + src[(5 * 3 + 2) * 49 + 10]) / 3.0;
    assert!((conv1[5 * 49 + 10] - want).abs() < 1e-6);
    let rm: Vec<f32> = r.layer3[0].downsample.as_ref().unwrap().bn.running_mean.value().into_data().to_vec().unwrap();
    assert_eq!(rm, values["layer3.0.downsample.1.running_mean"]);

    // A matching classifier is taken over, transposed to burn's [in, out] layout.
    let w4 = dir.path().join("four.safetensors");
    let v4 = write_torchvision_resnet18(&w4, 4);
    let mut net4: Net<CpuBackend> = Net::seeded(Arch::Resnet18, 1, 4, 1, &device);
    crate::transfer::load_resnet18(&mut net4, &w4, &device).unwrap();
    let fc: Vec<f32> = net4.fc.weight.val().into_data().to_vec().unwrap();
    assert_eq!(fc[3 * 4 + 2], v4["fc.weight"][2 * 512 + 3]);

    // Wrong files are clear errors.
    let small = dir.path().join("bad.safetensors");
    {
        use safetensors::{tensor::TensorView, Dtype};
        let b = vec![0u8; 16];
        let v = vec![("conv1.weight".to_string(), TensorView::new(Dtype::F32, vec![2, 2], &b).unwrap())];
        safetensors::serialize_to_file(v, None, &small).unwrap();
    }
    let err = crate::transfer::load_resnet18(&mut net, &small, &device).unwrap_err().to_string();
    assert!(err.contains("conv1.weight") && err.contains("shape"), "{err}");
    std::fs::write(dir.path().join("junk.pth"), b"junk").unwrap();
    let err = crate::transfer::load_resnet18(&mut net, &dir.path().join("junk.pth"), &device).unwrap_err();
    assert!(err.to_string().contains("junk.pth"), "{err}");

    // Fine-tuning from the file runs and records where the weights came from.
    let ds = toy_dataset(&dir.path().join("data"), 2, 1);
    let mut cfg = small_cfg(1);
    cfg.arch = Arch::Resnet18;
    cfg.pretrained = Some(wpath.clone());
    let s = train(&ds, &cfg, &dir.path().join("run"), &mut quiet).unwrap();
    assert_eq!(s.epochs_run, 1);
    let meta = CheckpointMeta::read(&dir.path().join("run")).unwrap();
    assert_eq!(meta.pretrained_from.as_deref(), Some(wpath.to_str().unwrap()));
}

#[test]
fn gradcam_writes_an_overlay_of_the_image_size() {
    let dir = tempfile::tempdir().unwrap();
    let ds = toy_dataset(&dir.path().join("data"), 4, 1);
    let run = dir.path().join("run");
    let mut cfg = small_cfg(3);
    cfg.augment = false;
    train(&ds, &cfg, &run, &mut quiet).unwrap();
    // A larger image than the input size: the overlay keeps the image's own resolution.
    let big = dir.path().join("big.png");
    image::imageops::resize(&toy_image(1, 0), 48, 48, image::imageops::FilterType::Nearest)
        .save(&big)
        .unwrap();
    let out = dir.path().join("cam.png");
    let e = crate::gradcam::explain_to_png(&run, &big, None, &out).unwrap();
    assert_eq!(e.cam.len(), (SIZE * SIZE) as usize);
    let max = e.cam.iter().cloned().fold(0.0, f32::max);
    assert!(max == 1.0 || max == 0.0);
    assert!((e.probabilities.iter().map(|p| p.1).sum::<f64>() - 1.0).abs() < 1e-4);
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (48, 48));
    let err = crate::gradcam::explain(&run, &big, Some("kidney")).unwrap_err().to_string();
    assert!(err.contains("kidney"), "{err}");
}
