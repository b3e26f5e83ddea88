//! `mica demo`: the README's first command. The whole main job on the built-in synthetic
//! datasets: synthesise, train CNNs, run the LLM arm where one is configured, compare, report.
//!
//! Every step is a library call that `mica synth`, `mica compare` and `mica report` also make;
//! the demo only chooses the experiments. Re-running it resumes: finished classifiers and
//! trained models are reused.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use mica_run::{ClassifierConfig, DatasetSpec, EnergySpec, EvalSpec, Experiment, Kind, RunOptions};
use mica_core::Modality;

use crate::exit::usage;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where datasets, runs and reports go.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// xray, mri, ct or all.
    #[arg(long, default_value = "all")]
    pub modality: String,
    /// An LLM to compare (`openai/gpt-4o`, `ollama/llama3.2-vision`,
    /// `openai-compatible/<model>@http://host:port`), run with and without the filter.
    #[arg(long, env = "MICA_DEMO_LLM")]
    pub llm: Option<String>,
    /// Run the LLM arm against mica's built-in simulator. This is the default when no `--llm`
    /// is given; every result from it is stamped SIMULATED and kept out of energy and cost
    /// comparisons.
    #[arg(long, conflicts_with = "no_llm")]
    pub simulated_llm: bool,
    /// Leave the LLM arm out (neither a model nor the simulator).
    #[arg(long, conflicts_with = "llm")]
    pub no_llm: bool,
    /// The CNN architectures to train, comma-separated (small, resnet8, resnet18, mobilenet).
    /// The default pair fits the demo's ten-minute budget on two CPU cores (about 6 minutes in
    /// all; bench/README.md, "A second CNN"); ResNet-18 and the MobileNet take far longer per
    /// epoch and do not.
    #[arg(long, default_value = "small,resnet8", value_delimiter = ',')]
    pub cnn: Vec<String>,
    /// Print every training epoch's figures.
    #[arg(short, long)]
    pub verbose: bool,
    /// Also show CNNs that did not reach the demo's 80 % test-accuracy bar (by default they
    /// are left out of the tables and reports, with the reason stated).
    #[arg(long)]
    pub show_all: bool,
    /// Country (ISO 3166-1 alpha-3) whose grid carbon intensity to use; without it the world
    /// average is used, and the report says so.
    #[arg(long)]
    pub country: Option<String>,
    /// Electricity price in USD per kWh, for the break-even point between a trained CNN and a
    /// paid API (without it only energy is compared).
    #[arg(long, value_name = "USD_PER_KWH")]
    pub electricity_price: Option<f64>,
    /// A smoke run in well under a minute: few, small images and one epoch. Its figures mean
    /// nothing; it checks that every stage works.
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Side of the synthetic images in pixels (the CNNs train at this size); 64 by default, 32
    /// with `--quick`. The ten-minute budget holds at 64.
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..=256))]
    pub size: Option<u32>,
    /// Results store to index the runs in (default: `$MICA_STORE` or the user data folder).
    #[arg(long)]
    pub store: Option<PathBuf>,
}

/// Sizes of the two demo flavours.
struct Plan {
    synth: mica_data::synth::SynthConfig,
    cnn_epochs: usize,
    llm_limit_per_class: usize,
}

