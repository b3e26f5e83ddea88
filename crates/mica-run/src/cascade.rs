//! The cascade arm of the factory: a first stage (usually a CNN) on every image, a second
//! (usually an LLM) only on the images the first is unsure of, a physician when both are.
//!
//! Both stages are built by [`factory::build`] from the entry's [`ClassifierConfig::stage`]
//! entries, so any family works as a stage, and a `cnn-train:` first stage trains on the run's
//! own train split into its own model directory (`models/<slug>-first`). The decision rule is
//! `mica_eval::cascade::combine`, the same function the offline threshold sweep uses.
//!
//! Resume needs nothing special: the run engine logs the cascade's predictions, so a re-run
//! asks neither stage about a finished image, and a failed second stage leaves a failed
//! prediction, which a resumed run asks again (first stage included: the CNN's answer is not
//! logged apart, and re-running it costs milliseconds).

use mica_core::{Classifier, ClassifyError, LabelSet, Outcome, Prediction, Sample};
use mica_eval::cascade::{combine, first_answers, CascadeRecord, CascadeSummary, CascadeThresholds};

use crate::experiment::{CascadeStage, ClassifierConfig};
use crate::factory::{self, BuildContext, Built};
use crate::run::Event;
use crate::spec::ClassifierSpec;
use crate::RunError;

/// Runs two classifiers as a cascade.
pub struct CascadeClassifier {
    name: String,
    labels: LabelSet,
    first: Box<dyn Classifier>,
    second: Box<dyn Classifier>,
    second_name: String,
    thresholds: CascadeThresholds,
    /// Tell the second stage the first's top two labels (`--cascade-context`).
    context: bool,
}

impl CascadeClassifier {
    /// Refuses `context` for a second stage that cannot read a note (anything but an LLM),
    /// rather than silently running without it.
    pub fn new(
        name: impl Into<String>,
        first: Box<dyn Classifier>,
        second: Box<dyn Classifier>,
        thresholds: CascadeThresholds,
        context: bool,
    ) -> Result<Self, String> {
        let name = name.into();
        if context && !second.accepts_notes() {
            return Err(format!(
                "{name}: --cascade-context tells the second stage the first's answer in its prompt, but `{}` reads no prompt (use an llm: second stage)",
                second.name()
            ));
        }
        Ok(CascadeClassifier {
            labels: first.labels().clone(),
            second_name: second.name().to_string(),
            name,
            first,
            second,
            thresholds,
            context,
        })
    }

    pub fn thresholds(&self) -> CascadeThresholds {
        self.thresholds
    }
}

/// What `--cascade-context` tells the second stage: the first model's two most probable labels
/// with their confidences (its predicted label and confidence when it gives no probabilities).
/// Built from the first model's output only, so it can carry neither the true label (beyond
/// what the first model predicted) nor a file name. None when the first stage gave no label.
pub fn suggestion(first: &Prediction) -> Option<String> {
    if let Some(probs) = first.probabilities.as_ref().filter(|p| !p.is_empty()) {
        let mut ranked: Vec<(&String, f64)> = probs.iter().map(|(l, p)| (l, *p)).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        let top: Vec<String> = ranked.iter().take(2).map(|(l, p)| format!("{l} (confidence {p:.2})")).collect();
        return Some(format!("an image classifier ranks {}.", top.join(", then ")));
    }
    let label = first.predicted.as_deref().filter(|_| !first.outcome.is_no_answer())?;
    Some(match first.confidence {
        Some(c) => format!("an image classifier suggests {label} (confidence {c:.2})."),
        None => format!("an image classifier suggests {label}."),
    })
}

impl Classifier for CascadeClassifier {
    fn name(&self) -> &str {
        &self.name
    }

    fn labels(&self) -> &LabelSet {
        &self.labels
    }

