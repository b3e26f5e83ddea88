//! Recognising a dataset on disk and turning it into a [`Dataset`].
//!
//! Detection looks only at folder and file names (cheap); loading then probes every image's
//! header so obviously broken files are listed as skipped up front instead of failing a
//! training run half-way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mica_core::{Dataset, ImageSource, LabelSet, Layout, Modality, Sample, SkippedFile, Split};
use rayon::prelude::*;

use crate::image::{extension, has_dicom_magic, probe, DICOM_EXTENSIONS, RASTER_EXTENSIONS};
use crate::labels::{canonical_index, detect_modality, label_set_for};
use crate::DataError;

/// The top folder of the COVID-19 Radiography Database as Kaggle ships it.
pub const COVID_TOP: &str = "COVID-19_Radiography_Dataset";
/// Optional per-image clinical context next to the dataset root.
pub const METADATA_FILE: &str = "metadata.csv";

pub use crate::context::ContextSpec;

/// One folder whose images all have one class (and maybe one official split).
#[derive(Debug, Clone)]
struct ClassDir {
    name: String,
    dir: PathBuf,
    split: Option<Split>,
}

#[derive(Debug)]
enum Plan {
    Folders {
        layout: Layout,
        classes: Vec<ClassDir>,
        /// Sub-folders never descended into (segmentation masks next to the images).
        skip_dirs: &'static [&'static str],
    },
    Csv(PathBuf),
    Npz(PathBuf),
}

/// Which layout `path` is in, without reading any image.
pub fn detect(path: &Path) -> Result<Layout, DataError> {
    Ok(match plan(path)? {
        Plan::Folders { layout, .. } => layout,
        Plan::Csv(_) => Layout::CsvManifest,
        Plan::Npz(_) => Layout::MedMnistNpz,
    })
}

/// Detects the layout of `path` and loads it: a dataset folder (ImageFolder, the three Kaggle
/// layouts, a folder of DICOM class folders), a CSV manifest file or a MedMNIST `.npz`.
///
/// Samples come sorted by id. Classes get the canonical labels when the class names belong to
/// one of the study tasks; samples keep the layout's official split, if any. Files that cannot
/// be used are listed in `skipped`, never fatal.
///
/// No clinical context is read: images and labels only (what a CNN, a split or an inspection
/// needs). [`load_with`] adds the context a prompt may carry.
pub fn load(path: &Path) -> Result<Dataset, DataError> {
    load_inner(path, None)
}

/// [`load`], with the metadata columns `context` says may reach a prompt (see
/// [`crate::context`]): a CSV manifest's own columns, else `metadata.csv` beside the images.
pub fn load_with(path: &Path, context: &ContextSpec) -> Result<Dataset, DataError> {
    load_inner(path, Some(context))
}

fn load_inner(path: &Path, context: Option<&ContextSpec>) -> Result<Dataset, DataError> {
    let root = path.to_path_buf();
    let mut ds = match plan(path)? {
        Plan::Folders {
            layout,
            classes,
            skip_dirs,
        } => load_folders(&root, layout, classes, skip_dirs)?,
        Plan::Csv(p) => load_csv_manifest(&p, context)?,
        Plan::Npz(p) => load_npz(&p)?,
    };
    ds.samples.sort_by(|a, b| a.id.cmp(&b.id));
    ds.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    if let (Some(c), false) = (context, ds.layout == Layout::CsvManifest) {
        attach_metadata(&mut ds, c)?;
    }
    Ok(ds)
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.') || name.starts_with("__")
}

/// Sorted (name, path) of the non-hidden sub-folders and files of `dir`.
fn list(dir: &Path) -> Result<(Vec<(String, PathBuf)>, Vec<(String, PathBuf)>), DataError> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_hidden(&name) {
            continue;
        }
        let p = entry.path();
        if p.is_dir() {
            dirs.push((name, p));
        } else {
            files.push((name, p));
        }
    }
    dirs.sort();
    files.sort();
    Ok((dirs, files))
}

fn find_dir<'a>(dirs: &'a [(String, PathBuf)], name: &str) -> Option<&'a PathBuf> {
    dirs.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, p)| p)
}

