//! A CPU inference engine for mica's four architectures, compiled from a trained [`Net`].
//!
//! Why a second forward pass: burn-flex runs every layer as separate tensor operations, each a
//! pass over memory with a fresh allocation (convolution, then batch norm's multiply and add,
//! then ReLU, then the residual add), and its element-wise kernels run on one core. A `perf`
//! profile of ResNet-18 inference put only a third of the time in the GEMM microkernel; the
//! rest was packing, im2col, page faults on fresh buffers and single-threaded element-wise
//! work, and PyTorch was 1.4-1.6x faster (bench/README.md). At inference every one of those
//! element-wise steps is a per-channel affine map or a clamp, so here:
//!
//! - batch norm is folded into the convolution's weights and a per-channel bias;
//! - the bias, the residual and the activation are applied to each output block while it is
//!   still in cache: the GEMM accumulates onto the shortcut (consumed in place), and bias and
//!   activation run in one pass over the block it just wrote;
//! - feature maps are laid out `[N, H, W, C]`, so a convolution is one GEMM
//!   `col [N·H·W, K] · W [K, O]` over the whole batch, cut into blocks of output pixels, one
//!   parallel task each, whatever the feature map's size; a pointwise convolution reads the
//!   input directly as its `col`;
//! - a stride-1 convolution on a map at least `TAPS_MIN_WIDTH` wide skips im2col: one GEMM per
//!   kernel row on the zero-padded map (`conv_taps`);
//! - each task reuses thread-local scratch buffers instead of allocating them.
//!
//! Training, Grad-CAM and the GPU keep burn's graph; this only replaces the CPU forward pass of
//! [`crate::CnnClassifier`]. The result is the same function as [`Net::forward_with_features`]
//! up to float rounding (the tests hold every architecture to it). It is deterministic: the
//! blocks depend on the shapes and the thread count only, never on timing (a test also finds
//! one and three threads bit-identical on ResNet-18).
//! `MICA_CNN_ENGINE=burn` switches it off, so a benchmark can compare both in one build.

use std::cell::RefCell;

use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::model::{Backbone, BasicBlock, ConvBn, InvertedResidual, Net};

/// True unless `MICA_CNN_ENGINE=burn`.
pub fn enabled() -> bool {
    std::env::var("MICA_CNN_ENGINE").map_or(true, |v| v != "burn")
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    Identity,
    Relu,
    Relu6,
}

/// A feature map laid out `[N, H, W, C]`: one row of `C` values per pixel.
struct Map {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    d: Vec<f32>,
}

/// A convolution with its batch norm folded in.
struct Conv {
    c_in: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: [usize; 2],
    /// top, left, bottom, right
    pad: [usize; 4],
    depthwise: bool,
    /// `[K, O]` with `K = kh·kw·C` ordered (ky, kx, c); `[kh·kw, C]` for depthwise
    w: Vec<f32>,
    bias: Vec<f32>,
    act: Act,
}

impl Conv {
    /// Bias and activation on one output pixel's channels.
    fn finish(&self, px: &mut [f32]) {
        match self.act {
            Act::Identity => px.iter_mut().zip(&self.bias).for_each(|(v, b)| *v += b),
            Act::Relu => px.iter_mut().zip(&self.bias).for_each(|(v, b)| *v = (*v + b).max(0.0)),
            Act::Relu6 => px.iter_mut().zip(&self.bias).for_each(|(v, b)| *v = (*v + b).clamp(0.0, 6.0)),
        }
    }
}

enum Stage {
    Conv(Conv),
    MaxPool { k: [usize; 2], s: [usize; 2], pad: [usize; 4] },
    /// `act(body(x) + shortcut(x))`; the activation is the last body convolution's, applied
    /// after the add.
    Residual { body: Vec<Conv>, shortcut: Option<Conv> },
}

/// A compiled network: see the module documentation.
pub struct FusedNet {
    in_channels: usize,
    stages: Vec<Stage>,
    max_too: bool,
    /// `[width, classes]`, as burn's `Linear` stores it
    fc_w: Vec<f32>,
    fc_b: Vec<f32>,
    width: usize,
    classes: usize,
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 data")
}

