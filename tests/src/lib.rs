//! Helpers for tests that compare against the committed reference outputs in
//! tests/fixtures (made by tests/fixtures/generate.py with diffusers/transformers).

pub mod process;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// tests/fixtures in this repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A committed tiny model: "sd21-tiny" (v-prediction) or "sd21-base-tiny" (epsilon, fp16 files).
pub fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// A file under tests/fixtures/reference.
pub fn reference(rel: &str) -> PathBuf {
    fixtures().join("reference").join(rel)
}

pub fn load_tensors(rel: &str) -> HashMap<String, Tensor> {
    let path = reference(rel);
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn load_json(rel: &str) -> serde_json::Value {
    let path = reference(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Max |actual - expected| over all elements, with the index of the worst one.
pub fn max_abs_diff(actual: &Tensor, expected: &Tensor) -> (f32, usize) {
    let a = actual.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).expect("actual");
    let e =
        expected.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).expect("expected");
    a.iter()
        .zip(&e)
        .enumerate()
        .map(|(i, (x, y))| if x.is_nan() != y.is_nan() { (f32::INFINITY, i) } else { ((x - y).abs(), i) })
        .fold((0f32, 0usize), |best, cur| if cur.0 > best.0 { cur } else { best })
}

/// Asserts same shape and max abs error <= `tol`, naming the worst element on failure.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f32) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape differs");
    let (err, at) = max_abs_diff(actual, expected);
    if err > tol {
        let flat = |t: &Tensor| {
            t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).expect("flat")
        };
        let index = unravel(at, actual.dims());
        panic!(
            "{what}: max abs error {err:e} > {tol:e} at {index:?} (actual {}, expected {})",
            flat(actual)[at],
            flat(expected)[at]
        );
    }
}

fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for (i, d) in dims.iter().enumerate().rev() {
        idx[i] = flat % d.max(&1);
        flat /= d.max(&1);
    }
    idx
}

/// A JSON file under tests/fixtures (e.g. "reference-seeds/cases.json").
pub fn load_fixture_json(rel: &str) -> serde_json::Value {
    load_json(&format!("../{rel}"))
}

/// A safetensors file under tests/fixtures.
pub fn load_fixture_tensors(rel: &str) -> HashMap<String, Tensor> {
    load_tensors(&format!("../{rel}"))
}
