//! `mica train` (owned by the CNN work).
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use mica_cnn::{Arch, Progress, TrainConfig};

use crate::exit::usage;

#[derive(clap::Args)]
pub struct TrainArgs {
    #[arg(long)]
    pub dataset: PathBuf,
    /// small, resnet8, resnet18 or mobilenet.
    #[arg(long, default_value = "small")]
    pub model: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Maximum epochs (early stopping may end sooner) [default: 20].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per optimiser step [default: 32].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate after warm-up [default: 0.002, 0.0005 with --pretrained].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Input side in pixels [default: the images' own size, at most 128].
    #[arg(long)]
    pub size: Option<u32>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Weight the loss by inverse class frequency (imbalanced datasets).
    #[arg(long)]
    pub class_weights: bool,
    /// Continue a killed or finished run from its last completed epoch.
    #[arg(long)]
    pub resume: bool,
    /// Epochs without a better validation macro F1 before stopping, counted in the second half
    /// of the schedule only [default: 6].
    #[arg(long)]
    pub patience: Option<usize>,
    /// Train without augmentation.
    #[arg(long)]
    pub no_augment: bool,
    /// Label smoothing epsilon in [0, 1) [default: 0, none].
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// torchvision ResNet-18 weights (.pth or .safetensors) to fine-tune from.
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    /// Use 3 input channels (RGB datasets); the default is grayscale.
    #[arg(long)]
    pub rgb: bool,
    /// Use at most N images per split (quick runs).
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub energy: super::energy::EnergyOpts,
}

pub fn config_from(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let arch: Arch = args.model.parse().map_err(usage)?;
    let mut cfg = TrainConfig::new(arch);
    if let Some(e) = args.epochs {
        if e == 0 {
            return Err(usage("--epochs must be at least 1"));
        }
        cfg.epochs = e;
    }
    if let Some(b) = args.batch {
        if b == 0 {
            return Err(usage("--batch must be at least 1"));
        }
        cfg.batch = b;
    }
    if args.pretrained.is_some() {
        cfg.lr = 5e-4;
    }
    if let Some(lr) = args.lr {
        if !(lr.is_finite() && lr > 0.0 && lr <= 1.0) {
            return Err(usage("--lr must be in (0, 1]"));
        }
        cfg.lr = lr;
    }
    if let Some(s) = args.size {
        if !(8..=1024).contains(&s) {
            return Err(usage("--size must be between 8 and 1024"));
        }
        cfg.size = Some(s as usize);
    }
    if let Some(p) = args.patience {
        cfg.patience = p.max(1);
    }
    if let Some(e) = args.label_smoothing {
        if !(0.0..1.0).contains(&e) {
            return Err(usage("--label-smoothing must be in [0, 1)"));
        }
        cfg.label_smoothing = e;
    }
    if let Some(p) = &args.pretrained {
        if arch != Arch::Resnet18 {
            return Err(usage("--pretrained needs --model resnet18"));
        }
        if !p.is_file() {
            return Err(usage(format!("{}: no such weights file", p.display())));
        }
    }
    cfg.seed = args.seed;
    cfg.class_weights = args.class_weights;
    cfg.resume = args.resume;
    cfg.augment = !args.no_augment;
    cfg.pretrained = args.pretrained.clone();
    cfg.channels = if args.rgb { 3 } else { 1 };
    cfg.limit = args.limit;
    Ok(cfg)
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = config_from(&args)?;
    let split = mica_data::split::SplitConfig { seed: args.seed, ..Default::default() };
    let (ds, _) = mica_run::load_split(&args.dataset, &split).map_err(|e| {
        if e.is_usage() {
            crate::exit::usage(e.to_string())
        } else {
            anyhow::Error::new(e)
        }
    })?;
    let project = format!("train {}", args.model);
    let summary = super::energy::measured(&args.energy, &args.out, &project, || {
        let s = train_with_progress(&ds, &cfg, &args.out)?;
        // Images processed: every epoch of this invocation saw the training split once.
        let images = s.train_images * s.history.len().max(1);
        Ok((s, images))
    })?;
    println!(
        "trained {} on {} ({} train / {} val images, {} px, {}): best epoch {} of {}, val macro F1 {:.3}, val accuracy {:.3}{}",
        summary.arch,
        args.dataset.display(),
        summary.train_images,
        summary.val_images,
        summary.input_size,
        summary.device,
        summary.best_epoch,
        summary.epochs_run,
        summary.best_val_macro_f1,
        summary.best_val_accuracy,
        if summary.stopped_early { " (stopped early)" } else { "" }
    );
    println!(
        "{:.1} s training, {:.1} images/s; checkpoint and train_log.csv in {}",
        summary.train_seconds,
        summary.train_images_per_s,
        args.out.display()
    );
    if let Some(msg) = near_chance(summary.best_val_accuracy, ds.labels.len()) {
        eprintln!("warning: {msg}");
    }
    Ok(())
}

/// A warning when the best validation accuracy is within 15 points of guessing: such a model
/// (the MobileNet on 64 px data, for one) would otherwise be saved and used without a word.
fn near_chance(val_accuracy: f64, classes: usize) -> Option<String> {
    let chance = 1.0 / classes.max(1) as f64;
    (classes > 1 && val_accuracy < chance + 0.15).then(|| {
        format!(
            "NOT LEARNED: the best validation accuracy, {:.1} %, is within 15 points of chance ({:.1} % for {classes} \
             classes). Do not use this model; try more epochs, another --lr or another --model.",
            val_accuracy * 100.0,
            chance * 100.0
        )
    })
}

/// Trains with an indicatif bar per epoch (hidden when stderr is not a terminal) and one
/// summary line per epoch on stderr. Shared with `mica demo`.
pub fn train_with_progress(
    ds: &mica_core::Dataset,
    cfg: &TrainConfig,
    out: &std::path::Path,
) -> anyhow::Result<mica_cnn::TrainSummary> {
    let mut bar: Option<ProgressBar> = None;
    let style = ProgressStyle::with_template(
        "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let mut on_progress = |p: Progress| match p {
        Progress::Notice(m) => eprintln!("note: {m}"),
        Progress::EpochStart { epoch, epochs, steps } => {
            let b = ProgressBar::new(steps as u64);
            b.set_style(style.clone());
            b.set_prefix(format!("{epoch}/{epochs}"));
            bar = Some(b);
        }
        Progress::Step { step, loss, accuracy, images_per_s, .. } => {
            if let Some(b) = &bar {
                b.set_position(step as u64);
                b.set_message(format!("loss {loss:.3} acc {accuracy:.3} {images_per_s:.0} img/s"));
            }
        }
        Progress::EpochEnd(s) => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!(
                "epoch {:>3}: loss {:.4} acc {:.3} | val loss {:.4} acc {:.3} macro-F1 {:.3} | {:.0} img/s {:.1}s{}",
                s.epoch,
                s.train_loss,
                s.train_accuracy,
                s.val_loss,
                s.val_accuracy,
                s.val_macro_f1,
                s.images_per_s,
                s.seconds,
                if s.best { " *best" } else { "" }
            );
        }
    };
    mica_cnn::train(ds, cfg, out, &mut on_progress)
        .with_context(|| format!("training into {}", out.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn near_chance_warns_only_near_guessing() {
        assert!(super::near_chance(0.30, 4).unwrap().contains("25.0 % for 4 classes"));
        assert!(super::near_chance(0.41, 4).is_none());
        assert!(super::near_chance(0.60, 2).is_some());
        assert!(super::near_chance(0.70, 2).is_none());
    }
}
