//! `make test` builds the binaries (`cargo build --bins`), then the tests (`cargo test`). When a
//! test-only dependency turns on a feature of a crate the binaries use too, the two builds
//! resolve different features, and everything above that crate (candle, tonic, tokenizers...)
//! is compiled twice: jsonschema did that once, through serde_json, and CI took 31 minutes
//! instead of 13. The workspace turns those features on for every build; this keeps it so.
//! It also keeps the crates that only run while building (or only in tests) unoptimised.

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

/// The package names in the workspace's graph when `edges` are followed.
fn package_names(edges: &str) -> BTreeSet<String> {
    features(edges).keys().map(|p| p.split(' ').next().unwrap().to_string()).collect()
}

/// Dependencies are built at opt-level 3 (the models run in tests), but the crates that only
/// run while building (proc macros, build scripts and what they use) or only in tests are not
/// worth optimising: at opt-level 3 they cost CI minutes. The workspace's Cargo.toml lists them
/// at opt-level 0; this names any it is missing (a new dependency brought them).
#[test]
fn crates_that_only_run_while_building_or_testing_are_not_optimised() {
    let run = package_names("normal,no-proc-macro");
    let binaries = package_names("normal,build");
    let everything = package_names("normal,build,dev");
    assert!(run.contains("candle-core") && !run.contains("syn") && binaries.contains("syn"), "{run:?}");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let manifest: toml::Table = std::fs::read_to_string(root).unwrap().parse().unwrap();
    let overrides = &manifest["profile"]["dev"]["package"];
    let opt_level = |name: &str| overrides.get(name).and_then(|o| o.get("opt-level")).and_then(|l| l.as_integer());
    let optimised: Vec<&String> = binaries
        .iter()
        .filter(|name| !run.contains(*name))
        .chain(everything.iter().filter(|name| !binaries.contains(*name) && !name.starts_with("sdmesh")))
        .filter(|name| opt_level(name) != Some(0))
        .collect();
    assert!(
        optimised.is_empty(),
        "add these to [profile.dev.package] in the workspace's Cargo.toml with opt-level = 0: {optimised:?}"
    );
    // The other way round: none of them is something the services run, or a crate no longer
    // in the graph.
    let listed = overrides.as_table().unwrap().keys().filter(|name| opt_level(name) == Some(0));
    let wrong: Vec<&String> = listed.filter(|name| run.contains(*name) || !everything.contains(*name)).collect();
    assert!(wrong.is_empty(), "at opt-level 0 but run by the services, or not a dependency any more: {wrong:?}");
}
