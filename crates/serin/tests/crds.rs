//! The CRD YAML in `crds/` must be exactly what the Rust types generate (run with SERIN_UPDATE_CRDS=1 to refresh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../crds")
}

#[test]
fn crds_directory_matches_the_generated_definitions() {
    let generated = serin::crd::all_as_yaml().expect("CRDs serialize to YAML");
    if std::env::var_os("SERIN_UPDATE_CRDS").is_some() {
        std::fs::create_dir_all(crds_dir()).unwrap();
        for (file, yaml) in &generated {
            std::fs::write(crds_dir().join(file), yaml).unwrap();
        }
    }
    let mut stale = Vec::new();
    for (file, yaml) in &generated {
        match std::fs::read_to_string(crds_dir().join(file)) {
            Ok(on_disk) if &on_disk == yaml => {}
            Ok(_) => stale.push(format!("{file} differs")),
            Err(e) => stale.push(format!("{file} unreadable: {e}")),
        }
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(crds_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = generated.iter().map(|(f, _)| f.clone()).collect();
    expected.sort();
    assert_eq!(on_disk, expected, "crds/ holds exactly one file per CRD");
    assert!(
        stale.is_empty(),
        "crds/ is stale ({}); regenerate with `SERIN_UPDATE_CRDS=1 cargo test --test crds`",
        stale.join(", ")
    );
}

#[test]
fn rollout_crd_has_scale_subresource_printer_columns_and_short_name() {
    let crd = serin::crd::all().remove(0);
    assert_eq!(crd.spec.names.kind, "Rollout");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["ro".to_string()][..])
    );
    let version = &crd.spec.versions[0];
    let scale = version
        .subresources
        .as_ref()
        .and_then(|s| s.scale.as_ref())
        .expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let columns: Vec<&str> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    for wanted in ["Phase", "Step", "Weight", "Age"] {
        assert!(
            columns.contains(&wanted),
            "printer column {wanted} in {columns:?}"
        );
    }
    let yaml = serde_yaml::to_string(&crd).unwrap();
    assert!(yaml.contains("exactly one of strategy.canary or strategy.blueGreen"));
    assert!(
        yaml.len() < 200_000,
        "CRD must stay small enough for client-side kubectl apply"
    );
}
