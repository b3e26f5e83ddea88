//! Step-time and inference benchmark of one architecture on random data, for
//! `bench/cnn_vs_pytorch.sh` (which runs the same measurement in PyTorch and prints ratios).
//!
//! Usage: `cargo run --release -p mica-cnn --example bench_cnn -- [--model resnet18]
//! [--size 128] [--batch 32] [--steps 10] [--infer-batches 10]`; prints one JSON line.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{ElementConversion, Tensor, TensorData};
use mica_cnn::{Arch, CpuBackend, CpuTrainBackend, Net};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arch: Arch = arg(&args, "--model", "resnet18".to_string()).parse().expect("model");
    let size: usize = arg(&args, "--size", 128);
    let batch: usize = arg(&args, "--batch", 32);
    let steps: usize = arg(&args, "--steps", 10);
    let infer_batches: usize = arg(&args, "--infer-batches", 10);
    let classes = 4;
    let device = Default::default();

    let mut model: Net<CpuTrainBackend> = Net::seeded(arch, 1, classes, 1, &device);
    let mut optim = AdamWConfig::new().init::<CpuTrainBackend, Net<CpuTrainBackend>>();
    let x: Vec<f32> = (0..batch * size * size).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut target = vec![0.0f32; batch * classes];
    for i in 0..batch {
        target[i * classes + i % classes] = 1.0 / batch as f32;
    }
    let mut times = Vec::new();
    let mut last_loss = 0.0;
    for s in 0..steps + 1 {
        let t0 = Instant::now();
        let xt = Tensor::<CpuTrainBackend, 4>::from_data(TensorData::new(x.clone(), [batch, 1, size, size]), &device);
        let tt = Tensor::<CpuTrainBackend, 2>::from_data(TensorData::new(target.clone(), [batch, classes]), &device);
        let logits = model.forward(xt, None);
        let loss = (log_softmax(logits, 1) * tt).sum().neg();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        last_loss = loss.into_scalar().elem::<f64>();
        model = optim.step(1e-3, model, grads);
        if s > 0 {
            // The first step includes one-off allocation and thread start-up.
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let train_step_ms = 1000.0 * times.iter().sum::<f64>() / times.len().max(1) as f64;

    let inner: Net<CpuBackend> = model.valid();
    let xi = Tensor::<CpuBackend, 4>::from_data(TensorData::new(x.clone(), [batch, 1, size, size]), &device);
    let _ = inner.forward(xi.clone(), None).into_data(); // warm-up
    let t0 = Instant::now();
    for _ in 0..infer_batches {
        let _ = inner.forward(xi.clone(), None).into_data();
    }
    let secs = t0.elapsed().as_secs_f64();
    let infer_ips = (infer_batches * batch) as f64 / secs;
    println!(
        "{{\"framework\":\"mica-burn-flex\",\"model\":\"{arch}\",\"size\":{size},\"batch\":{batch},\"train_step_ms\":{train_step_ms:.2},\"infer_images_per_s\":{infer_ips:.2},\"peak_rss_mb\":{:.1},\"last_loss\":{last_loss:.4}}}",
        peak_rss_mb()
    );
}
