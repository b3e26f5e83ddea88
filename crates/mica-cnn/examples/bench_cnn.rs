//! Step-time and inference benchmark of one architecture on random data, for
//! `bench/cnn_vs_pytorch.sh` and `bench/gpu.sh` (which run the same measurement in PyTorch and
//! print ratios).
//!
//! Usage: `cargo run --release -p mica-cnn --features bench --example bench_cnn -- [--model resnet18]
//! [--size 128] [--batch 32] [--steps 10] [--infer-batches 10] [--device cpu|cuda] [--one-pass]`;
//! prints one JSON line. `--device cuda` needs a build with `--features cuda` and an NVIDIA driver.
//!
//! The training step is `mica train`'s ([`mica_cnn::StepRunner`]): on the CPU the batch is split
//! between two data-parallel workers; `--one-pass` times the whole batch in one pass instead
//! (the step before data-parallel training, for the A/B).
//!
//! CPU utilisation is the process's user+system CPU time over wall time during the timed
//! steps (2.0 = both cores of a 2-core machine busy), read from `getrusage`-equivalent
//! `/proc/self/stat`, so a kernel that leaves cores idle shows up in the output.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use mica_cnn::{Arch, Net};

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

/// Process CPU seconds (user + system) from `/proc/self/stat`, in clock ticks of 1/100 s
/// (`CLK_TCK` is 100 on every Linux this runs on).
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name; utime and stime are fields 14, 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(f64::NAN)
}

struct Setup {
    arch: Arch,
    size: usize,
    batch: usize,
    steps: usize,
    infer_batches: usize,
    /// Batches timed through burn's own forward pass when the fused engine is timed as well
    /// (0 profiles the fused engine alone).
    burn_infer_batches: usize,
    /// Time the training step as one pass over the batch instead of mica's data-parallel step.
    one_pass: bool,
}

