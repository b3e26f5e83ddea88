use std::path::{Path, PathBuf};

use mica_core::{Classifier, ImageSource, LabelSet, Sample};

use crate::testing::{self, Dim};
use crate::*;

const SIDE_RGB: &str = "labels = [\"glioma\", \"meningioma\", \"notumor\", \"pituitary\"]\nscale = 255.0\nmean = [0.5, 0.4, 0.3]\nstd = [0.2, 0.25, 0.5]\noutput = \"logits\"\n";

/// Channel weights `[3 x 4]` that give each channel its own effect on each class.
const W: [f32; 12] = [1.0, -2.0, 0.5, 3.0, -1.0, 0.7, 2.0, -0.4, 0.3, 1.1, -1.5, 0.2];
const B: [f32; 4] = [0.1, -0.2, 0.3, 0.0];

fn write_model(dir: &Path, name: &str, m: &tract_onnx::pb::ModelProto, sidecar: &str) -> PathBuf {
    let p = dir.join(format!("{name}.onnx"));
    testing::write(&p, m);
    testing::write_sidecar(&p, sidecar);
    p
}

fn solid_png(path: &Path, rgb: [u8; 3], w: u32, h: u32) {
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).save(path).unwrap();
}

fn sample(id: &str, path: &Path) -> Sample {
    Sample { id: id.into(), source: ImageSource::file(path), label: 0, split: None, context: None }
}

/// softmax(x . W + b) with x the standardised channel values: what any correct runtime and
/// preprocessing must give for a one-colour image.
fn by_hand(rgb: [u8; 3], mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let x: Vec<f32> = (0..3).map(|c| (rgb[c] as f32 / 255.0 - mean[c]) / std[c]).collect();
    let z: Vec<f32> = (0..4).map(|k| B[k] + (0..3).map(|c| x[c] * W[c * 4 + k]).sum::<f32>()).collect();
    model::softmax(&z)
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

#[test]
fn runtime_version_is_the_one_in_cargo_lock() {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock")).unwrap();
    let entry = lock.split("[[package]]").find(|p| p.contains("name = \"tract-onnx\"\n")).expect("tract-onnx in Cargo.lock");
    assert!(entry.contains(&format!("version = \"{RUNTIME_VERSION}\"")), "RUNTIME_VERSION {RUNTIME_VERSION} is stale: {entry}");
}

#[test]
fn nchw_and_nhwc_exports_agree_with_the_hand_computed_answer() {
    let dir = tempfile::tempdir().unwrap();
    let nchw = testing::mean_linear(false, &[Dim::Param("N"), Dim::Fixed(3), Dim::Fixed(16), Dim::Fixed(12)], 4, &W, &B, false);
    let nhwc = testing::mean_linear(true, &[Dim::Param("batch_size"), Dim::Fixed(16), Dim::Fixed(12), Dim::Fixed(3)], 4, &W, &B, true);
    let a = write_model(dir.path(), "torch", &nchw, SIDE_RGB);
    let b = write_model(dir.path(), "keras", &nhwc, &SIDE_RGB.replace("logits", "probabilities"));
    let img = dir.path().join("c.png");
    let rgb = [200, 40, 120];
    solid_png(&img, rgb, 30, 20);
    let want = by_hand(rgb, [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]);
    for p in [a, b] {
        let mut c = OnnxClassifier::load(&p).unwrap();
        assert_eq!(c.model().pre.height, 16);
        assert_eq!(c.model().pre.width, 12);
        assert_eq!(c.model().pre.batch, BatchDim::Dynamic);
        let pred = c.classify(&[sample("a", &img)]).pop().unwrap().unwrap();
        let probs = pred.probabilities.as_ref().unwrap();
        // Keyed by mica's names (`notumor` became `no_tumor`), in output order here.
        let got: Vec<f32> = ["glioma", "meningioma", "no_tumor", "pituitary"].iter().map(|l| probs[*l] as f32).collect();
        assert!(close(&got, &want, 1e-5), "{}: {got:?} vs {want:?}", p.display());
        let best = want.iter().cloned().fold(0.0, f32::max);
        assert!((pred.confidence.unwrap() as f32 - best).abs() < 1e-5);
    }
}

#[test]
fn keys_the_graph_states_are_filled_in_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let m = testing::mean_linear(false, &[Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(8), Dim::Fixed(8)], 4, &W[..4], &B, false);
    let side = "labels = [\"glioma\", \"meningioma\", \"no_tumor\", \"pituitary\"]\nscale = 255.0\nmean = [0.0]\nstd = [1.0]\noutput = \"logits\"\n";
    let p = write_model(dir.path(), "gray", &m, side);
    let c = OnnxClassifier::load(&p).unwrap();
    let pre = &c.model().pre;
    assert_eq!((pre.layout, pre.height, pre.width, pre.graph_channels), (TensorLayout::Nchw, 8, 8, 1));
    assert_eq!(pre.channels, Channels::Gray);
    assert_eq!(pre.batch, BatchDim::One);
    assert_eq!(pre.filled_in, ["layout", "channels", "size", "resize (default bilinear)"]);
    let prov = &c.model().provenance;
    assert_eq!(prov.producer_name, "pytorch");
    assert_eq!(prov.opsets, ["ai.onnx:17"]);
    assert_eq!(prov.ir_version, 8);
    assert_eq!(prov.inputs[0].name, "input");
    assert_eq!(prov.runtime, format!("tract-onnx {RUNTIME_VERSION}"));
    use sha2::Digest;
    assert_eq!(prov.sha256, format!("{:x}", sha2::Sha256::digest(std::fs::read(&p).unwrap())));
    // Fixed batch 1: a batch of 16 runs one image at a time.
    assert_eq!(c.model().max_batch(16), 1);
}