    /// The first stage on the whole batch, the second on the unsure ones only. A first stage
    /// that could not classify an image (unreadable file) fails the image: the second would
    /// fail to read it too.
    fn classify(&mut self, batch: &[Sample]) -> Vec<Result<Prediction, ClassifyError>> {
        let t = self.thresholds;
        let mut out: Vec<Option<Result<Prediction, ClassifyError>>> = vec![None; batch.len()];
        let mut unsure: Vec<(usize, Prediction)> = Vec::new();
        let firsts = self.first.classify(batch);
        for (i, (s, r)) in batch.iter().zip(firsts.into_iter().chain(std::iter::repeat_with(|| {
            Err(ClassifyError { sample_id: String::new(), message: "no answer from the first stage".into() })
        })))
        .enumerate()
        {
            match r {
                Err(e) => {
                    out[i] = Some(Err(ClassifyError {
                        sample_id: s.id.clone(),
                        message: format!("first stage: {}", e.message),
                    }))
                }
                Ok(p) if first_answers(&p, &t) => out[i] = Some(Ok(self.named(combine(&p, None, &t)))),
                Ok(p) => unsure.push((i, p)),
            }
        }
        if !unsure.is_empty() {
            let samples: Vec<Sample> = unsure.iter().map(|(i, _)| batch[*i].clone()).collect();
            let seconds = if self.context {
                let notes: Vec<Option<String>> = unsure.iter().map(|(_, p)| suggestion(p)).collect();
                self.second.classify_with_notes(&samples, &notes)
            } else {
                self.second.classify(&samples)
            };
            let mut seconds = seconds.into_iter();
            for (i, first) in unsure {
                let second = match seconds.next() {
                    Some(Ok(p)) => p,
                    Some(Err(e)) => self.failed_second(&batch[i], e.message),
                    None => self.failed_second(&batch[i], "the second stage returned no answer".into()),
                };
                out[i] = Some(Ok(self.named(combine(&first, Some(&second), &t))));
            }
        }
        out.into_iter()
            .map(|o| o.expect("every image of the batch is decided above"))
            .collect()
    }
}

impl CascadeClassifier {
    fn named(&self, mut p: Prediction) -> Prediction {
        p.classifier = self.name.clone();
        p
    }

    fn failed_second(&self, s: &Sample, message: String) -> Prediction {
        let mut p = Prediction::new(&s.id, &self.second_name, Outcome::Failed);
        p.error = Some(message);
        p
    }
}

/// What the run records about a cascade's money figure, from its stages': the most telling
/// basis wins (a simulated stage makes the whole run simulated; a priced API stage makes it
/// `api-price`; an API without a price makes the total unknown).
fn cost_basis(simulated: bool, first: &'static str, second: &'static str) -> &'static str {
    if simulated {
        return "simulated";
    }
    for basis in ["unknown-price", "api-price"] {
        if first == basis || second == basis {
            return basis;
        }
    }
    "no-api-fee"
}

