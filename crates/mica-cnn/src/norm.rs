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

use burn::nn::BatchNorm;
use burn::prelude::*;

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

        let momentum = bn.momentum;
        let running_mean = bn.running_mean.value_sync().to_device(&device);
        let running_var = bn.running_var.value_sync().to_device(&device);
        bn.running_mean.update(
            running_mean
                .mul_scalar(1.0 - momentum)
                .add(mean.detach().mul_scalar(momentum).reshape([channels]))
                .detach(),
        );
        bn.running_var.update(
            running_var
                .mul_scalar(1.0 - momentum)
                .add(var.clone().detach().mul_scalar(momentum).reshape([channels]))
                .detach(),
        );

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

        reference
            .running_mean
            .value()
            .to_data()
            .assert_approx_eq::<f32>(&ours.running_mean.value().to_data(), Tolerance::absolute(1e-6));
        reference
            .running_var
            .value()
            .to_data()
            .assert_approx_eq::<f32>(&ours.running_var.value().to_data(), Tolerance::absolute(1e-6));

        // Inference (no autodiff) uses the running statistics in both.
        let inner_ref = reference.valid();
        let inner_ours = ours.valid();
        let x = input::<CpuBackend>(&device);
        batch_norm(&inner_ours, x.clone())
            .to_data()
            .assert_approx_eq::<f32>(&inner_ref.forward(x).to_data(), Tolerance::absolute(1e-5));
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
