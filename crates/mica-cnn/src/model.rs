//! The four architectures: a small baseline CNN, ResNet-8, ResNet-18 and a MobileNetV2-style net.
//!
//! All four end in the same head (global pooling, dropout, one linear layer; see [`Net::head`]), and all
//! expose the last convolutional feature map separately ([`Net::features`] / [`Net::head`]), so
//! training, inference and Grad-CAM treat them alike. Input channels are a parameter: 1 for the
//! grayscale medical images (native, no channel replication), 3 for RGB datasets.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Which network to build. Stored in checkpoints by its `as_str` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Small,
    Resnet8,
    Resnet18,
    Mobilenet,
}

impl Arch {
    pub const ALL: [Arch; 4] = [Arch::Small, Arch::Resnet8, Arch::Resnet18, Arch::Mobilenet];

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Small => "small",
            Arch::Resnet8 => "resnet8",
            Arch::Resnet18 => "resnet18",
            Arch::Mobilenet => "mobilenet",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "small" | "smallcnn" => Ok(Arch::Small),
            "resnet8" => Ok(Arch::Resnet8),
            "resnet18" => Ok(Arch::Resnet18),
            "mobilenet" | "mobilenetv2" => Ok(Arch::Mobilenet),
            _ => Err(format!(
                "unknown model `{s}` (expected small, resnet8, resnet18 or mobilenet)"
            )),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn conv<B: Backend>(
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    groups: usize,
    device: &B::Device,
) -> Conv2d<B> {
    // No bias: every conv is followed by batch norm, whose shift makes a bias redundant
    // (and torchvision's ResNet has none, which keeps weight import one-to-one).
    Conv2dConfig::new([c_in, c_out], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
        .with_groups(groups)
        .with_bias(false)
        .init(device)
}

fn bn<B: Backend>(c: usize, device: &B::Device) -> BatchNorm<B> {
    BatchNormConfig::new(c).init(device)
}

/// Conv, batch norm, ReLU.
#[derive(Module, Debug)]
pub struct ConvBn<B: Backend> {
    pub conv: Conv2d<B>,
    pub bn: BatchNorm<B>,
}

impl<B: Backend> ConvBn<B> {
    fn new(c_in: usize, c_out: usize, k: usize, stride: usize, groups: usize, d: &B::Device) -> Self {
        ConvBn {
            conv: conv(c_in, c_out, k, stride, groups, d),
            bn: bn(c_out, d),
        }
    }

    fn forward_linear(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        crate::norm::batch_norm(&self.bn, self.conv.forward(x))
    }

    fn forward_relu(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        relu(self.forward_linear(x))
    }

    fn forward_relu6(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_linear(x).clamp(0.0, 6.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Small baseline CNN

/// Four conv blocks (16-32-64-128 channels, one 3x3 conv + BN + ReLU + 2x2 max-pool each).
///
/// Deliberately small: on two CPU cores a 64 px batch of 32 trains in well under a second, and
/// the synthetic phantoms need no more capacity than this.
#[derive(Module, Debug)]
pub struct SmallCnn<B: Backend> {
    pub blocks: Vec<ConvBn<B>>,
    pub pool: MaxPool2d,
}

impl<B: Backend> SmallCnn<B> {
    pub const WIDTHS: [usize; 4] = [16, 32, 64, 128];

    fn new(in_channels: usize, d: &B::Device) -> Self {
        let mut blocks = Vec::new();
        let mut c = in_channels;
        for w in Self::WIDTHS {
            blocks.push(ConvBn::new(c, w, 3, 1, 1, d));
            c = w;
        }
        SmallCnn {
            blocks,
            pool: MaxPool2dConfig::new([2, 2]).init(),
        }
    }

    fn features(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        let n = self.blocks.len();
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward_relu(x);
            // The last block keeps its resolution so Grad-CAM maps are not too coarse.
            if i + 1 < n {
                x = self.pool.forward(x);
            }
        }
        x
    }
}

// ---------------------------------------------------------------------------------------------
// ResNet-18 (torchvision layout, so torchvision weights map one-to-one)

#[derive(Module, Debug)]
pub struct BasicBlock<B: Backend> {
    pub conv1: Conv2d<B>,
    pub bn1: BatchNorm<B>,
    pub conv2: Conv2d<B>,
    pub bn2: BatchNorm<B>,
    pub downsample: Option<ConvBn<B>>,
}

impl<B: Backend> BasicBlock<B> {
    fn new(c_in: usize, c_out: usize, stride: usize, d: &B::Device) -> Self {
        let downsample = (stride != 1 || c_in != c_out).then(|| ConvBn {
            conv: Conv2dConfig::new([c_in, c_out], [1, 1])
                .with_stride([stride, stride])
                .with_bias(false)
                .init(d),
            bn: bn(c_out, d),
        });
        BasicBlock {
            conv1: conv(c_in, c_out, 3, stride, 1, d),
            bn1: bn(c_out, d),
            conv2: conv(c_out, c_out, 3, 1, 1, d),
            bn2: bn(c_out, d),
            downsample,
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let identity = match &self.downsample {
            Some(ds) => ds.forward_linear(x.clone()),
            None => x.clone(),
        };
        let y = relu(crate::norm::batch_norm(&self.bn1, self.conv1.forward(x)));
        let y = crate::norm::batch_norm(&self.bn2, self.conv2.forward(y));
        relu(y + identity)
    }
}

#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    pub conv1: Conv2d<B>,
    pub bn1: BatchNorm<B>,
    pub maxpool: MaxPool2d,
    pub layer1: Vec<BasicBlock<B>>,
    pub layer2: Vec<BasicBlock<B>>,
    pub layer3: Vec<BasicBlock<B>>,
    pub layer4: Vec<BasicBlock<B>>,
}

impl<B: Backend> ResNet<B> {
    fn new18(in_channels: usize, d: &B::Device) -> Self {
        let layer = |c_in: usize, c_out: usize, stride: usize| {
            vec![
                BasicBlock::new(c_in, c_out, stride, d),
                BasicBlock::new(c_out, c_out, 1, d),
            ]
        };
        ResNet {
            conv1: conv(in_channels, 64, 7, 2, 1, d),
            bn1: bn(64, d),
            maxpool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            layer1: layer(64, 64, 1),
            layer2: layer(64, 128, 2),
            layer3: layer(128, 256, 2),
            layer4: layer(256, 512, 2),
        }
    }

    fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = relu(crate::norm::batch_norm(&self.bn1, self.conv1.forward(x)));
        x = self.maxpool.forward(x);
        for b in self
            .layer1
            .iter()
            .chain(&self.layer2)
            .chain(&self.layer3)
            .chain(&self.layer4)
        {
            x = b.forward(x);
        }
        x
    }
}

// ---------------------------------------------------------------------------------------------
// ResNet-8: a compact residual net for small inputs

/// A 3x3 stem, a 2x2 max-pool and three basic blocks (16-32-64-128 channels), ending on an 8x8
/// map for 64 px inputs, like the small CNN.
///
/// The demo's second CNN (`mica demo` trains `small,resnet8`): about 1.5x the small CNN's
/// multiply-adds, with skip connections, two convolutions per stage and strided (learned)
/// downsampling in place of two of its pools. ResNet-18 and the MobileNet take far longer per
/// epoch on two cores. On the synthetic sets it needs its 32 epochs (24 underfit, and a layout
/// ending on a 4x4 map generalised worse); see `bench/README.md`, "A second CNN".
#[derive(Module, Debug)]
pub struct ResNet8<B: Backend> {
    pub stem: ConvBn<B>,
    pub pool: MaxPool2d,
    pub blocks: Vec<BasicBlock<B>>,
}

impl<B: Backend> ResNet8<B> {
    /// (output channels, stride) of the three blocks.
    pub const BLOCKS: [(usize, usize); 3] = [(32, 2), (64, 2), (128, 1)];
    pub const STEM: usize = 16;

    fn new(in_channels: usize, d: &B::Device) -> Self {
        let mut c = Self::STEM;
        let blocks = Self::BLOCKS
            .iter()
            .map(|&(out, s)| {
                let b = BasicBlock::new(c, out, s, d);
                c = out;
                b
            })
            .collect();
        ResNet8 {
            stem: ConvBn::new(in_channels, Self::STEM, 3, 1, 1, d),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            blocks,
        }
    }

    fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.pool.forward(self.stem.forward_relu(x));
        for b in &self.blocks {
            x = b.forward(x);
        }
        x
    }
}

// ---------------------------------------------------------------------------------------------
// MobileNetV2-style net (width 0.5): depthwise-separable inverted residuals

#[derive(Module, Debug)]
pub struct InvertedResidual<B: Backend> {
    pub expand: Option<ConvBn<B>>,
    pub depthwise: ConvBn<B>,
    pub project: ConvBn<B>,
    pub residual: bool,
}

impl<B: Backend> InvertedResidual<B> {
    fn new(c_in: usize, c_out: usize, stride: usize, t: usize, d: &B::Device) -> Self {
        let hidden = c_in * t;
        InvertedResidual {
            expand: (t != 1).then(|| ConvBn::new(c_in, hidden, 1, 1, 1, d)),
            depthwise: ConvBn::new(hidden, hidden, 3, stride, hidden, d),
            project: ConvBn::new(hidden, c_out, 1, 1, 1, d),
            residual: stride == 1 && c_in == c_out,
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut y = x.clone();
        if let Some(e) = &self.expand {
            y = e.forward_relu6(y);
        }
        y = self.depthwise.forward_relu6(y);
        y = self.project.forward_linear(y);
        if self.residual {
            y + x
        } else {
            y
        }
    }
}

#[derive(Module, Debug)]
pub struct MobileNetV2<B: Backend> {
    pub stem: ConvBn<B>,
    pub blocks: Vec<InvertedResidual<B>>,
    pub last: ConvBn<B>,
    /// Which [`MobileNetV2::settings`] built it (recorded in `checkpoint.json`, so checkpoints
    /// of the earlier layout still load).
    pub layout: u32,
}

/// The MobileNet layout new models are trained with.
///
/// Layout 0 (ImageNet's strides at width 0.5) downsampled 64 px inputs 32x, to a 2x2 map, and
/// pooled it by its mean: on the synthetic sets it stayed at chance (19-25 %) in the demo's
/// budget. Layout 1 keeps the second stage at full resolution (16x downsampling, a 4x4 map for
/// 64 px), as the CIFAR adaptations of MobileNetV2 do for small inputs, and pools by mean and
/// maximum like the small CNN, so a lesion covering a few cells is not averaged away.
pub const MOBILENET_LAYOUT: u32 = 1;

impl<B: Backend> MobileNetV2<B> {
    /// (expansion, channels, repeats, stride) per stage, channels at width 0.5, for a layout.
    fn settings(layout: u32) -> [(usize, usize, usize, usize); 7] {
        let stage2_stride = if layout == 0 { 2 } else { 1 };
        [
            (1, 8, 1, 1),
            (6, 12, 2, stage2_stride),
            (6, 16, 3, 2),
            (6, 32, 4, 2),
            (6, 48, 3, 1),
            (6, 80, 3, 2),
            (6, 160, 1, 1),
        ]
    }
    pub const LAST: usize = 640;

    fn new(in_channels: usize, layout: u32, d: &B::Device) -> Self {
        let stem_c = 16;
        let mut blocks = Vec::new();
        let mut c = stem_c;
        for (t, out, n, s) in Self::settings(layout) {
            for i in 0..n {
                blocks.push(InvertedResidual::new(c, out, if i == 0 { s } else { 1 }, t, d));
                c = out;
            }
        }
        MobileNetV2 {
            stem: ConvBn::new(in_channels, stem_c, 3, 2, 1, d),
            blocks,
            last: ConvBn::new(c, Self::LAST, 1, 1, 1, d),
            layout,
        }
    }

    fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.stem.forward_relu6(x);
        for b in &self.blocks {
            x = b.forward(x);
        }
        self.last.forward_relu6(x)
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Module, Debug)]
pub enum Backbone<B: Backend> {
    Small(SmallCnn<B>),
    Resnet8(ResNet8<B>),
    Resnet18(ResNet<B>),
    Mobilenet(MobileNetV2<B>),
}

/// A backbone plus the shared classification head.
#[derive(Module, Debug)]
pub struct Net<B: Backend> {
    pub backbone: Backbone<B>,
    pub fc: Linear<B>,
}

/// Dropout before the classifier; applied with our own seeded RNG (see [`Net::head`]).
pub const DROPOUT: f64 = 0.3;

impl<B: Backend> Net<B> {
    pub fn new(arch: Arch, in_channels: usize, classes: usize, device: &B::Device) -> Self {
        Self::with_layout(arch, MOBILENET_LAYOUT, in_channels, classes, device)
    }

    /// [`Net::new`] with the MobileNet layout a checkpoint records (ignored by the other
    /// architectures).
    pub fn with_layout(arch: Arch, layout: u32, in_channels: usize, classes: usize, device: &B::Device) -> Self {
        let (backbone, width) = match arch {
            Arch::Small => (
                Backbone::Small(SmallCnn::new(in_channels, device)),
                2 * SmallCnn::<B>::WIDTHS[3],
            ),
            Arch::Resnet8 => (
                Backbone::Resnet8(ResNet8::new(in_channels, device)),
                2 * ResNet8::<B>::BLOCKS[2].0,
            ),
            Arch::Resnet18 => (Backbone::Resnet18(ResNet::new18(in_channels, device)), 512),
            Arch::Mobilenet => (
                Backbone::Mobilenet(MobileNetV2::new(in_channels, layout, device)),
                if layout == 0 { MobileNetV2::<B>::LAST } else { 2 * MobileNetV2::<B>::LAST },
            ),
        };
        Net {
            backbone,
            fc: LinearConfig::new(width, classes).init(device),
        }
    }

    /// Like [`Net::new`], with burn's backend RNG seeded first under a process-wide lock, so the
    /// same seed always gives the same initial weights.
    pub fn seeded(arch: Arch, in_channels: usize, classes: usize, seed: u64, device: &B::Device) -> Self {
        let _guard = crate::device::INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        B::seed(device, seed);
        let net = Self::new(arch, in_channels, classes, device);
        // burn initialises parameters lazily, on first use; force it now, under the lock and
        // in field order, so the draws happen here and always in the same sequence.
        net.visit(&mut Materialise);
        net
    }

    /// The last convolutional feature map `[batch, channels, h, w]` (what Grad-CAM weighs).
    pub fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match &self.backbone {
            Backbone::Small(m) => m.features(x),
            Backbone::Resnet8(m) => m.features(x),
            Backbone::Resnet18(m) => m.features(x),
            Backbone::Mobilenet(m) => m.features(x),
        }
    }

    /// Global average pooling, dropout (only when `dropout_rng` is given) and the linear layer.
    ///
    /// The small CNN also concatenates global max pooling: its lesions cover a few pixels of
    /// an 8x8 map, and an average over the whole map dilutes exactly that evidence (measured on
    /// the synthetic chest X-rays: most errors were lesions called `normal`). So do ResNet-8 and the MobileNet
    /// since layout 1 ([`MOBILENET_LAYOUT`]); ResNet-18 keeps plain average pooling, as in
    /// torchvision, so imported weights fit.
    ///
    /// Dropout masks come from the caller's seeded ChaCha RNG rather than burn's process-wide
    /// backend RNG, so a training run is reproducible even when other work in the same process
    /// draws random numbers concurrently.
    pub fn head(&self, f: Tensor<B, 4>, dropout_rng: Option<&mut ChaCha8Rng>) -> Tensor<B, 2> {
        let mut x = self.pool(f);
        let [b, c] = x.dims();
        if let Some(rng) = dropout_rng {
            let keep = 1.0 - DROPOUT;
            let mask: Vec<f32> = (0..b * c)
                .map(|_| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 })
                .collect();
            let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, c]), &x.device());
            x = x * mask;
        }
        self.fc.forward(x)
    }

    pub fn forward(&self, x: Tensor<B, 4>, dropout_rng: Option<&mut ChaCha8Rng>) -> Tensor<B, 2> {
        self.head(self.features(x), dropout_rng)
    }

    /// The pooled penultimate feature vector `[batch, width]` the linear layer reads (global
    /// average pooling; average and max concatenated for the small CNN, see [`Net::head`]).
    ///
    /// Kept as its own step so the out-of-distribution check ([`crate::ood`]) sees exactly the
    /// representation the classifier decides on.
    pub fn pool(&self, f: Tensor<B, 4>) -> Tensor<B, 2> {
        let [b, c, _, _] = f.dims();
        let flat = f.flatten::<3>(2, 3);
        if self.pools_max() {
            let avg = flat.clone().mean_dim(2).reshape([b, c]);
            let max = flat.max_dim(2).reshape([b, c]);
            Tensor::cat(vec![avg, max], 1)
        } else {
            flat.mean_dim(2).reshape([b, c])
        }
    }

    /// Logits and pooled features of one inference pass (no dropout). The logits are the same
    /// operations as [`Net::forward`] without dropout, so they are bit-identical to it.
    pub fn forward_with_features(&self, x: Tensor<B, 4>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let pooled = self.pool(self.features(x));
        (self.fc.forward(pooled.clone()), pooled)
    }

    /// Whether the head concatenates global max pooling to the average (see [`Net::head`]).
    pub fn pools_max(&self) -> bool {
        match &self.backbone {
            Backbone::Small(_) | Backbone::Resnet8(_) => true,
            Backbone::Mobilenet(m) => m.layout >= 1,
            Backbone::Resnet18(_) => false,
        }
    }

    /// Width of the pooled feature vector (the linear layer's input).
    pub fn feature_width(&self) -> usize {
        self.fc.weight.dims()[0]
    }

    pub fn arch(&self) -> Arch {
        match &self.backbone {
            Backbone::Small(_) => Arch::Small,
            Backbone::Resnet8(_) => Arch::Resnet8,
            Backbone::Resnet18(_) => Arch::Resnet18,
            Backbone::Mobilenet(_) => Arch::Mobilenet,
        }
    }
}

