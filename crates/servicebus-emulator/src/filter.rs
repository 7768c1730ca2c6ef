//! Subscription rules (§7): correlation filters, and a small, explicit subset of SQL filters.
//!
//! Supported SQL: `1=1`, `1=0`, `TRUE`, `FALSE`, and `AND`-joined comparisons
//! `<property> = <literal>` / `<property> <> <literal>`, where the property is a user property
//! (`name` or `user.name`) or a system one (`sys.Label`, `sys.To`, ...), and the literal is a
//! quoted string or a number. Anything else is refused when the entities file is loaded, so a
//! filter never silently matches differently from Service Bus. Rule actions are not applied.

use std::collections::BTreeMap;

use fe2o3_amqp_types::messaging::MessageId;
use fe2o3_amqp_types::primitives::SimpleValue;
use serde::Deserialize;

use super::message::MessageParts;

/// A rule as written in `Config.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuleEntry {
    name: String,
    #[serde(default)]
    properties: RuleProps,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RuleProps {
    filter_type: Option<String>,
    correlation_filter: Option<CorrelationEntry>,
    sql_filter: Option<SqlEntry>,
    action: Option<SqlEntry>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct CorrelationEntry {
    content_type: Option<String>,
    correlation_id: Option<String>,
    label: Option<String>,
    message_id: Option<String>,
    reply_to: Option<String>,
    reply_to_session_id: Option<String>,
    session_id: Option<String>,
    to: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct SqlEntry {
    sql_expression: Option<String>,
}

/// A system property a filter can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysField {
    /// `ContentType`.
    ContentType,
    /// `CorrelationId`.
    CorrelationId,
    /// `Label` (AMQP subject).
    Label,
    /// `MessageId`.
    MessageId,
    /// `ReplyTo`.
    ReplyTo,
    /// `ReplyToSessionId`.
    ReplyToSessionId,
    /// `SessionId` (AMQP group-id).
    SessionId,
    /// `To`.
    To,
}

impl SysField {
    fn parse(name: &str) -> Option<SysField> {
        Some(match name.to_ascii_lowercase().as_str() {
            "contenttype" => SysField::ContentType,
            "correlationid" => SysField::CorrelationId,
            "label" | "subject" => SysField::Label,
            "messageid" => SysField::MessageId,
            "replyto" => SysField::ReplyTo,
            "replytosessionid" => SysField::ReplyToSessionId,
            "sessionid" => SysField::SessionId,
            "to" => SysField::To,
            _ => return None,
        })
    }

    fn read(self, m: &MessageParts) -> Option<String> {
        let p = m.properties.as_ref()?;
        let id = |id: &MessageId| match id {
            MessageId::String(s) => s.clone(),
            MessageId::Ulong(n) => n.to_string(),
            MessageId::Uuid(u) => uuid::Uuid::from_bytes(u.clone().into_inner()).to_string(),
            MessageId::Binary(b) => hex::encode(b.as_slice()),
        };
        match self {
            SysField::ContentType => p.content_type.as_ref().map(|s| s.as_str().to_string()),
            SysField::CorrelationId => p.correlation_id.as_ref().map(id),
            SysField::Label => p.subject.clone(),
            SysField::MessageId => p.message_id.as_ref().map(id),
            SysField::ReplyTo => p.reply_to.clone(),
            SysField::ReplyToSessionId => p.reply_to_group_id.clone(),
            SysField::SessionId => p.group_id.clone(),
            SysField::To => p.to.clone(),
        }
    }
}

/// A literal in a filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// Text.
    Text(String),
    /// A number (compared numerically with any numeric property).
    Number(f64),
    /// A boolean.
    Bool(bool),
}

/// What a comparison reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A system property.
    Sys(SysField),
    /// A user (application) property.
    User(String),
}

/// One `operand (=|<>) literal`.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    operand: Operand,
    literal: Literal,
    equal: bool,
}

/// A subscription filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// `1=1` / `TRUE` (the `$Default` rule) or `1=0` / `FALSE`.
    Constant(bool),
    /// All comparisons must hold (correlation filters and `AND`-joined SQL).
    All(Vec<Comparison>),
}

/// A named rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Rule name.
    pub name: String,
    /// Its filter.
    pub filter: Filter,
}

