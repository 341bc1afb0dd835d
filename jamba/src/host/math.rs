//! The transcendental functions of the host loops in forms the compiler vectorises (the
//! standard library's are a call per element).

/// `exp(x)` to about 2e-7 relative error, in a form the compiler vectorises (the standard
/// library's `exp` is a call per element): `2^k · e^r` with `k = round(x / ln 2)` and a degree-6
/// polynomial for `e^r`, `|r| ≤ ln 2 / 2`. Clamps its argument to [−87, 88] (below, it returns
/// `e^−87` ≈ 1.6e-38 where the true value is smaller still: a decay that is zero either way).
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let k = shifted - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `shifted`'s low mantissa bits hold k itself (its bits are those of ROUND plus k): an
    // integer read of them vectorises, where `k as i32` (a saturating conversion) does not.
    let k_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    f32::from_bits(((k_int + 127) << 23) as u32) * p
}

/// `ln(1 + t)` for `t ∈ [0, 1]` to about 1.5e-7 relative error, vectorisable:
/// `2·atanh(s)` with `s = t / (2 + t) ≤ 1/3`, the odd series to `s^11` (accurate for tiny `t`
/// too, where `ln(1 + t)` through `1 + t` would round to zero).
#[inline(always)]
fn ln_1p_unit(t: f32) -> f32 {
    let s = t / (2.0 + t);
    let s2 = s * s;
    2.0 * s
        * (1.0
            + s2 * (1.0 / 3.0
                + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0))))))
}

/// `ln(1 + e^x)`, as `max(x, 0) + ln(1 + e^−|x|)` (no overflow, no cancellation).
#[inline(always)]
pub(crate) fn softplus(x: f32) -> f32 {
    x.max(0.0) + ln_1p_unit(exp_fast(-x.abs()))
}

#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

/// `Σ l` by halving (log₂ N dependent adds instead of N).
#[inline(always)]
pub(crate) fn tree_sum<const N: usize>(mut l: [f32; N]) -> f32 {
    let mut half = N / 2;
    let mut len = N;
    while half > 0 {
        for i in 0..half {
            l[i] += l[i + half];
        }
        if len % 2 == 1 {
            l[0] += l[len - 1];
        }
        len = half;
        half /= 2;
    }
    l[0]
}

/// `Σ a·b` in 16 independent lanes (a sequential sum would not vectorise).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a16.zip(b16) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_is_accurate_over_its_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let exact = (x as f64).exp();
            worst = worst.max(((exp_fast(x) as f64) - exact).abs() / exact);
            x += 0.001_37;
        }
        assert!(worst < 5e-7, "worst relative error {worst:.3e}");
        assert!(exp_fast(-1000.0) < 2e-38 && exp_fast(0.0) == 1.0);
    }

    #[test]
    fn tree_sum_matches_a_plain_sum() {
        fn check<const N: usize>() {
            let l: [f32; N] = std::array::from_fn(|i| (i as f32 * 0.37).sin());
            let exact: f64 = l.iter().map(|&x| x as f64).sum();
            assert!((tree_sum(l) as f64 - exact).abs() < 1e-5, "N {N}");
        }
        check::<1>();
        check::<3>();
        check::<7>();
        check::<16>();
    }

    #[test]
    fn dot_matches_a_plain_sum() {
        for n in [1usize, 3, 4, 7, 16, 33] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - exact).abs() < 1e-5, "n {n}");
        }
    }

    #[test]
    fn softplus_and_silu_match_libm() {
        let (mut worst_sp, mut worst_silu) = (0.0f64, 0.0f64);
        let mut x = -60.0f32;
        while x <= 60.0 {
            let xf = x as f64;
            let sp = if xf > 30.0 { xf } else { xf.exp().ln_1p() };
            worst_sp = worst_sp.max((softplus(x) as f64 - sp).abs() / sp);
            let si = xf / (1.0 + (-xf).exp());
            worst_silu = worst_silu.max((silu(x) as f64 - si).abs() / si.abs().max(1e-30));
            x += 0.000_93;
        }
        assert!(
            worst_sp < 1e-6,
            "softplus: worst relative error {worst_sp:.3e}"
        );
        assert!(
            worst_silu < 1e-6,
            "silu: worst relative error {worst_silu:.3e}"
        );
    }
}
