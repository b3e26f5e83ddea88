//! Transfer learning: ResNet-18 weights from a PyTorch/torchvision file.
//!
//! Accepts `.safetensors` and `.pth`/`.pt` (PyTorch's zip or legacy pickle format) with
//! torchvision's key names (`conv1.weight`, `bn1.running_mean`, `layer1.0.conv1.weight`, ...,
//! `fc.weight`). For a grayscale model the RGB first convolution is averaged over its input
//! channels. The classifier layer is taken only when its class count matches the dataset;
//! otherwise it stays freshly initialised (the usual fine-tuning setup).

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Param, RunningState};
use burn::nn::conv::Conv2d;
use burn::nn::BatchNorm;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::model::{Backbone, BasicBlock, Net};
use crate::CnnError;

/// A tensor read from a weights file: shape and row-major values.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Reads every floating-point tensor of a `.safetensors` or `.pth` file.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, RawTensor>, CnnError> {
    let err = |m: String| CnnError::Weights { path: path.to_path_buf(), message: m };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" => {
            let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| err(format!("not a safetensors file: {e}")))?;
            let mut out = HashMap::new();
            for (name, view) in st.tensors() {
                use safetensors::Dtype;
                let d = view.data();
                let values: Vec<f32> = match view.dtype() {
                    Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                    Dtype::F64 => d
                        .chunks_exact(8)
                        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                        .collect(),
                    Dtype::F16 => d
                        .chunks_exact(2)
                        .map(|b| half_to_f32(u16::from_le_bytes([b[0], b[1]])))
                        .collect(),
                    Dtype::BF16 => d
                        .chunks_exact(2)
                        .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                        .collect(),
                    _ => continue, // integer buffers such as num_batches_tracked
                };
                out.insert(name, RawTensor { shape: view.shape().to_vec(), values });
            }
            Ok(out)
        }
        "pth" | "pt" | "bin" => {
            let reader = std::panic::catch_unwind(|| burn_store::pytorch::PytorchReader::new(path))
                .map_err(|_| err("not a readable PyTorch file".into()))?
                .map_err(|e| err(format!("not a readable PyTorch file: {e}")))?;
            let mut out = HashMap::new();
            for (name, snap) in reader.into_tensors() {
                let data = snap.to_data().map_err(|e| err(format!("{name}: {e:?}")))?;
                if !data.dtype.is_float() {
                    continue;
                }
                let shape = data.shape.to_vec();
                let values: Vec<f32> = data
                    .convert::<f32>()
                    .to_vec()
                    .map_err(|e| err(format!("{name}: {e:?}")))?;
                out.insert(name, RawTensor { shape, values });
            }
            Ok(out)
        }
        _ => Err(err("expected a .safetensors, .pth or .pt file".into())),
    }
}

fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if frac == 0 => sign,
        0 => {
            // Subnormal half: renormalise.
            let mut e = 127 - 15 + 1;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        0x1f => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

struct Loader<'a, B: Backend> {
    tensors: &'a HashMap<String, RawTensor>,
    device: &'a B::Device,
    path: &'a Path,
    loaded: usize,
}

impl<B: Backend> Loader<'_, B> {
    fn get<const D: usize>(&mut self, key: &str, want: [usize; D]) -> Result<Tensor<B, D>, CnnError> {
        let t = self.tensors.get(key).ok_or_else(|| CnnError::Weights {
            path: self.path.to_path_buf(),
            message: format!("missing tensor `{key}` (expected torchvision ResNet-18 key names)"),
        })?;
        if t.shape != want {
            return Err(CnnError::Weights {
                path: self.path.to_path_buf(),
                message: format!("`{key}` has shape {:?}, the model needs {:?}", t.shape, want),
            });
        }
        self.loaded += 1;
        Ok(Tensor::from_data(TensorData::new(t.values.clone(), want), self.device))
    }

    fn conv(&mut self, c: &mut Conv2d<B>, key: &str) -> Result<(), CnnError> {
        let dims = c.weight.dims();
        c.weight = Param::from_tensor(self.get::<4>(&format!("{key}.weight"), dims)?);
        Ok(())
    }

    fn bn(&mut self, b: &mut BatchNorm<B>, key: &str) -> Result<(), CnnError> {
        let n = b.gamma.dims();
        b.gamma = Param::from_tensor(self.get::<1>(&format!("{key}.weight"), n)?);
        b.beta = Param::from_tensor(self.get::<1>(&format!("{key}.bias"), n)?);
        b.running_mean = RunningState::new(self.get::<1>(&format!("{key}.running_mean"), n)?);
        b.running_var = RunningState::new(self.get::<1>(&format!("{key}.running_var"), n)?);
        Ok(())
    }

    fn block(&mut self, b: &mut BasicBlock<B>, key: &str) -> Result<(), CnnError> {
        self.conv(&mut b.conv1, &format!("{key}.conv1"))?;
        self.bn(&mut b.bn1, &format!("{key}.bn1"))?;
        self.conv(&mut b.conv2, &format!("{key}.conv2"))?;
        self.bn(&mut b.bn2, &format!("{key}.bn2"))?;
        if let Some(ds) = &mut b.downsample {
            self.conv(&mut ds.conv, &format!("{key}.downsample.0"))?;
            self.bn(&mut ds.bn, &format!("{key}.downsample.1"))?;
        }
        Ok(())
    }
}

