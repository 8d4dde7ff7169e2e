//! Decides how `{{args.NAME}}` placeholders become text in a PromQL query without any value being able to
//! close a string, a label matcher or the query itself.
//!
//! The query is scanned with a small PromQL lexer that knows whether each placeholder sits inside a
//! double-quoted, single-quoted or backtick string, or outside any string:
//! - inside `"..."` or `'...'` the value is escaped (backslash, the quote, newline, every control character);
//! - inside a backtick (raw) string, where PromQL has no escapes, a value containing a backtick is rejected;
//! - outside a string the value must be one plain token (`[A-Za-z0-9_.:]+`: a number, a duration such as `5m`,
//!   a metric or label name), so `1 or vector(1)` or `} or {` are rejected.

use std::collections::BTreeMap;

/// Why a query's arguments could not be substituted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ArgsError {
    #[error("query refers to {{{{args.{0}}}}}, but no argument {0:?} is declared")]
    UnknownArgument(String),
    #[error("placeholder {0:?} is malformed; write {{{{args.NAME}}}}")]
    MalformedPlaceholder(String),
    #[error("placeholder starting at byte {0} is not closed with }}}}")]
    UnclosedPlaceholder(usize),
    #[error(
        "argument {name:?} is used outside a quoted string, so its value must be a single token of letters, \
         digits, '_', '.' or ':' (a number, a duration, a name); {value:?} is not"
    )]
    UnsafeBareValue { name: String, value: String },
    #[error("argument {name:?} is used inside a `backtick` string, where its value may not contain a backtick")]
    BacktickInRawString { name: String },
    #[error("argument {name:?} is used inside a string, but its value contains {reason}")]
    UnsafeQuotedValue { name: String, reason: &'static str },
}

impl ArgsError {
    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ArgsError::UnknownArgument(_) => "unknown_argument",
            ArgsError::MalformedPlaceholder(_) => "malformed_placeholder",
            ArgsError::UnclosedPlaceholder(_) => "unclosed_placeholder",
            ArgsError::UnsafeBareValue { .. } => "unsafe_bare_value",
            ArgsError::BacktickInRawString { .. } => "backtick_in_raw_string",
            ArgsError::UnsafeQuotedValue { .. } => "unsafe_quoted_value",
        }
    }
}

/// Where a placeholder sits in the query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Context {
    Bare,
    DoubleQuoted,
    SingleQuoted,
    Backtick,
    Comment,
}

/// One piece of a parsed query: literal text, or a placeholder with the context it appears in.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'q> {
    Text(&'q str),
    Placeholder { name: &'q str, context: Context },
}

const PLACEHOLDER_OPEN: &str = "{{";
const PLACEHOLDER_CLOSE: &str = "}}";

/// Splits the query into text and placeholders, tracking the lexical context of each placeholder.
fn parse(query: &str) -> Result<Vec<Piece<'_>>, ArgsError> {
    let mut pieces = Vec::new();
    let mut context = Context::Bare;
    let mut escaped = false;
    let mut text_start = 0;
    let mut index = 0;
    let bytes = query.as_bytes();
    while index < bytes.len() {
        if query[index..].starts_with(PLACEHOLDER_OPEN) {
            let body_start = index + PLACEHOLDER_OPEN.len();
            let body_len = query[body_start..]
                .find(PLACEHOLDER_CLOSE)
                .ok_or(ArgsError::UnclosedPlaceholder(index))?;
            let body = &query[body_start..body_start + body_len];
            let name = placeholder_name(body)
                .ok_or_else(|| ArgsError::MalformedPlaceholder(format!("{{{{{body}}}}}")))?;
            if text_start < index {
                pieces.push(Piece::Text(&query[text_start..index]));
            }
            pieces.push(Piece::Placeholder { name, context });
            index = body_start + body_len + PLACEHOLDER_CLOSE.len();
            text_start = index;
            // A placeholder never changes the lexical context: its value cannot open or close a string.
            escaped = false;
            continue;
        }
        let byte = bytes[index];
        context = match (context, byte) {
            (Context::Bare, b'"') => Context::DoubleQuoted,
            (Context::Bare, b'\'') => Context::SingleQuoted,
            (Context::Bare, b'`') => Context::Backtick,
            (Context::Bare, b'#') => Context::Comment,
            (Context::DoubleQuoted | Context::SingleQuoted, _) if escaped => {
                escaped = false;
                context
            }
            (Context::DoubleQuoted | Context::SingleQuoted, b'\\') => {
                escaped = true;
                context
            }
            (Context::DoubleQuoted, b'"')
            | (Context::SingleQuoted, b'\'')
            | (Context::Backtick, b'`') => Context::Bare,
            (Context::Comment, b'\n') => Context::Bare,
            (unchanged, _) => unchanged,
        };
        index += 1;
    }
    if text_start < query.len() {
        pieces.push(Piece::Text(&query[text_start..]));
    }
    Ok(pieces)
}

