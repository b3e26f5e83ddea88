//! What `mica dataset inspect` reports: layout, classes, counts per class and split, image
//! sizes, unreadable files, and near-duplicates within and across splits.
//!
//! Every image is decoded here (not just probed), so truncated files show up before training.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mica_core::{Layout, Modality, SkippedFile, Split};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::image::load_gray_with_frames;
use crate::phash::{correlation, near_pairs, phash, thumbnail};
use crate::split::{assign, SplitConfig};
use crate::DataError;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InspectOptions {
    /// Hamming distance (of 64 pHash bits) at or below which two images count as
    /// near-duplicates. 4 catches resized and re-encoded copies without flagging different
    /// patients whose scans merely look alike.
    pub max_distance: u32,
    /// Pixel correlation (of 32x32 standardised thumbnails) a hash match must also reach.
    /// 0.99 keeps resized, re-encoded and brightened copies (brightness and contrast do not change
    /// a correlation) and drops look-alike anatomy: on the synthetic phantoms, which share one
    /// template per modality, 0.95 still paired dozens of different patients, 0.99 none.
    pub min_correlation: f32,
    /// Split used for counts and the cross-split check when the layout has no official split,
    /// so users see the leakage the default split would have.
    pub split: SplitConfig,
}

impl Default for InspectOptions {
    fn default() -> Self {
        InspectOptions {
            max_distance: 4,
            min_correlation: 0.99,
            split: SplitConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassCounts {
    pub label: String,
    pub train: usize,
    pub val: usize,
    pub test: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SizeStats {
    pub min_width: u32,
    pub max_width: u32,
    pub min_height: u32,
    pub max_height: u32,
    pub mean_width: f64,
    pub mean_height: f64,
    /// The most common `WxH` sizes with their counts (at most 5).
    pub common: Vec<(String, usize)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DuplicateMember {
    pub id: String,
    pub label: String,
    pub split: Option<Split>,
}

/// A group of images whose perceptual hashes are within the threshold of each other (linked
/// transitively).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DuplicateGroup {
    pub members: Vec<DuplicateMember>,
    /// Largest hash distance of a linking pair in the group (0 = identical hash).
    pub max_distance: u32,
    /// Members sit in more than one split: train/test leakage.
    pub cross_split: bool,
    /// Members carry different labels: the same image labelled two ways.
    pub conflicting_labels: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inspection {
    pub root: PathBuf,
    /// Written with the same names the CLI prints (`covid19-radiography`, ...).
    pub layout: Layout,
    pub modality: Modality,
    pub labels: Vec<String>,
    /// `official` when the layout defines the split, otherwise the seeded default split.
    pub split_source: String,
    pub split_notes: Vec<String>,
    pub images: usize,
    pub counts: Vec<ClassCounts>,
    pub sizes: SizeStats,
    pub with_context: usize,
    /// The metadata columns read as context (a `context` column by default).
    #[serde(default)]
    pub context_columns: Vec<String>,
    /// Of those, the ones a run refuses because they name or imply a class.
    #[serde(default)]
    pub label_like_context: Vec<String>,
    /// Files that could not be used, each with its reason.
    pub unreadable: Vec<SkippedFile>,
    /// Informational notes, e.g. multi-frame DICOM files of which only the first frame is used.
    pub notes: Vec<String>,
    pub duplicate_threshold: u32,
    pub duplicate_min_correlation: f32,
    pub duplicates: Vec<DuplicateGroup>,
    /// Near-duplicate pairs whose two images are in the same split / in different splits.
    pub duplicate_pairs_within_split: usize,
    pub duplicate_pairs_across_splits: usize,
    /// How well each acquisition property alone predicts the class (see [`crate::shortcut`]).
    #[serde(default)]
    pub shortcuts: Vec<crate::shortcut::PropertyCheck>,
}

/// Loads, fully decodes and hashes every image of the dataset at `path`.
pub fn inspect(path: &Path, opts: &InspectOptions) -> Result<Inspection, DataError> {
    // Context is read to count and check it, never to refuse it: inspecting is how a user
    // finds out which columns would be refused.
    let look = crate::ContextSpec { allow_label_like: true, ..Default::default() };
    let mut ds = crate::load_with(path, &look)?;
    let official = ds.samples.iter().any(|s| s.split.is_some());
    let summary = assign(&mut ds, &opts.split)?;

    struct Decoded {
        w: u32,
        h: u32,
        frames: u32,
        hash: u64,
        thumb: Vec<f32>,
        props: crate::shortcut::Properties,
    }
    let decoded: Vec<Result<Decoded, DataError>> = ds
        .samples
        .par_iter()
        .map(|s| {
            let (g, frames) = load_gray_with_frames(&s.source)?;
            Ok(Decoded {
                props: crate::shortcut::Properties::of(&s.source, &g),
                w: g.width(),
                h: g.height(),
                frames,
                hash: phash(&g),
                thumb: thumbnail(&g),
            })
        })
        .collect();

    let mut unreadable = ds.skipped.clone();
    let mut notes = Vec::new();
    let mut kept = Vec::new();
    let mut info = Vec::new();
    for (s, d) in ds.samples.iter().zip(decoded) {
        match d {
            Ok(d) => {
                if d.frames > 1 {
                    notes.push(format!("{}: multi-frame DICOM ({} frames); only the first frame is used", s.id, d.frames));
                }
                kept.push(s);
                info.push(d);
            }
            Err(e) => unreadable.push(SkippedFile {
                path: s.source.path().to_path_buf(),
                reason: e.reason(),
            }),
        }
    }
    unreadable.sort_by(|a, b| a.path.cmp(&b.path));

    let counts = (0..ds.labels.len())
        .map(|l| {
            let of = |sp: Split| kept.iter().filter(|s| s.label == l && s.split == Some(sp)).count();
            ClassCounts {
                label: ds.labels.name(l).to_string(),
                train: of(Split::Train),
                val: of(Split::Val),
                test: of(Split::Test),
                total: kept.iter().filter(|s| s.label == l).count(),
            }
        })
        .collect();

    let mut sizes = SizeStats::default();
    if !info.is_empty() {
        sizes.min_width = info.iter().map(|d| d.w).min().unwrap_or(0);
        sizes.max_width = info.iter().map(|d| d.w).max().unwrap_or(0);
        sizes.min_height = info.iter().map(|d| d.h).min().unwrap_or(0);
        sizes.max_height = info.iter().map(|d| d.h).max().unwrap_or(0);
        sizes.mean_width = info.iter().map(|d| d.w as f64).sum::<f64>() / info.len() as f64;
        sizes.mean_height = info.iter().map(|d| d.h as f64).sum::<f64>() / info.len() as f64;
        let mut freq: BTreeMap<String, usize> = BTreeMap::new();
        for d in &info {
            *freq.entry(format!("{}x{}", d.w, d.h)).or_default() += 1;
        }
        let mut common: Vec<(String, usize)> = freq.into_iter().collect();
        common.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        common.truncate(5);
        sizes.common = common;
    }

    let hashes: Vec<u64> = info.iter().map(|d| d.hash).collect();
    let pairs: Vec<(usize, usize, u32)> = near_pairs(&hashes, opts.max_distance)
        .into_iter()
        .filter(|&(i, j, _)| correlation(&info[i].thumb, &info[j].thumb) >= opts.min_correlation)
        .collect();
    let (mut within, mut across) = (0, 0);
    let mut parent: Vec<usize> = (0..hashes.len()).collect();
    fn find(p: &mut [usize], mut x: usize) -> usize {
        while p[x] != x {
            p[x] = p[p[x]];
            x = p[x];
        }
        x
    }
    for &(i, j, _) in &pairs {
        if kept[i].split == kept[j].split {
            within += 1;
        } else {
            across += 1;
        }
        let (a, b) = (find(&mut parent, i), find(&mut parent, j));
        if a != b {
            parent[a.max(b)] = a.min(b);
        }
    }
    let mut groups: BTreeMap<usize, (Vec<usize>, u32)> = BTreeMap::new();
    for &(i, j, d) in &pairs {
        let r = find(&mut parent, i);
        let g = groups.entry(r).or_default();
        g.0.push(i);
        g.0.push(j);
        g.1 = g.1.max(d);
    }
    let duplicates = groups
        .into_values()
        .map(|(mut idx, max_distance)| {
            idx.sort();
            idx.dedup();
            let members: Vec<DuplicateMember> = idx
                .iter()
                .map(|&i| DuplicateMember {
                    id: kept[i].id.clone(),
                    label: ds.labels.name(kept[i].label).to_string(),
                    split: kept[i].split,
                })
                .collect();
            DuplicateGroup {
                cross_split: members.iter().any(|m| m.split != members[0].split),
                conflicting_labels: members.iter().any(|m| m.label != members[0].label),
                members,
                max_distance,
            }
        })
        .collect();

    let props: Vec<crate::shortcut::Properties> = info.iter().map(|d| d.props.clone()).collect();
    let shortcuts = crate::shortcut::check(&props, &kept.iter().map(|s| s.label).collect::<Vec<_>>());

    Ok(Inspection {
        root: ds.root.clone(),
        layout: ds.layout,
        modality: ds.modality,
        labels: ds.labels.names().to_vec(),
        split_source: if official { "official".into() } else { format!("seeded default (seed {})", opts.split.seed) },
        split_notes: summary.notes,
        images: kept.len(),
        with_context: kept.iter().filter(|s| s.context.is_some()).count(),
        context_columns: ds.context_columns.clone(),
        label_like_context: ds.label_like_context.clone(),
        counts,
        sizes,
        unreadable,
        notes,
        duplicate_threshold: opts.max_distance,
        duplicate_min_correlation: opts.min_correlation,
        duplicates,
        duplicate_pairs_within_split: within,
        duplicate_pairs_across_splits: across,
        shortcuts,
    })
}

impl Inspection {
    /// Plain-text report for terminals.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "dataset   {}", self.root.display());
        let _ = writeln!(o, "layout    {}", self.layout);
        let _ = writeln!(o, "modality  {}", self.modality);
        let _ = writeln!(o, "classes   {} ({})", self.labels.len(), self.labels.join(", "));
        let _ = writeln!(o, "images    {} readable, {} unreadable, {} with clinical context", self.images, self.unreadable.len(), self.with_context);
        for c in &self.label_like_context {
            let _ = writeln!(o, "CONTEXT   column `{c}` names or implies a class: runs refuse it (unless --allow-label-like-context)");
        }
        let _ = writeln!(o, "split     {}", self.split_source);
        for n in &self.split_notes {
            let _ = writeln!(o, "          {n}");
        }
        let w = self.labels.iter().map(|l| l.len()).max().unwrap_or(5).max(5);
        let _ = writeln!(o, "\n  {:<w$}  {:>7} {:>7} {:>7} {:>7}", "class", "train", "val", "test", "total");
        for c in &self.counts {
            let _ = writeln!(o, "  {:<w$}  {:>7} {:>7} {:>7} {:>7}", c.label, c.train, c.val, c.test, c.total);
        }
        let t = |f: fn(&ClassCounts) -> usize| self.counts.iter().map(f).sum::<usize>();
        let _ = writeln!(o, "  {:<w$}  {:>7} {:>7} {:>7} {:>7}", "all", t(|c| c.train), t(|c| c.val), t(|c| c.test), t(|c| c.total));
        let s = &self.sizes;
        let _ = writeln!(
            o,
            "\nimage size  width {}..{} (mean {:.1}), height {}..{} (mean {:.1}); most common: {}",
            s.min_width,
            s.max_width,
            s.mean_width,
            s.min_height,
            s.max_height,
            s.mean_height,
            s.common.iter().map(|(k, n)| format!("{k} ({n})")).collect::<Vec<_>>().join(", ")
        );
        let flagged: Vec<&crate::shortcut::PropertyCheck> = self.shortcuts.iter().filter(|c| c.flagged).collect();
        if flagged.is_empty() {
            let _ = writeln!(
                o,
                "shortcuts   none: no acquisition property (size, aspect, bit depth, format, DICOM source, file size, mean intensity) predicts the class far above chance"
            );
        } else {
            for c in flagged {
                let _ = writeln!(o, "SHORTCUT    {}", c.sentence());
            }
        }
        if !self.unreadable.is_empty() {
            let _ = writeln!(o, "\nunreadable files ({}), skipped:", self.unreadable.len());
            for u in &self.unreadable {
                let _ = writeln!(o, "  {}: {}", u.path.display(), u.reason);
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(o, "\nnotes:");
            for n in &self.notes {
                let _ = writeln!(o, "  {n}");
            }
        }
        let _ = writeln!(
            o,
            "\nnear-duplicates (pHash distance <= {}, pixel correlation >= {}): {} groups; {} pairs within a split, {} pairs ACROSS splits",
            self.duplicate_threshold,
            self.duplicate_min_correlation,
            self.duplicates.len(),
            self.duplicate_pairs_within_split,
            self.duplicate_pairs_across_splits
        );
        if self.duplicate_pairs_across_splits > 0 {
            let _ = writeln!(o, "  warning: images shared between splits leak training data into evaluation and inflate accuracy");
        }
        for g in self.duplicates.iter().take(20) {
            let mut flags = Vec::new();
            if g.cross_split {
                flags.push("ACROSS SPLITS");
            }
            if g.conflicting_labels {
                flags.push("CONFLICTING LABELS");
            }
            let _ = writeln!(o, "  group (max distance {}){}{}", g.max_distance, if flags.is_empty() { "" } else { ": " }, flags.join(", "));
            for m in &g.members {
                let _ = writeln!(o, "    [{}] {} ({})", m.split.map(|s| s.as_str()).unwrap_or("-"), m.id, m.label);
            }
        }
        if self.duplicates.len() > 20 {
            let _ = writeln!(o, "  ... {} more groups (use --json for all)", self.duplicates.len() - 20);
        }
        o
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn synthetic_sets_show_no_shortcut_and_a_size_tied_set_does() {
        let d = tempfile::tempdir().unwrap();
        for m in mica_core::Modality::STUDY {
            let cfg = crate::synth::SynthConfig { per_class: 30, size: 64, seed: 5 };
            let root = crate::synth::generate(d.path(), m, &cfg).unwrap();
            let r = inspect(&root, &InspectOptions::default()).unwrap();
            let flagged: Vec<String> = r.shortcuts.iter().filter(|c| c.flagged).map(|c| c.sentence()).collect();
            assert!(flagged.is_empty(), "{m}: {flagged:?}");
            assert_eq!(r.shortcuts.len(), 8);
        }
        // Two sources: glioma and meningioma scanned at 40x40, the others at 32x48.
        let tied = d.path().join("tied");
        for (c, class) in ["glioma", "meningioma", "pituitary", "notumor"].iter().enumerate() {
            for i in 0..12u32 {
                let (w, h) = if c < 2 { (40, 40) } else { (32, 48) };
                let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 3 + i * 11) % 256) as u8]));
                let dir = tied.join(class);
                std::fs::create_dir_all(&dir).unwrap();
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
        let r = inspect(&tied, &InspectOptions::default()).unwrap();
        let w = r.shortcuts.iter().find(|c| c.property == "native width").unwrap();
        assert!(w.flagged, "{w:?}");
        assert!(r.to_text().contains("SHORTCUT    Native width alone predicts the class with"), "{}", r.to_text());
    }

    use super::*;

    #[test]
    fn finds_cross_split_copies_and_unreadable_files() {
        let d = tempfile::tempdir().unwrap();
        let root = crate::synth::generate(d.path(), Modality::Mri, &crate::synth::SynthConfig { per_class: 10, size: 48, seed: 5 }).unwrap();
        // Leak a training image into the test folder, resized (a re-encoded copy).
        let src = root.join("Training/glioma/Tr-gl_0001.png");
        let img = image::open(&src).unwrap().to_luma8();
        crate::image::resize_gray(&img, 64, 64).save(root.join("Testing/glioma/Te-gl_copy.png")).unwrap();
        // A truncated PNG (header intact) and a text file posing as an image.
        let bytes = std::fs::read(root.join("Training/pituitary/Tr-pi_0002.png")).unwrap();
        std::fs::write(root.join("Training/pituitary/broken.png"), &bytes[..bytes.len() / 2]).unwrap();
        std::fs::write(root.join("Testing/notumor/readme.png"), "text").unwrap();

        let r = inspect(&root, &InspectOptions::default()).unwrap();
        assert_eq!(r.layout, Layout::BrainTumorMri);
        assert_eq!(r.split_source, "official");
        assert_eq!(r.counts[0].total, 11);
        assert_eq!(r.counts[0].test, 3);
        assert_eq!(r.unreadable.len(), 2, "{:?}", r.unreadable);
        assert!(r.unreadable.iter().any(|u| u.path.ends_with("broken.png") && u.reason.contains("cannot decode")));
        let leak = r.duplicates.iter().find(|g| g.members.iter().any(|m| m.id.ends_with("Te-gl_copy.png"))).expect("copy found");
        assert!(leak.cross_split);
        assert!(leak.members.iter().any(|m| m.id == "Training/glioma/Tr-gl_0001.png"));
        assert!(r.duplicate_pairs_across_splits >= 1);
        // Different phantoms share one template; only the planted copy may be flagged.
        assert_eq!(r.duplicates.len(), 1, "{:?}", r.duplicates);
        let text = r.to_text();
        assert!(text.contains("ACROSS SPLITS") && text.contains("broken.png"), "{text}");
    }
}