#[test]
fn what_stays_ambiguous_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = "labels = [\"glioma\", \"meningioma\", \"no_tumor\", \"pituitary\"]\nscale = 255.0\nmean = [0.0]\nstd = [1.0]\noutput = \"logits\"\n";
    let cases: Vec<(&str, Vec<Dim>, String, &str)> = vec![
        ("size", vec![Dim::Param("N"), Dim::Fixed(3), Dim::Param("h"), Dim::Param("w")], base.into(), "missing key `size`"),
        // 3 x ? x ? x 3: channels could be first or last.
        ("layout", vec![Dim::Param("N"), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(3)], base.into(), "missing key `layout`"),
        ("scale", vec![Dim::Param("N"), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)], base.replace("scale = 255.0\n", ""), "missing key `scale`"),
        ("mean", vec![Dim::Param("N"), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)], base.replace("mean = [0.0]\n", ""), "missing key `mean`"),
        ("output", vec![Dim::Param("N"), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)], base.replace("output = \"logits\"\n", ""), "missing key `output`"),
        ("contradiction", vec![Dim::Param("N"), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)], format!("{base}layout = \"nhwc\"\n"), "contradicts the graph"),
        ("size differs", vec![Dim::Param("N"), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)], format!("{base}size = [9, 8]\n"), "size = [9, 8] contradicts"),
        ("batch 4", vec![Dim::Fixed(4), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)], base.into(), "fixed batch of 4"),
        ("labels", vec![Dim::Param("N"), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)], base.replace("\"pituitary\"", ""), "lists 3 labels"),
        ("rgb into gray", vec![Dim::Param("N"), Dim::Fixed(1), Dim::Fixed(8), Dim::Fixed(8)], format!("{base}channels = \"rgb\"\n"), "takes one channel"),
    ];
    for (what, dims, side, want) in cases {
        let ch = match &dims[1] { Dim::Fixed(1) => 1, _ => 3 };
        let m = testing::mean_linear(false, &dims, 4, &W[..4 * ch], &B, false);
        let p = write_model(dir.path(), what, &m, &side);
        let e = OnnxClassifier::load(&p).err().unwrap_or_else(|| panic!("{what}: loaded")).to_string();
        assert!(e.contains(want), "{what}: {e}");
        assert!(!e.contains('\n'), "{what}: {e}");
    }
    let e = OnnxClassifier::load(&dir.path().join("absent.onnx")).err().unwrap().to_string();
    assert!(e.contains("absent.toml") && e.contains("no sidecar"), "{e}");
}

#[test]
fn an_unsupported_operator_is_named_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = testing::mean_linear(false, &[Dim::Param("N"), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)], 4, &W, &B, false);
    let g = m.graph.as_mut().unwrap();
    g.node.insert(0, testing::node("MicaMadeUpOp", &["input"], &["weird"], vec![]));
    g.node[1].input[0] = "weird".into();
    let p = write_model(dir.path(), "odd", &m, SIDE_RGB);
    let e = OnnxClassifier::load(&p).err().unwrap().to_string();
    assert!(e.contains("unsupported operator `MicaMadeUpOp`") && e.contains("tract-onnx"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn probabilities_are_checked_and_logits_get_softmax() {
    assert!(close(&model::softmax(&[0.0, 0.0]), &[0.5, 0.5], 1e-7));
    let s = model::softmax(&[1000.0, 0.0, -1000.0]);
    assert!(s.iter().all(|v| v.is_finite()) && (s[0] - 1.0).abs() < 1e-6);
    let dir = tempfile::tempdir().unwrap();
    // Logits declared as probabilities: refused with the fix named.
    let m = testing::mean_linear(false, &[Dim::Param("N"), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)], 4, &W, &B, false);
    let p = write_model(dir.path(), "raw", &m, &SIDE_RGB.replace("logits", "probabilities"));
    let img = dir.path().join("c.png");
    solid_png(&img, [250, 10, 10], 8, 8);
    let mut c = OnnxClassifier::load(&p).unwrap();
    let e = c.classify(&[sample("a", &img)]).pop().unwrap().unwrap_err().message;
    assert!(e.contains("not a probability distribution") && e.contains("output = \\\"logits\\\"") || e.contains("output = \"logits\""), "{e}");
    // An unreadable image fails alone.
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"not an image").unwrap();
    let mut c = OnnxClassifier::load(&write_model(dir.path(), "ok", &m, SIDE_RGB)).unwrap();
    let r = c.classify(&[sample("bad", &bad), sample("a", &img)]);
    assert!(r[0].is_err() && r[1].is_ok());
}