impl Rule {
    /// Builds a rule from its `Config.json` entry; the error says what is unsupported.
    pub fn from_entry(entry: &RuleEntry) -> Result<Rule, String> {
        let p = &entry.properties;
        if let Some(action) = p.action.as_ref().and_then(|a| a.sql_expression.as_deref())
            && !action.trim().is_empty()
        {
            tracing::warn!(rule = %entry.name, action, "Rule actions are not applied by this emulator.");
        }
        let kind = p
            .filter_type
            .as_deref()
            .unwrap_or("Sql")
            .to_ascii_lowercase();
        let filter = match kind.as_str() {
            "correlation" => correlation(p.correlation_filter.as_ref().ok_or_else(|| {
                format!(
                    "rule {}: FilterType Correlation needs a CorrelationFilter",
                    entry.name
                )
            })?)?,
            "sql" => {
                let expr = p
                    .sql_filter
                    .as_ref()
                    .and_then(|f| f.sql_expression.as_deref())
                    .unwrap_or("1=1");
                parse_sql(expr).map_err(|e| format!("rule {}: {e}", entry.name))?
            }
            other => return Err(format!("rule {}: unknown FilterType {other}", entry.name)),
        };
        Ok(Rule {
            name: entry.name.clone(),
            filter,
        })
    }

    /// Whether the message passes this rule.
    pub fn matches(&self, m: &MessageParts) -> bool {
        match &self.filter {
            Filter::Constant(b) => *b,
            Filter::All(list) => list.iter().all(|c| c.holds(m)),
        }
    }
}

impl Comparison {
    fn holds(&self, m: &MessageParts) -> bool {
        let equal = match &self.operand {
            Operand::Sys(f) => match (f.read(m), &self.literal) {
                (Some(v), Literal::Text(t)) => v == *t,
                _ => false,
            },
            Operand::User(name) => {
                let value = m.app_props.as_ref().and_then(|p| p.0.get(name.as_str()));
                value.is_some_and(|v| simple_equals(v, &self.literal))
            }
        };
        equal == self.equal
    }
}

fn simple_equals(v: &SimpleValue, lit: &Literal) -> bool {
    let number = match v {
        SimpleValue::Byte(n) => Some(f64::from(*n)),
        SimpleValue::Short(n) => Some(f64::from(*n)),
        SimpleValue::Int(n) => Some(f64::from(*n)),
        SimpleValue::Long(n) => Some(*n as f64),
        SimpleValue::Ubyte(n) => Some(f64::from(*n)),
        SimpleValue::Ushort(n) => Some(f64::from(*n)),
        SimpleValue::Uint(n) => Some(f64::from(*n)),
        SimpleValue::Ulong(n) => Some(*n as f64),
        SimpleValue::Float(f) => Some(f64::from(f.into_inner())),
        SimpleValue::Double(f) => Some(f.into_inner()),
        _ => None,
    };
    match lit {
        Literal::Text(t) => match v {
            SimpleValue::String(s) => s == t,
            SimpleValue::Symbol(s) => s.as_str() == t,
            _ => false,
        },
        Literal::Number(n) => number == Some(*n),
        Literal::Bool(b) => matches!(v, SimpleValue::Bool(x) if x == b),
    }
}

fn correlation(c: &CorrelationEntry) -> Result<Filter, String> {
    let mut list = Vec::new();
    let sys = [
        (SysField::ContentType, &c.content_type),
        (SysField::CorrelationId, &c.correlation_id),
        (SysField::Label, &c.label),
        (SysField::MessageId, &c.message_id),
        (SysField::ReplyTo, &c.reply_to),
        (SysField::ReplyToSessionId, &c.reply_to_session_id),
        (SysField::SessionId, &c.session_id),
        (SysField::To, &c.to),
    ];
    for (field, value) in sys {
        if let Some(v) = value {
            list.push(Comparison {
                operand: Operand::Sys(field),
                literal: Literal::Text(v.clone()),
                equal: true,
            });
        }
    }
    for (k, v) in &c.properties {
        let literal = match v {
            serde_json::Value::String(s) => Literal::Text(s.clone()),
            serde_json::Value::Number(n) => Literal::Number(n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::Bool(b) => Literal::Bool(*b),
            other => {
                return Err(format!(
                    "correlation property {k}={other} is not a simple value"
                ));
            }
        };
        list.push(Comparison {
            operand: Operand::User(k.clone()),
            literal,
            equal: true,
        });
    }
    Ok(Filter::All(list))
}

/// Parses the supported SQL subset.
pub fn parse_sql(expr: &str) -> Result<Filter, String> {
    let trimmed = expr.trim();
    match trimmed.to_ascii_lowercase().replace(' ', "").as_str() {
        "1=1" | "true" => return Ok(Filter::Constant(true)),
        "1=0" | "false" => return Ok(Filter::Constant(false)),
        _ => {}
    }
    let mut list = Vec::new();
    for term in split_and(trimmed)? {
        list.push(comparison(term.trim())?);
    }
    Ok(Filter::All(list))
}

/// Splits on `AND` outside quotes; refuses `OR`, `NOT` and parentheses.
fn split_and(expr: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'\'' {
            quoted = !quoted;
        } else if !quoted {
            if c == b'(' || c == b')' {
                return Err(format!("unsupported SQL filter {expr:?}: parentheses"));
            }
            let word = |w: &str| {
                expr.get(i..i + w.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(w))
                    && (i == 0 || bytes[i - 1] == b' ')
                    && bytes.get(i + w.len()) == Some(&b' ')
            };
            if word("or") || word("not") || word("like") || word("in") {
                return Err(format!(
                    "unsupported SQL filter {expr:?}: only =, <> and AND are supported"
                ));
            }
            if word("and") {
                parts.push(&expr[start..i]);
                i += 3;
                start = i;
                continue;
            }
        }
        i += 1;
    }
    if quoted {
        return Err(format!("unterminated string in SQL filter {expr:?}"));
    }
    parts.push(&expr[start..]);
    Ok(parts)
}