fn plan(path: &Path) -> Result<Plan, DataError> {
    if !path.exists() {
        return Err(DataError::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.is_file() {
        return match extension(path).as_deref() {
            Some("csv") => Ok(Plan::Csv(path.to_path_buf())),
            Some("npz") => Ok(Plan::Npz(path.to_path_buf())),
            _ => Err(DataError::usage(
                path,
                "is a file, not a dataset; expected a dataset folder, a CSV manifest (.csv) or a MedMNIST .npz file",
            )),
        };
    }
    let (dirs, files) = list(path)?;

    // COVID-19 Radiography: <top>/<Class>/images/*.png (masks/ beside images/ is not data).
    let covid_base = match find_dir(&dirs, COVID_TOP) {
        Some(top) => Some(top.clone()),
        None if !dirs.is_empty() && dirs.iter().all(|(_, d)| d.join("images").is_dir()) => {
            Some(path.to_path_buf())
        }
        None => None,
    };
    if let Some(base) = covid_base {
        let (cdirs, _) = list(&base)?;
        let classes: Vec<ClassDir> = cdirs
            .into_iter()
            .map(|(name, dir)| {
                let images = dir.join("images");
                ClassDir {
                    name,
                    dir: if images.is_dir() { images } else { dir },
                    split: None,
                }
            })
            .collect();
        if classes.is_empty() {
            return Err(DataError::invalid(&base, "no class folders inside"));
        }
        let names: Vec<&str> = classes.iter().map(|c| c.name.as_str()).collect();
        let layout = if detect_modality(names.iter().copied()) == Some(Modality::Xray) {
            Layout::CovidRadiography
        } else {
            Layout::ImageFolder
        };
        return Ok(Plan::Folders {
            layout,
            classes,
            skip_dirs: &["masks"],
        });
    }

    // Official splits: <root>[/Data]/{Training,Testing,train,valid,test}/<class>/.
    let split_base = match find_dir(&dirs, "Data") {
        Some(d) if dirs.len() == 1 => d.clone(),
        _ => path.to_path_buf(),
    };
    let (sdirs, _) = if split_base == path {
        (dirs.clone(), Vec::new())
    } else {
        list(&split_base)?
    };
    let split_dirs: Vec<(Split, &String, &PathBuf)> = sdirs
        .iter()
        .filter_map(|(n, p)| n.parse::<Split>().ok().map(|s| (s, n, p)))
        .collect();
    if !split_dirs.is_empty() && split_dirs.len() == sdirs.len() {
        let mut classes = Vec::new();
        for (split, _, dir) in &split_dirs {
            let (cdirs, _) = list(dir)?;
            if cdirs.is_empty() {
                return Err(DataError::invalid(*dir, "split folder has no class folders"));
            }
            classes.extend(cdirs.into_iter().map(|(name, d)| ClassDir {
                name,
                dir: d,
                split: Some(*split),
            }));
        }
        let names: Vec<&str> = classes.iter().map(|c| c.name.as_str()).collect();
        let training_testing = split_dirs
            .iter()
            .any(|(_, n, _)| n.eq_ignore_ascii_case("training") || n.eq_ignore_ascii_case("testing"));
        let layout = match detect_modality(names.iter().copied()) {
            Some(Modality::Mri) if training_testing => Layout::BrainTumorMri,
            Some(Modality::Ct) => Layout::ChestCt,
            Some(Modality::Mri) => Layout::BrainTumorMri,
            _ => Layout::ImageFolder,
        };
        return Ok(Plan::Folders {
            layout,
            classes,
            skip_dirs: &[],
        });
    }

    // Generic ImageFolder: <root>/<class>/* (DICOM when the files are DICOM).
    if !dirs.is_empty() {
        let classes: Vec<ClassDir> = dirs
            .iter()
            .map(|(name, dir)| ClassDir {
                name: name.clone(),
                dir: dir.clone(),
                split: None,
            })
            .collect();
        let any_dicom = classes.iter().any(|c| first_file_is_dicom(&c.dir));
        return Ok(Plan::Folders {
            layout: if any_dicom { Layout::Dicom } else { Layout::ImageFolder },
            classes,
            skip_dirs: &[],
        });
    }

    // A folder holding just a manifest or an archive.
    let npz: Vec<&PathBuf> = files
        .iter()
        .filter(|(_, p)| extension(p).as_deref() == Some("npz"))
        .map(|(_, p)| p)
        .collect();
    if npz.len() == 1 {
        return Ok(Plan::Npz(npz[0].clone()));
    }
    let csv: Vec<&PathBuf> = files
        .iter()
        .filter(|(n, p)| extension(p).as_deref() == Some("csv") && n != METADATA_FILE)
        .map(|(_, p)| p)
        .collect();
    if csv.len() == 1 {
        return Ok(Plan::Csv(csv[0].clone()));
    }
    Err(DataError::invalid(
        path,
        "unknown dataset layout: expected class folders (<root>/<class>/*), split folders \
         (Training/Testing or train/valid/test with class folders), COVID-19_Radiography_Dataset/, \
         or exactly one .csv manifest or .npz file",
    ))
}

fn first_file_is_dicom(dir: &Path) -> bool {
    let Ok((_, files)) = list(dir) else {
        return false;
    };
    files.first().is_some_and(|(_, p)| match extension(p) {
        Some(e) => DICOM_EXTENSIONS.contains(&e.as_str()),
        None => has_dicom_magic(p),
    })
}

/// Relative id with `/` separators, stable across machines and mount points.
fn rel_id(root: &Path, p: &Path) -> String {
    let rel = p.strip_prefix(root).unwrap_or(p);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Candidate image files under `dir` (recursively), and files that are plainly not images.
fn collect_files(
    dir: &Path,
    skip_dirs: &[&str],
    out: &mut Vec<PathBuf>,
    not_images: &mut Vec<PathBuf>,
) -> Result<(), DataError> {
    let (dirs, files) = list(dir)?;
    for (_, p) in files {
        match extension(&p) {
            Some(e) if RASTER_EXTENSIONS.contains(&e.as_str()) || DICOM_EXTENSIONS.contains(&e.as_str()) => {
                out.push(p)
            }
            None if has_dicom_magic(&p) => out.push(p),
            _ => not_images.push(p),
        }
    }
    for (name, d) in dirs {
        if skip_dirs.iter().any(|s| name.eq_ignore_ascii_case(s)) {
            continue;
        }
        collect_files(&d, skip_dirs, out, not_images)?;
    }
    Ok(())
}

fn load_folders(
    root: &Path,
    layout: Layout,
    classes: Vec<ClassDir>,
    skip_dirs: &[&str],
) -> Result<Dataset, DataError> {
    let names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
    let (modality, labels, index) = label_set_for(&names);
    let mut candidates: Vec<(PathBuf, usize, Option<Split>)> = Vec::new();
    let mut skipped = Vec::new();
    for (c, label) in classes.iter().zip(index) {
        let mut files = Vec::new();
        let mut not_images = Vec::new();
        collect_files(&c.dir, skip_dirs, &mut files, &mut not_images)?;
        if files.is_empty() {
            return Err(DataError::invalid(
                &c.dir,
                format!(
                    "class folder `{}` contains no images (PNG, JPEG, BMP, TIFF or DICOM)",
                    c.name
                ),
            ));
        }
        skipped.extend(not_images.into_iter().map(|p| SkippedFile {
            reason: format!(
                "not an image file (extension `{}`)",
                extension(&p).unwrap_or_default()
            ),
            path: p,
        }));
        candidates.extend(files.into_iter().map(|f| (f, label, c.split)));
    }
    let probed: Vec<Result<Sample, SkippedFile>> = candidates
        .into_par_iter()
        .map(|(path, label, split)| {
            let source = ImageSource::file(&path);
            match probe(&source) {
                Ok(_) => Ok(Sample {
                    id: rel_id(root, &path),
                    source,
                    label,
                    split,
                    context: None,
                }),
                Err(e) => Err(SkippedFile {
                    reason: e.reason(),
                    path,
                }),
            }
        })
        .collect();
    let mut samples = Vec::new();
    for r in probed {
        match r {
            Ok(s) => samples.push(s),
            Err(s) => skipped.push(s),
        }
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        layout,
        modality,
        labels,
        samples,
        skipped,
        context_columns: Vec::new(),
        label_like_context: Vec::new(),
    })
}

/// Columns that may hold the image path in a manifest or metadata file (folded names).
const PATH_COLUMNS: [&str; 7] = ["path", "id", "file", "filename", "file_name", "image", "image_id"];

fn header_index(headers: &csv::StringRecord, names: &[&str]) -> Option<usize> {
    headers
        .iter()
        .position(|h| names.contains(&crate::labels::fold(h).as_str()))
}

fn csv_reader(path: &Path) -> Result<csv::Reader<std::fs::File>, DataError> {
    let f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    Ok(csv::ReaderBuilder::new().flexible(false).trim(csv::Trim::All).from_reader(f))
}

fn csv_err(path: &Path, e: csv::Error) -> DataError {
    let line = e.position().map(|p| format!("line {}: ", p.line())).unwrap_or_default();
    DataError::invalid(path, format!("{line}malformed CSV: {e}"))
}

/// A CSV manifest `path,label[,split][,context][,...]`; paths relative to the manifest's
/// folder. Its `context` column, and the columns `context` names, become the clinical context.
fn load_csv_manifest(manifest: &Path, context: Option<&ContextSpec>) -> Result<Dataset, DataError> {
    let root = manifest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut rdr = csv_reader(manifest)?;
    let headers = rdr.headers().map_err(|e| csv_err(manifest, e))?.clone();
    let shown = headers.iter().collect::<Vec<_>>().join(",");
    let col_path = header_index(&headers, &["path", "file", "filename", "image"]).ok_or_else(|| {
        DataError::invalid(manifest, format!("missing column `path` (header: {shown})"))
    })?;
    let col_label = header_index(&headers, &["label", "class", "diagnosis"]).ok_or_else(|| {
        DataError::invalid(manifest, format!("missing column `label` (header: {shown})"))
    })?;
    let col_split = header_index(&headers, &["split"]);
    let header_names: Vec<String> = headers.iter().map(String::from).collect();

    struct Row {
        line: u64,
        path: String,
        label: String,
        split: Option<Split>,
        cells: Vec<String>,
    }
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| csv_err(manifest, e))?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let get = |i: usize| rec.get(i).unwrap_or("").to_string();
        let path = get(col_path);
        let label = get(col_label);
        if path.is_empty() {
            return Err(DataError::invalid(manifest, format!("line {line}: empty path")));
        }
        if label.is_empty() {
            return Err(DataError::invalid(manifest, format!("line {line}: empty label for `{path}`")));
        }
        let split = match col_split.map(get).filter(|s| !s.is_empty()) {
            Some(s) => Some(
                s.parse::<Split>()
                    .map_err(|e| DataError::invalid(manifest, format!("line {line}: {e}")))?,
            ),
            None => None,
        };
        let cells = rec.iter().map(String::from).collect();
        rows.push(Row {
            line,
            path,
            label,
            split,
            cells,
        });
    }
    if rows.is_empty() {
        return Err(DataError::invalid(manifest, "manifest has a header but no rows"));
    }
    let mut names: Vec<String> = Vec::new();
    for r in &rows {
        if !names.contains(&r.label) {
            names.push(r.label.clone());
        }
    }
    let (modality, labels, index) = label_set_for(&names);
    let label_of: HashMap<&str, usize> = names.iter().map(|n| n.as_str()).zip(index).collect();
    let cells: Vec<Vec<String>> = rows.iter().map(|r| r.cells.clone()).collect();
    let (chosen, label_like) = match context {
        Some(c) => crate::context::select_columns(manifest, &header_names, &cells, c, &labels, modality)?,
        None => (Vec::new(), Vec::new()),
    };
    let results: Vec<Result<Sample, SkippedFile>> = rows
        .par_iter()
        .map(|r| {
            let rel = r.path.replace('\\', "/");
            let rel = rel.trim_start_matches("./").to_string();
            let full = if Path::new(&rel).is_absolute() {
                PathBuf::from(&rel)
            } else {
                root.join(&rel)
            };
            let source = ImageSource::file(&full);
            if !full.is_file() {
                return Err(SkippedFile {
                    path: full,
                    reason: format!("listed on line {} of the manifest but not found", r.line),
                });
            }
            match probe(&source) {
                Ok(_) => Ok(Sample {
                    id: rel,
                    source,
                    label: label_of[r.label.as_str()],
                    split: r.split,
                    context: crate::context::compose(&header_names, &r.cells, &chosen),
                }),
                Err(e) => Err(SkippedFile {
                    path: full,
                    reason: e.reason(),
                }),
            }
        })
        .collect();
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    for r in results {
        match r {
            Ok(s) => samples.push(s),
            Err(s) => skipped.push(s),
        }
    }
    Ok(Dataset {
        root,
        layout: Layout::CsvManifest,
        modality,
        labels,
        samples,
        skipped,
        context_columns: chosen.iter().map(|(i, _)| header_names[*i].clone()).collect(),
        label_like_context: label_like,
    })
}

