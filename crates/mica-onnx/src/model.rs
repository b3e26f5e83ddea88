//! Loading an ONNX graph with tract: what it is (provenance), what it takes (the input shape,
//! resolved with the sidecar), and running it on raw tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prost::Message;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::sidecar::{Channels, OutputKind, Resize, Sidecar, TensorLayout};
use crate::{OnnxError, RUNTIME, RUNTIME_VERSION};

/// One dimension as the graph declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum GraphDim {
    Fixed(i64),
    /// A named dimension (`N`, `batch_size`, `unk__0`): any size.
    Param(String),
    /// No value at all: any size.
    Unknown(Option<()>),
}

impl GraphDim {
    fn fixed(&self) -> Option<i64> {
        match self {
            GraphDim::Fixed(v) if *v > 0 => Some(*v),
            _ => None,
        }
    }
}

impl std::fmt::Display for GraphDim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GraphDim::Fixed(v) => write!(f, "{v}"),
            GraphDim::Param(p) => f.write_str(p),
            GraphDim::Unknown(_) => f.write_str("?"),
        }
    }
}

fn show(dims: &[GraphDim]) -> String {
    format!("[{}]", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

/// A named graph input or output with its declared shape.
#[derive(Debug, Clone, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<GraphDim>,
}

/// What the model file is, for the audit trail: recorded in `metrics.json` and the manifest.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    pub producer_name: String,
    pub producer_version: String,
    /// `domain:version` per imported operator set (`ai.onnx` for the default domain).
    pub opsets: Vec<String>,
    pub ir_version: i64,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// The runtime that executed the graph, e.g. `tract-onnx 0.23.9`.
    pub runtime: String,
}

/// Whether the graph takes any batch size or exactly one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchDim {
    Dynamic,
    One,
}

/// How images become the model's input: the sidecar with the graph's own facts filled in.
#[derive(Debug, Clone, Serialize)]
pub struct Preprocess {
    pub layout: TensorLayout,
    pub height: usize,
    pub width: usize,
    /// Channels the graph takes (1 or 3).
    pub graph_channels: usize,
    pub channels: Channels,
    pub scale: f32,
    /// One value per graph channel.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub output: OutputKind,
    pub resize: Resize,
    pub batch: BatchDim,
    /// Keys the sidecar left out and how they were filled in (from the graph, or a default).
    pub filled_in: Vec<&'static str>,
}

/// An ONNX image classifier graph, ready to run on `[N, ...]` tensors.
pub struct OnnxModel {
    path: PathBuf,
    model: InferenceModel,
    pub provenance: Provenance,
    pub pre: Preprocess,
    /// Width of one image's output (the number of classes).
    pub classes: usize,
    /// Optimised plans by batch size: tract plans are for concrete shapes, and a run needs at
    /// most two (full batches and the last one).
    plans: Mutex<HashMap<usize, Arc<TypedRunnableModel>>>,
}

