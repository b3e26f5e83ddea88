//! mica patch (see MICA-PATCH.md): f32 2-D convolution, forward and both backward passes, as
//! one GEMM per image over an NCHW im2col buffer, parallel over the batch.
//!
//! Why: burn-flex 0.21 computes the weight gradient through burn's default, a convolution of
//! the batch-transposed input with the output gradient as its kernel (a kernel as large as the
//! feature map, which its tiled im2col handles slowly), and the input gradient through a
//! transposed convolution; its forward pass converts every input to NHWC and allocates a
//! result per tile. Written as GEMMs, the three passes are
//!
//! - forward:        `y_n [O, P] = W [O, K] · col(x_n) [K, P]`
//! - weight grad:    `dW [O, K] = Σ_n dy_n [O, P] · col(x_n)ᵀ [P, K]`
//! - input grad:     `dx_n = col⁻¹(Wᵀ [K, O] · dy_n [O, P])`
//!
//! with `K = C·kh·kw` and `P = oh·ow`; a pointwise convolution (1x1, stride 1, no padding)
//! uses the image itself as `col`. Where `P` is small, a block of images is laid side by side
//! so each GEMM has at least [`BLOCK_COLUMNS`] columns. Blocks run in parallel tasks, each GEMM
//! single-threaded; a batch with fewer blocks than threads runs block by block with GEMM's own
//! threads instead. The weight gradient is summed per task and the tasks' sums are added in
//! task order, so a run is deterministic for a given thread count.
//!
//! Grouped convolutions run group by group (their forward pass keeps burn-flex's depthwise
//! kernel); other dtypes keep burn-flex's own paths. `MICA_FLEX_STOCK_CONV=1` switches this
//! module off, so a benchmark can compare both paths in one build.

use alloc::vec;
use alloc::vec::Vec;
use burn_backend::DType;
use burn_backend::ops::ConvOptions;
use burn_backend::ops::conv::calculate_conv_output_size;
use burn_std::{Bytes, Shape};

use super::conv::valid_out_range;
use crate::{FlexTensor, Layout};

/// True unless `MICA_FLEX_STOCK_CONV=1`.
#[cfg(feature = "std")]
pub(crate) fn enabled() -> bool {
    static STOCK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*STOCK.get_or_init(|| std::env::var_os("MICA_FLEX_STOCK_CONV").is_some_and(|v| v == "1"))
}

#[cfg(not(feature = "std"))]
pub(crate) fn enabled() -> bool {
    true
}

/// The geometry of one convolution.
#[derive(Clone, Copy)]
struct Geo {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    dh: usize,
    dw: usize,
    oh: usize,
    ow: usize,
    groups: usize,
}

impl Geo {
    /// `None` for what this module does not handle (non-f32, non-4-D, inconsistent groups).
    fn new(x: &FlexTensor, weight: &FlexTensor, options: &ConvOptions<2>) -> Option<Geo> {
        let groups = options.groups;
        if !enabled() || groups == 0 || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
            return None;
        }
        let xs = x.layout().shape();
        let ws = weight.layout().shape();
        if xs.num_dims() != 4 || ws.num_dims() != 4 || xs[1] % groups != 0 || ws[0] % groups != 0 || ws[1] * groups != xs[1] {
            return None;
        }
        let [sh, sw] = options.stride;
        let [ph, pw] = options.padding;
        let [dh, dw] = options.dilation;
        let (h, w, kh, kw) = (xs[2], xs[3], ws[2], ws[3]);
        Some(Geo {
            n: xs[0],
            c: xs[1],
            h,
            w,
            o: ws[0],
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            dh,
            dw,
            oh: calculate_conv_output_size(kh, sh, ph, dh, h),
            ow: calculate_conv_output_size(kw, sw, pw, dw, w),
            groups,
        })
    }

    /// Input channels per group.
    fn cg(&self) -> usize {
        self.c / self.groups
    }

    /// Output channels per group.
    fn og(&self) -> usize {
        self.o / self.groups
    }

    /// Rows of a group's im2col matrix.
    fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }

    fn p(&self) -> usize {
        self.oh * self.ow
    }

    fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Padded height and width.
    fn hp(&self) -> usize {
        self.h + 2 * self.ph
    }

    fn wp(&self) -> usize {
        self.w + 2 * self.pw
    }

    /// Columns of the per-tap GEMMs ([`taps`]): output pixel (oy, ox) sits at `oy·Wp + ox`, so
    /// the last one is at `(oh-1)·Wp + ow - 1`.
    fn q(&self) -> usize {
        (self.oh - 1) * self.wp() + self.ow
    }

    /// Whether the per-tap path ([`taps`]) handles this convolution: stride 1, no dilation, no
    /// groups, a real kernel, and maps wide enough that the padded grid wastes little.
    fn taps(&self) -> bool {
        self.groups == 1
            && self.sh == 1
            && self.sw == 1
            && self.dh == 1
            && self.dw == 1
            && !self.pointwise()
            && self.oh > 0
            && self.ow > 0
            && self.q() >= TAPS_MIN_COLUMNS
    }

    /// A 1x1, stride-1, unpadded convolution: the image already is its im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }

    /// Output columns `[lo, hi)` whose input column `ox*sw + kj*dw - pw` lies in `[0, w)`.
    fn cols(&self, kj: usize) -> (usize, usize) {
        valid_out_range(kj, self.dw, self.pw, self.sw, self.w, self.ow)
    }
}