/// Reads a label array of any integer dtype MedMNIST (or a user) may have saved.
fn read_labels(path: &Path, name: &str) -> Result<Vec<i64>, DataError> {
    fn try_read<T: ndarray_npy::ReadableElement + Copy + Into<i64>>(
        path: &Path,
        name: &str,
    ) -> Option<(Vec<usize>, Vec<i64>)> {
        let f = std::fs::File::open(path).ok()?;
        let mut npz = ndarray_npy::NpzReader::new(f).ok()?;
        let a: ndarray::ArrayD<T> = npz.by_name(name).ok()?;
        Some((a.shape().to_vec(), a.iter().map(|&v| v.into()).collect()))
    }
    let got = try_read::<u8>(path, name)
        .or_else(|| try_read::<i64>(path, name))
        .or_else(|| try_read::<i32>(path, name))
        .or_else(|| try_read::<u16>(path, name))
        .or_else(|| try_read::<i16>(path, name))
        .or_else(|| try_read::<u32>(path, name))
        .or_else(|| try_read::<i8>(path, name));
    let (shape, values) = got.ok_or_else(|| {
        DataError::invalid(path, format!("array `{name}` is not an integer label array"))
    })?;
    match shape.as_slice() {
        [_] | [_, 1] => {}
        [_, k] => {
            return Err(DataError::invalid(
                path,
                format!("array `{name}` has {k} labels per image (multi-label, like ChestMNIST); only single-label classification is supported"),
            ))
        }
        other => {
            return Err(DataError::invalid(
                path,
                format!("array `{name}` has shape {other:?}; expected [N] or [N,1]"),
            ))
        }
    }
    if let Some(v) = values.iter().find(|&&v| v < 0) {
        return Err(DataError::invalid(path, format!("array `{name}` has a negative label {v}")));
    }
    Ok(values)
}