fn plan(args: &DemoArgs) -> Plan {
    if args.quick {
        Plan {
            synth: mica_data::synth::SynthConfig { per_class: 12, size: args.size.unwrap_or(32), seed: args.seed },
            cnn_epochs: 1,
            llm_limit_per_class: 3,
        }
    } else {
        Plan {
            synth: mica_data::synth::SynthConfig {
                seed: args.seed,
                size: args.size.unwrap_or(mica_data::synth::SynthConfig::default().size),
                ..Default::default()
            },
            // Sized to the 10-minute budget on two CPU cores: with data-parallel training the
            // small CNN takes 1.6 s an epoch and ResNet-8 2.1 s on the 2026-12-04 host (372 s
            // for the whole demo). ResNet-8 needs its 32 epochs (24 gave 72.9 % test accuracy on
            // the chest X-rays, underfitted: 84 % on its training set); the MobileNet trains at
            // 27 images/s (30 s an epoch) and stays at chance in 8; ResNet-18 takes 30-60 s an
            // epoch. `--cnn` adds them.
            cnn_epochs: 32,
            llm_limit_per_class: 25,
        }
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let modalities: Vec<Modality> = match args.modality.as_str() {
        "all" => Modality::STUDY.to_vec(),
        m => vec![m.parse::<Modality>().map_err(usage)?],
    };
    if modalities.contains(&Modality::Other) {
        return Err(usage("--modality must be xray, mri, ct or all"));
    }
    for arch in &args.cnn {
        arch.parse::<mica_cnn::Arch>().map_err(|e| usage(format!("--cnn: {e}")))?;
    }
    let plan = plan(&args);
    // Another --size gets its own datasets, so a run made at the default size keeps the images
    // it was made from (and resuming it at another size is refused: the recorded input size
    // differs).
    let data_dir = match args.size {
        Some(s) => args.out.join(format!("data-{s}px")),
        None => args.out.join("data"),
    };
    let llm = llm_choice(&args);
    match &llm {
        None => println!("LLM arm: left out (--no-llm)."),
        Some((model, true)) => println!(
            "LLM arm: SIMULATED stand-in for {model} (the built-in simulator answers; no model is \
             asked). To compare a real LLM, pass --llm openai/gpt-4o (key from OPENAI_API_KEY), \
             --llm ollama/llama3.2-vision, or --llm openai-compatible/<model>@http://host:port."
        ),
        Some((model, false)) => println!("LLM arm: {model}"),
    }

    let store = args.store.clone().or_else(mica_report::store::default_store_path);
    let mut reports = Vec::new();
    for m in &modalities {
        let t = Instant::now();
        let dataset = mica_data::synth::generate(&data_dir, *m, &plan.synth)
            .with_context(|| format!("synthesising the {m} dataset"))?;
        println!(
            "\n== {m}: synthetic dataset {} ({} images per class, {} px, seed {}) in {:.1} s",
            dataset.display(),
            plan.synth.per_class,
            plan.synth.size,
            plan.synth.seed,
            t.elapsed().as_secs_f64()
        );
        let exp = experiment(&args, &plan, *m, &dataset, llm.as_ref());
        let opts = RunOptions {
            // The demo writes its reports itself, after leaving out the CNNs that did not learn.
            report: false,
            store: store.clone(),
            command: Some(std::env::args().collect::<Vec<_>>().join(" ")),
            ..Default::default()
        };
        let outcome = super::compare::run_with_progress(&exp, &opts, args.verbose)?;
        let mut run = mica_report::RunDir::open(&outcome.dir)
            .with_context(|| format!("reading back {}", outcome.dir.display()))?;
        if !args.show_all {
            for hidden in hide_unlearned(&mut run) {
                println!("not shown: {hidden}");
                run.skipped.push(hidden);
            }
        }
        let cmp = mica_report::Comparison::build(&run);
        println!("{}", mica_report::render::headline_text(&cmp));
        mica_report::render::write_report(&run, &cmp, mica_report::Format::Markdown)?;
        reports.push(mica_report::render::write_report(&run, &cmp, mica_report::Format::Html)?);
    }
    println!(
        "\nDemo finished in {:.0} s. Figures on synthetic phantoms show that the pipeline works; \
         they say nothing about performance on patients. Reports:",
        started.elapsed().as_secs_f64()
    );
    for r in &reports {
        println!("  {}", r.display());
    }
    Ok(())
}

/// Test accuracy below which the demo does not show a CNN: a model that has not learned the
/// task would only show that a short training budget was too short.
const SHOW_AT: f64 = 0.80;

/// Removes the CNNs under [`SHOW_AT`] from what the demo shows, and says why for each.
fn hide_unlearned(run: &mut mica_report::RunDir) -> Vec<String> {
    let mut hidden = Vec::new();
    run.classifiers.retain(|c| {
        let m = &c.metrics;
        let cnn = m.classifier.starts_with("cnn");
        if cnn && !m.simulated && m.all.accuracy < SHOW_AT {
            hidden.push(format!(
                "{} reached {:.1} % test accuracy, below the demo's {:.0} % bar (it did not learn the task in the demo's training budget; --show-all shows it)",
                m.classifier,
                m.all.accuracy * 100.0,
                SHOW_AT * 100.0
            ));
            false
        } else {
            true
        }
    });
    hidden
}

/// The LLM to run, and whether it is the simulator.
fn llm_choice(args: &DemoArgs) -> Option<(String, bool)> {
    match (&args.llm, args.no_llm) {
        (Some(m), _) => Some((m.clone(), false)),
        (None, true) => None,
        // The simulator stands in for GPT-4o so the dry run also exercises GPT-4o's price table.
        (None, false) => Some(("openai/gpt-4o".into(), true)),
    }
}

fn experiment(
    args: &DemoArgs,
    plan: &Plan,
    m: Modality,
    dataset: &Path,
    llm: Option<&(String, bool)>,
) -> Experiment {
    let blank = ClassifierConfig::new;
    // Each CNN runs its whole schedule, keeping the best validation checkpoint: with 120
    // validation images, the validation F1 swings by 5-10 points from one epoch to the next
    // while the learning rate is still high, and stopping on it ended CT training at epoch 19 of
    // 32 with 77.9 % test accuracy (the full schedule: see bench/README.md).
    let mut classifiers: Vec<ClassifierConfig> = args
        .cnn
        .iter()
        .map(|arch| ClassifierConfig {
            train: Some(arch.clone()),
            epochs: Some(plan.cnn_epochs),
            patience: Some(plan.cnn_epochs),
            ..blank(Kind::Cnn)
        })
        .collect();
    classifiers.push(blank(Kind::Baseline));
    if let Some((model, simulated)) = llm {
        for filter in ["none", "default"] {
            classifiers.push(ClassifierConfig {
                model: Some(model.clone()),
                // The same evidence as the CNNs: the image only. The synthetic clinical context
                // is label-correlated by construction and would hand the LLM the answer.
                context: Some("image".into()),
                filter: Some(filter.into()),
                simulated: *simulated,
                limit_per_class: Some(plan.llm_limit_per_class),
                ..blank(Kind::Llm)
            });
        }
    }
    Experiment {
        name: Some(format!("demo-{m}")),
        output: Some(args.out.join(m.as_str())),
        dataset: DatasetSpec {
            seed: args.seed,
            image_size: Some(plan.synth.size as usize),
            ..DatasetSpec::new(dataset)
        },
        classifiers,
        energy: EnergySpec {
            country: args.country.clone(),
            electricity_usd_per_kwh: args.electricity_price,
            ..Default::default()
        },
        eval: EvalSpec::default(),
    }
}
