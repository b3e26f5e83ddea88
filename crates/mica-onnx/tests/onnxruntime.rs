//! Cross-check against ONNX Runtime, the reference implementation of ONNX.
//!
//! When `python3` with `venv` is available, a virtual environment is created once under
//! cargo's target tmp dir (reused afterwards) with `pip install onnx onnxruntime numpy`. The
//! Python side builds two graphs with the official `onnx` package (`onnx.helper`), in the exact
//! node shapes the two common exporters emit, with seeded random weights:
//! - PyTorch's `torch.onnx.export` of a small CNN: NCHW input with a named dynamic batch axis
//!   (`batch_size`), Conv, BatchNormalization, Relu, MaxPool, Conv, Relu, GlobalAveragePool,
//!   Flatten, Gemm (transB = 1, as `nn.Linear` exports), logits out;
//! - tf2onnx's conversion of a Keras model: NHWC input (`N`), Transpose to NCHW, Conv, Relu,
//!   Transpose back to NHWC, ReduceMean over H and W (GlobalAveragePooling2D), Reshape,
//!   MatMul + Add (Dense), Softmax, probabilities out.
//!
//! The graphs are written with onnx.helper rather than exported because torch and tensorflow
//! are gigabytes of wheels (PyPI's torch pulls the CUDA libraries) for two small files whose
//! node sequence is all that matters here; `onnx.checker` validates them.
//!
//! ONNX Runtime then scores seeded raw tensors (a batch of 5, through the dynamic batch axis)
//! and seeded RGB images, which it standardises itself from the pixel values with numpy; mica
//! runs the same raw tensors through [`OnnxModel::run_raw`] and the same images through the
//! full image pipeline (PNG decoding, sidecar scaling, layout) of [`OnnxClassifier`]. Every
//! output must agree to 1e-4.
//!
//! Without Python or network the test prints SKIPPED and passes, unless
//! `MICA_REQUIRE_ONNXRUNTIME=1` (CI sets it, so a broken environment cannot pass silently).

use std::path::{Path, PathBuf};
use std::process::Command;

use mica_core::{Classifier, ImageSource, Sample};
use mica_onnx::{OnnxClassifier, OnnxModel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const TOL: f32 = 1e-4;
const PACKAGES: [&str; 3] = ["onnx", "onnxruntime", "numpy"];
const BATCH: usize = 5;

const SCRIPT: &str = r#"
import json, sys
import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto
import onnxruntime as ort

out_dir = sys.argv[1]
inputs = json.load(open(sys.argv[2]))
rng = np.random.default_rng(7)

def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)