/// MedMNIST `.npz`: `{train,val,test}_images` (uint8 `[N,H,W]` or `[N,H,W,3]`) with matching
/// `{split}_labels`. The file carries no class names, so classes are named by their index.
fn load_npz(path: &Path) -> Result<Dataset, DataError> {
    let f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut npz = ndarray_npy::NpzReader::new(f)
        .map_err(|e| DataError::invalid(path, format!("not a readable .npz archive: {e}")))?;
    let keys = npz
        .names()
        .map_err(|e| DataError::invalid(path, format!("not a readable .npz archive: {e}")))?;
    let keys: Vec<String> = keys.into_iter().map(|k| k.trim_end_matches(".npy").to_string()).collect();
    let has = |k: &str| keys.iter().any(|x| x == k);
    let mut parts = Vec::new();
    for (split, prefix) in [(Split::Train, "train"), (Split::Val, "val"), (Split::Test, "test")] {
        let (ik, lk) = (format!("{prefix}_images"), format!("{prefix}_labels"));
        match (has(&ik), has(&lk)) {
            (true, true) => parts.push((split, ik, lk)),
            (false, false) => {}
            (true, false) => {
                return Err(DataError::invalid(path, format!("has `{ik}` but no `{lk}` (found: {})", keys.join(", "))))
            }
            (false, true) => {
                return Err(DataError::invalid(path, format!("has `{lk}` but no `{ik}` (found: {})", keys.join(", "))))
            }
        }
    }
    if parts.is_empty() {
        return Err(DataError::invalid(
            path,
            format!(
                "missing MedMNIST arrays `train_images`/`train_labels` (or val_/test_); found: {}",
                if keys.is_empty() { "nothing".to_string() } else { keys.join(", ") }
            ),
        ));
    }
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut raw = Vec::new();
    let mut max_label = 0i64;
    for (split, ik, lk) in &parts {
        let images = crate::image::npz_array(path, ik)?;
        let labels = read_labels(path, lk)?;
        if labels.len() != images.shape()[0] {
            return Err(DataError::invalid(
                path,
                format!("`{ik}` has {} images but `{lk}` has {} labels", images.shape()[0], labels.len()),
            ));
        }
        for (i, &l) in labels.iter().enumerate() {
            max_label = max_label.max(l);
            raw.push((format!("{file}:{ik}[{i}]"), ik.clone(), i, l as usize, *split));
        }
    }
    let labels = LabelSet::new((0..=max_label).map(|i| i.to_string()).collect())
        .expect("distinct numeric names");
    let samples = raw
        .into_iter()
        .map(|(id, array, index, label, split)| Sample {
            id,
            source: ImageSource::Npz {
                path: path.to_path_buf(),
                array,
                index,
            },
            label,
            split: Some(split),
            context: None,
        })
        .collect();
    Ok(Dataset {
        root: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        layout: Layout::MedMnistNpz,
        modality: Modality::Other,
        labels,
        samples,
        skipped: Vec::new(),
        context_columns: Vec::new(),
        label_like_context: Vec::new(),
    })
}

