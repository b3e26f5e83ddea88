//! `mica`: a thin shell over the library crates. Each subcommand lives in its own module under
//! `cmd/`, parses its flags, calls library functions and prints; no logic lives here that the
//! web server would lack.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod exit;

pub use exit::UsageError;

#[derive(Parser)]
#[command(
    name = "mica",
    version,
    about = "Medical Image Classification Arena: CNNs vs multimodal LLMs, with accuracy, time, energy and CO2",
    long_about = "mica is decision support for research and procurement. Its outputs are model \
                  predictions with confidence, not diagnoses; low-confidence cases are flagged \
                  for a physician."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the main job on the built-in synthetic datasets.
    Demo(cmd::demo::DemoArgs),
    /// Generate synthetic 4-class phantom datasets in the real datasets' folder layouts.
    Synth(cmd::synth::SynthArgs),
    /// Dataset tools.
    #[command(subcommand)]
    Dataset(cmd::dataset::DatasetCommand),
    /// Metrics for a predictions file (CSV with label,prediction[,prob_<class>...]).
    Eval(cmd::eval::EvalArgs),
    /// Train a CNN on a dataset.
    Train(cmd::train::TrainArgs),
    /// Classify a dataset split with a CNN run or an LLM.
    Classify(cmd::classify::ClassifyArgs),
    /// Grad-CAM explanation of a CNN's answer for one image.
    Explain(cmd::explain::ExplainArgs),
    /// Energy measurement tools.
    #[command(subcommand)]
    Energy(cmd::energy::EnergyCommand),
    /// A local server speaking the OpenAI and Ollama protocols, answering from a confusion model.
    /// For dry runs and tests only: its results are stamped SIMULATED.
    LlmSim(cmd::llm_sim::LlmSimArgs),
    /// LLM tools: `mica llm check SPEC` asks a model one tiny question before a paid run.
    #[command(subcommand)]
    Llm(cmd::llm_check::LlmCommand),
    /// Run every classifier of an experiment on one split and write one comparison.
    Compare(cmd::compare::CompareArgs),
    /// Render a run directory as Markdown, HTML, JSON or CSV.
    Report(cmd::report::ReportArgs),
    /// The results store: every finished run, indexed.
    #[command(subcommand)]
    Runs(cmd::runs::RunsCommand),
    /// The web app and JSON API: upload an image, see every classifier's suggestion side by
    /// side, record the physician's decision; runs dashboard and monitoring.
    Serve(cmd::serve::ServeArgs),
    /// The web app's audit trail: verify its hash chain, export every decision.
    #[command(subcommand)]
    Audit(cmd::audit::AuditCommand),
    /// Named users for `mica serve --users`: add one (argon2id-hashed secret).
    #[command(subcommand)]
    Users(cmd::users::UsersCommand),
}

fn main() -> ExitCode {
    mica_cnn::tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MICA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Synth(a) => cmd::synth::run(a),
        Command::Dataset(c) => cmd::dataset::run(c),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Classify(a) => cmd::classify::run(a),
        Command::Explain(a) => cmd::explain::run(a),
        Command::Energy(c) => cmd::energy::run(c),
        Command::LlmSim(a) => cmd::llm_sim::run(a),
        Command::Llm(c) => cmd::llm_check::run(c),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Report(a) => cmd::report::run(a),
        Command::Runs(c) => cmd::runs::run(c),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Audit(c) => cmd::audit::run(c),
        Command::Users(c) => cmd::users::run(c),
    };
    exit::report(result)
}
