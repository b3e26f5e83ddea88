//! The predictions CSV of `mica eval`: any tool's predictions, scored the same way.
//!
//! Format: a header row, then one row per image.
//! - `label` (required): the true class name;
//! - `prediction` (required): the predicted class name; an empty cell, `unparseable`,
//!   `refused` or `failed` (any case) means the model gave no answer, which counts as wrong and gets its own
//!   confusion-matrix column;
//! - `prob_<class>` (optional): the probability of `<class>`, 0..=1; a row may leave all of
//!   them empty (e.g. a failed call), which turns ROC AUC and ECE off for the file; they need
//!   not sum to 1 (scikit-learn's multi-class AUC insists on it, mica ranks them as given);
//! - other columns (ids, paths) are ignored. Column names are matched after trimming and
//!   lower-casing; class names are case-sensitive.
//!
//! The label set is the sorted (byte-order) union of the `label` values and the `<class>` names
//! of the `prob_` columns, so the class order never depends on row order. A prediction outside
//! that set is an error naming its line: it is usually a typo or a different label vocabulary,
//! and scoring it as a plain miss would hide that.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mica_core::LabelSet;

use crate::metrics::{evaluate, EvalReport};
use crate::{EvalError, EvalOptions, NO_ANSWER};

/// A parsed predictions file, labels still as text.
#[derive(Debug, Clone)]
pub struct PredictionsCsv {
    pub path: PathBuf,
    /// Class names of the `prob_` columns, in column order.
    pub prob_classes: Vec<String>,
    pub rows: Vec<CsvRow>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CsvRow {
    /// Line in the file (the header is line 1), for error messages.
    pub line: u64,
    pub label: String,
    /// None when the model gave no answer.
    pub prediction: Option<String>,
    /// Values of the `prob_` columns in column order; None when the row leaves them all empty.
    pub probs: Option<Vec<f64>>,
}

/// A predictions file mapped onto a label set, ready for [`evaluate`].
#[derive(Debug, Clone)]
pub struct EncodedPredictions {
    pub labels: LabelSet,
    pub y_true: Vec<usize>,
    /// [`NO_ANSWER`] where the model gave none.
    pub y_pred: Vec<usize>,
    pub probs: Option<Vec<Vec<f64>>>,
    /// Why probabilities were not used, if the file has some.
    pub notes: Vec<String>,
}

impl EncodedPredictions {
    pub fn evaluate(&self, opts: &EvalOptions) -> Result<EvalReport, EvalError> {
        let mut r = evaluate(&self.labels, &self.y_true, &self.y_pred, self.probs.as_deref(), opts)?;
        r.notes.extend(self.notes.iter().cloned());
        Ok(r)
    }
}

/// Prediction cell values that mean "no answer".
pub const NO_ANSWER_TOKENS: [&str; 3] = ["unparseable", "refused", "failed"];

fn is_no_answer(v: &str) -> bool {
    v.is_empty() || NO_ANSWER_TOKENS.iter().any(|t| v.eq_ignore_ascii_case(t))
}

impl PredictionsCsv {
    pub fn read(path: impl AsRef<Path>) -> Result<PredictionsCsv, EvalError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| mica_core::CoreError::io(path, e))?;
        Self::parse(path, &bytes)
    }

    /// Parses file contents; `path` only names the file in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<PredictionsCsv, EvalError> {
        let file_err = |message: String| EvalError::File {
            path: path.to_path_buf(),
            message,
        };
        let row_err = |line: u64, message: String| EvalError::Row {
            path: path.to_path_buf(),
            line,
            message,
        };
        if std::str::from_utf8(bytes).is_err() {
            return Err(file_err("not a UTF-8 text file (expected a CSV with a label,prediction header)".into()));
        }
        let mut rdr = csv::ReaderBuilder::new().has_headers(true).from_reader(bytes);
        let headers = rdr
            .headers()
            .map_err(|e| file_err(format!("cannot read the CSV header: {e}")))?
            .clone();
        let names: Vec<String> = headers.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
        if names.iter().all(|n| n.is_empty()) {
            return Err(file_err("empty file: expected a header row with columns label,prediction".into()));
        }
        let find = |want: &str| -> Result<usize, EvalError> {
            let mut hits = names.iter().enumerate().filter(|(_, n)| *n == want);
            let first = hits.next().map(|(i, _)| i);
            if hits.next().is_some() {
                return Err(file_err(format!("column `{want}` appears more than once")));
            }
            first.ok_or_else(|| {
                file_err(format!(
                    "missing column `{want}` (expected label,prediction[,prob_<class>...]; found: {})",
                    headers.iter().map(|h| h.trim()).collect::<Vec<_>>().join(",")
                ))
            })
        };
        let label_col = find("label")?;
        let pred_col = find("prediction")?;
        let mut prob_cols = Vec::new();
        let mut prob_classes: Vec<String> = Vec::new();
        for (i, raw) in headers.iter().enumerate() {
            let raw = raw.trim();
            if raw.len() >= 5 && raw[..5].eq_ignore_ascii_case("prob_") {
                let class = raw[5..].to_string();
                if class.trim().is_empty() {
                    return Err(file_err(format!("column {} is `{raw}`: a prob_ column needs a class name", i + 1)));
                }
                if prob_classes.contains(&class) {
                    return Err(file_err(format!("column `{raw}` appears more than once")));
                }
                prob_cols.push(i);
                prob_classes.push(class);
            }
        }

        let mut rows = Vec::new();
        for rec in rdr.records() {
            let rec = rec.map_err(|e| match e.position() {
                Some(p) => row_err(p.line(), csv_message(&e)),
                None => file_err(csv_message(&e)),
            })?;
            let line = rec.position().map(|p| p.line()).unwrap_or(0);
            if rec.iter().all(|c| c.trim().is_empty()) {
                continue; // blank line
            }
            let label = rec.get(label_col).unwrap_or("").trim().to_string();
            if label.is_empty() {
                return Err(row_err(line, "empty `label` (every row needs its true class)".into()));
            }
            if is_no_answer(&label) {
                return Err(row_err(
                    line,
                    format!("label `{label}` is reserved for predictions without an answer"),
                ));
            }
            let pred = rec.get(pred_col).unwrap_or("").trim();
            let prediction = (!is_no_answer(pred)).then(|| pred.to_string());
            let cells: Vec<&str> = prob_cols.iter().map(|&c| rec.get(c).unwrap_or("").trim()).collect();
            let probs = if prob_cols.is_empty() || cells.iter().all(|c| c.is_empty()) {
                None
            } else {
                let mut v = Vec::with_capacity(cells.len());
                for (cell, class) in cells.iter().zip(&prob_classes) {
                    let x: f64 = cell.parse().map_err(|_| {
                        row_err(
                            line,
                            if cell.is_empty() {
                                format!("column `prob_{class}` is empty while other prob_ columns are filled")
                            } else {
                                format!("column `prob_{class}`: `{cell}` is not a number")
                            },
                        )
                    })?;
                    if !(0.0..=1.0).contains(&x) {
                        return Err(row_err(line, format!("column `prob_{class}`: {x} is not a probability (0..=1)")));
                    }
                    v.push(x);
                }
                Some(v)
            };
            rows.push(CsvRow {
                line,
                label,
                prediction,
                probs,
            });
        }
        if rows.is_empty() {
            return Err(file_err("no prediction rows after the header".into()));
        }
        Ok(PredictionsCsv {
            path: path.to_path_buf(),
            prob_classes,
            rows,
        })
    }

    /// The classes this file knows: `label` values and `prob_` classes.
    pub fn label_names(&self) -> BTreeSet<String> {
        let mut s: BTreeSet<String> = self.rows.iter().map(|r| r.label.clone()).collect();
        s.extend(self.prob_classes.iter().cloned());
        s
    }

    /// The file's own label set (sorted union, see the module docs).
    pub fn label_set(&self) -> Result<LabelSet, EvalError> {
        Ok(LabelSet::new(self.label_names().into_iter().collect())?)
    }

    /// Maps the rows onto `labels` (which must contain every `label` value).
    pub fn encode(&self, labels: &LabelSet) -> Result<EncodedPredictions, EvalError> {
        let row_err = |line: u64, message: String| EvalError::Row {
            path: self.path.clone(),
            line,
            message,
        };
        let known = || labels.names().join(", ");
        let mut y_true = Vec::with_capacity(self.rows.len());
        let mut y_pred = Vec::with_capacity(self.rows.len());
        for r in &self.rows {
            y_true.push(
                labels
                    .index_of(&r.label)
                    .ok_or_else(|| row_err(r.line, format!("label `{}` is not one of {}", r.label, known())))?,
            );
            y_pred.push(match &r.prediction {
                None => NO_ANSWER,
                Some(p) => labels.index_of(p).ok_or_else(|| {
                    row_err(
                        r.line,
                        format!(
                            "prediction `{p}` is not a known label (labels: {}); write `unparseable`, `refused` or `failed` for a case without an answer",
                            known()
                        ),
                    )
                })?,
            });
        }
        let mut notes = Vec::new();
        let probs = if self.prob_classes.is_empty() {
            None
        } else if let Some(missing) = labels.iter().find(|l| !self.prob_classes.iter().any(|c| c == l)) {
            notes.push(format!("ROC AUC and ECE not computed: no `prob_{missing}` column"));
            None
        } else if let Some(r) = self.rows.iter().find(|r| r.probs.is_none()) {
            notes.push(format!("ROC AUC and ECE not computed: line {} has no probabilities", r.line));
            None
        } else {
            let order: Vec<usize> = labels
                .iter()
                .map(|l| self.prob_classes.iter().position(|c| c == l).expect("checked above"))
                .collect();
            Some(
                self.rows
                    .iter()
                    .map(|r| {
                        let v = r.probs.as_ref().expect("checked above");
                        order.iter().map(|&j| v[j]).collect()
                    })
                    .collect(),
            )
        };
        Ok(EncodedPredictions {
            labels: labels.clone(),
            y_true,
            y_pred,
            probs,
            notes,
        })
    }

    /// Encodes two files on the same images for a paired comparison: one shared label set (the
    /// union of both), the same number of rows and the same true label row by row.
    pub fn paired(a: &PredictionsCsv, b: &PredictionsCsv) -> Result<(EncodedPredictions, EncodedPredictions), EvalError> {
        if a.rows.len() != b.rows.len() {
            return Err(EvalError::File {
                path: b.path.clone(),
                message: format!(
                    "{} rows, but {} has {}: --versus needs predictions on the same images in the same order",
                    b.rows.len(),
                    a.path.display(),
                    a.rows.len()
                ),
            });
        }
        for (ra, rb) in a.rows.iter().zip(&b.rows) {
            if ra.label != rb.label {
                return Err(EvalError::Row {
                    path: b.path.clone(),
                    line: rb.line,
                    message: format!(
                        "label `{}` differs from `{}` on line {} of {}: --versus needs the same images in the same order",
                        rb.label,
                        ra.label,
                        ra.line,
                        a.path.display()
                    ),
                });
            }
        }
        let mut names = a.label_names();
        names.extend(b.label_names());
        let labels = LabelSet::new(names.into_iter().collect())?;
        Ok((a.encode(&labels)?, b.encode(&labels)?))
    }
}