def w(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

# PyTorch-style: torch.onnx.export(model, x, f, dynamic_axes={"input": {0: "batch_size"}, ...}).
nodes = [
    helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["/conv1/Conv_output_0"], name="/conv1/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
    helper.make_node("BatchNormalization", ["/conv1/Conv_output_0", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"], ["/bn1/BatchNormalization_output_0"], name="/bn1/BatchNormalization", epsilon=1e-5, momentum=0.9),
    helper.make_node("Relu", ["/bn1/BatchNormalization_output_0"], ["/relu/Relu_output_0"], name="/relu/Relu"),
    helper.make_node("MaxPool", ["/relu/Relu_output_0"], ["/pool/MaxPool_output_0"], name="/pool/MaxPool", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0]),
    helper.make_node("Conv", ["/pool/MaxPool_output_0", "conv2.weight", "conv2.bias"], ["/conv2/Conv_output_0"], name="/conv2/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
    helper.make_node("Relu", ["/conv2/Conv_output_0"], ["/relu_1/Relu_output_0"], name="/relu_1/Relu"),
    helper.make_node("GlobalAveragePool", ["/relu_1/Relu_output_0"], ["/gap/GlobalAveragePool_output_0"], name="/gap/GlobalAveragePool"),
    helper.make_node("Flatten", ["/gap/GlobalAveragePool_output_0"], ["/Flatten_output_0"], name="/Flatten", axis=1),
    helper.make_node("Gemm", ["/Flatten_output_0", "fc.weight", "fc.bias"], ["logits"], name="/fc/Gemm", alpha=1.0, beta=1.0, transB=1),
]
inits = [
    init("conv1.weight", w(8, 3, 3, 3)), init("conv1.bias", w(8)),
    init("bn1.weight", 1 + w(8, scale=0.1)), init("bn1.bias", w(8, scale=0.1)),
    init("bn1.running_mean", w(8, scale=0.1)), init("bn1.running_var", 0.5 + np.abs(w(8))),
    init("conv2.weight", w(8, 8, 3, 3)), init("conv2.bias", w(8)),
    init("fc.weight", w(4, 8)), init("fc.bias", w(4)),
]
g = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", 3, 32, 32])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 4])], inits)
m = helper.make_model(g, producer_name="pytorch", producer_version="2.5.0", opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 8
onnx.checker.check_model(m)
onnx.save(m, out_dir + "/torch_nchw.onnx")

# tf2onnx-style (tf2onnx.convert.from_keras): NHWC in, Transpose around the Conv.
nodes = [
    helper.make_node("Transpose", ["input_1"], ["model/conv2d/Conv2D__6:0"], name="model/conv2d/Conv2D__6", perm=[0, 3, 1, 2]),
    helper.make_node("Conv", ["model/conv2d/Conv2D__6:0", "model/conv2d/Conv2D/ReadVariableOp:0", "model/conv2d/BiasAdd/ReadVariableOp:0"], ["model/conv2d/BiasAdd:0"], name="model/conv2d/BiasAdd", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1),
    helper.make_node("Relu", ["model/conv2d/BiasAdd:0"], ["model/conv2d/Relu:0"], name="model/conv2d/Relu"),
    helper.make_node("Transpose", ["model/conv2d/Relu:0"], ["model/conv2d/Relu__8:0"], name="model/conv2d/Relu__8", perm=[0, 2, 3, 1]),
    helper.make_node("ReduceMean", ["model/conv2d/Relu__8:0"], ["model/global_average_pooling2d/Mean:0"], name="model/global_average_pooling2d/Mean", axes=[1, 2], keepdims=1),
    helper.make_node("Reshape", ["model/global_average_pooling2d/Mean:0", "const_fold_opt__12"], ["model/global_average_pooling2d/Mean_Squeeze__10:0"], name="model/global_average_pooling2d/Mean_Squeeze__10"),
    helper.make_node("MatMul", ["model/global_average_pooling2d/Mean_Squeeze__10:0", "model/dense/MatMul/ReadVariableOp:0"], ["model/dense/MatMul:0"], name="model/dense/MatMul"),
    helper.make_node("Add", ["model/dense/MatMul:0", "model/dense/BiasAdd/ReadVariableOp:0"], ["model/dense/BiasAdd:0"], name="model/dense/BiasAdd"),
    helper.make_node("Softmax", ["model/dense/BiasAdd:0"], ["dense"], name="model/dense/Softmax", axis=-1),
]
inits = [
    init("model/conv2d/Conv2D/ReadVariableOp:0", w(6, 3, 3, 3)), init("model/conv2d/BiasAdd/ReadVariableOp:0", w(6)),
    numpy_helper.from_array(np.array([-1, 6], dtype=np.int64), "const_fold_opt__12"),
    init("model/dense/MatMul/ReadVariableOp:0", w(6, 4, scale=1.0)), init("model/dense/BiasAdd/ReadVariableOp:0", w(4)),
]
g = helper.make_graph(nodes, "tf2onnx", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", 24, 24, 3])],
                      [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["N", 4])], inits)
m = helper.make_model(g, producer_name="tf2onnx", producer_version="1.16.1 15c810", opset_imports=[helper.make_opsetid("", 13)])
m.ir_version = 8
onnx.checker.check_model(m)
onnx.save(m, out_dir + "/keras_nhwc.onnx")

result = {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
for name, spec in inputs.items():
    sess = ort.InferenceSession(out_dir + "/" + name + ".onnx", providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    raw = np.asarray(spec["raw"], dtype=np.float32).reshape(spec["raw_shape"])
    raw_out = sess.run(None, {feed: raw})[0]
    # The image pipeline, independently: pixels (N, H, W, 3) in 0..255 -> /scale -> (x-mean)/std.
    px = np.asarray(spec["pixels"], dtype=np.float32).reshape(spec["pixel_shape"])
    x = (px / np.float32(spec["scale"]) - np.asarray(spec["mean"], dtype=np.float32)) / np.asarray(spec["std"], dtype=np.float32)
    if spec["layout"] == "nchw":
        x = x.transpose(0, 3, 1, 2)
    img_out = sess.run(None, {feed: np.ascontiguousarray(x, dtype=np.float32)})[0]
    result[name] = {"raw": raw_out.astype(float).ravel().tolist(), "images": img_out.astype(float).ravel().tolist()}
json.dump(result, open(out_dir + "/ort.json", "w"))
"#;

struct Case {
    name: &'static str,
    layout: &'static str,
    /// Input shape for one image, after the batch axis.
    shape: [usize; 3],
    size: usize,
    sidecar: &'static str,
    scale: f32,
    mean: [f32; 3],
    std: [f32; 3],
    logits: bool,
}

const CASES: [Case; 2] = [
    Case {
        name: "torch_nchw",
        layout: "nchw",
        shape: [3, 32, 32],
        size: 32,
        sidecar: "labels = [\"glioma\", \"meningioma\", \"notumor\", \"pituitary\"]\nmodality = \"mri\"\nlayout = \"nchw\"\nchannels = \"rgb\"\nscale = 255.0\nmean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\noutput = \"logits\"\nresize = \"bilinear\"\n",
        scale: 255.0,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        logits: true,
    },
    // Keras' `x / 127.5 - 1`, written as scale 127.5, mean 1, std 1; size and layout from the graph.
    Case {
        name: "keras_nhwc",
        layout: "nhwc",
        shape: [24, 24, 3],
        size: 24,
        sidecar: "labels = [\"COVID\", \"Lung_Opacity\", \"Normal\", \"Viral Pneumonia\"]\nscale = 127.5\nmean = [1.0]\nstd = [1.0]\noutput = \"probabilities\"\n",
        scale: 127.5,
        mean: [1.0, 1.0, 1.0],
        std: [1.0, 1.0, 1.0],
        logits: false,
    },
];

#[test]
fn tract_agrees_with_onnxruntime_on_pytorch_and_tf2onnx_style_graphs() {
    let python = match python() {
        Ok(p) => p,
        Err(why) => return skip(&why),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let mut inputs = serde_json::Map::new();
    let mut images: Vec<Vec<PathBuf>> = Vec::new();
    for c in &CASES {
        let per: usize = c.shape.iter().product();
        let raw: Vec<f32> = (0..BATCH * per).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let mut pixels: Vec<u8> = Vec::new();
        let mut files = Vec::new();
        for i in 0..BATCH {
            let img = image::RgbImage::from_fn(c.size as u32, c.size as u32, |_, _| image::Rgb([rng.random(), rng.random(), rng.random()]));
            pixels.extend_from_slice(img.as_raw());
            let f = dir.path().join(format!("{}-{i}.png", c.name));
            img.save(&f).unwrap();
            files.push(f);
        }
        images.push(files);
        let mut raw_shape = vec![BATCH];
        raw_shape.extend(c.shape);
        inputs.insert(
            c.name.into(),
            json!({
                "raw": raw, "raw_shape": raw_shape,
                "pixels": pixels, "pixel_shape": [BATCH, c.size, c.size, 3],
                "scale": c.scale, "mean": c.mean, "std": c.std, "layout": c.layout,
            }),
        );
    }
    let inputs_path = dir.path().join("inputs.json");
    std::fs::write(&inputs_path, serde_json::to_vec(&Value::Object(inputs.clone())).unwrap()).unwrap();
    let script = dir.path().join("ort.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = Command::new(&python).arg(&script).arg(dir.path()).arg(&inputs_path).output().unwrap();
    assert!(out.status.success(), "reference script failed: {}", String::from_utf8_lossy(&out.stderr));
    let ort: Value = serde_json::from_slice(&std::fs::read(dir.path().join("ort.json")).unwrap()).unwrap();
    eprintln!("onnxruntime {} (onnx {}) vs {} {}", ort["onnxruntime"], ort["onnx"], mica_onnx::RUNTIME, mica_onnx::RUNTIME_VERSION);
    let mut worst = 0.0f32;
    for (c, files) in CASES.iter().zip(&images) {
        let model_path = dir.path().join(format!("{}.onnx", c.name));
        std::fs::write(mica_onnx::sidecar_path(&model_path), c.sidecar).unwrap();
        // Raw tensors, one batch of 5 through the dynamic batch axis.
        let model = OnnxModel::load(&model_path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(model.pre.batch, mica_onnx::BatchDim::Dynamic, "{}", c.name);
        let raw: Vec<f32> = inputs[c.name]["raw"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let ours: Vec<f32> = model.run_raw(&raw, BATCH).unwrap().concat();
        let theirs: Vec<f32> = ort[c.name]["raw"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        worst = worst.max(compare(&format!("{} raw", c.name), &ours, &theirs));
        // Images through the whole pipeline; the classifier answers in its sidecar's label order
        // (mica names), the reference in output order.
        let mut clf = OnnxClassifier::load(&model_path).unwrap();
        clf.batch = 2;
        let samples: Vec<Sample> = files
            .iter()
            .enumerate()
            .map(|(i, f)| Sample { id: i.to_string(), source: ImageSource::file(f), label: usize::MAX, split: None, context: None })
            .collect();
        let labels = clf.model_labels().clone();
        let ours: Vec<f32> = clf
            .classify(&samples)
            .into_iter()
            .flat_map(|r| {
                let p = r.unwrap().probabilities.unwrap();
                labels.iter().map(|l| p[l] as f32).collect::<Vec<_>>()
            })
            .collect();
        let theirs: Vec<f32> = ort[c.name]["images"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let theirs: Vec<f32> = if c.logits { theirs.chunks(4).flat_map(softmax).collect() } else { theirs };
        worst = worst.max(compare(&format!("{} images", c.name), &ours, &theirs));
        let prov = &clf.model().provenance;
        assert_eq!(prov.producer_name, if c.logits { "pytorch" } else { "tf2onnx" });
        assert_eq!(prov.sha256.len(), 64);
    }
    eprintln!("largest difference from onnxruntime: {worst:e}");
}

fn softmax(z: &[f32]) -> Vec<f32> {
    let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

fn compare(what: &str, ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    let worst = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= TOL, "{what}: largest difference {worst} > {TOL}\nmica {ours:?}\nonnxruntime {theirs:?}");
    // The outputs carry information: not all equal (a graph that ignored its input would pass).
    assert!(theirs.iter().any(|v| (v - theirs[0]).abs() > 1e-3), "{what}: degenerate reference output");
    worst
}

fn skip(why: &str) {
    if std::env::var("MICA_REQUIRE_ONNXRUNTIME").is_ok_and(|v| v == "1") {
        panic!("ONNX Runtime cross-check required (MICA_REQUIRE_ONNXRUNTIME=1) but unavailable: {why}");
    }
    eprintln!("SKIPPED ONNX Runtime cross-check: {why}");
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        ))
    }
}

/// The venv's python, creating the venv on first use; a marker file lists the packages of a
/// finished install, so an interrupted install is redone rather than trusted.
fn python() -> Result<PathBuf, String> {
    let dir = std::env::var_os("MICA_ONNXRUNTIME_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("onnxruntime-venv"));
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