/// Loads torchvision ResNet-18 weights into `model` (which must be a ResNet-18); returns a
/// one-line account of what was taken.
pub fn load_resnet18<B: Backend>(model: &mut Net<B>, path: &Path, device: &B::Device) -> Result<String, CnnError> {
    let mut tensors = read_tensors(path)?;
    // Checkpoints saved from a wrapped model carry a `module.` or `model.` prefix.
    for prefix in ["module.", "model."] {
        if !tensors.contains_key("conv1.weight") && tensors.keys().any(|k| k.starts_with(prefix)) {
            tensors = tensors
                .into_iter()
                .map(|(k, v)| (k.strip_prefix(prefix).map(str::to_string).unwrap_or(k), v))
                .collect();
        }
    }
    let Backbone::Resnet18(net) = &mut model.backbone else {
        return Err(CnnError::Config("pretrained weights need --model resnet18".into()));
    };
    let mut notes = Vec::new();
    // First conv: average RGB filters for a grayscale model.
    let in_ch = net.conv1.weight.dims()[1];
    if let Some(t) = tensors.get_mut("conv1.weight") {
        if t.shape.len() == 4 && t.shape[1] == 3 && in_ch == 1 {
            let [o, _, kh, kw] = [t.shape[0], 3, t.shape[2], t.shape[3]];
            let plane = kh * kw;
            let mut avg = vec![0.0f32; o * plane];
            for oc in 0..o {
                for c in 0..3 {
                    for p in 0..plane {
                        avg[oc * plane + p] += t.values[(oc * 3 + c) * plane + p] / 3.0;
                    }
                }
            }
            *t = RawTensor { shape: vec![o, 1, kh, kw], values: avg };
            notes.push("conv1 averaged from RGB to 1 channel".to_string());
        }
    }
    let mut l = Loader::<B> { tensors: &tensors, device, path, loaded: 0 };
    l.conv(&mut net.conv1, "conv1")?;
    l.bn(&mut net.bn1, "bn1")?;
    for (li, layer) in [&mut net.layer1, &mut net.layer2, &mut net.layer3, &mut net.layer4]
        .into_iter()
        .enumerate()
    {
        for (bi, block) in layer.iter_mut().enumerate() {
            l.block(block, &format!("layer{}.{bi}", li + 1))?;
        }
    }
    let [d_in, classes] = model.fc.weight.dims();
    match tensors.get("fc.weight") {
        Some(w) if w.shape == [classes, d_in] => {
            // torchvision stores [out, in]; burn's Linear stores [in, out].
            let t: Tensor<B, 2> =
                Tensor::from_data(TensorData::new(w.values.clone(), [classes, d_in]), device);
            model.fc.weight = Param::from_tensor(t.transpose());
            if let (Some(b), Some(bias)) = (tensors.get("fc.bias"), &mut model.fc.bias) {
                if b.shape == [classes] {
                    *bias = Param::from_tensor(Tensor::from_data(TensorData::new(b.values.clone(), [classes]), device));
                }
            }
            l.loaded += 2;
            notes.push("classifier taken from the file".into());
        }
        Some(w) => notes.push(format!(
            "classifier kept fresh (file has {} classes, the dataset {classes})",
            w.shape.first().copied().unwrap_or(0)
        )),
        None => notes.push("classifier kept fresh (none in the file)".into()),
    }
    Ok(format!(
        "loaded {} ResNet-18 tensors from {}; {}",
        l.loaded,
        path.display(),
        notes.join("; ")
    ))
}
