//! The vendored burn-flex runs max pooling through its own plane kernel (vendor/burn-flex/
//! MICA-PATCH.md, "Max pooling"). These tests hold its output, argmax indices and gradient to
//! the definition: the first tap of the window (depth, row, column order) that lies inside the
//! input, replaced only by a strictly greater value. Inputs take few distinct values, so ties
//! are common and the tie rule is checked.

use burn::tensor::module::{max_pool2d, max_pool2d_with_indices};
use burn::tensor::{Int, Tensor, TensorData};

use crate::CpuTrainBackend as B;

struct Case {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    dil: [usize; 2],
}

/// Output, plane-relative argmax index per output, and dL/dx for L = Σ y·g.
fn reference(t: &Case, x: &[f32], g: &[f32], oh: usize, ow: usize) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
    let mut y = vec![0f32; t.n * t.c * oh * ow];
    let mut at = vec![-1i64; y.len()];
    let mut dx = vec![0f32; x.len()];
    for p in 0..t.n * t.c {
        for oy in 0..oh {
            for ox in 0..ow {
                let yi = (p * oh + oy) * ow + ox;
                let mut best: Option<(f32, usize)> = None;
                for ki in 0..t.k[0] {
                    for kj in 0..t.k[1] {
                        let iy = (oy * t.stride[0] + ki * t.dil[0]) as isize - t.pad[0] as isize;
                        let ix = (ox * t.stride[1] + kj * t.dil[1]) as isize - t.pad[1] as isize;
                        if iy < 0 || ix < 0 || iy >= t.h as isize || ix >= t.w as isize {
                            continue;
                        }
                        let pos = iy as usize * t.w + ix as usize;
                        let v = x[p * t.h * t.w + pos];
                        if best.is_none_or(|(b, _)| v > b) {
                            best = Some((v, pos));
                        }
                    }
                }
                let (v, pos) = best.expect("every window overlaps the input");
                y[yi] = v;
                at[yi] = pos as i64;
                dx[p * t.h * t.w + pos] += g[yi];
            }
        }
    }
    (y, at, dx)
}

#[test]
fn max_pooling_and_its_gradient_match_the_definition() {
    let cases = [
        // The small CNN's and ResNet-8's 2x2 pool, ResNet-18's 3x3/2 pool with padding, and
        // geometries with dilation, unequal strides, overlapping windows and odd sizes.
        Case { n: 3, c: 4, h: 8, w: 8, k: [2, 2], stride: [2, 2], pad: [0, 0], dil: [1, 1] },
        Case { n: 2, c: 3, h: 11, w: 9, k: [3, 3], stride: [2, 2], pad: [1, 1], dil: [1, 1] },
        Case { n: 2, c: 2, h: 9, w: 10, k: [3, 2], stride: [1, 2], pad: [1, 1], dil: [2, 1] },
        Case { n: 1, c: 5, h: 7, w: 13, k: [3, 3], stride: [1, 1], pad: [1, 1], dil: [1, 1] },
        Case { n: 4, c: 1, h: 5, w: 5, k: [2, 3], stride: [3, 2], pad: [0, 1], dil: [1, 1] },
    ];
    let device = Default::default();
    for (ci, t) in cases.iter().enumerate() {
        // Five levels: ties everywhere, so the first-tap rule decides most windows.
        let x: Vec<f32> = (0..t.n * t.c * t.h * t.w).map(|i| ((i * 7 + ci * 3) % 5) as f32 - 2.0).collect();
        let xt = Tensor::<B, 4>::from_data(TensorData::new(x.clone(), [t.n, t.c, t.h, t.w]), &device).require_grad();
        let (y, idx) = max_pool2d_with_indices(xt.clone(), t.k, t.stride, t.pad, t.dil, false);
        let [_, _, oh, ow] = y.dims();
        let g: Vec<f32> = (0..t.n * t.c * oh * ow).map(|i| ((i * 13 + ci) % 11) as f32 - 5.0).collect();
        let gt = Tensor::<B, 4>::from_data(TensorData::new(g.clone(), [t.n, t.c, oh, ow]), &device);
        let grads = (y.clone() * gt).sum().backward();
        let (ry, rat, rdx) = reference(t, &x, &g, oh, ow);
        let idx: Tensor<B, 4, Int> = idx;
        assert_eq!(y.clone().into_data().to_vec::<f32>().unwrap(), ry, "case {ci}: output");
        let got_idx: Vec<i64> = idx.into_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(got_idx, rat, "case {ci}: indices");
        assert_eq!(xt.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(), rdx, "case {ci}: dx");
        // The pooling without indices (inference) agrees with the indexed one.
        let plain = max_pool2d(xt.clone().inner(), t.k, t.stride, t.pad, t.dil, false);
        assert_eq!(plain.into_data().to_vec::<f32>().unwrap(), ry, "case {ci}: output without indices");
    }
}
