//! `make test` builds the binaries (`cargo build --bins`), then the tests (`cargo test`). When a
//! test-only dependency turns on a feature of a crate the binaries use too, the two builds
//! resolve different features, and everything above that crate (candle, tonic, tokenizers...)
//! is compiled twice: jsonschema did that once, through serde_json, and CI took 31 minutes
//! instead of 13. The workspace turns those features on for every build; this keeps it so.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Each package of the workspace's dependency graph, with the features it is built with (once
/// for each build of it: one for build scripts, one for the binaries), when `edges` are
/// followed (`cargo tree -e EDGES`).
fn features(edges: &str) -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["tree", "--workspace", "--offline", "--prefix", "none", "-e", edges, "-f", "{p}|{f}"])
        .output()
        .expect("runs cargo tree");
    assert!(out.status.success(), "cargo tree: {}", String::from_utf8_lossy(&out.stderr));
    let mut packages: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        if let Some((package, features)) = line.trim_end_matches(" (*)").split_once('|') {
            packages.entry(package.to_string()).or_default().insert(features.to_string());
        }
    }
    packages
}

#[test]
fn test_only_dependencies_change_no_features_of_the_binaries_dependencies() {
    let binaries = features("normal,build");
    let tests = features("normal,build,dev");
    assert!(binaries.len() > 100 && binaries.keys().any(|p| p.starts_with("candle-core ")), "{binaries:?}");
    let changed: Vec<String> = binaries
        .iter()
        .filter_map(|(package, built)| {
            let tested = tests.get(package).expect("the tests' graph has the binaries' packages");
            (tested != built).then(|| format!("{package}: {built:?} for the binaries, {tested:?} for the tests"))
        })
        .collect();
    assert!(
        changed.is_empty(),
        "turn these features on in the workspace's Cargo.toml (see its note on jsonschema):\n{}",
        changed.join("\n")
    );
}