/// Fills `context` from `metadata.csv` next to the dataset: its `context` column and the
/// columns `context` names, matched to images by their path relative to the dataset root (a
/// bare file name or stem only where it names one image).
fn attach_metadata(ds: &mut Dataset, context: &ContextSpec) -> Result<(), DataError> {
    let base = if ds.root.is_dir() { ds.root.clone() } else { return Ok(()) };
    let meta = base.join(METADATA_FILE);
    if !meta.is_file() {
        if !context.columns.is_empty() {
            return Err(DataError::usage(
                &meta,
                "--context-columns needs a metadata.csv beside the images (path column plus the named columns)",
            ));
        }
        return Ok(());
    }
    let mut rdr = csv_reader(&meta)?;
    let headers: Vec<String> = rdr.headers().map_err(|e| csv_err(&meta, e))?.iter().map(String::from).collect();
    let rows: Vec<Vec<String>> = rdr
        .records()
        .map(|r| r.map(|r| r.iter().map(String::from).collect()).map_err(|e| csv_err(&meta, e)))
        .collect::<Result<_, _>>()?;
    let (chosen, label_like) =
        crate::context::select_columns(&meta, &headers, &rows, context, &ds.labels, ds.modality)?;
    if chosen.is_empty() {
        return Ok(());
    }
    let col_path = headers
        .iter()
        .position(|h| PATH_COLUMNS.contains(&crate::labels::fold(h).as_str()))
        .ok_or_else(|| {
            DataError::invalid(
                &meta,
                format!("missing a path column (one of {}; header: {})", PATH_COLUMNS.join(", "), headers.join(",")),
            )
        })?;
    let ids: Vec<&str> = ds.samples.iter().map(|s| s.id.as_str()).collect();
    let matched = crate::context::match_rows(
        &meta,
        rows.iter().enumerate().map(|(i, r)| (i, r.get(col_path).map(|s| s.as_str()).unwrap_or(""))),
        &ids,
    )?;
    for (sample, row) in matched {
        ds.samples[sample].context = crate::context::compose(&headers, &rows[row], &chosen);
    }
    ds.context_columns = chosen.iter().map(|(i, _)| headers[*i].clone()).collect();
    ds.label_like_context = label_like;
    Ok(())
}

