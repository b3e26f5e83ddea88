//! `mica synth`: synthetic 4-class phantom datasets in the real datasets' folder layouts.
use std::path::PathBuf;
use std::time::Instant;

use mica_core::Modality;
use mica_data::synth::{generate, SynthConfig};

use crate::exit::usage;

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output folder; one sub-folder per dataset.
    #[arg(long)]
    pub out: PathBuf,
    /// xray, mri, ct or all.
    #[arg(long, default_value = "all")]
    pub modality: String,
    /// Images per class (split across the layout's folders) [default: 300].
    #[arg(long)]
    pub per_class: Option<usize>,
    /// Image side in pixels [default: 64].
    #[arg(long)]
    pub size: Option<u32>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Turns a dataset-crate error into the CLI's exit-code convention.
pub fn data_err(e: mica_data::DataError) -> anyhow::Error {
    if e.is_usage() {
        usage(e.to_string())
    } else {
        anyhow::Error::new(e)
    }
}

pub fn parse_modalities(s: &str) -> anyhow::Result<Vec<Modality>> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(Modality::STUDY.to_vec());
    }
    match s.parse::<Modality>() {
        Ok(Modality::Other) | Err(_) => Err(usage(format!(
            "--modality `{s}` is not one of xray, mri, ct, all"
        ))),
        Ok(m) => Ok(vec![m]),
    }
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let defaults = SynthConfig::default();
    let cfg = SynthConfig {
        per_class: args.per_class.unwrap_or(defaults.per_class),
        size: args.size.unwrap_or(defaults.size),
        seed: args.seed,
    };
    for m in parse_modalities(&args.modality)? {
        let t = Instant::now();
        let root = generate(&args.out, m, &cfg).map_err(data_err)?;
        println!(
            "{m}: {} images ({} per class, {}x{} px, seed {}) in {} ({:.1} s)",
            cfg.per_class * 4,
            cfg.per_class,
            cfg.size,
            cfg.size,
            cfg.seed,
            root.display(),
            t.elapsed().as_secs_f64()
        );
    }
    println!("synthetic phantoms for testing the pipeline only: not medical images, no diagnostic value");
    Ok(())
}
