//! Label and field selectors: parses the `labelSelector`/`fieldSelector` query syntax and decides matches.

use std::collections::BTreeMap;

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum SelectorError {
    #[error("unable to parse requirement: {0}")]
    MalformedLabelRequirement(String),
    #[error("field label not supported: {0}")]
    UnsupportedField(String),
    #[error("invalid field selector: {0}")]
    MalformedFieldRequirement(String),
}

impl SelectorError {
    pub fn category(&self) -> &'static str {
        match self {
            SelectorError::MalformedLabelRequirement(_) => "malformed_label_requirement",
            SelectorError::UnsupportedField(_) => "unsupported_field",
            SelectorError::MalformedFieldRequirement(_) => "malformed_field_requirement",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// Splits on commas that are not inside a `( ... )` value set.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    for (index, character) in text.char_indices() {
        match character {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn valid_label_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn parse_value_set(text: &str, whole: &str) -> Result<Vec<String>, SelectorError> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(|| SelectorError::MalformedLabelRequirement(whole.to_string()))?;
    Ok(inner
        .split(',')
        .map(|value| value.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<LabelSelector, SelectorError> {
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(LabelSelector { requirements });
        }
        for raw in split_top_level(text) {
            let part = raw.trim();
            let malformed = || SelectorError::MalformedLabelRequirement(part.to_string());
            if part.is_empty() {
                return Err(malformed());
            }
            let requirement = if let Some(key) = part.strip_prefix('!') {
                LabelRequirement::NotExists(key.trim().to_string())
            } else if let Some((key, values)) = part.split_once(" notin ") {
                LabelRequirement::NotIn(key.trim().to_string(), parse_value_set(values, part)?)
            } else if let Some((key, values)) = part.split_once(" in ") {
                LabelRequirement::In(key.trim().to_string(), parse_value_set(values, part)?)
            } else if let Some((key, value)) = part.split_once("!=") {
                LabelRequirement::NotEquals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, value)) = part.split_once("==") {
                LabelRequirement::Equals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, value)) = part.split_once('=') {
                LabelRequirement::Equals(key.trim().to_string(), value.trim().to_string())
            } else {
                LabelRequirement::Exists(part.to_string())
            };
            let key = match &requirement {
                LabelRequirement::Equals(k, _)
                | LabelRequirement::NotEquals(k, _)
                | LabelRequirement::In(k, _)
                | LabelRequirement::NotIn(k, _)
                | LabelRequirement::Exists(k)
                | LabelRequirement::NotExists(k) => k,
            };
            if !valid_label_key(key) {
                return Err(malformed());
            }
            requirements.push(requirement);
        }
        Ok(LabelSelector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                LabelRequirement::Equals(key, value) => labels.get(key) == Some(value),
                LabelRequirement::NotEquals(key, value) => labels.get(key) != Some(value),
                LabelRequirement::In(key, values) => {
                    labels.get(key).is_some_and(|v| values.contains(v))
                }
                LabelRequirement::NotIn(key, values) => {
                    !labels.get(key).is_some_and(|v| values.contains(v))
                }
                LabelRequirement::Exists(key) => labels.contains_key(key),
                LabelRequirement::NotExists(key) => !labels.contains_key(key),
            })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum FieldRequirement {
    NameIs(String, bool),
    NamespaceIs(String, bool),
}

/// A parsed field selector over `metadata.name` and `metadata.namespace`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    pub fn parse(text: &str) -> Result<FieldSelector, SelectorError> {
        let mut requirements = Vec::new();
        for raw in text.split(',') {
            let part = raw.trim();
            if part.is_empty() {
                continue;
            }
            let (field, value, equal) = if let Some((field, value)) = part.split_once("!=") {
                (field, value, false)
            } else if let Some((field, value)) = part.split_once("==") {
                (field, value, true)
            } else if let Some((field, value)) = part.split_once('=') {
                (field, value, true)
            } else {
                return Err(SelectorError::MalformedFieldRequirement(part.to_string()));
            };
            let value = value.trim().to_string();
            requirements.push(match field.trim() {
                "metadata.name" => FieldRequirement::NameIs(value, equal),
                "metadata.namespace" => FieldRequirement::NamespaceIs(value, equal),
                other => return Err(SelectorError::UnsupportedField(other.to_string())),
            });
        }
        Ok(FieldSelector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, namespace: &str, name: &str) -> bool {
        self.requirements
            .iter()
            .all(|requirement| match requirement {
                FieldRequirement::NameIs(value, equal) => (name == value) == *equal,
                FieldRequirement::NamespaceIs(value, equal) => (namespace == value) == *equal,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_label_operator_decides_like_kubernetes() {
        let object = labels(&[("app", "web"), ("tier", "front")]);
        let cases = [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=api", true),
            ("missing!=x", true),
            ("app in (web, api)", true),
            ("app notin (web,api)", false),
            ("missing notin (a)", true),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("app=web,tier=back", false),
            ("app in (web),tier", true),
            ("", true),
        ];
        for (selector, expected) in cases {
            let parsed = LabelSelector::parse(selector).unwrap();
            assert_eq!(parsed.matches(&object), expected, "selector {selector:?}");
        }
    }

    #[test]
    fn malformed_selectors_are_rejected() {
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b=c").is_err());
        assert!(FieldSelector::parse("spec.x=1").is_err());
        assert!(FieldSelector::parse("metadata.name").is_err());
    }

    #[test]
    fn field_selector_on_name_and_namespace() {
        let selector =
            FieldSelector::parse("metadata.name=a,metadata.namespace!=kube-system").unwrap();
        assert!(selector.matches("default", "a"));
        assert!(!selector.matches("kube-system", "a"));
        assert!(!selector.matches("default", "b"));
    }
}
