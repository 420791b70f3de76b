//! Helpers shared by the bench targets (a directory, so Cargo does not take it for a bench).
#![allow(dead_code)] // each bench uses its own part

use std::collections::BTreeMap;

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

// ---- BENCH lines: `BENCH <vmm> <test> round=N key=value ...` ----

/// (vmm, test) -> round -> key -> value
pub type Results = BTreeMap<(String, String), BTreeMap<u32, BTreeMap<String, f64>>>;

pub fn parse(output: &str) -> Results {
    let mut r: Results = BTreeMap::new();
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("BENCH ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let (Some(vmm), Some(test)) = (it.next(), it.next()) else {
            continue;
        };
        let kv: BTreeMap<String, String> = it
            .filter_map(|s| s.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let Some(round) = kv.get("round").and_then(|v| v.parse::<u32>().ok()) else {
            continue;
        };
        let e = r
            .entry((vmm.to_string(), test.to_string()))
            .or_default()
            .entry(round)
            .or_default();
        for (k, v) in kv {
            if let Ok(v) = v.parse::<f64>() {
                e.insert(k, v);
            }
        }
    }
    r
}

/// Values of `key` for each round (rounds in order), derived by `f` from the round's map.
pub fn per_round(
    r: &Results,
    vmm: &str,
    test: &str,
    f: &dyn Fn(&BTreeMap<String, f64>) -> Option<f64>,
) -> Vec<f64> {
    r.get(&(vmm.to_string(), test.to_string()))
        .map(|m| m.values().filter_map(f).collect())
        .unwrap_or_default()
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

pub fn fmt(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

pub fn list(v: &[f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter().map(|x| fmt(*x)).collect::<Vec<_>>().join(" / ")
}
