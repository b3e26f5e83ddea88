//! CNN classifiers trained and run with burn.
