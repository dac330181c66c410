//! Bit-for-bit emulation of the torch / numpy primitives diffusers' schedulers are built from.
//!
//! diffusers mixes float32 torch tensors (betas, alphas_cumprod, sigmas, every step's
//! coefficients) with float64 numpy arrays (timesteps, Karras sigmas). Reproducing its
//! schedules exactly means reproducing each primitive's rounding, which is not always the
//! obvious formula; the surprising ones are documented where they are emulated.

use super::config::BetaSchedule;

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU.
///
/// torch computes `step = (end - start) / (steps - 1)` in float32, then fills the first half
/// from `start` and the second half from `end` (`end - step * (steps - 1 - i)`), and the
/// kernel is compiled with FMA contraction, so each element is one fused multiply-add.
/// (Plain `start + i * step` differs from torch in ~15% of SD's betas.)
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    match steps {
        0 => Vec::new(),
        // torch special-cases one step as `fill_(start)`.
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - 1 - i) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// `torch.cumprod(x, 0)` for float32 on the CPU: torch accumulates in float64 (its CPU
/// accumulation type for float) and rounds each partial product to float32; a float32
/// running product differs from it in most elements.
pub fn torch_cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    x.iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar(n)` (cosine, max_beta 0.999): Python floats, then a
/// float32 tensor.
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// The float32 betas diffusers builds in a scheduler's `__init__`.
pub fn betas(
    schedule: BetaSchedule,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
    trained_betas: Option<&[f64]>,
) -> Vec<f32> {
    if let Some(trained) = trained_betas {
        return trained.iter().map(|&b| b as f32).collect();
    }
    match schedule {
        BetaSchedule::Linear => torch_linspace_f32(beta_start, beta_end, num_train_timesteps),
        BetaSchedule::ScaledLinear => torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(num_train_timesteps),
    }
}

/// diffusers' `rescale_zero_terminal_snr(betas)`, in float32 like the torch original.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = torch_cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (Some(&first), Some(&last)) = (sqrt_bar.first(), sqrt_bar.last()) else {
        return Vec::new();
    };
    // `alphas_bar_sqrt *= a0 / (a0 - aT)`: the 0-d quotient is rounded first.
    let scale = first / (first - last);
    for v in &mut sqrt_bar {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// numpy's `round` (and `np.round`): halves go to the even neighbour.
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, num)` in float64: `i * step + start` with `step = (stop - start) /
/// (num - 1)`, the last element forced to `stop`, and a single element being `start`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> =
        (0..num).map(|i| if step == 0.0 { i as f64 / div * delta + start } else { i as f64 * step + start }).collect();
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` with a float step: length `ceil((stop - start) / step)`,
/// elements `start`, `start + step`, then `start + i * delta` with `delta = (start + step) -
/// start` (numpy's fill loop), which is why it is not simply `start + i * step`.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    // NaN (a zero step) or a non-positive length: empty, like numpy.
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)` at integer-valued `x`: grid points return `fp`
/// exactly, and points outside the grid clamp to the end values.
pub fn np_interp_integer_grid(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return f64::from(fp[j]);
    }
    let (lo, hi) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    (hi - lo) * (x - j as f64) + lo
}

/// torch's scalar `lerp` as compiled for the CPU (FMA-contracted, and exactly what the
/// vectorised `lerp_vec` computes too).
pub fn torch_lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        weight.mul_add(end - start, start)
    } else {
        (weight - 1.0).mul_add(end - start, end)
    }
}

/// `torch.clamp(v, lo, hi)`: `min(max(v, lo), hi)`, NaN in, NaN out (Rust's `max`/`min`
/// would drop the NaN).
pub fn torch_clamp(v: f32, lo: f32, hi: f32) -> f32 {
    if v.is_nan() {
        v
    } else {
        v.max(lo).min(hi)
    }
}

/// diffusers' `_threshold_sample` (dynamic thresholding, Imagen), on a float32 tensor of
/// `batch` rows: per row, `s = quantile(|x|, ratio)` (torch's linear interpolation), clamped
/// to `[1, sample_max_value]`, then `clamp(x, -s, s) / s`.
pub fn threshold_sample(data: &mut [f32], batch: usize, ratio: f64, sample_max_value: f64) {
    if batch == 0 || data.is_empty() {
        return;
    }
    let n = data.len() / batch;
    let ratio = ratio as f32;
    let max_value = sample_max_value as f32;
    for row in data.chunks_mut(n) {
        let mut sorted: Vec<f32> = row.iter().map(|v| v.abs()).collect();
        let s = if sorted.iter().any(|v| v.is_nan()) {
            f32::NAN
        } else {
            sorted.sort_by(f32::total_cmp);
            // The rank is float32 q times the last index in float64 (measured against torch
            // 2.15: a float32 rank is off in ~40% of cases); the lerp weight is float32.
            let rank = f64::from(ratio) * (n - 1) as f64;
            let below = rank as usize;
            let above = rank.ceil() as usize;
            let weight = (rank - below as f64) as f32;
            torch_lerp(sorted[below.min(n - 1)], sorted[above.min(n - 1)], weight)
        };
        let s = torch_clamp(s, 1.0, max_value);
        for v in row.iter_mut() {
            *v = torch_clamp(*v, -s, s) / s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_endpoints() {
        let v = torch_linspace_f32(0.1, 0.2, 5);
        assert_eq!(v[0], 0.1f32);
        assert_eq!(v[4], 0.2f32);
        assert_eq!(torch_linspace_f32(0.3, 0.9, 1), vec![0.3f32]);
    }

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 1.0, 3), vec![0.0, 0.5, 1.0]);
        assert_eq!(np_arange(1000.0, 0.0, -250.0), vec![1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(np_round(498.5), 498.0);
        assert_eq!(np_round(499.5), 500.0);
        assert_eq!(np_interp_integer_grid(1000.0, &[1.0, 2.0, 3.0]), 3.0);
        assert_eq!(np_interp_integer_grid(-1.0, &[1.0, 2.0, 3.0]), 1.0);
    }
}
