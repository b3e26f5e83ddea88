//! Several tasks in one server: a chest X-ray panel and a brain MRI panel side by side, each
//! with its own classifiers and labels, and the rule that decides which one an upload goes to.
//!
//! An image is never classified by a task it does not belong to. The uploader may name the
//! task; a DICOM upload also says what it is (Modality, Body Part Examined), and when that
//! contradicts the task the case is recorded with a mismatch flag and no classifier is asked,
//! unless the uploader explicitly overrides (the override is recorded on the case). PNG and
//! JPEG carry no such header, so they go to the named task, or to the only one.
//!
//! The DICOM map (what a header says a study is):
//!
//! | Modality            | Body Part Examined                | task modality |
//! |---------------------|-----------------------------------|---------------|
//! | `CR`, `DX`, `DR`    | absent, `CHEST`, `THORAX`, `LUNG`  | `xray`        |
//! | `MR`                | absent, `BRAIN`, `HEAD`, `SKULL`   | `mri`         |
//! | `CT`                | absent, `CHEST`, `THORAX`, `LUNG`  | `ct`          |
//!
//! Any other Modality, or a body part that contradicts the table (an `MR` of the `KNEE`), maps
//! to no task: the case is flagged rather than guessed.

use std::path::Path;
use std::sync::Arc;

use mica_core::Modality;
use mica_energy::MeterConfig;

use crate::panel::{LlmOptions, Panel};
use crate::ServerError;

/// One task as configured: a name the uploader picks and the classifier specs of its panel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    /// The task's modality (`xray`, `mri`, `ct`); needed when only LLMs are configured, else
    /// taken from the CNNs (and from the name when it is one of these words).
    #[serde(default)]
    pub modality: Option<String>,
    pub classifiers: Vec<String>,
}

impl TaskSpec {
    /// Parses `NAME=SPEC,SPEC,...` (`--task xray=cnn:runs/x,llm:openai/gpt-4o`).
    pub fn parse(s: &str) -> Result<TaskSpec, ServerError> {
        let (name, specs) = s.split_once('=').ok_or_else(|| {
            ServerError::Config(format!("--task `{s}`: expected NAME=SPEC[,SPEC...], e.g. xray=cnn:runs/xray,llm:openai/gpt-4o"))
        })?;
        let classifiers: Vec<String> =
            specs.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect();
        let t = TaskSpec { name: name.trim().to_string(), modality: None, classifiers };
        t.check()?;
        Ok(t)
    }

