//! The head of a request a job sends the egress proxy, parsed by hand (a few dozen lines; an
//! HTTP library would bring a server's worth of code for two request forms): `CONNECT
//! host:port HTTP/1.1` for TLS, and absolute-form plain HTTP (`GET http://host:port/path
//! HTTP/1.1`). Anything else is refused. The input comes from a hostile job: every length is
//! bounded by the caller's buffer, and nothing here can panic.

use super::rules::Target;

/// Longest request head the proxy reads (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines in one head.
const MAX_HEADERS: usize = 100;

/// Why a head was refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("only CONNECT and absolute-form http:// requests go through this proxy: {0}")]
    NotProxyRequest(String),
}

/// What a job asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A tunnel (TLS, normally) to `target`.
    Connect { target: Target },
    /// A plain HTTP request for `target`; `head` is what goes upstream: the request line in
    /// origin form, the job's headers without the proxy's own (`Proxy-Authorization`,
    /// `Proxy-Connection`, `Connection`, `Keep-Alive`) and with `Connection: close`, so that
    /// one connection carries requests for this one target only.
    Plain { target: Target, head: Vec<u8> },
}

/// A parsed head: the request and the password of its `Proxy-Authorization: Basic`, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub request: Request,
    pub password: Option<String>,
}

/// Where the head ends in `buf` (the index after its blank line), if it is complete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a complete head (as delimited by [`head_end`]).
pub fn parse(head: &[u8]) -> Result<Head, HeadError> {
    let malformed = |why: &str| HeadError::Malformed(why.to_owned());
    let text = std::str::from_utf8(head).map_err(|_| malformed("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("the request line is not METHOD TARGET VERSION"));
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(malformed("only HTTP/1.0 and HTTP/1.1"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(malformed("the method is not an upper-case token"));
    }
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        if headers.len() == MAX_HEADERS {
            return Err(malformed("too many header lines"));
        }
        if line.starts_with([' ', '\t']) {
            return Err(malformed("folded header lines are not accepted"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| malformed("a header line without ':'"))?;
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_!#$%&'*+.^`|~".contains(&b));
        if !name_ok || value.contains(['\r', '\n']) {
            return Err(malformed("a header name is not a token"));
        }
        headers.push((name, value.trim()));
    }
    let password = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("proxy-authorization"))
        .and_then(|(_, v)| basic_password(v));
    let request = if method == "CONNECT" {
        let target = Target::parse(target).map_err(HeadError::Malformed)?;
        Request::Connect { target }
    } else {
        plain(method, target, version, &headers)?
    };
    Ok(Head { request, password })
}

/// The password of a `Basic` credential (`user:password` in base64); the user is ignored.
fn basic_password(value: &str) -> Option<String> {
    use base64::Engine;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, password)| password.to_owned())
}

/// An absolute-form request: its target, and the head to send upstream.
fn plain(
    method: &str,
    target: &str,
    version: &str,
    headers: &[(&str, &str)],
) -> Result<Request, HeadError> {
    let rest = target
        .strip_prefix("http://")
        .ok_or_else(|| HeadError::NotProxyRequest(format!("{method} {target}")))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(HeadError::Malformed("a user in the URL".into()));
    }
    // A URL without a port means port 80.
    let authority = if authority.starts_with('[') && !authority.contains("]:")
        || !authority.starts_with('[') && !authority.contains(':')
    {
        format!("{authority}:80")
    } else {
        authority.to_owned()
    };
    let target = Target::parse(&authority).map_err(HeadError::Malformed)?;
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    let mut head = format!("{method} {path} {version}\r\n");
    const HOP: [&str; 4] = [
        "proxy-authorization",
        "proxy-connection",
        "connection",
        "keep-alive",
    ];
    for (name, value) in headers {
        if !HOP.iter().any(|h| name.eq_ignore_ascii_case(h)) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    Ok(Request::Plain {
        target,
        head: head.into_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::rules::TargetHost;

    fn auth(password: &str) -> String {
        use base64::Engine;
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("job:{password}"));
        format!("Proxy-Authorization: Basic {creds}\r\n")
    }

    #[test]
    fn connect_gives_the_target_and_the_password() {
        let text = format!(
            "CONNECT acct.blob.core.windows.net:443 HTTP/1.1\r\nHost: x\r\n{}\r\n",
            auth("tok3n")
        );
        let head = parse(text.as_bytes()).expect("parses");
        assert_eq!(head.password.as_deref(), Some("tok3n"));
        let Request::Connect { target } = head.request else {
            panic!("not a CONNECT");
        };
        assert_eq!(target.to_string(), "acct.blob.core.windows.net:443");
    }

    #[test]
    fn plain_http_is_rewritten_to_origin_form_without_proxy_headers() {
        let text = format!(
            "GET http://127.0.0.1:8080/a/b?q=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n{}Proxy-Connection: keep-alive\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n",
            auth("p")
        );
        let head = parse(text.as_bytes()).expect("parses");
        let Request::Plain { target, head } = head.request else {
            panic!("not plain");
        };
        assert_eq!(target.port, 8080);
        assert!(matches!(target.host, TargetHost::Ip(_)));
        assert_eq!(
            String::from_utf8(head).expect("utf-8"),
            "GET /a/b?q=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let head = parse(b"GET http://example.com HTTP/1.0\r\n\r\n").expect("parses");
        let Request::Plain { target, head } = head.request else {
            panic!("not plain");
        };
        assert_eq!(target.to_string(), "example.com:80");
        assert!(head.starts_with(b"GET / HTTP/1.0\r\n"));
        let head = parse(b"GET http://[::1]?x HTTP/1.1\r\n\r\n").expect("parses");
        let Request::Plain { target, head } = head.request else {
            panic!("not plain");
        };
        assert_eq!(target.to_string(), "[::1]:80");
        assert!(head.starts_with(b"GET /?x HTTP/1.1\r\n"));
    }

    #[test]
    fn bad_heads_are_refused_not_panicked_on() {
        let cases: [&[u8]; 14] = [
            b"\r\n\r\n",
            b"CONNECT\r\n\r\n",
            b"CONNECT a:1 HTTP/2\r\n\r\n",
            b"CONNECT a:1  HTTP/1.1\r\n\r\n",
            b"connect a:1 HTTP/1.1\r\n\r\n",
            b"CONNECT a HTTP/1.1\r\n\r\n",
            b"CONNECT a:99999 HTTP/1.1\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\nNoColon\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /local HTTP/1.1\r\n\r\n",
            b"GET https://a:443/ HTTP/1.1\r\n\r\n",
            b"GET http://u@a:1/ HTTP/1.1\r\n\r\n",
            b"\xff\xfe HTTP/1.1\r\n\r\n",
        ];
        for case in cases {
            assert!(parse(case).is_err(), "{:?}", String::from_utf8_lossy(case));
        }
        let many = format!("CONNECT a:1 HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(101));
        assert!(parse(many.as_bytes()).is_err());
        // A wrong scheme or garbage in the credential is no password, not an error.
        let head = parse(b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Bearer x\r\n\r\n")
            .expect("parses");
        assert_eq!(head.password, None);
        let head = parse(b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic !!\r\n\r\n")
            .expect("parses");
        assert_eq!(head.password, None);
    }

    #[test]
    fn the_end_of_a_head_is_found() {
        assert_eq!(head_end(b"CONNECT a:1 HTTP/1.1\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"CONNECT a:1 HTTP/1.1\r\n"), None);
    }
}
