//! `mica dataset ...`: dataset tools over `mica_data`.
use std::path::PathBuf;

use mica_data::inspect::{inspect, InspectOptions};
use mica_data::split::SplitConfig;

use super::synth::data_err;

#[derive(clap::Subcommand)]
pub enum DatasetCommand {
    /// Detect the layout, count classes and splits, list unreadable files and near-duplicates.
    Inspect(InspectArgs),
}

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A dataset folder, a CSV manifest (path,label[,split][,context]) or a MedMNIST .npz.
    pub path: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Perceptual-hash distance (0-64 bits) at or below which images are near-duplicates.
    #[arg(long, default_value_t = 4)]
    pub max_distance: u32,
    /// Pixel correlation (-1 to 1) a hash match must also reach to count as a duplicate.
    #[arg(long, default_value_t = 0.99)]
    pub min_correlation: f32,
    /// Seed of the default split used when the layout has no official one.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn run(cmd: DatasetCommand) -> anyhow::Result<()> {
    match cmd {
        DatasetCommand::Inspect(a) => {
            if a.max_distance > 64 {
                return Err(crate::exit::usage(format!(
                    "--max-distance {} is more than the 64 bits of a hash",
                    a.max_distance
                )));
            }
            let opts = InspectOptions {
                max_distance: a.max_distance,
                min_correlation: a.min_correlation,
                split: SplitConfig {
                    seed: a.seed,
                    ..SplitConfig::default()
                },
            };
            let r = inspect(&a.path, &opts).map_err(data_err)?;
            let text = if a.json {
                serde_json::to_string_pretty(&r)? + "\n"
            } else {
                r.to_text()
            };
            write_stdout(&text)
        }
    }
}

/// Prints, treating a closed pipe (`| head`) as a normal end rather than a panic.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