/// `args.NAME` (surrounding spaces allowed) -> `NAME`.
fn placeholder_name(body: &str) -> Option<&str> {
    let name = body.trim().strip_prefix("args.")?;
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    valid.then_some(name)
}

/// The names of every argument the text refers to, in order of first use.
pub fn referenced_names(text: &str) -> Result<Vec<String>, ArgsError> {
    let mut names: Vec<String> = Vec::new();
    for piece in parse(text)? {
        if let Piece::Placeholder { name, .. } = piece {
            if !names.iter().any(|known| known == name) {
                names.push(name.to_string());
            }
        }
    }
    Ok(names)
}

/// Substitutes arguments into a PromQL query, escaping or rejecting each value according to where it appears.
pub fn substitute_promql(
    query: &str,
    values: &BTreeMap<String, String>,
) -> Result<String, ArgsError> {
    let mut out = String::with_capacity(query.len());
    for piece in parse(query)? {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Placeholder { name, context } => {
                let value = values
                    .get(name)
                    .ok_or_else(|| ArgsError::UnknownArgument(name.to_string()))?;
                match context {
                    Context::DoubleQuoted => out.push_str(&escape_quoted(value, '"', name)?),
                    Context::SingleQuoted => out.push_str(&escape_quoted(value, '\'', name)?),
                    Context::Backtick => {
                        if value.contains('`') {
                            return Err(ArgsError::BacktickInRawString {
                                name: name.to_string(),
                            });
                        }
                        out.push_str(value);
                    }
                    // A comment ends at a newline; a value with a newline would resume the query.
                    Context::Comment => out.push_str(&value.replace(['\n', '\r'], " ")),
                    Context::Bare => {
                        if !is_bare_safe(value) {
                            return Err(ArgsError::UnsafeBareValue {
                                name: name.to_string(),
                                value: value.clone(),
                            });
                        }
                        out.push_str(value);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Substitutes arguments into plain text (a built-in check's field), without any escaping: the result is
/// escaped where it is finally placed into PromQL.
pub fn substitute_plain(
    text: &str,
    values: &BTreeMap<String, String>,
) -> Result<String, ArgsError> {
    let mut out = String::with_capacity(text.len());
    for piece in parse(text)? {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Placeholder { name, .. } => out.push_str(
                values
                    .get(name)
                    .ok_or_else(|| ArgsError::UnknownArgument(name.to_string()))?,
            ),
        }
    }
    Ok(out)
}

/// Whether a value may appear outside quotes: one token that cannot start an operator, a selector or a string.
pub fn is_bare_safe(value: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':'))
}

/// Escapes a value for the inside of a PromQL double-quoted string literal.
pub fn escape_double_quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    push_escaped(&mut out, value, '"');
    out
}

fn escape_quoted(value: &str, quote: char, name: &str) -> Result<String, ArgsError> {
    if value.contains('\0') {
        // Prometheus rejects NUL even escaped in some versions; refuse it rather than guess.
        return Err(ArgsError::UnsafeQuotedValue {
            name: name.to_string(),
            reason: "a NUL character",
        });
    }
    let mut out = String::with_capacity(value.len() + 2);
    push_escaped(&mut out, value, quote);
    Ok(out)
}

fn push_escaped(out: &mut String, value: &str, quote: char) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            // Go-style \u escapes are what the PromQL lexer accepts for every other control character.
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn quoted_values_are_escaped_so_they_cannot_close_the_string() {
        let query = r#"sum(rate(http_requests_total{service="{{args.service}}"}[1m]))"#;
        let table: &[(&str, &str)] = &[
            ("checkout", r#"service="checkout""#),
            (r#"a"b"#, r#"service="a\"b""#),
            (
                r#"x"} or vector(1) or {a=""#,
                r#"service="x\"} or vector(1) or {a=\"""#,
            ),
            ("}", r#"service="}""#),
            ("line1\nline2", r#"service="line1\nline2""#),
            (r"back\slash", r#"service="back\\slash""#),
            (r"trailing\", r#"service="trailing\\""#),
            ("tab\tcr\rbell\u{7}", r#"service="tab\tcr\rbell\u0007""#),
            ("ünïcødé-✓", r#"service="ünïcødé-✓""#),
            ("or vector(1)", r#"service="or vector(1)""#),
        ];
        for (value, expected_fragment) in table {
            let out = substitute_promql(query, &values(&[("service", value)])).unwrap();
            assert!(
                out.contains(expected_fragment),
                "value {value:?}: {out} should contain {expected_fragment}"
            );
            // The escaped value keeps the query's structure: exactly one closing brace after the matcher.
            assert!(out.ends_with(r#""}[1m]))"#), "value {value:?}: {out}");
        }
    }

    #[test]
    fn single_quoted_values_escape_the_single_quote() {
        let out =
            substitute_promql("up{job='{{args.job}}'}", &values(&[("job", "a'b\"c")])).unwrap();
        assert_eq!(out, r#"up{job='a\'b"c'}"#);
    }

    #[test]
    fn bare_values_must_be_a_single_safe_token() {
        let query = "rate(x[{{args.window}}]) > {{args.threshold}}";
        let ok =
            substitute_promql(query, &values(&[("window", "5m"), ("threshold", "0.05")])).unwrap();
        assert_eq!(ok, "rate(x[5m]) > 0.05");
        for bad in [
            "1 or vector(1)",
            "1)",
            "}",
            "a\"",
            "",
            "1\n",
            "x{a=\"b\"}",
            "-1",
            "ü",
        ] {
            let err = substitute_promql(query, &values(&[("window", "5m"), ("threshold", bad)]))
                .unwrap_err();
            assert!(
                matches!(&err, ArgsError::UnsafeBareValue { name, .. } if name == "threshold"),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn escaped_quote_in_the_template_does_not_confuse_the_lexer() {
        // The \" inside the first string must not end it, so the placeholder is still inside a string.
        let out = substitute_promql(
            r#"x{a="q\"{{args.v}}"}"#,
            &values(&[("v", "1 or vector(1)")]),
        )
        .unwrap();
        assert_eq!(out, r#"x{a="q\"1 or vector(1)"}"#);
    }

    #[test]
    fn backtick_strings_reject_backticks() {
        let ok = substitute_promql("x{a=`{{args.v}}`}", &values(&[("v", r#"a"b\"#)])).unwrap();
        assert_eq!(ok, r#"x{a=`a"b\`}"#);
        let err = substitute_promql("x{a=`{{args.v}}`}", &values(&[("v", "a`b")])).unwrap_err();
        assert_eq!(err.category(), "backtick_in_raw_string");
    }

    #[test]
    fn unknown_and_malformed_placeholders_are_errors() {
        let err = substitute_promql(r#"x{a="{{args.nope}}"}"#, &values(&[])).unwrap_err();
        assert_eq!(err, ArgsError::UnknownArgument("nope".into()));
        assert!(err.to_string().contains("nope"));
        let err = substitute_promql("x{{ foo }}", &values(&[])).unwrap_err();
        assert_eq!(err.category(), "malformed_placeholder");
        let err = substitute_promql("x{{args.a", &values(&[("a", "1")])).unwrap_err();
        assert_eq!(err.category(), "unclosed_placeholder");
    }

    #[test]
    fn spaces_inside_placeholders_and_dashes_in_names_are_accepted() {
        let out = substitute_promql(
            r#"x{h="{{ args.canary-hash }}"}"#,
            &values(&[("canary-hash", "abc123")]),
        )
        .unwrap();
        assert_eq!(out, r#"x{h="abc123"}"#);
        assert_eq!(
            referenced_names(r#"{{args.a}} {{args.b}} {{args.a}}"#).unwrap(),
            vec!["a".to_string(), "b".to_string()]
        );
    }

    #[test]
    fn values_in_comments_cannot_start_a_new_line_of_query() {
        let out =
            substitute_promql("up # {{args.v}}\n", &values(&[("v", "x\nor vector(1)")])).unwrap();
        assert_eq!(out, "up # x or vector(1)\n");
    }

    #[test]
    fn plain_substitution_does_not_escape() {
        let out = substitute_plain("{{args.svc}}-canary", &values(&[("svc", "a\"b")])).unwrap();
        assert_eq!(out, "a\"b-canary");
    }

    /// Reads a PromQL double-quoted string body back (the escapes `push_escaped` writes), or says where an
    /// unescaped quote would have ended the string early.
    fn unquote(body: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Err(format!("unescaped quote in {body:?}")),
                '\\' => match chars.next() {
                    Some('\\') => out.push('\\'),
                    Some('"') => out.push('"'),
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some('t') => out.push('\t'),
                    Some('u') => {
                        let hex: String = chars.by_ref().take(4).collect();
                        let code = u32::from_str_radix(&hex, 16).map_err(|e| e.to_string())?;
                        out.push(char::from_u32(code).ok_or("bad code point")?);
                    }
                    other => return Err(format!("unknown escape {other:?}")),
                },
                c if c.is_control() => return Err(format!("raw control character {c:?}")),
                c => out.push(c),
            }
        }
        Ok(out)
    }

    proptest::proptest! {
        #[test]
        fn any_value_stays_inside_its_string(value in "\\PC*|[\"\\\\{}\n\r\t\u{0}-\u{1f} a-z()]*") {
            let out = substitute_promql(r#"x{a="{{args.v}}"}"#, &values(&[("v", &value)]));
            match out {
                // NUL is refused outright.
                Err(err) => proptest::prop_assert!(value.contains('\0'), "{err}"),
                Ok(out) => {
                    let body = out
                        .strip_prefix(r#"x{a=""#)
                        .and_then(|rest| rest.strip_suffix(r#""}"#))
                        .ok_or_else(|| proptest::test_runner::TestCaseError::fail(format!("structure changed: {out}")))?;
                    proptest::prop_assert_eq!(unquote(body), Ok(value.clone()));
                }
            }
        }

        #[test]
        fn bare_values_are_single_tokens_or_rejected(value in "\\PC*") {
            match substitute_promql("rate(x[{{args.v}}])", &values(&[("v", &value)])) {
                Ok(out) => {
                    proptest::prop_assert!(is_bare_safe(&value));
                    proptest::prop_assert_eq!(out, format!("rate(x[{value}])"));
                }
                Err(err) => proptest::prop_assert_eq!(err.category(), "unsafe_bare_value"),
            }
        }
    }
}