pub(crate) fn build(
    cfg: &ClassifierConfig,
    spec: &ClassifierSpec,
    ctx: &BuildContext,
    progress: &mut dyn FnMut(Event),
) -> Result<Built, RunError> {
    let ClassifierSpec::Cascade { threshold, second_threshold, .. } = spec else {
        unreachable!("the factory sends only cascade specs here")
    };
    let thresholds = CascadeThresholds { first: *threshold, second: *second_threshold };
    let mut stages = Vec::with_capacity(2);
    for which in [CascadeStage::First, CascadeStage::Second] {
        let stage = cfg.stage(which).map_err(RunError::Invalid)?;
        let name = stage.display_name();
        let slug = stage.slug();
        let sub = BuildContext {
            ds: ctx.ds,
            dataset: ctx.dataset,
            root: ctx.root,
            slug: &slug,
            name: &name,
            energy: ctx.energy,
        };
        let built = factory::build(&stage, &sub, progress)?;
        stages.push((stage, name, slug, built));
    }
    let (_, second_name, second_slug, mut second) = stages.pop().expect("two stages");
    let (_, first_name, first_slug, mut first) = stages.pop().expect("two stages");
    let simulated = first.simulated || second.simulated;
    let stage_record = |name: &str, slug: &str, b: &mut Built| {
        serde_json::json!({
            "spec": name,
            "slug": slug,
            "cost_basis": b.cost_basis,
            "latency_kind": b.latency_kind,
            "simulated": b.simulated,
            "batch": b.batch,
            "local_server_port": b.local_server,
            // The stage's own provenance: checkpoint and training (CNN), configuration (LLM).
            "extra": std::mem::take(&mut b.extra),
        })
    };
    let stages_record = serde_json::json!({
        "threshold": thresholds.first,
        "second_threshold": thresholds.second,
        "context": cfg.cascade_context,
        "first": stage_record(&first_name, &first_slug, &mut first),
        "second": stage_record(&second_name, &second_slug, &mut second),
    });
    let batch = first.batch.max(second.batch);
    let classifier = CascadeClassifier::new(ctx.name, first.classifier, second.classifier, thresholds, cfg.cascade_context)
        .map_err(RunError::Invalid)?;
    let mut b = Built::new(Box::new(classifier), batch);
    b.simulated = simulated;
    b.cost_basis = cost_basis(simulated, first.cost_basis, second.cost_basis);
    // One cascade latency is the sum of the stages that ran; when an LLM may be asked, a
    // request dominates it.
    b.latency_kind = if second.latency_kind == mica_eval::LatencyKind::PerRequest {
        mica_eval::LatencyKind::PerRequest
    } else {
        first.latency_kind
    };
    // The model server whose energy belongs to the run: the second stage's, else the first's.
    b.local_server = second.local_server.or(first.local_server);
    if first.remote_usage.is_some() {
        progress(Event::Notice(format!(
            "{}: the first stage `{first_name}` is a remote API: the energy report records the second stage's usage only",
            ctx.name
        )));
    }
    // A remote second stage made requests only for the images that reached it.
    if let Some(remote) = second.remote_usage.take() {
        b.remote_usage = Some(Box::new(move |preds: &[Prediction]| remote(reached_second(preds).as_slice())));
    }
    let second_summary = second.summarize.take();
    b.summarize = Some(Box::new(move |preds: &[Prediction]| {
        let mut m = serde_json::Map::new();
        if let Some(s) = CascadeSummary::from_predictions(preds) {
            m.insert("cascade".into(), serde_json::to_value(s).expect("summary serialises"));
        }
        // The second stage's own summary (the LLM's parse stages, filter, tokens) over the
        // images it was asked about.
        if let Some(f) = &second_summary {
            m.insert("cascade_second".into(), serde_json::Value::Object(f(reached_second(preds).as_slice())));
        }
        m
    }));
    b.extra.insert("cascade_stages".into(), stages_record);
    Ok(b)
}

/// The predictions whose image the second stage was asked about.
fn reached_second(preds: &[Prediction]) -> Vec<Prediction> {
    preds
        .iter()
        .filter(|p| CascadeRecord::of(p).is_some_and(|r| r.reached_second()))
        .cloned()
        .collect()
}

#[cfg(test)]
#[path = "cascade_tests.rs"]
mod engine_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_suggestion_names_the_top_two_and_nothing_else() {
        let mut p = Prediction::new("s1", "cnn:x", Outcome::Answered);
        p.predicted = Some("glioma".into());
        p.confidence = Some(0.62);
        p.probabilities = Some(BTreeMap::from([
            ("glioma".to_string(), 0.62),
            ("meningioma".to_string(), 0.21),
            ("no_tumor".to_string(), 0.1),
            ("pituitary".to_string(), 0.07),
        ]));
        assert_eq!(
            suggestion(&p).unwrap(),
            "an image classifier ranks glioma (confidence 0.62), then meningioma (confidence 0.21)."
        );
        p.probabilities = None;
        assert_eq!(suggestion(&p).unwrap(), "an image classifier suggests glioma (confidence 0.62).");
        p.outcome = Outcome::Failed;
        assert!(suggestion(&p).is_none());
    }

    #[test]
    fn cost_basis_takes_the_most_telling_stage() {
        assert_eq!(cost_basis(false, "no-api-fee", "api-price"), "api-price");
        assert_eq!(cost_basis(false, "no-api-fee", "unknown-price"), "unknown-price");
        assert_eq!(cost_basis(false, "no-api-fee", "no-api-fee"), "no-api-fee");
        assert_eq!(cost_basis(true, "no-api-fee", "api-price"), "simulated");
    }
}
