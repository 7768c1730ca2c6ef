//! Scrubbing: the values of a job's secrets never leave the daemon. Whatever the job sends
//! back (log records, captured stdout and stderr, its result, its error message) passes
//! through the job's [`Scrubber`] before the daemon logs, replies or dead-letters it, so each
//! value is replaced by `[redacted:<name>]`.
//!
//! Each value is looked for as written, in its JSON-escaped forms (as `serde_json` and as
//! Python's `json.dumps` with its default `ensure_ascii` write it) and as Python's `repr` writes
//! it, so that a value with quotes, backslashes, control or non-ASCII characters is also caught
//! inside a printed JSON document, a `%r` log line or a printed dict.
//! A value the job transforms (base64, reversed, split) is not recognised: docs/secrets.md says
//! so.

use std::borrow::Cow;

use serde_json::Value;

use super::JobSecrets;
use crate::job::JobError;

/// Where the runtime cuts log messages and error descriptions (`MESSAGE_LIMIT` in
/// `hybrid_worker/_bootstrap.py`).
pub const MESSAGE_LIMIT: usize = 2000;

/// Replaces the values of one job's secrets.
#[derive(Clone, Default)]
pub struct Scrubber {
    /// (text to find, its replacement), longest first so that a value containing another
    /// is replaced whole.
    needles: Vec<(String, String)>,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} patterns)", self.needles.len())
    }
}

/// `value` as Python's `json.dumps` writes it inside quotes (ASCII only: `\uXXXX` escapes).
fn ascii_json(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out
}

/// `value` as Python's `repr` writes it inside its quotes (what `%r`, f"{x!r}" and a
/// container's `str` show): backslashes, line ends, tabs, other control characters and the
/// chosen quote escaped; printable non-ASCII kept.
fn python_repr(value: &str) -> String {
    let quote = if value.contains('\'') && !value.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(value.len());
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
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// A job's scrubber, shared by its channel reader and its token service (each token handed to
/// the job is scrubbed too, as `[redacted:token]`).
pub type SharedScrubber = std::sync::Arc<std::sync::Mutex<Scrubber>>;

impl Scrubber {
    /// The scrubber of a job holding `secrets` (an empty value is never looked for).
    pub fn new(secrets: &JobSecrets) -> Self {
        let mut scrubber = Self::default();
        for (name, value) in &secrets.values {
            scrubber.add(name, value);
        }
        scrubber
    }

    /// Looks for `value` too, replacing it by `[redacted:<name>]`.
    pub fn add(&mut self, name: &str, value: &str) {
        if value.is_empty() {
            return;
        }
        let replacement = format!("[redacted:{name}]");
        let quoted = serde_json::to_string(value).unwrap_or_default();
        let escaped = quoted
            .strip_prefix('"')
            .and_then(|q| q.strip_suffix('"'))
            .unwrap_or_default()
            .to_owned();
        let forms = [
            value.to_owned(),
            escaped,
            ascii_json(value),
            python_repr(value),
        ];
        for form in forms {
            if !form.is_empty() && !self.needles.iter().any(|(n, _)| *n == form) {
                self.needles.push((form, replacement.clone()));
            }
        }
        self.needles.sort_by_key(|n| std::cmp::Reverse(n.0.len()));
    }

    /// Whether there is nothing to scrub.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// `text` with every value replaced.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for (needle, replacement) in &self.needles {
            if out.contains(needle.as_str()) {
                out = Cow::Owned(out.replace(needle.as_str(), replacement));
            }
        }
        out
    }

    /// `text` that was cut at a length limit: scrubbed, and a beginning of a value left at the
    /// cut replaced too.
    pub fn cut_text(&self, text: &str) -> String {
        let mut out = self.text(text).into_owned();
        if let Some((keep, replacement)) = self.cut_tail(out.as_bytes()) {
            out.truncate(keep);
            out.push_str(replacement);
        }
        out
    }

    /// Where a beginning of a value (at least one byte, not all of it) starts at the end of
    /// `bytes`, and its replacement: the longest such beginning.
    fn cut_tail(&self, bytes: &[u8]) -> Option<(usize, &str)> {
        let mut best: Option<(usize, &str)> = None;
        for (needle, replacement) in &self.needles {
            let needle = needle.as_bytes();
            let longest = needle.len().saturating_sub(1).min(bytes.len());
            for len in (1..=longest).rev() {
                if bytes.ends_with(&needle[..len]) {
                    let at = bytes.len() - len;
                    if best.is_none_or(|(b, _)| at < b) {
                        best = Some((at, replacement.as_str()));
                    }
                    break;
                }
            }
        }
        best
    }

    /// Raw output bytes (stdout, stderr), scrubbed; `cut` says the job wrote more than was
    /// kept, so that a value cut at the end is replaced too. Invalid UTF-8 is kept as it is
    /// around the values found.
    pub fn bytes(&self, bytes: &[u8], cut: bool) -> Vec<u8> {
        let mut out = bytes.to_vec();
        for (needle, replacement) in &self.needles {
            out = replace_bytes(&out, needle.as_bytes(), replacement.as_bytes());
        }
        if cut && let Some((keep, replacement)) = self.cut_tail(&out) {
            out.truncate(keep);
            out.extend_from_slice(replacement.as_bytes());
        }
        out
    }

    /// A JSON value with every string (object keys included) scrubbed.
    pub fn value(&self, value: Value) -> Value {
        match value {
            Value::String(s) => Value::String(self.text(&s).into_owned()),
            Value::Array(items) => Value::Array(items.into_iter().map(|v| self.value(v)).collect()),
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| (self.text(&k).into_owned(), self.value(v)))
                    .collect(),
            ),
            other => other,
        }
    }

    /// A message of the runtime (a log record, an error), which it cuts at
    /// [`MESSAGE_LIMIT`] characters: one that long may end with the beginning of a value.
    pub fn message(&self, text: &str) -> String {
        if text.chars().count() >= MESSAGE_LIMIT {
            self.cut_text(text)
        } else {
            self.text(text).into_owned()
        }
    }

    /// An error whose message may quote a value.
    pub fn error(&self, mut error: JobError) -> JobError {
        error.message = self.message(&error.message);
        error
    }
}

