//! Finds the fixtures that live outside the repository (the upstream Gateway API and Istio CRDs in
//! `../shared/fixtures/upstream-crds`). A user's clone has no `../shared`: the tests that need them report
//! themselves skipped with the reason; in CI (`CI=true`) their absence is a failure.

use std::path::{Path, PathBuf};

/// Where the upstream CRDs are looked for, in order: `$SERIN_UPSTREAM_CRDS`, then `shared/fixtures/upstream-crds`
/// beside the repository or beside any of its ancestors (a git worktree).
pub fn upstream_crds_candidates() -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("SERIN_UPSTREAM_CRDS")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    candidates.extend(
        manifest
            .ancestors()
            .skip(1)
            .map(|ancestor| ancestor.join("shared/fixtures/upstream-crds")),
    );
    candidates
}

/// The directory of the upstream CRDs, or why it is missing.
pub fn upstream_crds() -> Result<PathBuf, String> {
    let candidates = upstream_crds_candidates();
    candidates
        .iter()
        .find(|dir| dir.join("gateway-api-httproutes.yaml").exists())
        .cloned()
        .ok_or_else(|| {
            format!(
                "the upstream CRD fixtures are not there (looked in {candidates:?}; set SERIN_UPSTREAM_CRDS \
                 to shared/fixtures/upstream-crds)"
            )
        })
}

/// The upstream CRDs for `test`, or `None` after printing why the test is skipped. In CI their absence fails.
pub fn upstream_crds_or_skip(test: &str) -> Option<PathBuf> {
    match upstream_crds() {
        Ok(dir) => Some(dir),
        Err(why) if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("{test}: {why}; CI must run it")
        }
        Err(why) => {
            println!("skipped: {test}: {why}");
            eprintln!("skipped: {test}: {why}");
            None
        }
    }
}
