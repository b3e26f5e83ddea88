//! mica patch (see MICA-PATCH.md): element-wise kernels over large contiguous buffers run in
//! parallel chunks.
//!
//! Why: burn-flex 0.21 runs every element-wise operation (add, multiply, scalar ops, ReLU and
//! its backward, the broadcast multiply-adds of batch norm) on the calling thread. In a training
//! step of ResNet-18 those are a fifth of the time, and during them the second core idles: a
//! step used 1.37 of 2 cores (bench/README.md). Each element's result depends on that element
//! alone, so cutting the buffer into chunks changes nothing but which core computes it.
//! `MICA_FLEX_SERIAL_ELEMENTWISE=1` switches this off, so a benchmark can compare both paths in
//! one build.

/// Buffers shorter than this stay on the calling thread: below it, waking a second thread costs
/// more than it saves.
const MIN_PARALLEL: usize = 1 << 16;
/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

/// Whether a buffer of `n` elements is worth splitting (and the patch is on).
#[inline]
pub(crate) fn worth(n: usize) -> bool {
    #[cfg(all(feature = "rayon", feature = "std"))]
    {
        static SERIAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        n >= MIN_PARALLEL
            && rayon::current_num_threads() > 1
            && !*SERIAL.get_or_init(|| {
                std::env::var_os("MICA_FLEX_SERIAL_ELEMENTWISE").is_some_and(|v| v == "1")
            })
    }
    #[cfg(not(all(feature = "rayon", feature = "std")))]
    {
        let _ = n;
        false
    }
}

/// `f` over `dst` in chunks whose length is a multiple of `unit`; `f` gets each chunk's
/// offset in `dst`. Serial when not [`worth`] it.
pub(crate) fn chunks_mut<E, F>(dst: &mut [E], unit: usize, f: F)
where
    E: Send,
    F: Fn(usize, &mut [E]) + Sync + Send,
{
    let unit = unit.max(1);
    if !worth(dst.len()) {
        f(0, dst);
        return;
    }
    #[cfg(all(feature = "rayon", feature = "std"))]
    {
        use rayon::prelude::*;
        let chunk = CHUNK.div_ceil(unit) * unit;
        dst.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i * chunk, c));
    }
    #[cfg(not(all(feature = "rayon", feature = "std")))]
    f(0, dst);
}

/// `f` over `dst` and `src` (same length) in matching chunks.
pub(crate) fn zip_mut<E, R, F>(dst: &mut [E], src: &[R], f: F)
where
    E: Send,
    R: Sync,
    F: Fn(&mut [E], &[R]) + Sync + Send,
{
    debug_assert!(src.len() >= dst.len());
    chunks_mut(dst, 1, |off, d| f(d, &src[off..off + d.len()]));
}

/// A new buffer of `n` elements, element `i` being `f(i)`: collected on the calling thread
/// when not [`worth`] splitting, else zero-filled and written chunk by chunk.
pub(crate) fn map_new<E, F>(n: usize, f: F) -> alloc::vec::Vec<E>
where
    E: Send + Copy + Default,
    F: Fn(usize) -> E + Sync + Send,
{
    if !worth(n) {
        return (0..n).map(f).collect();
    }
    let mut out = alloc::vec![E::default(); n];
    chunks_mut(&mut out, 1, |off, d| {
        for (i, v) in d.iter_mut().enumerate() {
            *v = f(off + i);
        }
    });
    out
}
