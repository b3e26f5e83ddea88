//! Classification metrics, confidence intervals and significance tests.