    fn check(&self) -> Result<(), ServerError> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 40
            && self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(ServerError::Config(format!(
                "task name `{}`: use 1 to 40 letters, digits, `-` or `_`",
                self.name.chars().take(40).collect::<String>()
            )));
        }
        if self.classifiers.is_empty() {
            return Err(ServerError::Config(format!("task `{}` has no classifier", self.name)));
        }
        Ok(())
    }

    /// The modality the task is for: the explicit one, else the name when it names one.
    fn modality(&self) -> Result<Option<Modality>, ServerError> {
        match &self.modality {
            Some(m) => m
                .parse::<Modality>()
                .map(Some)
                .map_err(|e| ServerError::Config(format!("task `{}`: {e}", self.name))),
            None => Ok(self.name.parse::<Modality>().ok().filter(|m| *m != Modality::Other)),
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TasksFile {
    task: Vec<TaskSpec>,
}

/// Reads a tasks file (`--tasks tasks.toml`):
///
/// ```toml
/// [[task]]
/// name = "xray"
/// classifiers = ["cnn:runs/xray", "llm:openai/gpt-4o"]
///
/// [[task]]
/// name = "brain"
/// modality = "mri"
/// classifiers = ["cnn:runs/brain-mri"]
/// ```
pub fn read_tasks_file(path: &Path) -> Result<Vec<TaskSpec>, ServerError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
    let f: TasksFile =
        toml::from_str(&text).map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
    for t in &f.task {
        t.check()?;
    }
    Ok(f.task)
}

/// A configured task with its loaded panel.
pub struct Task {
    pub name: String,
    pub panel: Arc<Panel>,
}

/// Loads every task's panel; names must be unique.
pub fn load_tasks(
    specs: &[TaskSpec],
    llm: &LlmOptions,
    meter: &MeterConfig,
) -> Result<Vec<Task>, ServerError> {
    if specs.is_empty() {
        return Err(ServerError::Config("no task configured".into()));
    }
    let mut out: Vec<Task> = Vec::new();
    for s in specs {
        if out.iter().any(|t| t.name == s.name) {
            return Err(ServerError::Config(format!("task `{}` is given twice", s.name)));
        }
        let panel = Panel::load(&s.classifiers, s.modality()?, llm, meter)
            .map_err(|e| ServerError::Config(format!("task `{}`: {e}", s.name)))?;
        out.push(Task { name: s.name.clone(), panel: Arc::new(panel) });
    }
    Ok(out)
}

/// What a DICOM header says the study is (see the module table); `None` when the header
/// names something no task modality covers.
pub fn modality_from_dicom(modality: &str, body_part: Option<&str>) -> Option<Modality> {
    let m = modality.trim().to_ascii_uppercase();
    let part = body_part.map(|b| b.trim().to_ascii_uppercase()).filter(|b| !b.is_empty());
    let chest = |p: &Option<String>| p.as_deref().is_none_or(|b| matches!(b, "CHEST" | "THORAX" | "LUNG"));
    let head = |p: &Option<String>| p.as_deref().is_none_or(|b| matches!(b, "BRAIN" | "HEAD" | "SKULL"));
    match m.as_str() {
        "CR" | "DX" | "DR" if chest(&part) => Some(Modality::Xray),
        "MR" if head(&part) => Some(Modality::Mri),
        "CT" if chest(&part) => Some(Modality::Ct),
        _ => None,
    }
}

/// Human words for a task modality, for messages.
pub fn modality_words(m: Modality) -> &'static str {
    match m {
        Modality::Xray => "chest X-ray",
        Modality::Mri => "brain MRI",
        Modality::Ct => "chest CT",
        Modality::Other => "an unspecified task",
    }
}

/// Which task an upload goes to, and whether its header contradicts that task.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub task: usize,
    /// Why the image does not belong to the task (None: it does, or nothing says otherwise).
    pub mismatch: Option<String>,
}

/// Why no task could be chosen (HTTP 422 with this message).
#[derive(Debug, Clone, PartialEq)]
pub struct NoTask(pub String);