fn padding(p: &PaddingConfig2d) -> Option<[usize; 4]> {
    match *p {
        PaddingConfig2d::Valid => Some([0; 4]),
        PaddingConfig2d::Explicit(t, l, b, r) => Some([t, l, b, r]),
        // Not used by mica's architectures; such a net stays on burn's path.
        PaddingConfig2d::Same => None,
    }
}

fn fold<B: Backend>(conv: &Conv2d<B>, bn: Option<&BatchNorm<B>>, act: Act) -> Option<Conv> {
    let [o, cg, kh, kw] = conv.weight.dims();
    if conv.dilation != [1, 1] {
        return None;
    }
    let c_in = cg * conv.groups;
    let depthwise = conv.groups > 1;
    if depthwise && !(conv.groups == c_in && o == c_in && cg == 1) {
        return None;
    }
    let mut w = values(conv.weight.val());
    let mut bias = match &conv.bias {
        Some(b) => values(b.val()),
        None => vec![0.0; o],
    };
    if let Some(bn) = bn {
        let gamma = values(bn.gamma.val());
        let beta = values(bn.beta.val());
        let mean = values(bn.running_mean.value());
        let var = values(bn.running_var.value());
        let k = w.len() / o;
        for i in 0..o {
            let scale = gamma[i] as f64 / (var[i] as f64 + bn.epsilon).sqrt();
            for v in &mut w[i * k..(i + 1) * k] {
                *v = (*v as f64 * scale) as f32;
            }
            bias[i] = (beta[i] as f64 + (bias[i] as f64 - mean[i] as f64) * scale) as f32;
        }
    }
    // burn's [O, C, kh, kw] becomes [(ky, kx, c), O] (for depthwise [(ky, kx), C]): the
    // right-hand matrix of an NHWC convolution, whose im2col rows are (ky, kx, c).
    let mut wt = vec![0.0; w.len()];
    for oc in 0..o {
        for c in 0..cg {
            for ky in 0..kh {
                for kx in 0..kw {
                    wt[((ky * kw + kx) * cg + c) * o + oc] = w[((oc * cg + c) * kh + ky) * kw + kx];
                }
            }
        }
    }
    Some(Conv {
        c_in,
        c_out: o,
        kh,
        kw,
        stride: conv.stride,
        pad: padding(&conv.padding)?,
        depthwise,
        w: wt,
        bias,
        act,
    })
}

fn conv_bn<B: Backend>(c: &ConvBn<B>, act: Act) -> Option<Conv> {
    fold(&c.conv, Some(&c.bn), act)
}

fn max_pool(p: &MaxPool2d) -> Option<Stage> {
    if p.dilation != [1, 1] || p.ceil_mode {
        return None;
    }
    Some(Stage::MaxPool { k: p.kernel_size, s: p.stride, pad: padding(&p.padding)? })
}

fn basic_block<B: Backend>(b: &BasicBlock<B>) -> Option<Stage> {
    Some(Stage::Residual {
        body: vec![fold(&b.conv1, Some(&b.bn1), Act::Relu)?, fold(&b.conv2, Some(&b.bn2), Act::Relu)?],
        shortcut: match &b.downsample {
            Some(d) => Some(conv_bn(d, Act::Identity)?),
            None => None,
        },
    })
}

fn inverted_residual<B: Backend>(b: &InvertedResidual<B>) -> Option<Vec<Stage>> {
    let mut body = Vec::new();
    if let Some(e) = &b.expand {
        body.push(conv_bn(e, Act::Relu6)?);
    }
    body.push(conv_bn(&b.depthwise, Act::Relu6)?);
    body.push(conv_bn(&b.project, Act::Identity)?);
    Some(if b.residual {
        vec![Stage::Residual { body, shortcut: None }]
    } else {
        body.into_iter().map(Stage::Conv).collect()
    })
}

