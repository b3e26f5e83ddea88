//! Which images a run classifies: the dataset with its split pinned in the run directory, and
//! one seeded, stratified per-class limit that every command applies the same way.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use mica_core::{Dataset, RunRoot, Sample, Split};
use mica_data::split::SplitConfig;

use crate::experiment::DatasetSpec;
use crate::RunError;

/// Loads a dataset and gives every image a split: the layout's own where it has one (carving
/// validation out of train where it lacks one), else a seeded stratified one. `mica train`
/// and every run call this, so they see the same images in the same splits.
pub fn load_split(path: &Path, cfg: &SplitConfig) -> Result<(Dataset, Vec<String>), RunError> {
    if !path.exists() {
        return Err(RunError::Invalid(format!("{}: no such dataset folder", path.display())));
    }
    let mut ds = mica_data::load(path)?;
    let summary = mica_data::split::assign(&mut ds, cfg)?;
    Ok((ds, summary.notes))
}

/// The dataset of a run, its split pinned in `root/split.csv`: read back from there when the
/// run is resumed (or another shard runs), else taken from the experiment's split manifest or
/// drawn, and written there.
///
/// Clinical context is read only when `with_context` (an LLM will be shown it), so a CNN run is
/// never stopped by metadata it does not use.
pub fn prepare(
    spec: &DatasetSpec,
    root: &RunRoot,
    with_context: bool,
    notice: &mut dyn FnMut(String),
) -> Result<Dataset, RunError> {
    let load = || match with_context {
        true => mica_data::load_with(&spec.path, &spec.context()),
        false => mica_data::load(&spec.path),
    };
    let split_path = root.split();
    let ds = if split_path.is_file() {
        let mut ds = load()?;
        mica_data::split::apply_manifest(&mut ds, &split_path).map_err(|e| RunError::DatasetChanged {
            path: split_path.clone(),
            source: e,
        })?;
        ds
    } else if let Some(m) = &spec.split_manifest {
        let mut ds = load()?;
        mica_data::split::apply_manifest(&mut ds, m)?;
        mica_data::split::write_manifest(&ds, &split_path)?;
        ds
    } else {
        let cfg = SplitConfig {
            seed: spec.seed,
            train: spec.train,
            val: spec.val,
            test: spec.test,
        };
        let mut ds = load()?;
        for n in mica_data::split::assign(&mut ds, &cfg)?.notes {
            notice(n);
        }
        mica_data::split::write_manifest(&ds, &split_path)?;
        ds
    };
    Ok(ds)
}

/// The images of `split` in a fixed order (by id), capped per class by a seeded, id-keyed draw,
/// so the subset is the same on every machine, in every command, and independent of file order.
pub fn select(ds: &Dataset, split: Split, limit_per_class: Option<usize>, seed: u64) -> Vec<Sample> {
    let mut chosen: Vec<Sample> = ds.split(split).cloned().collect();
    chosen.sort_by(|a, b| a.id.cmp(&b.id));
    match limit_per_class {
        None => chosen,
        Some(limit) => cap_per_class(&chosen, limit, seed),
    }
}

/// At most `limit` images of each class, drawn by a seeded hash of the image id; the result
/// keeps the order of `samples`.
pub fn cap_per_class(samples: &[Sample], limit: usize, seed: u64) -> Vec<Sample> {
    let mut ranked: Vec<(u64, &Sample)> = samples.iter().map(|s| (keyed_hash(seed, &s.id), s)).collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    let mut per_class: HashMap<usize, usize> = HashMap::new();
    let mut keep = HashSet::new();
    for (_, s) in ranked {
        let n = per_class.entry(s.label).or_insert(0);
        if *n < limit {
            *n += 1;
            keep.insert(s.id.as_str());
        }
    }
    samples.iter().filter(|s| keep.contains(s.id.as_str())).cloned().collect()
}

fn keyed_hash(seed: u64, id: &str) -> u64 {
    let mut h = mica_core::hash::fnv1a64_seeded(seed, id.as_bytes());
    // A final avalanche so neighbouring ids do not keep their order.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use mica_core::ImageSource;

    fn sample(id: &str, label: usize) -> Sample {
        Sample {
            id: id.into(),
            source: ImageSource::File { path: id.into() },
            label,
            split: Some(Split::Test),
            context: None,
        }
    }

    #[test]
    fn the_cap_is_seeded_stratified_and_order_free() {
        let mut v: Vec<Sample> = (0..40).map(|i| sample(&format!("img{i:02}"), i % 4)).collect();
        let a = cap_per_class(&v, 3, 7);
        assert_eq!(a.len(), 12);
        for c in 0..4 {
            assert_eq!(a.iter().filter(|s| s.label == c).count(), 3);
        }
        v.reverse();
        let mut b = cap_per_class(&v, 3, 7);
        b.reverse();
        assert_eq!(
            a.iter().map(|s| &s.id).collect::<Vec<_>>(),
            b.iter().map(|s| &s.id).collect::<Vec<_>>()
        );
        let other = cap_per_class(&v, 3, 8);
        assert_ne!(
            a.iter().map(|s| &s.id).collect::<HashSet<_>>(),
            other.iter().map(|s| &s.id).collect::<HashSet<_>>(),
            "another seed draws another subset"
        );
    }
}
