//! Loops over host memory: what the CPU backends run for the operations that tensor ops
//! express badly (the scan, the convolution) and, on flex, for a decoding step's few-row
//! products and mixtures of experts.
//!
//! On a CPU, one pass over time with the state in registers does `L·D·N` exponentials and
//! nothing else, where the tensor-op scan materialises several `[L, D, N]` tensors. Channels
//! are split across threads (the recurrence is independent per channel); within a thread a
//! block of [`BLOCK`] channels walks time together, the lanes of a SIMD register: every loop
//! over a block is a fixed-length loop over contiguous `f32`s, and the transcendental functions
//! are polynomial forms the compiler vectorises ([`math`]). The loops are compiled for AVX-512
//! and for AVX2 + FMA and picked at run time ([`simd_dispatch!`]): the baseline x86-64 target
//! stops at SSE2. Threads come from rayon's pool, whose `join` runs work on the calling thread
//! when no other thread is free: with other processes on the cores, the loops slow down to one
//! thread's speed instead of waiting for a descheduled helper.

use burn::tensor::{DType, Tensor, backend::Backend};

/// Defines `fn $name(args)` whose body is compiled three times, for AVX-512, for AVX2 + FMA and
/// for the baseline target, and runs the best one the CPU supports (detected once; the check is
/// an atomic load). The body must call only `#[inline(always)]` helpers so that they are
/// compiled with the same features.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) mod conv;
#[cfg(feature = "flex")]
pub(crate) mod gemv;
pub(crate) mod math;
#[cfg(feature = "flex")]
pub(crate) mod moe;
pub(crate) mod scan;

/// Channels a thread advances together through time: one AVX-512 register of f32, two AVX2.
const BLOCK: usize = 16;

/// Work (multiply-adds or state updates) below which a loop runs on the calling thread: a
/// decoding step's scan (a few thousand channels × 16 states) takes microseconds, less than
/// handing work to another thread.
const THREAD_MIN_WORK: usize = 1 << 18;

/// A tensor's values on the host, as f32.
fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data reads back as f32")
}

/// The threads the host loops split work over: rayon's pool's.
fn threads() -> usize {
    rayon::current_num_threads()
}

/// Splits `channels` into up to [`threads`] contiguous, block-aligned ranges and runs `f` on
/// each through rayon's pool; one range on the calling thread when `work` is too small to pay
/// for threads.
fn for_channel_ranges(channels: usize, work: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    use rayon::prelude::*;
    let blocks = channels.div_ceil(BLOCK);
    let workers = if work < THREAD_MIN_WORK {
        1
    } else {
        threads().min(blocks).max(1)
    };
    if workers == 1 {
        return f(0..channels);
    }
    let per = blocks.div_ceil(workers) * BLOCK;
    (0..workers).into_par_iter().for_each(|w| {
        let (lo, hi) = ((w * per).min(channels), ((w + 1) * per).min(channels));
        if lo < hi {
            f(lo..hi);
        }
    });
}

/// An output buffer that several threads write at disjoint indices.
struct Shared(*mut f32);

// SAFETY: every writer touches a disjoint set of indices (its own channel range, see
// `for_channel_ranges`), and the buffer outlives the parallel loop that the writers run in.
unsafe impl Sync for Shared {}

impl Shared {
    /// Writes `v` at `i`.
    ///
    /// # Safety
    /// `i` is in bounds and no other thread writes `i`.
    unsafe fn write(&self, i: usize, v: f32) {
        // SAFETY: the caller's contract.
        unsafe { *self.0.add(i) = v }
    }
}
