//! Small ONNX graphs written from Rust with the protobuf types tract-onnx exposes, for this
//! crate's tests and other crates' (feature `testing`). The graphs follow the shapes real
//! exporters emit: PyTorch's `torch.onnx.export` (NCHW, Gemm head) and tf2onnx (NHWC input,
//! Transpose to NCHW, MatMul + Add head, Softmax).

use std::path::Path;

use prost::Message;
use tract_onnx::pb;

/// One declared dimension: a number, or a name for "any size" (`N`, `batch_size`).
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(i64),
    Param(&'static str),
}

pub fn value_info(name: &str, dims: &[Dim]) -> pb::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| pb::tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(v) => pb::tensor_shape_proto::dimension::Value::DimValue(*v),
                Dim::Param(p) => pb::tensor_shape_proto::dimension::Value::DimParam(p.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A float initializer.
pub fn tensor(name: &str, dims: &[i64], data: Vec<f32>) -> pb::TensorProto {
    assert_eq!(dims.iter().product::<i64>() as usize, data.len(), "{name}: dims and data disagree");
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: data,
        ..Default::default()
    }
}

/// An int64 initializer (Reshape's shape).
pub fn tensor_i64(name: &str, data: Vec<i64>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: vec![data.len() as i64],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        int64_data: data,
        ..Default::default()
    }
}

pub fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: pb::attribute_proto::AttributeType::Int as i32, i: v, ..Default::default() }
}

pub fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: pb::attribute_proto::AttributeType::Float as i32, f: v, ..Default::default() }
}

pub fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<pb::AttributeProto>) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: format!("{op}_{}", outputs.first().copied().unwrap_or("")),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// A model around `graph` (opset 17, IR 8), produced by `producer`.
pub fn model(graph: pb::GraphProto, producer: &str, producer_version: &str) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        producer_name: producer.into(),
        producer_version: producer_version.into(),
        graph: Some(graph),
        ..Default::default()
    }
}

pub fn write(path: &Path, m: &pb::ModelProto) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).expect("model directory");
    }
    std::fs::write(path, m.encode_to_vec()).expect("write model");
}

/// A linear classifier over the per-channel mean of the input, as both exporters would write
/// it: `logits = mean_c(x) . weights + bias` (`weights` is `[channels x classes]`, row-major).
/// NCHW: GlobalAveragePool, Flatten, Gemm (PyTorch). NHWC: Transpose to NCHW,
/// GlobalAveragePool, Reshape, MatMul + Add (tf2onnx). `softmax` appends a Softmax (the output
/// is then probabilities). Its answers can be computed by hand, which is what tests assert.
pub fn mean_linear(
    nhwc: bool,
    input_dims: &[Dim],
    classes: usize,
    weights: &[f32],
    bias: &[f32],
    softmax: bool,
) -> pb::ModelProto {
    let channels = (weights.len() / classes) as i64;
    assert_eq!(bias.len(), classes);
    let mut nodes = Vec::new();
    let mut init = vec![tensor("bias", &[classes as i64], bias.to_vec())];
    let x = if nhwc {
        nodes.push(node("Transpose", &["input"], &["nchw"], vec![attr_ints("perm", &[0, 3, 1, 2])]));
        "nchw"
    } else {
        "input"
    };
    nodes.push(node("GlobalAveragePool", &[x], &["pooled"], vec![]));
    let last = if softmax { "logits" } else { "output" };
    if nhwc {
        init.push(tensor_i64("flat_shape", vec![-1, channels]));
        init.push(tensor("weights", &[channels, classes as i64], weights.to_vec()));
        nodes.push(node("Reshape", &["pooled", "flat_shape"], &["flat"], vec![]));
        nodes.push(node("MatMul", &["flat", "weights"], &["mm"], vec![]));
        nodes.push(node("Add", &["mm", "bias"], &[last], vec![]));
    } else {
        // Gemm with transB = 1, as torch.nn.Linear exports: weights stored [classes x channels].
        let mut wt = vec![0.0; weights.len()];
        for c in 0..channels as usize {
            for k in 0..classes {
                wt[k * channels as usize + c] = weights[c * classes + k];
            }
        }
        init.push(tensor("weights", &[classes as i64, channels], wt));
        nodes.push(node("Flatten", &["pooled"], &["flat"], vec![attr_int("axis", 1)]));
        nodes.push(node(
            "Gemm",
            &["flat", "weights", "bias"],
            &[last],
            vec![attr_float("alpha", 1.0), attr_float("beta", 1.0), attr_int("transB", 1)],
        ));
    }
    if softmax {
        nodes.push(node("Softmax", &["logits"], &["output"], vec![attr_int("axis", -1)]));
    }
    let batch = input_dims[0].clone();
    let graph = pb::GraphProto {
        name: "mean_linear".into(),
        node: nodes,
        initializer: init,
        input: vec![value_info("input", input_dims)],
        output: vec![value_info("output", &[batch, Dim::Fixed(classes as i64)])],
        ..Default::default()
    };
    if nhwc {
        model(graph, "tf2onnx", "1.16.1")
    } else {
        model(graph, "pytorch", "2.5.0")
    }
}

/// Writes `toml` as the sidecar of `model_path`.
pub fn write_sidecar(model_path: &Path, toml: &str) {
    std::fs::write(crate::sidecar_path(model_path), toml).expect("write sidecar");
}
