//! Batch normalisation written so burn-flex stays on its fast paths.
//!
//! burn's own `BatchNorm::forward` broadcasts per-channel statistics shaped `[1, C, 1, 1]`
//! over `[B, C, H, W]` and transposes the input to `[C, B*H*W]` to reduce it. burn-flex 0.21
//! has SIMD kernels only for broadcasts whose outer dims walk the smaller tensor contiguously,
//! so both steps fell back to its scalar strided iterator: profiling a training step of the
//! small CNN (`perf record`, 64 px, batch 32) put 60 % of the time in
//! `StridedIter::next` under `BatchNorm::forward` and its backward pass, on one core.
//! Here the statistics are reduced along the trailing (contiguous) dims first and then
//! materialised as `[B, C, 1, 1]`, which flex's "per-row scalar" kernel handles. The maths,
//! the parameters and the running-statistics update are exactly burn's (biased variance,
//! momentum 0.1 by default), so checkpoints and torchvision imports are unaffected; a test
//! compares the two implementations.

use std::any::Any;
use std::cell::RefCell;

use burn::module::RunningState;
use burn::nn::BatchNorm;
use burn::prelude::*;

thread_local! {
    /// Set while a data-parallel training worker runs its share of a batch (see
    /// [`deferring_running_stats`]): batch-norm calls then record their batch statistics here
    /// instead of updating the running statistics.
    static DEFERRED: RefCell<Option<Vec<Box<dyn Any + Send>>>> = const { RefCell::new(None) };
}

/// One training-mode batch-norm call's statistics, kept until the whole batch is known.
struct BatchStats<B: Backend> {
    running_mean: RunningState<Tensor<B, 1>>,
    running_var: RunningState<Tensor<B, 1>>,
    momentum: f64,
    /// Values per channel the statistics were taken over (batch x height x width).
    n: usize,
    mean: Tensor<B, 1>,
    /// Biased, as burn's.
    var: Tensor<B, 1>,
}

/// Batch statistics recorded by one worker, in call order; see [`deferring_running_stats`].
pub(crate) struct DeferredStats(Vec<Box<dyn Any + Send>>);

/// Runs `f` (a forward pass over part of a batch) with every batch-norm running-statistics
/// update deferred, and returns what it recorded.
///
/// Data-parallel training splits a batch between workers on their own threads. Each worker's
/// forward pass normalises with its own part's statistics, but the running statistics must
/// move once per batch, from the whole batch's statistics and in the same order on every run:
/// letting each worker update them (burn keeps one pending value per thread and averages them)
/// would make the result depend on thread timing. [`apply_deferred`] folds the parts together.
pub(crate) fn deferring_running_stats<R>(f: impl FnOnce() -> R) -> (R, DeferredStats) {
    DEFERRED.with(|d| *d.borrow_mut() = Some(Vec::new()));
    // Cleared even if `f` panics, so the thread (a pool worker) is left as it was.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            DEFERRED.with(|d| d.borrow_mut().take());
        }
    }
    let reset = Reset;
    let out = f();
    let recorded = DEFERRED.with(|d| d.borrow_mut().take()).unwrap_or_default();
    drop(reset);
    (out, DeferredStats(recorded))
}