struct Materialise;

impl<B: Backend> burn::module::ModuleVisitor<B> for Materialise {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

/// A fresh seeded RNG for one purpose of one run, so that e.g. adding an augmentation does not
/// change the dropout masks.
pub fn rng_for(seed: u64, purpose: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(purpose);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn every_arch_maps_a_batch_to_class_logits() {
        let d = Default::default();
        for arch in Arch::ALL {
            for ch in [1, 3] {
                let net = Net::<Flex>::seeded(arch, ch, 4, 1, &d);
                let x = Tensor::<Flex, 4>::zeros([2, ch, 32, 32], &d);
                let y = net.forward(x, None);
                assert_eq!(y.dims(), [2, 4], "{arch} ch={ch}");
                assert_eq!(net.arch(), arch);
            }
        }
    }

    #[test]
    fn features_path_gives_the_same_logits_as_forward() {
        let d = Default::default();
        for arch in Arch::ALL {
            let net = Net::<Flex>::seeded(arch, 1, 3, 2, &d);
            let v: Vec<f32> = (0..2 * 32 * 32).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
            let x = Tensor::<Flex, 4>::from_data(TensorData::new(v, [2, 1, 32, 32]), &d);
            let a: Vec<f32> = net.forward(x.clone(), None).into_data().to_vec().unwrap();
            let (logits, pooled) = net.forward_with_features(x);
            let b: Vec<f32> = logits.into_data().to_vec().unwrap();
            assert_eq!(a, b, "{arch}: logits must be bit-identical");
            assert_eq!(pooled.dims(), [2, net.feature_width()], "{arch}");
        }
    }

    #[test]
    fn arch_names_round_trip() {
        for a in Arch::ALL {
            assert_eq!(a.as_str().parse::<Arch>().unwrap(), a);
        }
        assert!("vgg".parse::<Arch>().is_err());
    }
}