fn bench<B: AutodiffBackend>(s: &Setup, device: B::Device, device_name: &str) {
    let (size, batch) = (s.size, s.batch);
    let classes = 4;
    let mut model: Net<B> = Net::seeded(s.arch, 1, classes, 1, &device);
    let mut optim = AdamWConfig::new().init::<B, Net<B>>();
    let x: Vec<f32> = (0..batch * size * size).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut target = vec![0.0f32; batch * classes];
    for i in 0..batch {
        target[i * classes + i % classes] = 1.0 / batch as f32;
    }
    let runner = if device_name == "cpu" && !s.one_pass {
        mica_cnn::StepRunner::data_parallel(mica_cnn::train::CPU_WORKERS).expect("training threads")
    } else {
        mica_cnn::StepRunner::one_pass()
    };
    let train_path = runner.describe();
    let mut times = Vec::new();
    let mut last_loss = 0.0;
    let (mut wall0, mut cpu0) = (Instant::now(), cpu_seconds());
    for step in 0..s.steps + 1 {
        if step == 1 {
            // The first step includes one-off allocation, thread start-up and (on a GPU)
            // kernel compilation.
            (wall0, cpu0) = (Instant::now(), cpu_seconds());
        }
        let t0 = Instant::now();
        let xt = Tensor::<B, 4>::from_data(TensorData::new(x.clone(), [batch, 1, size, size]), &device);
        let tt = Tensor::<B, 2>::from_data(TensorData::new(target.clone(), [batch, classes]), &device);
        // Reading the loss (and the logits) waits for the device (a GPU runs asynchronously).
        let (grads, _logits, loss) = runner.gradients(&model, xt, tt, None);
        last_loss = loss;
        model = optim.step(1e-3, model, grads);
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let train_cores = (cpu_seconds() - cpu0) / wall0.elapsed().as_secs_f64();
    let train_step_ms = 1000.0 * times.iter().sum::<f64>() / times.len().max(1) as f64;

    let inner: Net<B::InnerBackend> = model.valid();
    let xi = Tensor::<B::InnerBackend, 4>::from_data(TensorData::new(x.clone(), [batch, 1, size, size]), &device);
    let _ = inner.forward(xi.clone(), None).into_data(); // warm-up
    let (t0, c0) = (Instant::now(), cpu_seconds());
    for _ in 0..s.burn_infer_batches {
        // `into_data` copies the logits back to the host, as a classifier does.
        let _ = inner.forward(xi.clone(), None).into_data();
    }
    let secs = t0.elapsed().as_secs_f64();
    let burn_cores = (cpu_seconds() - c0) / secs;
    let burn_ips = (s.burn_infer_batches * batch) as f64 / secs;
    let mut infer = format!("\"infer_engine\":\"burn\",\"infer_images_per_s\":{burn_ips:.2},\"infer_cpu_cores\":{burn_cores:.2}");
    // On the CPU, mica classifies through the fused engine (mica_cnn::fused) unless
    // MICA_CNN_ENGINE=burn: time that, the same images, logits copied out as well.
    if device_name == "cpu" && mica_cnn::fused::enabled() {
        let fused = mica_cnn::fused::FusedNet::compile(&inner).expect("mica's architectures compile");
        let _ = fused.forward(&x, batch, size, size); // warm-up
        let (t0, c0) = (Instant::now(), cpu_seconds());
        for _ in 0..s.infer_batches {
            let _ = fused.forward(&x, batch, size, size);
        }
        let secs = t0.elapsed().as_secs_f64();
        let cores = (cpu_seconds() - c0) / secs;
        let ips = (s.infer_batches * batch) as f64 / secs;
        infer = format!("\"infer_engine\":\"fused\",\"infer_images_per_s\":{ips:.2},\"infer_cpu_cores\":{cores:.2},\"infer_burn_images_per_s\":{burn_ips:.2},\"infer_burn_cpu_cores\":{burn_cores:.2}");
    }
    println!(
        "{{\"framework\":\"mica-burn-0.21\",\"device\":\"{device_name}\",\"model\":\"{}\",\"size\":{size},\"batch\":{batch},\"train_path\":\"{train_path}\",\"train_step_ms\":{train_step_ms:.2},\"train_cpu_cores\":{train_cores:.2},{infer},\"peak_rss_mb\":{:.1},\"last_loss\":{last_loss:.4}}}",
        s.arch,
        peak_rss_mb()
    );
}

fn main() {
    // As `mica` does (mica_cnn::tune_allocator); MICA_DEFAULT_MALLOC=1 measures without it.
    mica_cnn::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let infer_batches = arg(&args, "--infer-batches", 10);
    let s = Setup {
        arch: arg(&args, "--model", "resnet18".to_string()).parse().expect("--model"),
        size: arg(&args, "--size", 128),
        batch: arg(&args, "--batch", 32),
        steps: arg(&args, "--steps", 10),
        infer_batches,
        burn_infer_batches: arg(&args, "--burn-infer-batches", infer_batches),
        one_pass: args.iter().any(|a| a == "--one-pass"),
    };
    match arg(&args, "--device", "cpu".to_string()).as_str() {
        "cpu" => bench::<mica_cnn::CpuTrainBackend>(&s, Default::default(), "cpu"),
        #[cfg(feature = "cuda")]
        "cuda" => {
            // burn's CUDA device panics on first use without a driver; say so in one line.
            if !mica_cnn::device::nvidia_gpu_present() {
                eprintln!("--device cuda: no NVIDIA GPU here (no /proc/driver/nvidia/version or /dev/nvidia0)");
                std::process::exit(2);
            }
            bench::<burn::backend::Autodiff<burn::backend::Cuda>>(&s, Default::default(), "cuda")
        }
        other => {
            eprintln!("--device {other}: this build knows cpu{}", if cfg!(feature = "cuda") { " and cuda" } else { " only (build with --features cuda for cuda)" });
            std::process::exit(2);
        }
    }
}