fn dims_of(v: &pb::ValueInfoProto) -> Vec<GraphDim> {
    let Some(pb::type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Vec::new();
    };
    t.shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => GraphDim::Fixed(*v),
                    Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => GraphDim::Param(p.clone()),
                    _ => GraphDim::Unknown(None),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A tract error chain on one line (`a: b: c`), the form every mica error takes.
pub(crate) fn one_line(e: &anyhow_like::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// tract's error type is `anyhow::Error`, re-exported through its prelude.
mod anyhow_like {
    pub use tract_onnx::prelude::TractError as Error;
}

impl OnnxModel {
    /// Reads `path` and its sidecar, checks every operator is one tract implements, resolves
    /// the input shape and builds the first plan, so that a model mica cannot run fails here
    /// with one line naming why, not on the first image.
    pub fn load(path: &Path) -> Result<OnnxModel, OnnxError> {
        let sidecar = Sidecar::read_for(path)?;
        OnnxModel::load_with(path, &sidecar, &crate::sidecar::sidecar_path(path))
    }

    /// [`OnnxModel::load`] with a sidecar already read (`sidecar_path` names it in errors).
    pub fn load_with(path: &Path, sidecar: &Sidecar, sidecar_path: &Path) -> Result<OnnxModel, OnnxError> {
        let model_err = |message: String| OnnxError::Model { path: path.to_path_buf(), message };
        let bytes = std::fs::read(path).map_err(|e| model_err(e.to_string()))?;
        let proto = pb::ModelProto::decode(bytes.as_slice()).map_err(|e| model_err(format!("not an ONNX model: {e}")))?;
        let graph = proto.graph.as_ref().ok_or_else(|| model_err("not an ONNX model: no graph".into()))?;
        let onnx = tract_onnx::onnx();
        // Named before tract parses: its own message for an unknown operator appears only much
        // later, deep in a type-inference error.
        let mut unsupported: Vec<String> = Vec::new();
        for n in &graph.node {
            if !onnx.op_register.0.contains_key(&n.op_type) && !unsupported.contains(&n.op_type) {
                unsupported.push(n.op_type.clone());
            }
        }
        if !unsupported.is_empty() {
            return Err(model_err(format!(
                "unsupported operator{} {} ({RUNTIME} {RUNTIME_VERSION} does not implement {}; re-export with standard operators or a lower opset)",
                if unsupported.len() > 1 { "s" } else { "" },
                unsupported.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", "),
                if unsupported.len() > 1 { "them" } else { "it" },
            )));
        }
        let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<TensorInfo> = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(|i| TensorInfo { name: i.name.clone(), shape: dims_of(i) })
            .collect();
        let outputs: Vec<TensorInfo> =
            graph.output.iter().map(|o| TensorInfo { name: o.name.clone(), shape: dims_of(o) }).collect();
        let provenance = Provenance {
            path: path.display().to_string(),
            sha256: format!("{:x}", Sha256::digest(&bytes)),
            bytes: bytes.len() as u64,
            producer_name: proto.producer_name.clone(),
            producer_version: proto.producer_version.clone(),
            opsets: proto
                .opset_import
                .iter()
                .map(|o| format!("{}:{}", if o.domain.is_empty() { "ai.onnx" } else { &o.domain }, o.version))
                .collect(),
            ir_version: proto.ir_version,
            inputs: inputs.clone(),
            outputs: outputs.clone(),
            runtime: format!("{RUNTIME} {RUNTIME_VERSION}"),
        };
        let [input] = inputs.as_slice() else {
            return Err(model_err(format!(
                "the graph has {} inputs ({}); an image classifier takes one image tensor",
                inputs.len(),
                inputs.iter().map(|i| format!("`{}`", i.name)).collect::<Vec<_>>().join(", ")
            )));
        };
        let Some(output) = outputs.first() else {
            return Err(model_err("the graph has no output".into()));
        };
        let labels = sidecar.labels.len();
        let pre = resolve(sidecar, input, sidecar_path, path)?;
        // The output must be one score per class (after the batch axis; trailing 1s allowed,
        // as in `[N, K, 1, 1]`).
        let out_fixed: Vec<i64> = output.shape.iter().skip(1).filter_map(|d| d.fixed()).collect();
        if output.shape.len() > 1 && out_fixed.len() == output.shape.len() - 1 {
            let width: i64 = out_fixed.iter().product();
            if width != labels as i64 {
                return Err(model_err(format!(
                    "output `{}` is {} ({width} values per image) but the sidecar lists {labels} labels",
                    output.name,
                    show(&output.shape)
                )));
            }
        }
        let model = onnx
            .model_for_proto_model(&proto)
            .map_err(|e| model_err(one_line(&e)))?;
        let m = OnnxModel {
            path: path.to_path_buf(),
            model,
            provenance,
            pre,
            classes: labels,
            plans: Mutex::new(HashMap::new()),
        };
        // Build the batch-1 plan now: shape inference errors (a Reshape tract cannot resolve)
        // surface at load time.
        m.plan(1)?;
        Ok(m)
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The input shape for `n` images, in the graph's layout.
    pub fn input_shape(&self, n: usize) -> [usize; 4] {
        let p = &self.pre;
        match p.layout {
            TensorLayout::Nchw => [n, p.graph_channels, p.height, p.width],
            TensorLayout::Nhwc => [n, p.height, p.width, p.graph_channels],
        }
    }

    /// The largest batch one run may take: 1 for a graph with a fixed batch of one.
    pub fn max_batch(&self, wanted: usize) -> usize {
        match self.pre.batch {
            BatchDim::One => 1,
            BatchDim::Dynamic => wanted.max(1),
        }
    }

    fn plan(&self, n: usize) -> Result<Arc<TypedRunnableModel>, OnnxError> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = plans.get(&n) {
            return Ok(p.clone());
        }
        let shape = self.input_shape(n);
        let plan = self
            .model
            .clone()
            .with_input_fact(0, f32::fact(shape).into())
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| OnnxError::Model {
                path: self.path.clone(),
                message: format!("cannot run the graph on input {shape:?}: {}", one_line(&e)),
            })?;
        plans.insert(n, plan.clone());
        Ok(plan)
    }

    /// Runs `n` images already laid out as the graph wants (`input_shape(n)`, f32) and returns
    /// each image's class probabilities: softmax applied to logits, probabilities checked.
    pub fn run(&self, data: &[f32], n: usize) -> Result<Vec<Vec<f32>>, OnnxError> {
        let raw = self.run_raw(data, n)?;
        raw.into_iter().map(|row| self.to_probabilities(row)).collect()
    }

    /// The graph's first output per image, as it came out.
    pub fn run_raw(&self, data: &[f32], n: usize) -> Result<Vec<Vec<f32>>, OnnxError> {
        let run_err = |message: String| OnnxError::Run { path: self.path.clone(), message };
        if n == 0 {
            return Ok(Vec::new());
        }
        if n > self.max_batch(n) {
            return Err(run_err(format!("the graph takes one image at a time, not {n}")));
        }
        let shape = self.input_shape(n);
        let tensor = Tensor::from_shape(&shape, data).map_err(|e| run_err(one_line(&e)))?;
        let plan = self.plan(n)?;
        let out = plan.run(tvec!(tensor.into_tvalue())).map_err(|e| run_err(one_line(&e)))?;
        let first = out.first().ok_or_else(|| run_err("the graph produced no output".into()))?;
        let first = first.cast_to::<f32>().map_err(|e| run_err(one_line(&e)))?;
        let view = first.to_plain_array_view::<f32>().map_err(|e| run_err(one_line(&e)))?;
        let values: Vec<f32> = view.iter().copied().collect();
        if values.len() != n * self.classes {
            return Err(run_err(format!(
                "output has {} values for {n} image(s), expected {} per image (one per label)",
                values.len(),
                self.classes
            )));
        }
        Ok(values.chunks(self.classes).map(|c| c.to_vec()).collect())
    }

    /// Softmax for logits; for probabilities a check that they are one.
    pub fn to_probabilities(&self, row: Vec<f32>) -> Result<Vec<f32>, OnnxError> {
        let run_err = |message: String| OnnxError::Run { path: self.path.clone(), message };
        if let Some(i) = row.iter().position(|v| !v.is_finite()) {
            return Err(run_err(format!("output {i} is {} (not a finite number)", row[i])));
        }
        match self.pre.output {
            OutputKind::Logits => Ok(softmax(&row)),
            OutputKind::Probabilities => {
                let sum: f32 = row.iter().sum();
                if row.iter().any(|&v| !(-1e-4..=1.0 + 1e-4).contains(&v)) || (sum - 1.0).abs() > 1e-3 {
                    return Err(run_err(format!(
                        "output is not a probability distribution (sum {sum:.4}, values {row:?}); if the graph has no Softmax at the end, write output = \"logits\" in the sidecar"
                    )));
                }
                Ok(row.iter().map(|v| v.clamp(0.0, 1.0) / sum).collect())
            }
        }
    }
}

