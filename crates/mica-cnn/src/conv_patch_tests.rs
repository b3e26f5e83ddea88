//! The vendored burn-flex computes 2-D convolutions and both of their gradients as GEMMs over
//! an im2col buffer (vendor/burn-flex/MICA-PATCH.md). These tests hold all three passes to a
//! direct loop over the convolution's definition, in f64, on geometries that exercise every
//! branch: padding, strides that drop input rows, dilation, groups, depthwise, pointwise,
//! bias, rectangular kernels, and a batch of one (GEMM's own threads instead of per-image
//! tasks).

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};

use crate::CpuTrainBackend as B;

struct Case {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    dil: [usize; 2],
    groups: usize,
    bias: bool,
}

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| (((i + seed) * 7919 + seed * 31) % 1013) as f32 / 506.5 - 1.0).collect()
}

/// y, dL/dx and dL/dW for L = Σ y·g, straight from the definition.
fn reference(t: &Case, x: &[f32], wt: &[f32], b: &[f32], g: &[f32], oh: usize, ow: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (cg, og) = (t.c / t.groups, t.o / t.groups);
    let mut y = vec![0f64; t.n * t.o * oh * ow];
    let mut dx = vec![0f64; x.len()];
    let mut dw = vec![0f64; wt.len()];
    for n in 0..t.n {
        for o in 0..t.o {
            let grp = o / og;
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((n * t.o + o) * oh + oy) * ow + ox;
                    let mut acc = if t.bias { b[o] as f64 } else { 0.0 };
                    for cl in 0..cg {
                        let c = grp * cg + cl;
                        for ki in 0..t.k[0] {
                            for kj in 0..t.k[1] {
                                let iy = (oy * t.stride[0] + ki * t.dil[0]) as isize - t.pad[0] as isize;
                                let ix = (ox * t.stride[1] + kj * t.dil[1]) as isize - t.pad[1] as isize;
                                if iy < 0 || ix < 0 || iy >= t.h as isize || ix >= t.w as isize {
                                    continue;
                                }
                                let xi = ((n * t.c + c) * t.h + iy as usize) * t.w + ix as usize;
                                let wi = ((o * cg + cl) * t.k[0] + ki) * t.k[1] + kj;
                                acc += x[xi] as f64 * wt[wi] as f64;
                                dx[xi] += g[yi] as f64 * wt[wi] as f64;
                                dw[wi] += g[yi] as f64 * x[xi] as f64;
                            }
                        }
                    }
                    y[yi] = acc;
                }
            }
        }
    }
    (y, dx, dw)
}

fn close(name: &str, got: Vec<f32>, want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(((*a as f64) - b).abs() <= 1e-5 * scale, "{name}[{i}]: {a} vs {b} (scale {scale})");
    }
}

#[test]
fn convolution_and_its_gradients_match_the_definition() {
    let cases = [
        Case { n: 3, c: 4, h: 9, w: 7, o: 5, k: [3, 3], stride: [1, 1], pad: [1, 1], dil: [1, 1], groups: 1, bias: true },
        Case { n: 2, c: 3, h: 11, w: 10, o: 6, k: [3, 3], stride: [2, 2], pad: [1, 1], dil: [1, 1], groups: 1, bias: false },
        Case { n: 4, c: 6, h: 8, w: 9, o: 4, k: [3, 2], stride: [2, 1], pad: [0, 1], dil: [2, 1], groups: 2, bias: false },
        Case { n: 5, c: 8, h: 6, w: 6, o: 12, k: [1, 1], stride: [1, 1], pad: [0, 0], dil: [1, 1], groups: 1, bias: false },
        Case { n: 2, c: 8, h: 7, w: 7, o: 8, k: [3, 3], stride: [2, 2], pad: [1, 1], dil: [1, 1], groups: 8, bias: false },
        Case { n: 1, c: 1, h: 16, w: 15, o: 4, k: [7, 7], stride: [2, 2], pad: [3, 3], dil: [1, 1], groups: 1, bias: true },
        Case { n: 3, c: 4, h: 6, w: 7, o: 8, k: [1, 1], stride: [2, 2], pad: [0, 0], dil: [1, 1], groups: 2, bias: false },
        // Feature maps of at least 512 pixels: one image per GEMM, a pointwise one straight
        // from the input.
        Case { n: 2, c: 3, h: 24, w: 24, o: 5, k: [1, 1], stride: [1, 1], pad: [0, 0], dil: [1, 1], groups: 1, bias: true },
        Case { n: 3, c: 2, h: 24, w: 23, o: 3, k: [3, 3], stride: [1, 1], pad: [1, 1], dil: [1, 1], groups: 1, bias: false },
        // Stride 1 on wide maps takes the per-tap path (conv_gemm.rs `taps`): the one above, a
        // rectangular kernel with unequal padding on a single image (GEMMs on every thread),
        // and an unpadded kernel whose output is smaller than its input.
        Case { n: 1, c: 5, h: 20, w: 17, o: 7, k: [5, 3], stride: [1, 1], pad: [2, 1], dil: [1, 1], groups: 1, bias: true },
        Case { n: 3, c: 3, h: 20, w: 20, o: 4, k: [3, 3], stride: [1, 1], pad: [0, 0], dil: [1, 1], groups: 1, bias: false },
    ];
    let device = Default::default();
    for (ci, t) in cases.iter().enumerate() {
        let x = values(t.n * t.c * t.h * t.w, 1 + ci);
        let wt = values(t.o * (t.c / t.groups) * t.k[0] * t.k[1], 100 + ci);
        let b = values(t.o, 200 + ci);
        let xt = Tensor::<B, 4>::from_data(TensorData::new(x.clone(), [t.n, t.c, t.h, t.w]), &device).require_grad();
        let wtt = Tensor::<B, 4>::from_data(TensorData::new(wt.clone(), [t.o, t.c / t.groups, t.k[0], t.k[1]]), &device)
            .require_grad();
        let bt = t.bias.then(|| Tensor::<B, 1>::from_data(TensorData::new(b.clone(), [t.o]), &device));
        let y = conv2d(xt.clone(), wtt.clone(), bt, ConvOptions::new(t.stride, t.pad, t.dil, t.groups));
        let [_, _, oh, ow] = y.dims();
        let g = values(t.n * t.o * oh * ow, 300 + ci);
        let gt = Tensor::<B, 4>::from_data(TensorData::new(g.clone(), [t.n, t.o, oh, ow]), &device);
        let grads = (y.clone() * gt).sum().backward();
        let (ry, rdx, rdw) = reference(t, &x, &wt, &b, &g, oh, ow);
        let name = |what: &str| format!("case {ci} {what}");
        close(&name("y"), y.into_data().to_vec().unwrap(), &ry);
        close(&name("dx"), xt.grad(&grads).unwrap().into_data().to_vec().unwrap(), &rdx);
        close(&name("dw"), wtt.grad(&grads).unwrap().into_data().to_vec().unwrap(), &rdw);
    }
}
