//! Samples and their summaries. Medians are what the last line reports; the spread is printed
//! beside them so a noisy run shows itself.

use std::time::Duration;

/// Durations of one measured operation.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub label: String,
    values_ms: Vec<f64>,
}

impl Samples {
    pub fn new(label: impl Into<String>) -> Self {
        Samples {
            label: label.into(),
            values_ms: Vec::new(),
        }
    }

    pub fn push(&mut self, d: Duration) {
        self.values_ms.push(d.as_secs_f64() * 1e3);
    }

    pub fn len(&self) -> usize {
        self.values_ms.len()
    }

    /// All samples of `parts` together, under `label`.
    pub fn merged(label: impl Into<String>, parts: &[&Samples]) -> Samples {
        Samples {
            label: label.into(),
            values_ms: parts
                .iter()
                .flat_map(|p| p.values_ms.iter().copied())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.values_ms.is_empty()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.values_ms.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The q-quantile (nearest rank), 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return 0.0;
        }
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }

    /// The median in ms (the mean of the two middle values for an even count).
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub fn mean(&self) -> f64 {
        if self.values_ms.is_empty() {
            return 0.0;
        }
        self.values_ms.iter().sum::<f64>() / self.values_ms.len() as f64
    }

    /// `label  n=.. median=..ms mean=..ms p10=.. p90=.. max=..`.
    pub fn summary(&self) -> String {
        format!(
            "{:<28} n={:<4} median={:>8.3}ms mean={:>8.3}ms p10={:>8.3}ms p90={:>8.3}ms max={:>8.3}ms",
            self.label,
            self.len(),
            self.median(),
            self.mean(),
            self.quantile(0.10),
            self.quantile(0.90),
            self.quantile(1.0),
        )
    }
}

/// The median of `v` (the mean of the middle two for an even count; 0 for none).
pub fn median_of(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The last line every benchmark prints: `bench <name> ours=<x> baseline=<y> ratio=<r> target=<t>`.
pub fn last_line(name: &str, ours: &str, baseline: &str, ratio: f64, target: &str) -> String {
    format!("bench {name} ours={ours} baseline={baseline} ratio={ratio:.3} target={target}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(ms: &[u64]) -> Samples {
        let mut s = Samples::new("t");
        for m in ms {
            s.push(Duration::from_millis(*m));
        }
        s
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(samples(&[5, 1, 3]).median(), 3.0);
        assert_eq!(samples(&[4, 1, 3, 2]).median(), 2.5);
        assert_eq!(samples(&[]).median(), 0.0);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let s = samples(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(s.quantile(0.9), 9.0);
        assert_eq!(s.quantile(0.1), 1.0);
        assert_eq!(s.quantile(1.0), 10.0);
    }

    #[test]
    fn last_line_has_the_agreed_shape() {
        assert_eq!(
            last_line("cni-add", "1.000ms", "4.000ms", 0.25, "0.50"),
            "bench cni-add ours=1.000ms baseline=4.000ms ratio=0.250 target=0.50"
        );
    }
}
