//! `mica energy ...` (owned by the energy work).

#[derive(clap::Subcommand)]
pub enum EnergyCommand {
    /// Print what this machine can measure, and why not where it cannot.
    Probe,
}

pub fn run(cmd: EnergyCommand) -> anyhow::Result<()> {
    match cmd {
        EnergyCommand::Probe => anyhow::bail!("`mica energy probe` is not built yet"),
    }
}
