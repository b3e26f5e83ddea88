//! Synthetic phantoms (in progress).
