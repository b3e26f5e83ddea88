//! glibc's allocator, tuned for tensor-sized buffers.
//!
//! Why: by default glibc serves every allocation above 128 KiB (grown dynamically up to
//! 32 MiB) with its own `mmap`, and gives freed memory at the top of the heap back to the kernel
//! past 128 KiB. A training step allocates and frees hundreds of feature maps and gradients of
//! a few MiB each, so nearly every one came back as fresh pages: `perf stat` on
//! `bench_cnn` (ResNet-18, 128 px, batch 32, 6 training steps and 6 inference batches) counted
//! 1.06 million page faults, each a trap and a 4 KiB zeroing in the kernel. With the thresholds
//! below the same run took 0.18-0.21 million. CPU time fell 18 % (25.5 -> 20.8 s) in the first
//! pair measured and was within this machine's noise in two later pairs; peak resident memory
//! stayed within 536-600 MB either way (bench/README.md).
//!
//! The cost: memory a finished run freed stays in the process (up to 1 GiB at the top of the
//! heap) until it exits, instead of going back to the system at once.

/// Sets the thresholds (glibc only; elsewhere it does nothing). Call once, early in `main`,
/// before threads start; `MICA_DEFAULT_MALLOC=1` leaves glibc's defaults, for comparison.
pub fn tune_allocator() {
    if std::env::var_os("MICA_DEFAULT_MALLOC").is_some_and(|v| v == "1") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads
    // allocate.
    unsafe {
        // Allocations up to 32 MiB (glibc's maximum for this setting) come from the heap ...
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // ... and freed heap memory is kept for the next tensor rather than returned.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
