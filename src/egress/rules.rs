//! A worker's egress allow-list (`network = ["host:port", …]` in `worker.toml`): its entries,
//! checked when the worker is loaded, and the match the egress proxy makes for each request
//! (`docs/egress.md`).
//!
//! Names are matched as the job wrote them, before any DNS lookup (the proxy resolves them
//! itself afterwards); an IP literal matches only an entry naming that same address, never a
//! name or a wildcard.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The host part of an allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// One DNS name, lower case, without a trailing dot.
    Name(String),
    /// `*.suffix`: any name ending in `.suffix` (one label or more before it), not `suffix`
    /// itself.
    Wildcard(String),
    /// One IP address, written literally.
    Ip(IpAddr),
}

/// One allow-list entry: a host pattern and one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    pub host: HostPattern,
    pub port: u16,
}

/// The host a job asked for, as it named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    Name(String),
    Ip(IpAddr),
}

/// Where a job asked the proxy to connect: `host:port` of a `CONNECT`, or of an absolute URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: TargetHost,
    pub port: u16,
}

impl fmt::Display for TargetHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetHost::Name(n) => f.write_str(n),
            TargetHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            TargetHost::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPattern::Name(n) => write!(f, "{n}:{}", self.port),
            HostPattern::Wildcard(s) => write!(f, "*.{s}:{}", self.port),
            HostPattern::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            HostPattern::Ip(ip) => write!(f, "{ip}:{}", self.port),
        }
    }
}

/// Splits `host:port` (the host may be `[v6]`) and checks the port.
fn split_port(text: &str) -> Result<(&str, u16), String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address needs its closing ']'")?;
        let port = after
            .strip_prefix(':')
            .ok_or("needs a port after the address ([v6]:port)")?;
        (inside, port)
    } else {
        text.rsplit_once(':')
            .ok_or("needs a port (host:port, e.g. \"example.com:443\")")?
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0 && port.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("port {port:?} must be a number from 1 to 65535"))?;
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    Ok((host, port))
}

/// An IP address as written, IPv4-mapped IPv6 addresses as their IPv4 form.
fn parse_ip(host: &str) -> Option<IpAddr> {
    let ip = host.parse::<IpAddr>().ok()?;
    Some(match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    })
}

/// A DNS name, lower-cased and without its trailing dot: labels of letters, digits, `-` and `_`
/// (1 to 63 characters, no `-` at either end), 253 characters at most.
fn parse_name(host: &str) -> Result<String, String> {
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{host:?} is not a host name"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(format!(
                "{host:?} is not a host name (label {label:?}: letters, digits, '-', '_')"
            ));
        }
    }
    Ok(name)
}

impl FromStr for EgressRule {
    type Err = String;

    /// Parses one entry, with a reason naming what is wrong.
    fn from_str(entry: &str) -> Result<Self, String> {
        let bad = |why: String| format!("network entry {entry:?}: {why}");
        if entry.contains("://") {
            return Err(bad(
                "no scheme: write host:port (\"example.com:443\")".into()
            ));
        }
        if entry.contains('/') {
            return Err(bad("no path: write host:port".into()));
        }
        if entry.contains('@') || entry.chars().any(char::is_whitespace) {
            return Err(bad("only host:port, no user and no spaces".into()));
        }
        let (host, port) = split_port(entry).map_err(bad)?;
        if let Some(ip) = parse_ip(host) {
            return Ok(EgressRule {
                host: HostPattern::Ip(ip),
                port,
            });
        }
        if entry.starts_with('[') {
            return Err(bad(format!("{host:?} is not an IPv6 address")));
        }
        let host = match host.strip_prefix("*.") {
            Some(suffix) if !suffix.contains('*') => {
                let suffix = parse_name(suffix).map_err(bad)?;
                if !suffix.contains('.') {
                    return Err(bad(
                        "a wildcard must keep two labels or more (\"*.example.com\", not \"*.com\")"
                            .into(),
                    ));
                }
                HostPattern::Wildcard(suffix)
            }
            _ if host.contains('*') => {
                return Err(bad(
                    "a wildcard may only be the whole first label (\"*.example.com\"); for every host use network = \"allow\""
                        .into(),
                ));
            }
            _ => HostPattern::Name(parse_name(host).map_err(bad)?),
        };
        Ok(EgressRule { host, port })
    }
}