#[test]
fn batches_give_the_same_answers_as_single_images_and_labels_follow_the_task_order() {
    let dir = tempfile::tempdir().unwrap();
    let m = testing::mean_linear(true, &[Dim::Param("N"), Dim::Fixed(8), Dim::Fixed(8), Dim::Fixed(3)], 4, &W, &B, false);
    let p = write_model(dir.path(), "k", &m, SIDE_RGB);
    let colours = [[10, 20, 30], [200, 100, 0], [0, 255, 128], [90, 90, 90], [255, 0, 0]];
    let samples: Vec<Sample> = colours
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let f = dir.path().join(format!("{i}.png"));
            solid_png(&f, c, 8, 8);
            sample(&i.to_string(), &f)
        })
        .collect();
    let mut c = OnnxClassifier::load(&p).unwrap();
    c.batch = 2;
    let batched: Vec<_> = c.classify(&samples).into_iter().map(|r| r.unwrap().probabilities.unwrap()).collect();
    c.batch = 1;
    for (s, b) in samples.iter().zip(&batched) {
        let one = c.classify(std::slice::from_ref(s)).pop().unwrap().unwrap().probabilities.unwrap();
        for (k, v) in &one {
            assert!((v - b[k]).abs() < 1e-6, "{k}");
        }
    }
    // The task's canonical order differs from the model's output order.
    let task = mica_core::Modality::Mri.canonical_labels().unwrap();
    c.align_labels(&task).unwrap();
    assert_eq!(c.labels(), &task);
    let p0 = c.classify(&samples[..1]).pop().unwrap().unwrap();
    let want = by_hand([10, 20, 30], [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]);
    let probs = p0.probabilities.unwrap();
    assert!((probs["no_tumor"] as f32 - want[2]).abs() < 1e-5 && (probs["pituitary"] as f32 - want[3]).abs() < 1e-5);
    let other = LabelSet::new(vec!["a".into(), "b".into(), "c".into(), "d".into()]).unwrap();
    assert!(c.align_labels(&other).unwrap_err().to_string().contains("not the task's labels"));
}

#[test]
fn occlusion_finds_the_only_region_the_model_sees() {
    use crate::testing::{node, tensor, value_info};
    let dir = tempfile::tempdir().unwrap();
    // x * mask (only the top-left 4x4 of 16x16 counts), mean, then logits (m, -m): hiding the
    // top-left changes the answer, hiding anything else changes nothing.
    let mut mask = vec![0.0f32; 256];
    for y in 0..4 {
        for x in 0..4 {
            mask[y * 16 + x] = 16.0;
        }
    }
    let graph = tract_onnx::pb::GraphProto {
        name: "masked".into(),
        node: vec![
            node("Mul", &["input", "mask"], &["masked"], vec![]),
            node("GlobalAveragePool", &["masked"], &["pooled"], vec![]),
            node("Flatten", &["pooled"], &["flat"], vec![testing::attr_int("axis", 1)]),
            node("Gemm", &["flat", "w", "b"], &["output"], vec![testing::attr_int("transB", 1)]),
        ],
        initializer: vec![tensor("mask", &[1, 1, 16, 16], mask), tensor("w", &[2, 1], vec![4.0, -4.0]), tensor("b", &[2], vec![0.0, 0.0])],
        input: vec![value_info("input", &[Dim::Param("N"), Dim::Fixed(1), Dim::Fixed(16), Dim::Fixed(16)])],
        output: vec![value_info("output", &[Dim::Param("N"), Dim::Fixed(2)])],
        ..Default::default()
    };
    let m = testing::model(graph, "test", "1");
    let side = "labels = [\"normal\", \"abnormal\"]\nmodality = \"other\"\nscale = 255.0\nmean = [0.0]\nstd = [1.0]\noutput = \"logits\"\n";
    let p = write_model(dir.path(), "masked", &m, side);
    let img = dir.path().join("g.png");
    // Bright top-left, dark elsewhere: the occluding mean grey darkens the top-left.
    image::GrayImage::from_fn(16, 16, |x, y| image::Luma([if x < 4 && y < 4 { 255 } else { 0 }])).save(&img).unwrap();
    let c = OnnxClassifier::load(&p).unwrap();
    let o = occlusion(&c, &ImageSource::file(&img), None, Some(4)).unwrap();
    assert_eq!(o.predicted, "normal");
    assert_eq!((o.height, o.width, o.patch, o.stride), (16, 16, 4, 2));
    assert!(o.max_drop > 0.1, "{o:?}");
    assert_eq!(o.map[0], 1.0, "the top-left corner is covered only by patches that matter");
    assert_eq!(o.map[15 * 16 + 15], 0.0);
    assert_eq!(o.map[8 * 16 + 8], 0.0);
    let e = occlusion(&c, &ImageSource::file(&img), Some("cat"), None).unwrap_err().to_string();
    assert!(e.contains("unknown class `cat`"), "{e}");
    assert!(occlusion::METHOD.contains("occlusion") && occlusion::METHOD.contains("no gradients"));
}