/// Picks the task for an upload: the named one, else the one the DICOM header maps to, else
/// the only one. A named (or only) task that the header contradicts is kept and flagged.
pub fn route(
    tasks: &[(String, Modality)],
    asked: Option<&str>,
    dicom_modality: Option<&str>,
    body_part: Option<&str>,
) -> Result<Routing, NoTask> {
    let names = || tasks.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
    let header = dicom_modality.map(|m| (m, modality_from_dicom(m, body_part)));
    let describe = |m: &str| match body_part.map(str::trim).filter(|b| !b.is_empty()) {
        Some(b) => format!("Modality {m}, Body Part Examined {b}"),
        None => format!("Modality {m}"),
    };
    let task = match asked.map(str::trim).filter(|a| !a.is_empty()) {
        Some(a) => tasks
            .iter()
            .position(|(n, _)| n == a)
            .ok_or_else(|| NoTask(format!("no task `{}` on this server (tasks: {})", a.chars().take(40).collect::<String>(), names())))?,
        None if tasks.len() == 1 => 0,
        None => match header {
            Some((m, Some(wanted))) => tasks.iter().position(|(_, tm)| *tm == wanted).ok_or_else(|| {
                NoTask(format!(
                    "the DICOM header ({}) is a {} study, and no task on this server is for that (tasks: {}); choose a task explicitly",
                    describe(m),
                    modality_words(wanted),
                    names()
                ))
            })?,
            Some((m, None)) => {
                return Err(NoTask(format!(
                    "the DICOM header ({}) matches no task on this server (tasks: {}); choose a task explicitly",
                    describe(m),
                    names()
                )))
            }
            None => {
                return Err(NoTask(format!(
                    "this server has several tasks ({}): choose one for a PNG or JPEG upload (the `task` field)",
                    names()
                )))
            }
        },
    };
    let (name, tm) = &tasks[task];
    let mismatch = match header {
        _ if *tm == Modality::Other => None,
        Some((m, Some(w))) if w == *tm => {
            let _ = m;
            None
        }
        Some((m, w)) => Some(format!(
            "modality mismatch: the DICOM header ({}) is {}, but task `{name}` is for {}",
            describe(m),
            w.map(|w| format!("a {} study", modality_words(w))).unwrap_or_else(|| "not a study any task covers".into()),
            modality_words(*tm)
        )),
        None => None,
    };
    Ok(Routing { task, mismatch })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Vec<(String, Modality)> {
        vec![("xray".into(), Modality::Xray), ("brain".into(), Modality::Mri)]
    }

    #[test]
    fn task_flags_parse_and_bad_ones_say_why() {
        let t = TaskSpec::parse("xray=cnn:runs/x, llm:openai/gpt-4o").unwrap();
        assert_eq!(t.name, "xray");
        assert_eq!(t.classifiers, ["cnn:runs/x", "llm:openai/gpt-4o"]);
        assert_eq!(t.modality().unwrap(), Some(Modality::Xray));
        assert_eq!(TaskSpec::parse("brain=cnn:r").unwrap().modality().unwrap(), None);
        assert!(TaskSpec::parse("cnn:runs/x").is_err());
        assert!(TaskSpec::parse("x=").is_err());
        assert!(TaskSpec::parse("a b=cnn:r").is_err());
    }

    #[test]
    fn tasks_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tasks.toml");
        std::fs::write(
            &p,
            "[[task]]\nname = \"xray\"\nclassifiers = [\"cnn:a\"]\n[[task]]\nname = \"brain\"\nmodality = \"mri\"\nclassifiers = [\"cnn:b\", \"llm:openai/gpt-4o\"]\n",
        )
        .unwrap();
        let t = read_tasks_file(&p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].modality().unwrap(), Some(Modality::Mri));
        std::fs::write(&p, "[[task]]\nname = \"x\"\nclassifier = []\n").unwrap();
        assert!(read_tasks_file(&p).is_err());
    }

    #[test]
    fn the_dicom_map_follows_the_documented_table() {
        assert_eq!(modality_from_dicom("CR", None), Some(Modality::Xray));
        assert_eq!(modality_from_dicom("dx", Some("CHEST")), Some(Modality::Xray));
        assert_eq!(modality_from_dicom("DX", Some("HAND")), None);
        assert_eq!(modality_from_dicom("MR", Some("BRAIN")), Some(Modality::Mri));
        assert_eq!(modality_from_dicom("MR", Some("KNEE")), None);
        assert_eq!(modality_from_dicom("CT", None), Some(Modality::Ct));
        assert_eq!(modality_from_dicom("US", None), None);
    }

    #[test]
    fn uploads_are_routed_and_contradictions_flagged() {
        let t = two();
        // The header picks the task when none is named.
        assert_eq!(route(&t, None, Some("MR"), None).unwrap(), Routing { task: 1, mismatch: None });
        assert_eq!(route(&t, None, Some("CR"), None).unwrap(), Routing { task: 0, mismatch: None });
        // A named task that the header contradicts is kept and flagged.
        let r = route(&t, Some("xray"), Some("MR"), None).unwrap();
        assert_eq!(r.task, 0);
        let m = r.mismatch.unwrap();
        assert!(m.contains("Modality MR") && m.contains("brain MRI") && m.contains("chest X-ray"), "{m}");
        // No header: the named task, or the only one; several tasks need a choice.
        assert_eq!(route(&t, Some("brain"), None, None).unwrap(), Routing { task: 1, mismatch: None });
        assert!(route(&t, None, None, None).unwrap_err().0.contains("several tasks"));
        assert!(route(&t, Some("knee"), None, None).unwrap_err().0.contains("no task `knee`"));
        assert!(route(&t, None, Some("CT"), None).unwrap_err().0.contains("chest CT"));
        // One task: an MR sent to a chest X-ray server is flagged, not classified silently.
        let one = vec![("xray".to_string(), Modality::Xray)];
        assert!(route(&one, None, Some("MR"), None).unwrap().mismatch.is_some());
        assert!(route(&one, None, Some("DX"), Some("KNEE")).unwrap().mismatch.unwrap().contains("KNEE"));
        // A task of unspecified modality cannot be contradicted.
        let other = vec![("misc".to_string(), Modality::Other)];
        assert_eq!(route(&other, None, Some("MR"), None).unwrap().mismatch, None);
    }
}