fn replace_bytes(haystack: &[u8], needle: &[u8], replacement: &[u8]) -> Vec<u8> {
    let Some(&first) = needle.first() else {
        return haystack.to_vec();
    };
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    // Jump from one occurrence of the needle's first byte to the next.
    while let Some(offset) = haystack[i..].iter().position(|&b| b == first) {
        let at = i + offset;
        if haystack[at..].starts_with(needle) {
            out.extend_from_slice(&haystack[i..at]);
            out.extend_from_slice(replacement);
            i = at + needle.len();
        } else {
            out.extend_from_slice(&haystack[i..=at]);
            i = at + 1;
        }
    }
    out.extend_from_slice(&haystack[i..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scrubber() -> Scrubber {
        Scrubber::new(&JobSecrets {
            values: vec![
                ("db".into(), "p\"ss\\wörd".into()),
                ("api".into(), "k3y-0123".into()),
                ("empty".into(), String::new()),
            ],
        })
    }

    #[test]
    fn values_and_their_json_forms_are_replaced() {
        let s = scrubber();
        assert_eq!(s.text("key=k3y-0123!"), "key=[redacted:api]!");
        assert_eq!(s.text("raw p\"ss\\wörd"), "raw [redacted:db]");
        assert_eq!(
            s.text(r#"{"v": "p\"ss\\wörd"}"#),
            r#"{"v": "[redacted:db]"}"#
        );
        assert_eq!(
            s.text(r#"{"v": "p\"ss\\w\u00f6rd"}"#),
            r#"{"v": "[redacted:db]"}"#
        );
        assert_eq!(s.text(r#"warn 'p"ss\\wörd'"#), "warn '[redacted:db]'");
        assert_eq!(s.text("nothing here"), "nothing here");
    }

    #[test]
    fn a_value_cut_at_the_end_of_kept_output_is_replaced() {
        let s = scrubber();
        assert_eq!(s.bytes(b"out: k3y-01", true), b"out: [redacted:api]");
        // Not cut: the same bytes are only text that happens to look alike.
        assert_eq!(s.bytes(b"out: k3y-01", false), b"out: k3y-01");
        assert_eq!(
            s.bytes(b"a k3y-0123 b\xff", false),
            b"a [redacted:api] b\xff"
        );
        assert_eq!(s.cut_text("msg k3"), "msg [redacted:api]");
        assert_eq!(s.message("ends in k"), "ends in k");
        let long = format!("{}k3y", "x".repeat(MESSAGE_LIMIT - 3));
        assert!(s.message(&long).ends_with("x[redacted:api]"));
    }

    #[test]
    fn results_are_scrubbed_in_keys_and_nested_strings() {
        let s = scrubber();
        let out = s.value(json!({"k3y-0123": ["x k3y-0123", {"n": 1}]}));
        assert_eq!(
            out,
            json!({"[redacted:api]": ["x [redacted:api]", {"n": 1}]})
        );
    }
}
