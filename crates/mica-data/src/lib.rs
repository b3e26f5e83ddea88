//! Datasets: layouts, loaders, splits, preprocessing, duplicate checks, synthetic phantoms.