/// Updates the running statistics from the parts of one batch that workers recorded with
/// [`deferring_running_stats`], as one batch-norm call over the whole batch would have: the
/// pooled mean, and the pooled biased variance (within-part plus between-part).
///
/// Every part must come from the same model, so the calls line up one to one.
pub(crate) fn apply_deferred<B: Backend>(parts: Vec<DeferredStats>) {
    let mut parts: Vec<std::vec::IntoIter<Box<dyn Any + Send>>> = parts.into_iter().map(|p| p.0.into_iter()).collect();
    let Some((first, rest)) = parts.split_first_mut() else {
        return;
    };
    for call in first.by_ref() {
        let call = *call.downcast::<BatchStats<B>>().expect("batch statistics of the training backend");
        let others: Vec<BatchStats<B>> = rest
            .iter_mut()
            .map(|p| {
                *p.next()
                    .expect("every worker ran the same layers")
                    .downcast::<BatchStats<B>>()
                    .expect("batch statistics of the training backend")
            })
            .collect();
        let total: usize = call.n + others.iter().map(|o| o.n).sum::<usize>();
        let all = || std::iter::once(&call).chain(others.iter());
        let mean = all()
            .map(|p| p.mean.clone().mul_scalar(p.n as f64 / total as f64))
            .reduce(|a, b| a + b)
            .expect("one part at least");
        let var = all()
            .map(|p| (p.var.clone() + (p.mean.clone() - mean.clone()).square()).mul_scalar(p.n as f64 / total as f64))
            .reduce(|a, b| a + b)
            .expect("one part at least");
        update_running(&call.running_mean, &call.running_var, call.momentum, mean, var);
    }
}

/// burn's running-statistics update: `running = (1 - momentum) * running + momentum * batch`.
fn update_running<B: Backend>(
    running_mean: &RunningState<Tensor<B, 1>>,
    running_var: &RunningState<Tensor<B, 1>>,
    momentum: f64,
    mean: Tensor<B, 1>,
    var: Tensor<B, 1>,
) {
    let device = mean.device();
    let old_mean = running_mean.value_sync().to_device(&device);
    let old_var = running_var.value_sync().to_device(&device);
    running_mean.update(old_mean.mul_scalar(1.0 - momentum).add(mean.mul_scalar(momentum)).detach());
    running_var.update(old_var.mul_scalar(1.0 - momentum).add(var.mul_scalar(momentum)).detach());
}