impl FusedNet {
    /// Compiles a network for inference; `None` for a layer this engine does not implement
    /// (the caller then keeps burn's forward pass).
    pub fn compile<B: Backend>(net: &Net<B>) -> Option<FusedNet> {
        let mut stages = Vec::new();
        let in_channels;
        match &net.backbone {
            Backbone::Small(m) => {
                in_channels = m.blocks.first()?.conv.weight.dims()[1];
                let n = m.blocks.len();
                for (i, b) in m.blocks.iter().enumerate() {
                    stages.push(Stage::Conv(conv_bn(b, Act::Relu)?));
                    if i + 1 < n {
                        stages.push(max_pool(&m.pool)?);
                    }
                }
            }
            Backbone::Resnet8(m) => {
                in_channels = m.stem.conv.weight.dims()[1];
                stages.push(Stage::Conv(conv_bn(&m.stem, Act::Relu)?));
                stages.push(max_pool(&m.pool)?);
                for b in &m.blocks {
                    stages.push(basic_block(b)?);
                }
            }
            Backbone::Resnet18(m) => {
                in_channels = m.conv1.weight.dims()[1];
                stages.push(Stage::Conv(fold(&m.conv1, Some(&m.bn1), Act::Relu)?));
                stages.push(max_pool(&m.maxpool)?);
                for b in m.layer1.iter().chain(&m.layer2).chain(&m.layer3).chain(&m.layer4) {
                    stages.push(basic_block(b)?);
                }
            }
            Backbone::Mobilenet(m) => {
                in_channels = m.stem.conv.weight.dims()[1];
                stages.push(Stage::Conv(conv_bn(&m.stem, Act::Relu6)?));
                for b in &m.blocks {
                    stages.extend(inverted_residual(b)?);
                }
                stages.push(Stage::Conv(conv_bn(&m.last, Act::Relu6)?));
            }
        }
        let max_too = net.pools_max();
        let [width, classes] = net.fc.weight.dims();
        Some(FusedNet {
            in_channels,
            stages,
            max_too,
            fc_w: values(net.fc.weight.val()),
            fc_b: match &net.fc.bias {
                Some(b) => values(b.val()),
                None => vec![0.0; classes],
            },
            width,
            classes,
        })
    }

    /// Logits `[n, classes]` and pooled features `[n, width]` (what [`Net::pool`] gives) of
    /// `n` images laid out `[N, C, H, W]`, row-major.
    pub fn forward(&self, x: &[f32], n: usize, h: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
        let c = self.in_channels;
        assert_eq!(x.len(), n * c * h * w, "input is not [{n}, {c}, {h}, {w}]");
        // [N, C, H, W] -> [N, H, W, C]
        let hw = h * w;
        let mut d = vec![0.0; x.len()];
        for img in 0..n {
            for ch in 0..c {
                for (p, &v) in x[(img * c + ch) * hw..][..hw].iter().enumerate() {
                    d[(img * hw + p) * c + ch] = v;
                }
            }
        }
        let mut m = Map { n, h, w, c, d };
        for s in &self.stages {
            m = match s {
                Stage::Conv(cv) => conv(cv, &m, None),
                Stage::MaxPool { k, s, pad } => maxpool(&m, *k, *s, *pad),
                Stage::Residual { body, shortcut } => {
                    let short = match shortcut {
                        Some(sc) => conv(sc, &m, None),
                        None => Map { n: m.n, h: m.h, w: m.w, c: m.c, d: m.d.clone() },
                    };
                    let (last, rest) = body.split_last().expect("a residual body has a convolution");
                    let mut y = None;
                    for cv in rest {
                        y = Some(conv(cv, y.as_ref().unwrap_or(&m), None));
                    }
                    conv(last, y.as_ref().unwrap_or(&m), Some(short))
                }
            };
        }
        self.head(&m)
    }

    fn head(&self, m: &Map) -> (Vec<f32>, Vec<f32>) {
        let (n, c, hw) = (m.n, m.c, m.h * m.w);
        let width = if self.max_too { 2 * c } else { c };
        assert_eq!(width, self.width, "pooled width does not match the linear layer");
        let mut pooled = vec![0.0f32; n * width];
        for img in 0..n {
            let row = &mut pooled[img * width..][..width];
            let (sum, max) = row.split_at_mut(c);
            if self.max_too {
                max.fill(f32::NEG_INFINITY);
            }
            for px in m.d[img * hw * c..][..hw * c].chunks_exact(c) {
                sum.iter_mut().zip(px).for_each(|(s, v)| *s += v);
                if self.max_too {
                    max.iter_mut().zip(px).for_each(|(m, &v)| *m = m.max(v));
                }
            }
            sum.iter_mut().for_each(|s| *s /= hw as f32);
        }
        let k = self.classes;
        let mut logits = vec![0.0f32; n * k];
        for img in 0..n {
            let row = &mut logits[img * k..][..k];
            row.copy_from_slice(&self.fc_b);
            for (i, &p) in pooled[img * width..][..width].iter().enumerate() {
                for (o, v) in row.iter_mut().enumerate() {
                    *v += p * self.fc_w[i * k + o];
                }
            }
        }
        (logits, pooled)
    }
}