fn comparison(term: &str) -> Result<Comparison, String> {
    let (left, right, equal) = if let Some((l, r)) = term.split_once("<>") {
        (l, r, false)
    } else if let Some((l, r)) = term.split_once("!=") {
        (l, r, false)
    } else if let Some((l, r)) = term.split_once('=') {
        (l, r, true)
    } else {
        return Err(format!("unsupported SQL term {term:?}: expected = or <>"));
    };
    let name = left.trim();
    let operand = if let Some(sys) = name
        .strip_prefix("sys.")
        .or_else(|| name.strip_prefix("SYS."))
    {
        Operand::Sys(SysField::parse(sys).ok_or_else(|| format!("unknown system property {sys}"))?)
    } else {
        let user = name
            .strip_prefix("user.")
            .or_else(|| name.strip_prefix("USER."))
            .unwrap_or(name);
        let ok = !user.is_empty()
            && user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            return Err(format!("unsupported property name {name:?}"));
        }
        Operand::User(user.to_string())
    };
    let value = right.trim();
    let literal = if let Some(text) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        Literal::Text(text.replace("''", "'"))
    } else if value.eq_ignore_ascii_case("true") || value.eq_ignore_ascii_case("false") {
        Literal::Bool(value.eq_ignore_ascii_case("true"))
    } else {
        Literal::Number(
            value
                .parse::<f64>()
                .map_err(|_| format!("unsupported literal {value:?}"))?,
        )
    };
    Ok(Comparison {
        operand,
        literal,
        equal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::Properties;

    fn msg(subject: &str, color: &str, size: i32) -> MessageParts {
        let mut m = MessageParts {
            properties: Some(Properties {
                subject: Some(subject.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        m.set_app_prop("color", SimpleValue::String(color.into()));
        m.set_app_prop("size", SimpleValue::Int(size));
        m
    }

    fn rule(filter: Filter) -> Rule {
        Rule {
            name: "r".into(),
            filter,
        }
    }

    #[test]
    fn sql_subset() -> Result<(), String> {
        let r = rule(parse_sql(
            "color = 'blue' AND sys.Label = 'order' AND size <> 3",
        )?);
        assert!(r.matches(&msg("order", "blue", 5)));
        assert!(!r.matches(&msg("order", "red", 5)));
        assert!(!r.matches(&msg("order", "blue", 3)));
        assert!(rule(parse_sql("1=1")?).matches(&msg("x", "y", 1)));
        assert!(parse_sql("color = 'a' OR color = 'b'").is_err());
        assert!(parse_sql("color LIKE 'a%'").is_err());
        Ok(())
    }

    #[test]
    fn correlation_filter() -> Result<(), String> {
        let entry: CorrelationEntry =
            serde_json::from_str(r#"{"Label":"order","Properties":{"color":"blue","size":5}}"#)
                .map_err(|e| e.to_string())?;
        let r = rule(correlation(&entry)?);
        assert!(r.matches(&msg("order", "blue", 5)));
        assert!(!r.matches(&msg("order", "blue", 4)));
        Ok(())
    }
}