/// Batch-norm forward with burn's semantics: batch statistics (and a running-statistics
/// update) when autodiff is enabled, running statistics otherwise.
pub fn batch_norm<B: Backend>(bn: &BatchNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, channels, h, w] = x.dims();
    let device = x.device();
    if B::ad_enabled(&device) {
        let n = (batch * h * w) as f64;
        let mean = x.clone().sum_dim(3).sum_dim(2).sum_dim(0).div_scalar(n); // [1, C, 1, 1]
        let centred = x - mean.clone().repeat_dim(0, batch);
        let var = centred
            .clone()
            .square()
            .sum_dim(3)
            .sum_dim(2)
            .sum_dim(0)
            .div_scalar(n);

        let batch_mean = mean.detach().reshape([channels]);
        let batch_var = var.clone().detach().reshape([channels]);
        let stats = BatchStats {
            running_mean: bn.running_mean.clone(),
            running_var: bn.running_var.clone(),
            momentum: bn.momentum,
            n: batch * h * w,
            mean: batch_mean,
            var: batch_var,
        };
        let deferred = DEFERRED.with(|d| match d.borrow_mut().as_mut() {
            Some(list) => {
                list.push(Box::new(stats) as Box<dyn Any + Send>);
                None
            }
            None => Some(stats),
        });
        if let Some(st) = deferred {
            update_running(&st.running_mean, &st.running_var, st.momentum, st.mean, st.var);
        }

        let scale = bn.gamma.val().reshape([1, channels, 1, 1]) / var.add_scalar(bn.epsilon).sqrt();
        let shift = bn.beta.val().reshape([1, channels, 1, 1]);
        centred * scale.repeat_dim(0, batch) + shift.repeat_dim(0, batch)
    } else {
        // Fold everything into one per-channel scale and shift: y = x * s + t.
        let mean = bn.running_mean.value().to_device(&device);
        let var = bn.running_var.value().to_device(&device);
        let scale = bn.gamma.val() / var.add_scalar(bn.epsilon).sqrt();
        let shift = bn.beta.val() - mean * scale.clone();
        let scale = scale.reshape([1, channels, 1, 1]).repeat_dim(0, batch);
        let shift = shift.reshape([1, channels, 1, 1]).repeat_dim(0, batch);
        x * scale + shift
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuBackend, CpuTrainBackend};
    use burn::module::AutodiffModule;
    use burn::nn::BatchNormConfig;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    fn input<B: Backend>(device: &B::Device) -> Tensor<B, 4> {
        let v: Vec<f32> = (0..3 * 5 * 4 * 6).map(|i| ((i * 37 % 101) as f32) / 17.0 - 2.0).collect();
        Tensor::from_data(TensorData::new(v, [3, 5, 4, 6]), device)
    }

    /// Running mean and variance of `a` and `b` agree. `value_sync`, not `value`: the latter
    /// can still hold the value before the last update.
    fn assert_same_running_stats<B: Backend>(a: &BatchNorm<B>, b: &BatchNorm<B>, tolerance: f64) {
        for (x, y) in [(&a.running_mean, &b.running_mean), (&a.running_var, &b.running_var)] {
            x.value_sync()
                .to_data()
                .assert_approx_eq::<f32>(&y.value_sync().to_data(), Tolerance::absolute(tolerance));
        }
    }

    #[test]
    fn training_forward_backward_and_running_stats_match_burn() {
        let device = Default::default();
        // Two independent modules (a clone would share its running-state cell) with equal,
        // non-trivial affine parameters.
        let gamma = Tensor::<CpuBackend, 1>::random([5], Distribution::Uniform(0.5, 1.5), &device).into_data();
        let beta = Tensor::<CpuBackend, 1>::random([5], Distribution::Uniform(-0.5, 0.5), &device).into_data();
        let make = || {
            let mut m = BatchNormConfig::new(5).init::<CpuTrainBackend>(&device);
            m.gamma = m.gamma.map(|_| Tensor::from_data(gamma.clone(), &device).require_grad());
            m.beta = m.beta.map(|_| Tensor::from_data(beta.clone(), &device).require_grad());
            m
        };
        let reference = make();
        let ours = make();

        let x1 = input::<CpuTrainBackend>(&device).require_grad();
        let x2 = input::<CpuTrainBackend>(&device).require_grad();
        let weights = input::<CpuTrainBackend>(&device).mul_scalar(0.3);
        let y_ref = reference.forward(x1.clone());
        let y_ours = batch_norm(&ours, x2.clone());
        y_ours.to_data().assert_approx_eq::<f32>(&y_ref.to_data(), Tolerance::absolute(1e-5));

        let g_ref = (y_ref * weights.clone()).sum().backward();
        let g_ours = (y_ours * weights).sum().backward();
        x2.grad(&g_ours)
            .unwrap()
            .to_data()
            .assert_approx_eq::<f32>(&x1.grad(&g_ref).unwrap().to_data(), Tolerance::absolute(1e-4));
        let gamma_ref = reference.gamma.val().grad(&g_ref).unwrap();
        let gamma_ours = ours.gamma.val().grad(&g_ours).unwrap();
        gamma_ours.to_data().assert_approx_eq::<f32>(&gamma_ref.to_data(), Tolerance::absolute(1e-4));

        assert_same_running_stats(&ours, &reference, 1e-6);

        // Inference (no autodiff) uses the running statistics in both.
        let inner_ref = reference.valid();
        let inner_ours = ours.valid();
        let x = input::<CpuBackend>(&device);
        batch_norm(&inner_ours, x.clone())
            .to_data()
            .assert_approx_eq::<f32>(&inner_ref.forward(x).to_data(), Tolerance::absolute(1e-5));
    }

    /// A batch split between two workers (on their own threads, as data-parallel training
    /// runs them) moves the running statistics exactly as one call over the whole batch does,
    /// and leaves them alone until the parts are applied.
    #[test]
    fn deferred_parts_update_running_stats_as_the_whole_batch() {
        let device = Default::default();
        let whole = BatchNormConfig::new(5).init::<CpuTrainBackend>(&device);
        let split = BatchNormConfig::new(5).init::<CpuTrainBackend>(&device);
        // Uneven parts (2 + 1 of 3 images) with different means, so the between-part variance
        // counts.
        let per_image = 5 * 4 * 6;
        let v: Vec<f32> = (0..3 * per_image)
            .map(|i| ((i * 37 % 101) as f32) / 17.0 - 2.0 + if i >= 2 * per_image { 3.0 } else { 0.0 })
            .collect();
        let x = Tensor::<CpuTrainBackend, 4>::from_data(TensorData::new(v, [3, 5, 4, 6]), &device);
        let _ = batch_norm(&whole, x.clone());
        let before = split.running_mean.value().into_data();
        let parts: Vec<DeferredStats> = [0..2, 2..3]
            .into_iter()
            .map(|rows| {
                let (bn, part) = (split.clone(), x.clone().slice([rows]));
                std::thread::spawn(move || deferring_running_stats(|| drop(batch_norm(&bn, part))).1).join().unwrap()
            })
            .collect();
        assert_eq!(split.running_mean.value().into_data(), before, "workers must not update running stats");
        apply_deferred::<CpuTrainBackend>(parts);
        assert_same_running_stats(&split, &whole, 1e-5);
        // And away from the deferral, a call updates them at once again.
        let _ = batch_norm(&split, x.clone());
        let _ = batch_norm(&whole, x);
        assert_same_running_stats(&split, &whole, 1e-5);
    }

    /// The vendored burn-flex's fast copy of permuted tensors (vendor/burn-flex/MICA-PATCH.md)
    /// must give exactly the row-major copy that index arithmetic gives.
    #[test]
    fn permuted_copies_match_index_arithmetic() {
        let device = Default::default();
        let dims = [3usize, 4, 5, 6];
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let x = Tensor::<CpuBackend, 4>::from_data(TensorData::new(v.clone(), dims), &device);
        // The expected copy: walk `ranges` (of the source dims) in the order `perm`, outermost
        // first, optionally reading source dim 0 backwards (a flipped view).
        let walk = |perm: [usize; 4], ranges: [std::ops::Range<usize>; 4], flip0: bool| {
            let mut out = Vec::new();
            let r = |d: usize| ranges[perm[d]].clone();
            for i0 in r(0) {
                for i1 in r(1) {
                    for i2 in r(2) {
                        for i3 in r(3) {
                            let mut i = [0usize; 4];
                            (i[perm[0]], i[perm[1]], i[perm[2]], i[perm[3]]) = (i0, i1, i2, i3);
                            if flip0 {
                                i[0] = dims[0] - 1 - i[0];
                            }
                            out.push(v[((i[0] * dims[1] + i[1]) * dims[2] + i[2]) * dims[3] + i[3]]);
                        }
                    }
                }
            }
            out
        };
        let flat = |t: Tensor<CpuBackend, 4>| {
            let m = t.dims().iter().product::<usize>();
            t.reshape([m]).into_data().to_vec::<f32>().unwrap()
        };
        let all = [0..3, 0..4, 0..5, 0..6];

        // swap_dims(0, 1): the conv weight-gradient layout, innermost run contiguous.
        assert_eq!(flat(x.clone().swap_dims(0, 1)), walk([1, 0, 2, 3], all.clone(), false));
        // A sliced (offset) view with its outer dims reordered: innermost run of 3.
        let ranges = [1..3, 0..4, 1..4, 2..5];
        let view = x.clone().slice(ranges.clone()).permute([2, 0, 1, 3]);
        assert_eq!(flat(view), walk([2, 0, 1, 3], ranges, false));
        // The innermost dim permuted away, and a flipped view: the general path, still right.
        assert_eq!(flat(x.clone().permute([3, 1, 2, 0])), walk([3, 1, 2, 0], all.clone(), false));
        assert_eq!(flat(x.flip([0]).swap_dims(0, 1)), walk([1, 0, 2, 3], all, true));
    }
}