/// Softmax probabilities and pooled features ([`Net::pool`]) for every cached image, in
/// batches: [`crate::train::predict_with_features`] through this engine.
pub fn predict_with_features(
    net: &FusedNet,
    cache: &crate::data::ImageCache,
    norm: &crate::data::Normalization,
    batch: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut probs = Vec::with_capacity(cache.len());
    let mut feats = Vec::with_capacity(cache.len());
    let idx: Vec<usize> = (0..cache.len()).collect();
    for rows in idx.chunks(batch.max(1)) {
        let x = crate::train::batch_values(cache, rows, norm, None);
        let (logits, pooled) = net.forward(&x, rows.len(), cache.size, cache.size);
        probs.extend(logits.chunks(net.classes).map(mica_core::softmax));
        feats.extend(pooled.chunks(net.width).map(<[f32]>::to_vec));
    }
    (probs, feats)
}

fn out_size(len: usize, k: usize, s: usize, before: usize, after: usize) -> usize {
    (len + before + after - k) / s + 1
}

/// A raw pointer the parallel tasks share; each writes a disjoint set of output rows.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// A method, not the field, so closures capture the whole (Sync) wrapper.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

thread_local! {
    static COL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

thread_local! {
    static ACC: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` on `len` floats of this thread's buffer `key` (contents left by the last use: callers
/// write before they read). If the buffer is in use, because this thread took up another
/// forward pass's task while waiting inside a GEMM on all threads, `f` gets a fresh one.
fn with_buf<R>(key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut f = Some(f);
    let reused = key.with(|cell| {
        let mut buf = cell.try_borrow_mut().ok()?;
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Some((f.take().expect("called once"))(&mut buf[..len]))
    });
    match reused {
        Some(r) => r,
        None => (f.take().expect("called once"))(&mut vec![0.0; len]),
    }
}

/// How `rows` output pixels are cut into parallel tasks: `(rows per task, tasks)`. Each task's
/// scratch stays under `bytes_per_task` for `floats_per_row` floats a row, and the task count
/// is a multiple of the thread count so no core idles at the end of a layer. Fewer rows than
/// give every thread 64 run as one task whose GEMM uses every thread (`tasks < threads`).
fn split(rows: usize, floats_per_row: usize, bytes_per_task: usize, threads: usize) -> (usize, usize) {
    if rows < 64 * threads {
        return (rows.max(1), 1);
    }
    let max_len = (bytes_per_task / (4 * floats_per_row.max(1))).max(64);
    let tasks = rows.div_ceil(max_len).div_ceil(threads) * threads;
    let len = rows.div_ceil(tasks);
    (len, rows.div_ceil(len))
}

/// A stride-1 convolution over a feature map at least this wide runs as one GEMM per kernel
/// tap on the zero-padded input (see [`conv_taps`]); narrower maps waste too many of the
/// padded grid's rows and take the im2col path.
const TAPS_MIN_WIDTH: usize = 16;

/// Walks output pixels `j0..` in order as (image, oy, ox) without a division per pixel.
struct Pixels {
    oh: usize,
    ow: usize,
    img: usize,
    oy: usize,
    ox: usize,
}

impl Pixels {
    fn at(j: usize, oh: usize, ow: usize) -> Pixels {
        Pixels { oh, ow, img: j / (oh * ow), oy: (j / ow) % oh, ox: j % ow }
    }

    fn advance(&mut self) {
        self.ox += 1;
        if self.ox == self.ow {
            self.ox = 0;
            self.oy += 1;
            if self.oy == self.oh {
                self.oy = 0;
                self.img += 1;
            }
        }
    }
}

fn conv(cv: &Conv, x: &Map, residual: Option<Map>) -> Map {
    assert_eq!(x.c, cv.c_in, "channel count mismatch");
    let oh = out_size(x.h, cv.kh, cv.stride[0], cv.pad[0], cv.pad[2]);
    let ow = out_size(x.w, cv.kw, cv.stride[1], cv.pad[1], cv.pad[3]);
    let rows = x.n * oh * ow;
    let (o, has_res) = (cv.c_out, residual.is_some());
    let mut out = match residual {
        Some(r) => {
            assert!(r.c == o && r.n == x.n && r.h == oh && r.w == ow, "shortcut shape mismatch");
            r.d
        }
        None => vec![0.0; rows * o],
    };
    let k = if cv.depthwise { cv.kh * cv.kw } else { cv.c_in * cv.kh * cv.kw };
    let pointwise = cv.kh == 1 && cv.kw == 1 && cv.stride == [1, 1] && cv.pad == [0; 4];
    let threads = rayon::current_num_threads();
    if !cv.depthwise && !pointwise && cv.stride == [1, 1] && x.w >= TAPS_MIN_WIDTH {
        conv_taps(cv, x, oh, ow, has_res, &mut out, threads);
        return Map { n: x.n, h: oh, w: ow, c: o, d: out };
    }
    let (block, tasks) = split(rows, if cv.depthwise { o } else { k }, 8 << 20, threads);
    let run = |t: usize, dst: &mut [f32], par: gemm::Parallelism| {
        let j0 = t * block;
        let len = dst.len() / o;
        if cv.depthwise {
            depthwise(cv, x, oh, ow, j0, has_res, dst);
        } else {
            if pointwise {
                gemm_rows(len, o, k, dst, has_res, &x.d[j0 * k..][..len * k], k, &cv.w, par);
            } else {
                with_buf(&COL, k * len, |buf| {
                    im2col(cv, x, oh, ow, j0, buf);
                    gemm_rows(len, o, k, dst, has_res, buf, k, &cv.w, par);
                });
            }
        }
        // One pass over the block while it is in cache: bias, then the activation.
        for px in dst.chunks_exact_mut(o) {
            cv.finish(px);
        }
    };
    if tasks >= threads {
        out.par_chunks_mut(block * o).enumerate().for_each(|(t, dst)| run(t, dst, gemm::Parallelism::None));
    } else {
        out.chunks_mut(block * o).enumerate().for_each(|(t, dst)| run(t, dst, gemm::Parallelism::Rayon(threads)));
    }
    Map { n: x.n, h: oh, w: ow, c: o, d: out }
}

/// `dst [m, n] (+)= lhs [m, k] · rhs [k, n]`: `dst` and `rhs` row-major, `lhs` rows `lhs_rs`
/// apart with contiguous columns (rows may overlap: see [`conv_taps`]).
#[allow(clippy::too_many_arguments)]
fn gemm_rows(m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, lhs: &[f32], lhs_rs: usize, rhs: &[f32], par: gemm::Parallelism) {
    assert!(dst.len() >= m * n && rhs.len() >= k * n && (m == 0 || lhs.len() >= (m - 1) * lhs_rs + k));
    // SAFETY: the assert above keeps every element the strides reach inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// A stride-1 convolution without im2col. On the zero-padded input `[N, Hp, Wp, C]`, output
/// pixel (image, oy, ox) placed at padded row `q = (image·Hp + oy)·Wp + ox` reads tap
/// (ky, kx) from padded pixel `q + ky·Wp + kx`, so each kernel row ky is one GEMM of `x_pad`
/// shifted by a constant (`[rows, kw·C] · W_ky [kw·C, O]`), accumulated. Rows that fall on the padding
/// compute values nobody reads; the epilogue keeps the valid ones. Compared with im2col this
/// reads each input pixel from cache once per tap instead of writing and reading a
/// `kh·kw`-times larger buffer through memory (the 3x3 layers of the first two ResNet stages:
/// bench/README.md).
fn conv_taps(cv: &Conv, x: &Map, oh: usize, ow: usize, has_res: bool, out: &mut [f32], threads: usize) {
    let (c, o) = (x.c, cv.c_out);
    let (hp, wp) = (x.h + cv.pad[0] + cv.pad[2], x.w + cv.pad[1] + cv.pad[3]);
    let mut xp = vec![0.0f32; x.n * hp * wp * c];
    xp.par_chunks_mut(hp * wp * c).enumerate().for_each(|(img, dst)| {
        for y in 0..x.h {
            let from = &x.d[(img * x.h + y) * x.w * c..][..x.w * c];
            dst[((y + cv.pad[0]) * wp + cv.pad[1]) * c..][..x.w * c].copy_from_slice(from);
        }
    });
    // The last rows whose every tap stays inside `xp`.
    let rows = x.n * hp * wp - (cv.kh - 1) * wp - (cv.kw - 1);
    let (block, tasks) = split(rows, o, 512 << 10, threads);
    let out_ptr = Shared(out.as_mut_ptr());
    let run = |t: usize, par: gemm::Parallelism| {
        let q0 = t * block;
        let len = block.min(rows - q0);
        with_buf(&ACC, len * o, |acc| {
            // The taps (ky, 0..kw) read kw adjacent pixels, which NHWC stores as one run of
            // kw·C values: a row of the kernel is one GEMM with K = kw·C whose input rows
            // overlap (row q starts C values after row q-1).
            let kc = cv.kw * c;
            for ky in 0..cv.kh {
                let lhs = &xp[(q0 + ky * wp) * c..][..(len - 1) * c + kc];
                gemm_rows(len, o, kc, acc, ky > 0, lhs, c, &cv.w[ky * kc * o..][..kc * o], par);
            }
            let (mut img, mut rem) = (q0 / (hp * wp), q0 % (hp * wp));
            for row in acc.chunks_exact_mut(o) {
                let (oy, ox) = (rem / wp, rem % wp);
                if oy < oh && ox < ow {
                    // SAFETY: padded row q maps to one output pixel, and the tasks' q ranges
                    // are disjoint, so no two tasks write the same output row.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(((img * oh + oy) * ow + ox) * o), o) };
                    if has_res {
                        row.iter_mut().zip(dst.iter()).for_each(|(a, r)| *a += r);
                    }
                    cv.finish(row);
                    dst.copy_from_slice(row);
                }
                rem += 1;
                if rem == hp * wp {
                    rem = 0;
                    img += 1;
                }
            }
        });
    };
    if tasks >= threads {
        (0..tasks).into_par_iter().for_each(|t| run(t, gemm::Parallelism::None));
    } else {
        (0..tasks).for_each(|t| run(t, gemm::Parallelism::Rayon(threads)));
    }
}

/// The im2col rows of output pixels `j0..j0 + col.len() / K`: each row is the pixel's
/// receptive field, (ky, kx, c) in order, zero where the kernel reads padding.
fn im2col(cv: &Conv, x: &Map, oh: usize, ow: usize, j0: usize, col: &mut [f32]) {
    let (h, w, c) = (x.h, x.w, x.c);
    let [sh, sw] = cv.stride;
    let (pt, pl) = (cv.pad[0] as isize, cv.pad[1] as isize);
    let k = c * cv.kh * cv.kw;
    let mut p = Pixels::at(j0, oh, ow);
    for row in col.chunks_exact_mut(k) {
        let base = p.img * h * w;
        for ky in 0..cv.kh {
            let iy = (p.oy * sh + ky) as isize - pt;
            let dst = &mut row[ky * cv.kw * c..][..cv.kw * c];
            if iy < 0 || iy >= h as isize {
                dst.fill(0.0);
                continue;
            }
            // The taps kx in a..b read inside the row, and their inputs are adjacent pixels:
            // one copy, zeros either side.
            let ix0 = (p.ox * sw) as isize - pl;
            let a = (-ix0).clamp(0, cv.kw as isize) as usize;
            let b = (w as isize - ix0).clamp(a as isize, cv.kw as isize) as usize;
            dst[..a * c].fill(0.0);
            dst[b * c..].fill(0.0);
            if b > a {
                let start = (base + iy as usize * w) as isize + ix0 + a as isize;
                dst[a * c..b * c].copy_from_slice(&x.d[start as usize * c..][..(b - a) * c]);
            }
        }
        p.advance();
    }
}

/// Depthwise convolution of the output pixels `j0..` that `dst` holds (`dst` already holds
/// the shortcut when `has_res`; the bias comes after).
fn depthwise(cv: &Conv, x: &Map, oh: usize, ow: usize, j0: usize, has_res: bool, dst: &mut [f32]) {
    let (h, w, c) = (x.h, x.w, x.c);
    let [sh, sw] = cv.stride;
    let (pt, pl) = (cv.pad[0] as isize, cv.pad[1] as isize);
    let mut p = Pixels::at(j0, oh, ow);
    for acc in dst.chunks_exact_mut(c) {
        if !has_res {
            acc.fill(0.0);
        }
        for ky in 0..cv.kh {
            let iy = (p.oy * sh + ky) as isize - pt;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            for kx in 0..cv.kw {
                let ix = (p.ox * sw + kx) as isize - pl;
                if ix < 0 || ix >= w as isize {
                    continue;
                }
                let src = &x.d[((p.img * h + iy as usize) * w + ix as usize) * c..][..c];
                let wt = &cv.w[(ky * cv.kw + kx) * c..][..c];
                for ((a, s), wv) in acc.iter_mut().zip(src).zip(wt) {
                    *a += s * wv;
                }
            }
        }
        p.advance();
    }
}

fn maxpool(x: &Map, k: [usize; 2], s: [usize; 2], pad: [usize; 4]) -> Map {
    let (h, w, c) = (x.h, x.w, x.c);
    let oh = out_size(h, k[0], s[0], pad[0], pad[2]);
    let ow = out_size(w, k[1], s[1], pad[1], pad[3]);
    let mut d = vec![f32::NEG_INFINITY; x.n * oh * ow * c];
    // One output row (all its pixels) per task.
    d.par_chunks_mut(ow * c).enumerate().for_each(|(r, dst)| {
        let (img, oy) = (r / oh, r % oh);
        for ky in 0..k[0] {
            let iy = (oy * s[0] + ky) as isize - pad[0] as isize;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            let line = (img * h + iy as usize) * w;
            for (ox, out) in dst.chunks_exact_mut(c).enumerate() {
                for kx in 0..k[1] {
                    let ix = (ox * s[1] + kx) as isize - pad[1] as isize;
                    if ix >= 0 && ix < w as isize {
                        let src = &x.d[(line + ix as usize) * c..][..c];
                        out.iter_mut().zip(src).for_each(|(m, &v)| *m = m.max(v));
                    }
                }
            }
        }
    });
    Map { n: x.n, h: oh, w: ow, c, d }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Arch;
    use crate::CpuBackend;
    use burn::module::RunningState;
    use burn::tensor::TensorData;

    type B = CpuBackend;

    /// Gives every batch norm distinct running statistics and affine parameters, so a wrong
    /// fold (or a fold that forgets one of them) changes the output.
    fn perturb_bn(bn: &mut BatchNorm<B>, salt: usize) {
        let c = bn.gamma.dims()[0];
        let d = Default::default();
        let t = |f: &dyn Fn(usize) -> f32| Tensor::<B, 1>::from_data(TensorData::new((0..c).map(f).collect::<Vec<f32>>(), [c]), &d);
        let s = salt as f32;
        bn.running_mean = RunningState::new(t(&|i| ((i as f32 * 0.37 + s) % 1.0 - 0.5) * 0.4));
        bn.running_var = RunningState::new(t(&|i| 0.5 + ((i as f32 * 0.61 + s) % 1.0)));
        bn.gamma = burn::module::Param::from_tensor(t(&|i| 0.8 + ((i as f32 * 0.23 + s) % 0.4)));
        bn.beta = burn::module::Param::from_tensor(t(&|i| ((i as f32 * 0.71 + s) % 1.0 - 0.5) * 0.2));
    }

    /// The stem's and every basic block's batch norms, in order (ResNet-8 and ResNet-18).
    fn bump_resnet<'a>(
        bump: &mut impl FnMut(&mut BatchNorm<B>),
        stem: &mut BatchNorm<B>,
        blocks: impl Iterator<Item = &'a mut BasicBlock<B>>,
    ) {
        bump(stem);
        for b in blocks {
            bump(&mut b.bn1);
            bump(&mut b.bn2);
            if let Some(d) = &mut b.downsample {
                bump(&mut d.bn);
            }
        }
    }

    fn perturb(net: &mut Net<B>) {
        let mut salt = 0;
        let mut bump = |bn: &mut BatchNorm<B>| {
            salt += 1;
            perturb_bn(bn, salt);
        };
        match &mut net.backbone {
            Backbone::Small(m) => m.blocks.iter_mut().for_each(|b| bump(&mut b.bn)),
            Backbone::Resnet8(m) => bump_resnet(&mut bump, &mut m.stem.bn, m.blocks.iter_mut()),
            Backbone::Resnet18(m) => {
                let blocks = m.layer1.iter_mut().chain(&mut m.layer2).chain(&mut m.layer3).chain(&mut m.layer4);
                bump_resnet(&mut bump, &mut m.bn1, blocks)
            }
            Backbone::Mobilenet(m) => {
                bump(&mut m.stem.bn);
                for b in &mut m.blocks {
                    if let Some(e) = &mut b.expand {
                        bump(&mut e.bn);
                    }
                    bump(&mut b.depthwise.bn);
                    bump(&mut b.project.bn);
                }
                bump(&mut m.last.bn);
            }
        }
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
        a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// Every architecture, one and three channels, an odd input size (floor division in the
    /// strided layers and pools) and batches whose pixels do not divide into tasks evenly:
    /// logits and pooled features match burn's forward pass.
    #[test]
    fn matches_burns_forward_pass_on_every_architecture() {
        let d = Default::default();
        for arch in Arch::ALL {
            // 64 px takes ResNet-18's first stage (16 px wide) through the per-tap path with
            // a residual; 37 px takes it through im2col.
            for (ch, size, n) in [(1, 37, 3), (3, 32, 2), (1, 64, 2)] {
                let mut net = Net::<B>::seeded(arch, ch, 4, 7, &d);
                perturb(&mut net);
                let x: Vec<f32> = (0..n * ch * size * size).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
                let t = Tensor::<B, 4>::from_data(TensorData::new(x.clone(), [n, ch, size, size]), &d);
                let (logits, pooled) = net.forward_with_features(t);
                let (want_l, want_p) = (values(logits), values(pooled));
                let fused = FusedNet::compile(&net).expect("every mica architecture compiles");
                let (got_l, got_p) = fused.forward(&x, n, size, size);
                let (dl, dp) = (max_rel_diff(&got_l, &want_l), max_rel_diff(&got_p, &want_p));
                assert!(dl < 1e-4 && dp < 1e-4, "{arch} ch={ch} size={size}: logits {dl:e}, pooled {dp:e}");
            }
        }
    }

    /// The pixel blocks differ with the thread count; the result must not.
    #[test]
    fn same_result_on_one_thread_and_on_several() {
        let d = Default::default();
        let mut net = Net::<B>::seeded(Arch::Resnet18, 1, 3, 3, &d);
        perturb(&mut net);
        let fused = FusedNet::compile(&net).unwrap();
        let (n, s) = (5, 40);
        let x: Vec<f32> = (0..n * s * s).map(|i| ((i * 31) % 97) as f32 / 97.0).collect();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let a = one.install(|| fused.forward(&x, n, s, s));
        let b = three.install(|| fused.forward(&x, n, s, s));
        assert_eq!(a, b);
    }

    /// Images are independent: one image alone gives the logits it gets inside a batch.
    #[test]
    fn an_image_alone_gets_the_logits_it_gets_in_a_batch() {
        let d = Default::default();
        let net = Net::<B>::seeded(Arch::Small, 1, 3, 5, &d);
        let fused = FusedNet::compile(&net).unwrap();
        let (n, s) = (4, 24);
        let x: Vec<f32> = (0..n * s * s).map(|i| ((i * 13) % 89) as f32 / 89.0).collect();
        let (all, _) = fused.forward(&x, n, s, s);
        let (third, _) = fused.forward(&x[2 * s * s..3 * s * s], 1, s, s);
        assert!(max_rel_diff(&third, &all[6..9]) < 1e-5);
    }

    /// A thread that takes up a second forward pass while its buffer is in use (rayon work
    /// stealing inside a GEMM on all threads) gets a fresh buffer instead of a borrow panic.
    #[test]
    fn a_busy_thread_buffer_gives_way_to_a_fresh_one() {
        let r = with_buf(&COL, 4, |outer| {
            outer.fill(1.0);
            let inner = with_buf(&COL, 3, |inner| {
                inner.fill(2.0);
                inner.iter().sum::<f32>()
            });
            inner + outer.iter().sum::<f32>()
        });
        assert_eq!(r, 6.0 + 4.0);
    }
}