/// Writes one group of one image, `[C/groups, H, W]`, into columns `off..off+P` of `col`
/// (`K` rows of `ld` values, row `(c, ki, kj)`).
fn im2col(g: &Geo, x: &[f32], col: &mut [f32], ld: usize, off: usize) {
    for c in 0..g.cg() {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (ylo, yhi) = valid_out_range(ki, g.dh, g.ph, g.sh, g.h, g.oh);
            for kj in 0..g.kw {
                let row = (c * g.kh + ki) * g.kw + kj;
                let dst = &mut col[row * ld + off..row * ld + off + g.p()];
                let (xlo, xhi) = g.cols(kj);
                dst[..ylo * g.ow].fill(0.0);
                dst[yhi * g.ow..].fill(0.0);
                for oy in ylo..yhi {
                    let iy = oy * g.sh + ki * g.dh - g.ph;
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    let d = &mut dst[oy * g.ow..(oy + 1) * g.ow];
                    d[..xlo].fill(0.0);
                    d[xhi..].fill(0.0);
                    if xlo < xhi {
                        let first = xlo * g.sw + kj * g.dw - g.pw;
                        if g.sw == 1 {
                            d[xlo..xhi].copy_from_slice(&src[first..first + (xhi - xlo)]);
                        } else {
                            for (j, v) in d[xlo..xhi].iter_mut().enumerate() {
                                *v = src[first + j * g.sw];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds columns `off..off+P` of `col` back onto one group of one image's gradient (the
/// adjoint of [`im2col`]).
fn col2im(g: &Geo, col: &[f32], ld: usize, off: usize, dx: &mut [f32]) {
    for c in 0..g.cg() {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (ylo, yhi) = valid_out_range(ki, g.dh, g.ph, g.sh, g.h, g.oh);
            for kj in 0..g.kw {
                let row = (c * g.kh + ki) * g.kw + kj;
                let src = &col[row * ld + off..row * ld + off + g.p()];
                let (xlo, xhi) = g.cols(kj);
                if xlo >= xhi {
                    continue;
                }
                for oy in ylo..yhi {
                    let iy = oy * g.sh + ki * g.dh - g.ph;
                    let d = &mut plane[iy * g.w..(iy + 1) * g.w];
                    let s = &src[oy * g.ow + xlo..oy * g.ow + xhi];
                    let first = xlo * g.sw + kj * g.dw - g.pw;
                    if g.sw == 1 {
                        for (a, b) in d[first..first + s.len()].iter_mut().zip(s) {
                            *a += *b;
                        }
                    } else {
                        for (j, b) in s.iter().enumerate() {
                            d[first + j * g.sw] += *b;
                        }
                    }
                }
            }
        }
    }
}

/// `dst [m, n] (+)= lhs [m, k] · rhs [k, n]`, every operand given by (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: &[f32],
    rhs_rs: isize,
    rhs_cs: isize,
    threads: gemm::Parallelism,
) {
    gemm_any(m, n, k, dst, n, accumulate, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, threads);
}

/// [`gemm`] with the destination's row stride given (`dst_rs` floats; columns contiguous).
#[allow(clippy::too_many_arguments)]
fn gemm_any(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: &[f32],
    rhs_rs: isize,
    rhs_cs: isize,
    threads: gemm::Parallelism,
) {
    assert!(m == 0 || n == 0 || dst.len() >= (m - 1) * dst_rs + n);
    // SAFETY: the destination is checked above; each operand is a slice starting at its first
    // element, and the callers' strides stay inside it (the per-tap shifts are at most
    // `(kh-1)·Wp + kw-1`, which `Geo::q` leaves room for).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            threads,
        );
    }
}

/// GEMM columns a block of images should give at least: a feature map of a few pixels (the
/// last stages of a ResNet) makes a per-image GEMM too thin to use the vector units well, so
/// such images are laid side by side in one im2col matrix.
const BLOCK_COLUMNS: usize = 512;

fn threads() -> usize {
    #[cfg(feature = "rayon")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "rayon"))]
    {
        1
    }
}

fn all_threads() -> gemm::Parallelism {
    #[cfg(feature = "rayon")]
    {
        gemm::Parallelism::Rayon(0)
    }
    #[cfg(not(feature = "rayon"))]
    {
        gemm::Parallelism::None
    }
}

/// How a batch is cut: `block` images per GEMM, `per_task` blocks per parallel task (`None`:
/// one block at a time, each GEMM using every thread).
struct Plan {
    block: usize,
    per_task: Option<usize>,
}

impl Plan {
    fn new(g: &Geo) -> Plan {
        let block = BLOCK_COLUMNS.div_ceil(g.p().max(1)).min(g.n.div_ceil(threads())).max(1);
        Plan::with_block(g, block)
    }

    /// One image per block (the per-tap path's GEMMs are wide enough on one image).
    fn per_image(g: &Geo) -> Plan {
        Plan::with_block(g, 1)
    }

    /// `block` images per block; one task per thread where there are blocks enough.
    fn with_block(g: &Geo, block: usize) -> Plan {
        let t = threads();
        let blocks = g.n.div_ceil(block);
        let per_task = (t > 1 && blocks >= t).then(|| blocks.div_ceil(t));
        Plan { block, per_task }
    }

    /// The image ranges of task `i`'s blocks.
    fn blocks(&self, g: &Geo, first_block: usize, count: usize) -> impl Iterator<Item = core::ops::Range<usize>> {
        let (block, n) = (self.block, g.n);
        (first_block..first_block + count).map(move |b| b * block..((b + 1) * block).min(n)).filter(|r| !r.is_empty())
    }

    /// Runs `f(images, scratch, parallelism)` on every block, in parallel tasks where the batch
    /// allows, and returns each task's result in task order. `scratch` is two buffers, of
    /// `K·block·P` floats (im2col columns; empty for a direct pointwise convolution) and
    /// `rows·block·P` (a side-by-side block of `rows` output rows, where blocks hold more than
    /// one image); their contents are whatever the last convolution left, and every caller
    /// writes before it reads.
    fn run<R: Send, F>(&self, g: &Geo, rows: usize, f: F) -> Vec<R>
    where
        F: Fn(&mut dyn Iterator<Item = core::ops::Range<usize>>, (&mut [f32], &mut [f32]), gemm::Parallelism) -> R + Sync,
    {
        let cols = self.block * g.p();
        let direct = self.block == 1 && g.pointwise();
        let lens = (if direct { 0 } else { g.k() * cols }, if self.block > 1 { rows * cols } else { 0 });
        self.run_with(g, lens, f)
    }

    /// [`Plan::run`] with scratch buffers of the given lengths.
    fn run_with<R: Send, F>(&self, g: &Geo, lens: (usize, usize), f: F) -> Vec<R>
    where
        F: Fn(&mut dyn Iterator<Item = core::ops::Range<usize>>, (&mut [f32], &mut [f32]), gemm::Parallelism) -> R + Sync,
    {
        let blocks = g.n.div_ceil(self.block);
        match self.per_task {
            #[cfg(feature = "rayon")]
            Some(per_task) => {
                use rayon::prelude::*;
                (0..blocks.div_ceil(per_task))
                    .into_par_iter()
                    .map(|task| {
                        let count = per_task.min(blocks - task * per_task);
                        with_scratch(lens, |s| f(&mut self.blocks(g, task * per_task, count), s, gemm::Parallelism::None))
                    })
                    .collect()
            }
            _ => vec![with_scratch(lens, |s| f(&mut self.blocks(g, 0, blocks), s, all_threads()))],
        }
    }
}

#[cfg(feature = "std")]
std::thread_local! {
    static SCRATCH: core::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { core::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Two scratch buffers of the given lengths. Each thread keeps its own across convolutions:
/// fresh ones cost a page fault and the kernel's zeroing per 4 KiB on every call, which a
/// profile of a ResNet-18 training step put at about 8 % of the time.
fn with_scratch<R>(lens: (usize, usize), f: impl FnOnce((&mut [f32], &mut [f32])) -> R) -> R {
    #[cfg(feature = "std")]
    {
        let mut f = Some(f);
        let reused = SCRATCH.with(|cell| {
            // Busy only if this thread re-entered a convolution while waiting on one (a rayon
            // worker stealing work): then this call allocates its own.
            let mut pair = cell.try_borrow_mut().ok()?;
            let (a, b) = &mut *pair;
            if a.len() < lens.0 {
                a.resize(lens.0, 0.0);
            }
            if b.len() < lens.1 {
                b.resize(lens.1, 0.0);
            }
            Some((f.take().unwrap())((&mut a[..lens.0], &mut b[..lens.1])))
        });
        if let Some(r) = reused {
            return r;
        }
        let (mut a, mut b) = (vec![0.0f32; lens.0], vec![0.0f32; lens.1]);
        (f.take().unwrap())((&mut a, &mut b))
    }
    #[cfg(not(feature = "std"))]
    {
        let (mut a, mut b) = (vec![0.0f32; lens.0], vec![0.0f32; lens.1]);
        f((&mut a, &mut b))
    }
}

/// Copies images `images` of a `[N, rows, P]` tensor (rows `r0..r0+rows_n` of each) side by
/// side into `[rows_n, len*P]`.
fn gather(src: &[f32], rows: usize, p: usize, images: &core::ops::Range<usize>, r0: usize, rows_n: usize, dst: &mut [f32]) {
    let ld = images.len() * p;
    for (j, i) in images.clone().enumerate() {
        for r in 0..rows_n {
            let s = (i * rows + r0 + r) * p;
            dst[r * ld + j * p..r * ld + (j + 1) * p].copy_from_slice(&src[s..s + p]);
        }
    }
}

/// A raw pointer that may cross threads: each task writes a disjoint range of the buffer.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// SAFETY: the caller guarantees `[start, start+len)` is in bounds and written by one
    /// task only.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        unsafe { core::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

fn tensor(data: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(Shape::from(shape.to_vec())), DType::F32)
}

/// Forward pass; `None` when this module does not handle the case (grouped convolutions
/// included: burn-flex's depthwise kernel is faster than a GEMM per channel).
pub(crate) fn conv2d(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    options: &ConvOptions<2>,
) -> Option<FlexTensor> {
    let g = Geo::new(x, weight, options)?;
    if g.groups != 1 {
        return None;
    }
    let x = x.to_contiguous();
    let weight = weight.to_contiguous();
    let bias = bias.map(|b| b.to_contiguous());
    if g.taps() && taps_enabled() {
        let bd: Option<&[f32]> = bias.as_ref().map(|b| b.storage());
        return Some(taps::forward(&g, x.storage(), weight.storage(), bd));
    }
    let (xd, wd): (&[f32], &[f32]) = (x.storage(), weight.storage());
    let bd: Option<&[f32]> = bias.as_ref().map(|b| b.storage());
    let (k, p) = (g.k(), g.p());
    let plan = Plan::new(&g);
    let mut out = vec![0.0f32; g.n * g.o * p];
    let dst = Out(out.as_mut_ptr());
    let direct = plan.block == 1 && g.pointwise();
    // The bias is added by the task that wrote the image, while its output is still in cache
    // (inference folds batch norm into this bias: `mica_cnn::norm::conv_bn`).
    let add_bias = |yi: &mut [f32]| {
        if let Some(bd) = bd {
            for (o, row) in yi.chunks_mut(p).enumerate() {
                row.iter_mut().for_each(|v| *v += bd[o]);
            }
        }
    };
    plan.run(
        &g,
        g.o,
        |blocks, (col, tmp), threads| {
            for images in blocks {
                let ld = images.len() * p;
                if !direct {
                    for (j, i) in images.clone().enumerate() {
                        im2col(&g, &xd[i * g.image()..(i + 1) * g.image()], col, ld, j * p);
                    }
                }
                let rhs: &[f32] = if direct { &xd[images.start * g.image()..images.end * g.image()] } else { col };
                if images.len() == 1 {
                    // SAFETY: this block's output rows are written by this task only.
                    let yi = unsafe { dst.slice(images.start * g.o * p, g.o * p) };
                    gemm(g.o, p, k, yi, false, wd, k as isize, 1, rhs, ld as isize, 1, threads);
                    add_bias(yi);
                } else {
                    gemm(g.o, ld, k, tmp, false, wd, k as isize, 1, rhs, ld as isize, 1, threads);
                    for (j, i) in images.clone().enumerate() {
                        // SAFETY: as above.
                        let yi = unsafe { dst.slice(i * g.o * p, g.o * p) };
                        for o in 0..g.o {
                            yi[o * p..(o + 1) * p].copy_from_slice(&tmp[o * ld + j * p..o * ld + (j + 1) * p]);
                        }
                        add_bias(yi);
                    }
                }
            }
        },
    );
    Some(tensor(out, [g.n, g.o, g.oh, g.ow]))
}

/// Gradient with respect to the input; `None` when this module does not handle the case.
pub(crate) fn conv2d_x_backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    output_grad: &FlexTensor,
    options: &ConvOptions<2>,
) -> Option<FlexTensor> {
    let g = Geo::new(x, weight, options)?;
    let weight = weight.to_contiguous();
    let dy = output_grad.to_contiguous();
    let (wd, dyd): (&[f32], &[f32]) = (weight.storage(), dy.storage());
    if g.taps() && taps_enabled() {
        return Some(taps::x_backward(&g, wd, dyd));
    }
    let (k, p, og, gin) = (g.k(), g.p(), g.og(), g.cg() * g.h * g.w);
    let plan = Plan::new(&g);
    let mut dx = vec![0.0f32; g.n * g.image()];
    let dst = Out(dx.as_mut_ptr());
    let direct = plan.block == 1 && g.pointwise();
    plan.run(
        &g,
        og,
        |blocks, (col, dyg), threads| {
            for images in blocks {
                let ld = images.len() * p;
                for gi in 0..g.groups {
                    let wg = &wd[gi * og * k..(gi + 1) * og * k];
                    let rhs: &[f32] = if images.len() == 1 {
                        let i = images.start;
                        &dyd[(i * g.o + gi * og) * p..(i * g.o + (gi + 1) * og) * p]
                    } else {
                        gather(dyd, g.o, p, &images, gi * og, og, dyg);
                        dyg
                    };
                    // W_gᵀ [K, O/groups]: element (kk, oo) is w_g[oo*K + kk].
                    if direct {
                        // SAFETY: image i's gradient is written by this task only.
                        let dxi = unsafe { dst.slice(images.start * g.image() + gi * gin, gin) };
                        gemm(k, p, og, dxi, false, wg, 1, k as isize, rhs, p as isize, 1, threads);
                        continue;
                    }
                    gemm(k, ld, og, col, false, wg, 1, k as isize, rhs, ld as isize, 1, threads);
                    for (j, i) in images.clone().enumerate() {
                        // SAFETY: as above.
                        let dxi = unsafe { dst.slice(i * g.image() + gi * gin, gin) };
                        col2im(&g, col, ld, j * p, dxi);
                    }
                }
            }
        },
    );
    Some(tensor(dx, [g.n, g.c, g.h, g.w]))
}

/// Gradient with respect to the weight; `None` when this module does not handle the case.
pub(crate) fn conv2d_weight_backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    output_grad: &FlexTensor,
    options: &ConvOptions<2>,
) -> Option<FlexTensor> {
    let g = Geo::new(x, weight, options)?;
    let x = x.to_contiguous();
    let dy = output_grad.to_contiguous();
    let (xd, dyd): (&[f32], &[f32]) = (x.storage(), dy.storage());
    if g.taps() && taps_enabled() {
        return Some(taps::weight_backward(&g, xd, dyd));
    }
    let (k, p, og, gin) = (g.k(), g.p(), g.og(), g.cg() * g.h * g.w);
    let plan = Plan::new(&g);
    let direct = plan.block == 1 && g.pointwise();
    // One partial sum per task, added in task order.
    let parts = plan.run(
        &g,
        og,
        |blocks, (col, dyg), threads| {
            let mut acc = vec![0.0f32; g.o * k];
            for (b, images) in blocks.enumerate() {
                let ld = images.len() * p;
                for gi in 0..g.groups {
                    let rhs: &[f32] = if direct {
                        let i = images.start;
                        &xd[i * g.image() + gi * gin..i * g.image() + (gi + 1) * gin]
                    } else {
                        for (j, i) in images.clone().enumerate() {
                            im2col(&g, &xd[i * g.image() + gi * gin..], col, ld, j * p);
                        }
                        col
                    };
                    let lhs: &[f32] = if images.len() == 1 {
                        let i = images.start;
                        &dyd[(i * g.o + gi * og) * p..(i * g.o + (gi + 1) * og) * p]
                    } else {
                        gather(dyd, g.o, p, &images, gi * og, og, dyg);
                        dyg
                    };
                    let accg = &mut acc[gi * og * k..(gi + 1) * og * k];
                    // col(x)ᵀ [P, K]: element (pp, kk) is col[kk*ld + pp].
                    gemm(og, k, ld, accg, b > 0, lhs, ld as isize, 1, rhs, 1, ld as isize, threads);
                }
            }
            acc
        },
    );
    Some(tensor(sum_in_order(parts, g.o * k), [g.o, g.cg(), g.kh, g.kw]))
}

/// The tasks' partial weight gradients added in task order (so a run is deterministic for a
/// thread count); zeros of `len` when there were no tasks.
fn sum_in_order(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut parts = parts.into_iter();
    let mut sum = parts.next().unwrap_or_else(|| vec![0.0; len]);
    for part in parts {
        sum.iter_mut().zip(&part).for_each(|(a, b)| *a += *b);
    }
    sum
}

/// Padded rows at least this long take the per-tap path ([`taps`]); shorter ones (the 8x8
/// and 4x4 stages of a ResNet at 128 px) keep im2col with images side by side.
const TAPS_MIN_COLUMNS: usize = 256;

/// True unless `MICA_FLEX_IM2COL_ONLY=1` (for the benchmark's A/B of the per-tap path).
#[cfg(feature = "std")]
fn taps_enabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*OFF.get_or_init(|| std::env::var_os("MICA_FLEX_IM2COL_ONLY").is_some_and(|v| v == "1"))
}

#[cfg(not(feature = "std"))]
fn taps_enabled() -> bool {
    true
}

/// Stride-1 convolutions without im2col.
///
/// On one zero-padded image `[C, Hp, Wp]`, output pixel (oy, ox) placed at column
/// `q = oy·Wp + ox` reads tap (ky, kx) from padded pixel `q + ky·Wp + kx` of every channel. So
/// each tap is one GEMM against the padded image shifted by a constant, with no copy:
///
/// - forward:      `y [O, Q] = Σ_tap W_tap [O, C] · x_pad[shift..] [C, Q]`
/// - weight grad:  `dW_tap [O, C] = Σ_n dy_pad [O, Q] · x_pad[shift..]ᵀ [Q, C]`
/// - input grad:   `dx_pad[shift..] [C, Q] += W_tapᵀ [C, O] · dy_pad [O, Q]`
///
/// where the columns with `ox >= ow` fall on the padding: the forward pass drops them and the
/// backward passes set `dy` there to zero. im2col writes and reads a `kh·kw` times larger
/// buffer through memory; here each GEMM reads the image from cache (the first two stages of
/// a ResNet-18 at 128 px, and the small CNN's wide layers: MICA-PATCH.md).
mod taps {
    use super::{Geo, Out, Plan, gemm_any, sum_in_order, tensor};
    use alloc::vec;
    use crate::FlexTensor;

    /// Copies image `[C, H, W]` into the middle of `xp` `[C, Hp, Wp]`, zeros around it.
    fn pad(g: &Geo, x: &[f32], xp: &mut [f32]) {
        let (hp, wp) = (g.hp(), g.wp());
        xp.fill(0.0);
        for c in 0..g.c {
            for y in 0..g.h {
                let s = &x[(c * g.h + y) * g.w..][..g.w];
                xp[(c * hp + y + g.ph) * wp + g.pw..][..g.w].copy_from_slice(s);
            }
        }
    }

    /// Spreads `dy` `[O, oh, ow]` over `[O, Q]` at `oy·Wp + ox`, zeros in between.
    fn spread(g: &Geo, dy: &[f32], dq: &mut [f32]) {
        let (q, wp) = (g.q(), g.wp());
        dq.fill(0.0);
        for o in 0..g.o {
            for oy in 0..g.oh {
                dq[o * q + oy * wp..][..g.ow].copy_from_slice(&dy[(o * g.oh + oy) * g.ow..][..g.ow]);
            }
        }
    }

    fn shift(g: &Geo, tap: usize) -> usize {
        (tap / g.kw) * g.wp() + tap % g.kw
    }

    pub(super) fn forward(g: &Geo, xd: &[f32], wd: &[f32], bd: Option<&[f32]>) -> FlexTensor {
        let (q, k, taps, plane) = (g.q(), g.k(), g.kh * g.kw, g.hp() * g.wp());
        let plan = Plan::per_image(g);
        let mut out = vec![0.0f32; g.n * g.o * g.p()];
        let dst = Out(out.as_mut_ptr());
        plan.run_with(g, (g.c * plane, g.o * q), |blocks, (xp, yq), threads| {
            for i in blocks.flatten() {
                pad(g, &xd[i * g.image()..][..g.image()], xp);
                for tap in 0..taps {
                    // W_tap: element (o, c) is w[o·K + c·taps + tap].
                    gemm_any(g.o, q, g.c, yq, q, tap > 0, &wd[tap..], k as isize, taps as isize, &xp[shift(g, tap)..], plane as isize, 1, threads);
                }
                // SAFETY: image i's output is written by this task only.
                let yi = unsafe { dst.slice(i * g.o * g.p(), g.o * g.p()) };
                for o in 0..g.o {
                    let b = bd.map_or(0.0, |b| b[o]);
                    for oy in 0..g.oh {
                        let (d, s) = (&mut yi[(o * g.oh + oy) * g.ow..][..g.ow], &yq[o * q + oy * g.wp()..][..g.ow]);
                        d.iter_mut().zip(s).for_each(|(d, s)| *d = s + b);
                    }
                }
            }
        });
        tensor(out, [g.n, g.o, g.oh, g.ow])
    }

    pub(super) fn x_backward(g: &Geo, wd: &[f32], dyd: &[f32]) -> FlexTensor {
        let (q, k, taps, plane) = (g.q(), g.k(), g.kh * g.kw, g.hp() * g.wp());
        let plan = Plan::per_image(g);
        let mut dx = vec![0.0f32; g.n * g.image()];
        let dst = Out(dx.as_mut_ptr());
        plan.run_with(g, (g.o * q, g.c * plane), |blocks, (dq, dxp), threads| {
            for i in blocks.flatten() {
                spread(g, &dyd[i * g.o * g.p()..][..g.o * g.p()], dq);
                dxp.fill(0.0);
                for tap in 0..taps {
                    // W_tapᵀ: element (c, o) is w[o·K + c·taps + tap].
                    gemm_any(g.c, q, g.o, &mut dxp[shift(g, tap)..], plane, true, &wd[tap..], taps as isize, k as isize, dq, q as isize, 1, threads);
                }
                // SAFETY: image i's gradient is written by this task only.
                let dxi = unsafe { dst.slice(i * g.image(), g.image()) };
                for c in 0..g.c {
                    for y in 0..g.h {
                        dxi[(c * g.h + y) * g.w..][..g.w].copy_from_slice(&dxp[(c * g.hp() + y + g.ph) * g.wp() + g.pw..][..g.w]);
                    }
                }
            }
        });
        tensor(dx, [g.n, g.c, g.h, g.w])
    }

    pub(super) fn weight_backward(g: &Geo, xd: &[f32], dyd: &[f32]) -> FlexTensor {
        let (q, taps, plane) = (g.q(), g.kh * g.kw, g.hp() * g.wp());
        let plan = Plan::per_image(g);
        // One partial sum per task, `[taps, O, C]`, added in task order.
        let parts = plan.run_with(g, (g.c * plane, g.o * q), |blocks, (xp, dq), threads| {
            let mut acc = vec![0.0f32; taps * g.o * g.c];
            for i in blocks.flatten() {
                pad(g, &xd[i * g.image()..][..g.image()], xp);
                spread(g, &dyd[i * g.o * g.p()..][..g.o * g.p()], dq);
                for tap in 0..taps {
                    // x_pad[shift..]ᵀ: element (q, c) is xp[shift + c·plane + q].
                    let a = &mut acc[tap * g.o * g.c..][..g.o * g.c];
                    gemm_any(g.o, g.c, q, a, g.c, true, dq, q as isize, 1, &xp[shift(g, tap)..], 1, plane as isize, threads);
                }
            }
            acc
        });
        let sum = sum_in_order(parts, taps * g.o * g.c);
        let mut dw = vec![0.0f32; g.o * g.c * taps];
        for tap in 0..taps {
            for o in 0..g.o {
                for c in 0..g.c {
                    dw[(o * g.c + c) * taps + tap] = sum[(tap * g.o + o) * g.c + c];
                }
            }
        }
        tensor(dw, [g.o, g.c, g.kh, g.kw])
    }
}

// burn's default backward passes, for other dtypes and `MICA_FLEX_STOCK_CONV=1`. Copied from
// burn-backend 0.21.0 `ops::modules::conv` (`conv2d_x_backward`, `conv2d_weight_backward`,
// `conv2d_weight_grad_no_groups`, `conv2d_weight_grad_groups`), where they are crate-private,
// with `B = Flex`.

use crate::Flex;
use burn_backend::TensorMetadata;
use burn_backend::ops::{ConvTransposeOptions, FloatTensorOps, ModuleOps};
use burn_std::Slice;

pub(crate) fn stock_x_backward(
    x: FlexTensor,
    weight: FlexTensor,
    output_grad: FlexTensor,
    options: ConvOptions<2>,
) -> FlexTensor {
    use burn_backend::ops::conv::calculate_padding_out;
    let [_, _, height_in, width_in] = x.shape().dims();
    let [_, _, height_out, width_out] = output_grad.shape().dims();
    let [_, _, k1, k2] = weight.shape().dims();
    let p1 = calculate_padding_out(k1, options.stride[0], options.padding[0], options.dilation[0], height_in, height_out);
    let p2 = calculate_padding_out(k2, options.stride[1], options.padding[1], options.dilation[1], width_in, width_out);
    Flex::conv_transpose2d(
        output_grad,
        weight,
        None,
        ConvTransposeOptions::new(options.stride, options.padding, [p1, p2], options.dilation, options.groups),
    )
}

pub(crate) fn stock_weight_backward(
    x: FlexTensor,
    weight: FlexTensor,
    output_grad: FlexTensor,
    options: ConvOptions<2>,
) -> FlexTensor {
    let weight_shape = weight.shape();
    let [channels_out, increment_ci, k1, k2] = weight_shape.dims();
    let inner = ConvOptions::new(options.dilation, options.padding, options.stride, 1);
    let x_swapped = Flex::float_swap_dims(x, 0, 1);
    let output_grad_swapped = Flex::float_swap_dims(output_grad, 0, 1);
    let crop = |t: FlexTensor, co: usize| {
        let [_, _, t1, t2] = t.shape().dims();
        if t1 != k1 || t2 != k2 {
            Flex::float_slice(t, &[Slice::from(0..co), Slice::from(0..increment_ci), Slice::from(0..k1), Slice::from(0..k2)])
        } else {
            t
        }
    };
    if options.groups == 1 {
        let g = Flex::conv2d(x_swapped, output_grad_swapped, None, inner);
        return crop(Flex::float_swap_dims(g, 0, 1), channels_out);
    }
    let increment_co = channels_out / options.groups;
    let mut weight_grad = Flex::float_zeros(weight_shape, &Default::default(), weight.dtype().into());
    for g in 0..options.groups {
        let (ci, co) = (g * increment_ci, g * increment_co);
        let x = Flex::float_slice(x_swapped.clone(), &[Slice::new(ci as isize, Some((ci + increment_ci) as isize), 1)]);
        let grad = Flex::float_slice(output_grad_swapped.clone(), &[Slice::new(co as isize, Some((co + increment_co) as isize), 1)]);
        let tmp = crop(Flex::float_swap_dims(Flex::conv2d(x, grad, None, inner.clone()), 0, 1), increment_co);
        weight_grad = Flex::float_slice_assign(
            weight_grad,
            &[Slice::from(co..co + increment_co), Slice::from(0..increment_ci), Slice::from(0..k1), Slice::from(0..k2)],
            tmp,
        );
    }
    weight_grad
}