/// Index of `name` in a study task's canonical labels (re-exported for manifest readers).
pub fn canonical_label(modality: Modality, name: &str) -> Option<usize> {
    canonical_index(modality, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::GrayImage;

    pub(crate) fn png(path: &Path, seed: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        GrayImage::from_fn(24, 20, |x, y| image::Luma([(x as u8).wrapping_mul(seed).wrapping_add(y as u8)]))
            .save(path)
            .unwrap();
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    #[test]
    fn image_folder_with_other_labels_and_skipped_files() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("dogs/a.png"), 3);
        png(&d.path().join("dogs/sub/b.png"), 4);
        png(&d.path().join("cats/c.png"), 5);
        std::fs::write(d.path().join("cats/notes.txt"), "x").unwrap();
        std::fs::write(d.path().join("cats/fake.png"), "not a png").unwrap();
        std::fs::write(d.path().join("cats/.DS_Store"), "x").unwrap();
        let ds = load(d.path()).unwrap();
        assert_eq!(ds.layout, Layout::ImageFolder);
        assert_eq!(ds.modality, Modality::Other);
        assert_eq!(ds.labels.names(), ["cats", "dogs"]);
        let ids: Vec<_> = ds.samples.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["cats/c.png", "dogs/a.png", "dogs/sub/b.png"]);
        assert_eq!(ds.samples[1].label, 1);
        assert!(ds.samples.iter().all(|s| s.split.is_none()));
        assert_eq!(ds.skipped.len(), 2, "{:?}", ds.skipped);
        assert!(ds.skipped.iter().any(|s| s.path.ends_with("fake.png") && s.reason.contains("not an image")));
        assert!(ds.skipped.iter().any(|s| s.path.ends_with("notes.txt")));
    }

    #[test]
    fn covid_layout_folds_names_and_ignores_masks() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join(COVID_TOP);
        for (class, file) in [("COVID", "COVID-1"), ("Lung_Opacity", "Lung_Opacity-1"), ("Normal", "Normal-1"), ("Viral Pneumonia", "Viral Pneumonia-1")] {
            png(&top.join(class).join("images").join(format!("{file}.png")), 2);
            png(&top.join(class).join("masks").join(format!("{file}.png")), 9);
        }
        std::fs::write(top.join("COVID.metadata.xlsx"), "x").unwrap();
        let ds = load(d.path()).unwrap();
        assert_eq!(ds.layout, Layout::CovidRadiography);
        assert_eq!(ds.modality, Modality::Xray);
        assert_eq!(ds.samples.len(), 4);
        let vp = ds.samples.iter().find(|s| s.id.contains("Viral")).unwrap();
        assert_eq!(ds.labels.name(vp.label), "viral_pneumonia");
        assert_eq!(vp.id, "COVID-19_Radiography_Dataset/Viral Pneumonia/images/Viral Pneumonia-1.png");
        // The folder itself is also recognised.
        assert_eq!(detect(&top).unwrap(), Layout::CovidRadiography);
    }

    #[test]
    fn brain_and_chest_ct_layouts_keep_official_splits() {
        let d = tempfile::tempdir().unwrap();
        let mri = d.path().join("mri");
        for class in ["glioma", "meningioma", "notumor", "pituitary"] {
            png(&mri.join("Training").join(class).join("Tr-1.png"), 1);
            png(&mri.join("Testing").join(class).join("Te-1.png"), 2);
        }
        let ds = load(&mri).unwrap();
        assert_eq!(ds.layout, Layout::BrainTumorMri);
        assert_eq!(ds.count(Some(Split::Test), 3), 1);
        let nt = ds.samples.iter().find(|s| s.id == "Training/notumor/Tr-1.png").unwrap();
        assert_eq!((ds.labels.name(nt.label), nt.split), ("no_tumor", Some(Split::Train)));

        let ct = d.path().join("ct");
        let train = ["adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib", "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa", "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa", "normal"];
        let test = ["adenocarcinoma", "large.cell.carcinoma", "squamous.cell.carcinoma", "normal"];
        for (split, names) in [("train", train), ("valid", train), ("test", test)] {
            for n in names {
                png(&ct.join("Data").join(split).join(n).join("1.png"), 3);
            }
        }
        let ds = load(&ct).unwrap();
        assert_eq!(ds.layout, Layout::ChestCt);
        assert_eq!(ds.labels.names(), ["adenocarcinoma", "large_cell_carcinoma", "squamous_cell_carcinoma", "normal"]);
        for l in 0..4 {
            assert_eq!(Split::ALL.map(|s| ds.count(Some(s), l)), [1, 1, 1]);
        }
    }

    #[test]
    fn bad_paths_and_layouts_give_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = load(&d.path().join("nope")).unwrap_err();
        assert!(e.is_usage() && e.to_string().contains("no such file"), "{e}");

        let f = d.path().join("x.png");
        png(&f, 1);
        let e = load(&f).unwrap_err();
        assert!(e.is_usage() && e.to_string().contains("is a file, not a dataset"), "{e}");

        let odd = d.path().join("odd");
        std::fs::create_dir_all(&odd).unwrap();
        std::fs::write(odd.join("readme.txt"), "x").unwrap();
        let e = load(&odd).unwrap_err();
        assert!(!e.is_usage() && e.to_string().contains("unknown dataset layout"), "{e}");

        let empty = d.path().join("withempty");
        png(&empty.join("a/1.png"), 1);
        std::fs::create_dir_all(empty.join("b")).unwrap();
        let e = load(&empty).unwrap_err().to_string();
        assert!(e.contains("withempty/b") && e.contains("class folder `b` contains no images"), "{e}");
    }

    #[test]
    fn csv_manifest_loads_relative_paths_and_lists_missing_files() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("img/1.png"), 1);
        png(&d.path().join("img/2.png"), 2);
        let m = d.path().join("labels.csv");
        std::fs::write(&m, "path,label,split,context\nimg/1.png,Glioma,train,age 40\nimg/2.png,notumor,test,\nimg/3.png,pituitary,,\n").unwrap();
        let ds = load(&m).unwrap();
        assert_eq!(ds.layout, Layout::CsvManifest);
        assert_eq!(ds.modality, Modality::Mri);
        assert_eq!(ds.samples.len(), 2);
        assert_eq!(ds.samples[0].context, None, "images and labels only");
        let ds = load_with(&m, &ContextSpec::default()).unwrap();
        assert_eq!(ds.samples[0].context.as_deref(), Some("age 40"));
        assert_eq!(ds.samples[1].split, Some(Split::Test));
        assert_eq!(ds.skipped.len(), 1);
        assert!(ds.skipped[0].reason.contains("line 4"), "{:?}", ds.skipped);

        std::fs::write(&m, "file,class_name\nimg/1.png,a\n").unwrap();
        let e = load(&m).unwrap_err().to_string();
        assert!(e.contains("labels.csv") && e.contains("missing column `label`"), "{e}");
        std::fs::write(&m, "path,label,split\nimg/1.png,a,holdout\n").unwrap();
        let e = load(&m).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("unknown split"), "{e}");
    }

    #[test]
    fn medmnist_npz_loads_and_missing_keys_are_named() {
        use ndarray::{Array2, Array3, Array4};
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bloodmnist.npz");
        let mut w = ndarray_npy::NpzWriter::new_compressed(std::fs::File::create(&p).unwrap());
        let imgs = Array3::<u8>::from_shape_fn((5, 8, 8), |(n, y, x)| (n * 10 + y + x) as u8);
        w.add_array("train_images", &imgs).unwrap();
        w.add_array("train_labels", &Array2::<u8>::from_shape_vec((5, 1), vec![0, 1, 2, 1, 0]).unwrap()).unwrap();
        let rgb = Array4::<u8>::from_elem((2, 8, 8, 3), 200);
        w.add_array("test_images", &rgb).unwrap();
        w.add_array("test_labels", &Array2::<u8>::from_shape_vec((2, 1), vec![2, 2]).unwrap()).unwrap();
        w.finish().unwrap();
        let ds = load(&p).unwrap();
        assert_eq!(ds.layout, Layout::MedMnistNpz);
        assert_eq!(ds.labels.names(), ["0", "1", "2"]);
        assert_eq!(ds.samples.len(), 7);
        let s = ds.samples.iter().find(|s| s.id == "bloodmnist.npz:train_images[3]").unwrap();
        assert_eq!((s.label, s.split), (1, Some(Split::Train)));
        let g = crate::image::load_gray(&s.source).unwrap();
        assert_eq!((g.width(), g.get_pixel(2, 1)[0]), (8, 33));
        let t = ds.samples.iter().find(|s| s.split == Some(Split::Test)).unwrap();
        assert_eq!(crate::image::load_gray(&t.source).unwrap().get_pixel(0, 0)[0], 200);

        let bad = d.path().join("bad.npz");
        let mut w = ndarray_npy::NpzWriter::new(std::fs::File::create(&bad).unwrap());
        w.add_array("x", &imgs).unwrap();
        w.finish().unwrap();
        let e = load(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.npz") && e.contains("missing MedMNIST arrays") && e.contains("found: x"), "{e}");
    }

    #[test]
    fn dicom_class_folders_load_and_pixelless_dicom_is_skipped() {
        use dicom_dictionary_std::tags;
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("ct")).unwrap();
        std::fs::create_dir_all(d.path().join("mr")).unwrap();
        std::fs::copy(fixture("CT_small.dcm"), d.path().join("ct/CT_small.dcm")).unwrap();
        std::fs::copy(fixture("MR_small.dcm"), d.path().join("mr/MR_small.dcm")).unwrap();
        let mut obj = dicom_object::open_file(fixture("CT_small.dcm")).unwrap();
        obj.remove_element(tags::PIXEL_DATA);
        obj.write_to_file(d.path().join("ct/no_pixels.dcm")).unwrap();
        let ds = load(d.path()).unwrap();
        assert_eq!(ds.layout, Layout::Dicom);
        assert_eq!(ds.samples.len(), 2);
        assert_eq!(ds.skipped.len(), 1);
        assert!(ds.skipped[0].reason.contains("no pixel data"), "{:?}", ds.skipped);
        let g = crate::image::load_gray(&ds.samples[0].source).unwrap();
        assert_eq!((g.width(), g.height()), (128, 128));
        // Windowed to the full 8-bit range, not a flat image.
        let (lo, hi) = g.as_raw().iter().fold((255u8, 0u8), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(lo < 30 && hi > 220, "range {lo}..{hi}");
        let e = crate::image::load_gray(&ImageSource::file(d.path().join("ct/no_pixels.dcm"))).unwrap_err().to_string();
        assert!(e.contains("no_pixels.dcm") && e.contains("no pixel data"), "{e}");
    }

    #[test]
    fn multi_frame_dicom_uses_first_frame_and_says_so() {
        let (g, frames) = crate::image::load_gray_with_frames(&ImageSource::file(fixture("SC_rgb_rle_2frame.dcm"))).unwrap();
        assert_eq!(frames, 2);
        assert!(g.width() > 0 && g.height() > 0);
    }

    #[test]
    fn metadata_csv_adds_only_the_columns_asked_for() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("a/x1.png"), 1);
        png(&d.path().join("b/x2.png"), 2);
        std::fs::write(d.path().join(METADATA_FILE), "FILE NAME,age,sex\nx1,61,F\n").unwrap();
        let ds = load_with(d.path(), &ContextSpec::default()).unwrap();
        assert!(ds.samples.iter().all(|s| s.context.is_none()), "no context column: nothing unless asked");
        let cols = ContextSpec { columns: vec!["age".into(), "sex".into()], ..Default::default() };
        let ds = load_with(d.path(), &cols).unwrap();
        assert_eq!(ds.samples[0].context.as_deref(), Some("age: 61; sex: F"));
        assert_eq!(ds.samples[1].context, None);
        assert_eq!(ds.context_columns, ["age", "sex"]);
    }

    #[test]
    fn label_like_metadata_never_reaches_the_context() {
        let d = tempfile::tempdir().unwrap();
        for (class, n) in [("glioma", 1), ("meningioma", 2), ("pituitary", 3), ("notumor", 4)] {
            png(&d.path().join("Training").join(class).join(format!("Tr-{n}.png")), n);
            png(&d.path().join("Testing").join(class).join(format!("Te-{n}.png")), n);
        }
        std::fs::write(
            d.path().join(METADATA_FILE),
            "path,diagnosis,finding,notes,age\nTraining/glioma/Tr-1.png,glioma,mass,seen by Dr A,40\nTraining/notumor/Tr-4.png,no tumor,none,history of meningioma,30\n",
        )
        .unwrap();
        for (cols, column) in [(vec!["diagnosis"], "diagnosis"), (vec!["finding"], "finding"), (vec!["age", "notes"], "notes")] {
            let spec = ContextSpec { columns: cols.iter().map(|c| c.to_string()).collect(), ..Default::default() };
            let e = load_with(d.path(), &spec).unwrap_err();
            assert!(e.is_usage(), "{e}");
            let msg = e.to_string();
            assert!(msg.contains(&format!("column `{column}`")) && !msg.contains('\n'), "{msg}");
        }
        let ok = load_with(d.path(), &ContextSpec { columns: vec!["age".into()], ..Default::default() }).unwrap();
        assert_eq!(ok.samples.iter().filter(|s| s.context.is_some()).count(), 2);
        let forced = ContextSpec { columns: vec!["diagnosis".into()], allow_label_like: true };
        let ds = load_with(d.path(), &forced).unwrap();
        assert_eq!(ds.label_like_context, ["diagnosis"]);
    }

    #[test]
    fn a_bare_name_shared_by_two_class_folders_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("a/img1.png"), 1);
        png(&d.path().join("b/img1.png"), 2);
        std::fs::write(d.path().join(METADATA_FILE), "file,context\nimg1.png,age 50\n").unwrap();
        let any = ContextSpec::default();
        assert!(load(d.path()).unwrap().samples.iter().all(|s| s.context.is_none()), "images only");
        let e = load_with(d.path(), &any).unwrap_err().to_string();
        assert!(e.contains("names several images") && e.contains("a/img1.png"), "{e}");
        std::fs::write(d.path().join(METADATA_FILE), "file,context\nb/img1.png,age 50\n").unwrap();
        let ds = load_with(d.path(), &any).unwrap();
        assert_eq!(ds.samples[1].context.as_deref(), Some("age 50"));
        assert_eq!(ds.samples[0].context, None);
    }

    #[test]
    fn a_manifest_label_column_never_becomes_context() {
        let d = tempfile::tempdir().unwrap();
        png(&d.path().join("img/1.png"), 1);
        png(&d.path().join("img/2.png"), 2);
        let m = d.path().join(METADATA_FILE);
        std::fs::write(&m, "path,label,age\nimg/1.png,glioma,40\nimg/2.png,pituitary,50\n").unwrap();
        let ds = load_with(&m, &ContextSpec::default()).unwrap();
        assert!(ds.samples.iter().all(|s| s.context.is_none()), "a manifest named metadata.csv is not its own metadata");
        let e = load_with(&m, &ContextSpec { columns: vec!["label".into()], ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("column `label`"), "{e}");
        let ds = load_with(&m, &ContextSpec { columns: vec!["age".into()], ..Default::default() }).unwrap();
        assert_eq!(ds.samples[0].context.as_deref(), Some("age: 40"));
    }
}