fn csv_message(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("{len} fields, but the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_string(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<PredictionsCsv, EvalError> {
        PredictionsCsv::parse(Path::new("p.csv"), s.as_bytes())
    }

    #[test]
    fn label_set_is_sorted_union_with_prob_classes() {
        let f = parse("id,label,prediction,prob_normal,prob_covid,prob_viral\n1,normal,covid,0.2,0.7,0.1\n2,covid,covid,0.1,0.8,0.1\n").unwrap();
        assert_eq!(f.label_set().unwrap().names(), ["covid", "normal", "viral"]);
        let e = f.encode(&f.label_set().unwrap()).unwrap();
        assert_eq!(e.y_true, vec![1, 0]);
        assert_eq!(e.y_pred, vec![0, 0]);
        // Reordered into label order: covid, normal, viral.
        assert_eq!(e.probs.unwrap()[0], vec![0.7, 0.2, 0.1]);
    }

    #[test]
    fn no_answer_tokens_and_blank_lines() {
        let f = parse("label,prediction\na,a\nb,\n\nb,FAILED\na, unparseable \nb,b\na,Refused\n").unwrap();
        let e = f.encode(&f.label_set().unwrap()).unwrap();
        assert_eq!(e.y_pred, vec![0, NO_ANSWER, NO_ANSWER, NO_ANSWER, 1, NO_ANSWER]);
        assert_eq!(f.rows[4].line, 7);
        let r = e.evaluate(&EvalOptions::default()).unwrap();
        assert_eq!(r.no_answer, 4);
    }

    #[test]
    fn unknown_prediction_names_line_and_value() {
        let f = parse("label,prediction\na,a\nb,c\n").unwrap();
        let err = f.encode(&f.label_set().unwrap()).unwrap_err().to_string();
        assert!(err.starts_with("p.csv:3: prediction `c` is not a known label (labels: a, b)"), "{err}");
    }

    #[test]
    fn missing_columns_name_the_file_and_column() {
        let err = parse("label,pred\na,a\n").unwrap_err().to_string();
        assert!(err.starts_with("p.csv: missing column `prediction`"), "{err}");
        assert!(err.contains("found: label,pred"), "{err}");
        let err = parse("truth,prediction\na,a\n").unwrap_err().to_string();
        assert!(err.contains("missing column `label`"), "{err}");
        let err = parse("").unwrap_err().to_string();
        assert!(err.contains("p.csv: empty file"), "{err}");
        let err = parse("label,prediction\n").unwrap_err().to_string();
        assert!(err.contains("no prediction rows"), "{err}");
    }

    #[test]
    fn bad_cells_name_the_line() {
        let err = parse("label,prediction,prob_a,prob_b\na,a,0.5,x\n").unwrap_err().to_string();
        assert!(err.starts_with("p.csv:2: column `prob_b`: `x` is not a number"), "{err}");
        let err = parse("label,prediction,prob_a,prob_b\na,a,0.5,1.5\n").unwrap_err().to_string();
        assert!(err.contains("p.csv:2: column `prob_b`: 1.5 is not a probability"), "{err}");
        let err = parse("label,prediction\na,a\n,b\n").unwrap_err().to_string();
        assert!(err.starts_with("p.csv:3: empty `label`"), "{err}");
        let err = parse("label,prediction\na,a\nb,b,extra\n").unwrap_err().to_string();
        assert!(err.starts_with("p.csv:3: 3 fields, but the header has 2"), "{err}");
        let err = parse("label,prediction\nfailed,a\n").unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");
        let err = PredictionsCsv::parse(Path::new("p.csv"), b"\xff\xfe\x00\x01").unwrap_err().to_string();
        assert!(err.contains("not a UTF-8"), "{err}");
    }

    #[test]
    fn partial_probabilities_turn_auc_off_with_a_note() {
        let f = parse("label,prediction,prob_a,prob_b\na,a,0.9,0.1\nb,failed,,\n").unwrap();
        let e = f.encode(&f.label_set().unwrap()).unwrap();
        assert!(e.probs.is_none());
        assert!(e.notes[0].contains("line 3 has no probabilities"), "{:?}", e.notes);
        let f = parse("label,prediction,prob_a\na,a,0.9\nb,b,0.2\n").unwrap();
        let e = f.encode(&f.label_set().unwrap()).unwrap();
        assert!(e.notes[0].contains("no `prob_b` column"), "{:?}", e.notes);
        let err = parse("label,prediction,prob_a,prob_b\na,a,0.9,\n").unwrap_err().to_string();
        assert!(err.contains("`prob_b` is empty"), "{err}");
    }

    #[test]
    fn pairing_checks_rows_and_labels() {
        let a = parse("label,prediction\nx,x\ny,y\n").unwrap();
        let b = PredictionsCsv::parse(Path::new("b.csv"), b"label,prediction,prob_x,prob_y,prob_z\nx,z,0.2,0.2,0.6\ny,x,0.5,0.4,0.1\n").unwrap();
        let (ea, eb) = PredictionsCsv::paired(&a, &b).unwrap();
        // z is known only from b's prob_ column; both files share the union label set.
        assert_eq!(ea.labels.names(), ["x", "y", "z"]);
        assert_eq!(eb.y_pred, vec![2, 0]);
        assert!(ea.probs.is_none() && eb.probs.is_some());
        let c = PredictionsCsv::parse(Path::new("c.csv"), b"label,prediction\nx,x\n").unwrap();
        let err = PredictionsCsv::paired(&a, &c).unwrap_err().to_string();
        assert!(err.starts_with("c.csv: 1 rows, but p.csv has 2"), "{err}");
        let d = PredictionsCsv::parse(Path::new("d.csv"), b"label,prediction\nx,x\nx,y\n").unwrap();
        let err = PredictionsCsv::paired(&a, &d).unwrap_err().to_string();
        assert!(err.starts_with("d.csv:3: label `x` differs from `y` on line 3 of p.csv"), "{err}");
    }
}