pub use mica_core::softmax;

/// Fills the sidecar's gaps from the input's declared shape, and refuses contradictions.
pub fn resolve(s: &Sidecar, input: &TensorInfo, sidecar_path: &Path, model_path: &Path) -> Result<Preprocess, OnnxError> {
    let d = &input.shape;
    let shape = show(d);
    let name = &input.name;
    let side = |m: String| OnnxError::sidecar(sidecar_path, m);
    let graph = |m: String| OnnxError::Model { path: model_path.to_path_buf(), message: m };
    if d.len() != 4 {
        return Err(graph(format!(
            "input `{name}` is {shape}; mica feeds images as a 4-dimensional [batch, channels, height, width] or [batch, height, width, channels] tensor"
        )));
    }
    let mut filled_in = Vec::new();
    let batch = match d[0].fixed() {
        None => BatchDim::Dynamic,
        Some(1) => BatchDim::One,
        Some(k) => {
            return Err(graph(format!(
                "input `{name}` is {shape}: a fixed batch of {k}; mica runs a dynamic batch axis or a batch of 1 (re-export with a dynamic batch axis)"
            )))
        }
    };
    let is_ch = |g: &GraphDim| matches!(g.fixed(), Some(1 | 3));
    let graph_layout = match (is_ch(&d[1]), is_ch(&d[3])) {
        (true, false) => Some(TensorLayout::Nchw),
        (false, true) => Some(TensorLayout::Nhwc),
        _ => None,
    };
    let layout = match (s.layout, graph_layout) {
        (Some(l), Some(g)) if l != g => {
            return Err(side(format!(
                "layout = \"{}\" contradicts the graph: input `{name}` is {shape}, channels {}",
                l.as_str(),
                if g == TensorLayout::Nchw { "first (nchw)" } else { "last (nhwc)" }
            )))
        }
        (Some(l), _) => l,
        (None, Some(g)) => {
            filled_in.push("layout");
            g
        }
        (None, None) => {
            return Err(side(format!(
                "missing key `layout` (input `{name}` is {shape}, which does not say where the channels are; write layout = \"nchw\" or \"nhwc\")"
            )))
        }
    };
    let (c, h, w) = match layout {
        TensorLayout::Nchw => (&d[1], &d[2], &d[3]),
        TensorLayout::Nhwc => (&d[3], &d[1], &d[2]),
    };
    let graph_channels = match (c.fixed(), s.channels) {
        (Some(k @ (1 | 3)), _) => k as usize,
        (Some(k), _) => {
            return Err(graph(format!("input `{name}` is {shape}: {k} channels; mica feeds 1 (gray) or 3 (RGB)")))
        }
        (None, Some(Channels::Gray)) => 1,
        (None, Some(Channels::Rgb)) => 3,
        (None, None) => {
            return Err(side(format!(
                "missing key `channels` (input `{name}` is {shape} with no fixed channel count; write channels = \"rgb\" or \"gray\")"
            )))
        }
    };
    let channels = match s.channels {
        Some(Channels::Rgb) if graph_channels == 1 => {
            return Err(side(format!("channels = \"rgb\" but input `{name}` ({shape}) takes one channel; write channels = \"gray\"")))
        }
        Some(ch) => ch,
        None => {
            filled_in.push("channels");
            // A 3-channel graph gets the file's colours (identical to gray replicated for the
            // grayscale images of the study tasks); a 1-channel graph gets gray.
            if graph_channels == 3 {
                Channels::Rgb
            } else {
                Channels::Gray
            }
        }
    };
    let (height, width) = match (h.fixed(), w.fixed(), s.size) {
        (Some(gh), Some(gw), Some([sh, sw])) if (gh, gw) != (sh as i64, sw as i64) => {
            return Err(side(format!("size = [{sh}, {sw}] contradicts the graph: input `{name}` is {shape}")))
        }
        (_, _, Some([sh, sw])) if sh > 0 && sw > 0 => (sh as usize, sw as usize),
        (_, _, Some(_)) => return Err(side("size: height and width must be at least 1".into())),
        (Some(gh), Some(gw), None) => {
            filled_in.push("size");
            (gh as usize, gw as usize)
        }
        _ => {
            return Err(side(format!(
                "missing key `size` (input `{name}` is {shape}, whose height and width are not fixed; write size = [height, width])"
            )))
        }
    };
    let missing = |key: &str, example: &str| {
        side(format!("missing key `{key}` (the graph does not say how it was trained to see pixels; e.g. {example})"))
    };
    let scale = s.scale.ok_or_else(|| missing("scale", "scale = 255.0 for inputs in [0, 1], 1.0 for raw 0-255"))?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(side(format!("scale = {scale}: must be a positive number")));
    }
    let per_channel = |key: &str, v: &Option<Vec<f32>>, example: &str| -> Result<Vec<f32>, OnnxError> {
        let v = v.as_ref().ok_or_else(|| missing(key, example))?;
        let v = match v.len() {
            1 => vec![v[0]; graph_channels],
            n if n == graph_channels => v.clone(),
            n => {
                return Err(side(format!(
                    "{key}: {n} values for a {graph_channels}-channel input (give 1 or {graph_channels})"
                )))
            }
        };
        if v.iter().any(|x| !x.is_finite()) {
            return Err(side(format!("{key}: values must be finite numbers")));
        }
        Ok(v)
    };
    let mean = per_channel("mean", &s.mean, "mean = [0.485, 0.456, 0.406] (ImageNet) or [0.0]")?;
    let std = per_channel("std", &s.std, "std = [0.229, 0.224, 0.225] (ImageNet) or [1.0]")?;
    if std.iter().any(|&x| x <= 0.0) {
        return Err(side("std: values must be positive".into()));
    }
    let output = s.output.ok_or_else(|| {
        side("missing key `output` (write output = \"probabilities\" if the graph ends in Softmax, \"logits\" if not)".into())
    })?;
    let resize = match s.resize {
        Some(r) => r,
        None => {
            filled_in.push("resize (default bilinear)");
            Resize::Bilinear
        }
    };
    Ok(Preprocess {
        layout,
        height,
        width,
        graph_channels,
        channels,
        scale,
        mean,
        std,
        output,
        resize,
        batch,
        filled_in,
    })
}