impl Target {
    /// Parses the `host:port` a job asked for (a `CONNECT` target, an absolute URL's
    /// authority). No wildcard; the port is required.
    pub fn parse(authority: &str) -> Result<Target, String> {
        let (host, port) = split_port(authority)?;
        if let Some(ip) = parse_ip(host) {
            return Ok(Target {
                host: TargetHost::Ip(ip),
                port,
            });
        }
        if authority.starts_with('[') {
            return Err(format!("{host:?} is not an IPv6 address"));
        }
        Ok(Target {
            host: TargetHost::Name(parse_name(host)?),
            port,
        })
    }
}

impl EgressRule {
    /// Whether this entry lets a job reach `target`.
    pub fn allows(&self, target: &Target) -> bool {
        if self.port != target.port {
            return false;
        }
        match (&self.host, &target.host) {
            (HostPattern::Name(n), TargetHost::Name(t)) => n == t,
            (HostPattern::Wildcard(suffix), TargetHost::Name(t)) => t
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            (HostPattern::Ip(a), TargetHost::Ip(b)) => a == b,
            _ => false,
        }
    }
}

/// Whether any entry of `rules` lets a job reach `target`.
pub fn allowed(rules: &[EgressRule], target: &Target) -> bool {
    rules.iter().any(|r| r.allows(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> EgressRule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn target(s: &str) -> Target {
        Target::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn entries_are_checked_with_the_reason() {
        let cases = [
            ("https://example.com:443", "no scheme"),
            ("example.com:443/x", "no path"),
            ("user@example.com:443", "no user"),
            ("example.com", "needs a port"),
            ("example.com:0", "1 to 65535"),
            ("example.com:65536", "1 to 65535"),
            ("example.com:+443", "1 to 65535"),
            ("a.*.example.com:443", "whole first label"),
            ("*:443", "whole first label"),
            ("*.com:443", "two labels"),
            ("exa mple.com:443", "no spaces"),
            ("-bad.example.com:443", "not a host name"),
            ("[::1:443", "closing"),
            ("[nope]:443", "not an IPv6 address"),
            (":443", "empty"),
        ];
        for (entry, why) in cases {
            let err = entry.parse::<EgressRule>().expect_err(entry);
            assert!(err.contains(why), "{entry}: {err}");
            assert!(err.contains(entry), "{entry}: {err}");
        }
    }

    #[test]
    fn entries_print_as_written_in_canonical_form() {
        for (entry, shown) in [
            ("Example.COM.:443", "example.com:443"),
            ("*.blob.core.windows.net:443", "*.blob.core.windows.net:443"),
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("[::1]:80", "[::1]:80"),
            ("[::ffff:10.0.0.1]:80", "10.0.0.1:80"),
        ] {
            assert_eq!(rule(entry).to_string(), shown);
        }
    }

    #[test]
    fn names_and_wildcards_match_names_only_and_ports_exactly() {
        let rules = [
            rule("*.blob.core.windows.net:443"),
            rule("api.example.com:443"),
            rule("127.0.0.1:8080"),
        ];
        let yes = [
            "acct.blob.core.windows.net:443",
            "a.b.blob.core.windows.net:443",
            "ACCT.Blob.Core.Windows.Net.:443",
            "api.example.com:443",
            "127.0.0.1:8080",
            "[::ffff:127.0.0.1]:8080",
        ];
        let no = [
            "blob.core.windows.net:443",
            "evilblob.core.windows.net:443",
            "acct.blob.core.windows.net:80",
            "acct.blob.core.windows.net.evil.com:443",
            "example.com:443",
            "x.api.example.com:443",
            "127.0.0.1:8081",
            "127.0.0.2:8080",
            "[::1]:8080",
            "localhost:8080",
        ];
        for t in yes {
            assert!(allowed(&rules, &target(t)), "{t} should be allowed");
        }
        for t in no {
            assert!(!allowed(&rules, &target(t)), "{t} should be denied");
        }
        // An IP that a listed name resolves to is not listed by that name.
        let by_name = [rule("localhost:8080")];
        assert!(!allowed(&by_name, &target("127.0.0.1:8080")));
        assert!(allowed(&[rule("[::1]:80")], &target("[0:0::1]:80")));
    }

    #[test]
    fn targets_refuse_what_is_not_host_port() {
        for bad in [
            "",
            "host",
            "host:",
            "host:x",
            "*.a.com:443",
            "[::1]",
            "a b:1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }
}
