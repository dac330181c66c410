//! The deployment files (deploy/: compose, Kubernetes) name binaries, flags and environment
//! variables that exist: each container's command is a workspace binary, and each `--flag`
//! and `SDMESH_*` variable it is given is one that binary's `--help` lists. No Docker engine
//! or cluster runs here, so this is what keeps the files from drifting from the code.

use sdmesh_testkit::process::bin;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// What a deployment file gives its sdmesh containers: the flags and `SDMESH_*` variables
/// set for all of them (compose's shared block, before the first command), then each
/// container's binary with its own (other containers, e.g. Redis, have no binary).
#[allow(clippy::type_complexity)]
fn containers(text: &str) -> (Vec<String>, Vec<(Option<String>, Vec<String>)>) {
    // Comments, and ${VAR} substitutions (the file's own variables, not the binaries').
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| {
            let mut l = l.to_string();
            while let Some(start) = l.find("${") {
                let end = l[start..].find('}').map_or(l.len(), |e| start + e + 1);
                l.replace_range(start..end, "");
            }
            l
        })
        .collect();
    let binary_in = |l: &str| {
        l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .find(|w| w.starts_with("sdmesh") || *w == "sdctl")
            .map(str::to_string)
    };
    let mut shared = Vec::new();
    let mut out: Vec<(Option<String>, Vec<String>)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        // Another image (Redis) is another container, whatever its command.
        if line.contains("image:") && !line.contains("sdmesh") {
            out.push((None, Vec::new()));
        }
        if line.contains("command:") {
            let folded = line.trim_end().ends_with(">-");
            out.push((binary_in(line).or_else(|| folded.then(|| binary_in(&lines[i + 1])).flatten()), Vec::new()));
        }
        let given = match out.last_mut() {
            Some((_, given)) => given,
            None => &mut shared,
        };
        for word in line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')) {
            if word.strip_prefix("--").is_some_and(|f| f.starts_with(|c: char| c.is_ascii_lowercase()))
                || word.starts_with("SDMESH_")
            {
                given.push(word.to_string());
            }
        }
    }
    (shared, out)
}

#[test]
fn deploy_files_name_binaries_flags_and_variables_that_exist() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut help = BTreeMap::new();
    let mut checked = 0;
    for file in ["compose.yaml", "kubernetes/sdmesh.yaml"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        let (shared, found) = containers(&text);
        let binaries: Vec<(String, Vec<String>)> =
            found.into_iter().filter_map(|(binary, given)| Some((binary?, given))).collect();
        assert!(binaries.len() >= 4, "{file}: only {} sdmesh containers found", binaries.len());
        for (binary, given) in binaries {
            let text = help.entry(binary.clone()).or_insert_with(|| {
                let out = Command::new(bin(&binary)).arg("--help").output().unwrap();
                assert!(out.status.success(), "{binary} --help");
                String::from_utf8(out.stdout).unwrap()
            });
            for word in shared.iter().chain(&given) {
                assert!(
                    text.contains(word.as_str()),
                    "{file}: {binary} is given {word}, which its --help does not list"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "only {checked} flags and variables checked");
}

/// Every binary the images ship.
const BINARIES: [&str; 8] = [
    "sdmesh",
    "sdctl",
    "sdmesh-text-encoder",
    "sdmesh-unet",
    "sdmesh-vae",
    "sdmesh-depth",
    "sdmesh-safety",
    "sdmesh-orchestrator",
];

#[test]
fn images_copy_every_service_binary() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for file in ["Dockerfile", "Dockerfile.cuda"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        for binary in BINARIES {
            bin(binary);
            assert!(text.contains(&format!("release/{binary} ")), "{file} does not copy {binary}");
        }
    }
}
