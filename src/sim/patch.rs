//! Patch math for the simulated API server (minimal placeholder version kept only so the sim-api branch
//! compiles; the patch/schema engineer's file replaces it at merge).

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    StrategicMerge,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<PatchType> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::StrategicMerge),
            "application/apply-patch+yaml" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub enum ListStrategy {
    Atomic,
    Set,
    Map(Vec<String>),
}

#[derive(Clone, Copy, Debug)]
pub enum MergeSchema<'a> {
    Builtin { group: &'a str, kind: &'a str },
    Structural(&'a Value),
    Unknown,
}

#[derive(Clone, Copy, Debug)]
pub struct ApplyOptions<'a> {
    pub field_manager: &'a str,
    pub force: bool,
    pub now: &'a str,
}

#[derive(thiserror::Error, Debug)]
pub enum PatchError {
    #[error("malformed patch: {0}")]
    MalformedPatch(String),
    #[error("invalid result: {0}")]
    InvalidResult(String),
    #[error("test failed: {0}")]
    TestFailed(String),
    #[error("apply conflict: {conflicts:?}")]
    ApplyConflict { conflicts: Vec<(String, String)> },
}

impl PatchError {
    pub fn category(&self) -> &'static str {
        match self {
            PatchError::MalformedPatch(_) => "malformed_patch",
            PatchError::InvalidResult(_) => "invalid_result",
            PatchError::TestFailed(_) => "test_failed",
            PatchError::ApplyConflict { .. } => "apply_conflict",
        }
    }
}

pub fn apply_patch(
    patch_type: PatchType,
    current: &Value,
    patch: &Value,
    _schema: &MergeSchema<'_>,
) -> Result<Value, PatchError> {
    let mut result = current.clone();
    match patch_type {
        PatchType::Json => {
            let operations: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|error| PatchError::MalformedPatch(error.to_string()))?;
            json_patch::patch(&mut result, &operations).map_err(|error| match error.kind {
                json_patch::PatchErrorKind::TestFailed => PatchError::TestFailed(error.to_string()),
                _ => PatchError::InvalidResult(error.to_string()),
            })?;
        }
        PatchType::Merge | PatchType::StrategicMerge | PatchType::Apply => {
            if !patch.is_object() {
                return Err(PatchError::MalformedPatch(
                    "patch must be a JSON object".into(),
                ));
            }
            json_patch::merge(&mut result, patch);
        }
    }
    Ok(result)
}

pub fn server_side_apply(
    current: Option<&Value>,
    applied: &Value,
    options: &ApplyOptions<'_>,
    schema: &MergeSchema<'_>,
) -> Result<Value, PatchError> {
    let base = current
        .cloned()
        .unwrap_or_else(|| Value::Object(Default::default()));
    let mut result = apply_patch(PatchType::Merge, &base, applied, schema)?;
    record_update(
        current,
        &mut result,
        options.field_manager,
        options.now,
        None,
    );
    Ok(result)
}

pub fn record_update(
    _old: Option<&Value>,
    _new: &mut Value,
    _field_manager: &str,
    _now: &str,
    _subresource: Option<&str>,
) {
}
