//! The broker connection's TCP socket, opened here rather than by `fe2o3-amqp` so that
//! Nagle's algorithm is off.
//!
//! AMQP's small frames (a transfer, a disposition, a management request) are written one at a
//! time; with Nagle on, a frame written while an earlier one is unacknowledged waits for the
//! peer's delayed ACK, ~40 ms on Linux. The end-to-end benchmark (`bench/e2e/`) showed exactly
//! that: every job's reply-and-settle took ~40 ms more than its process. `fe2o3-amqp`'s
//! `open(url)` connects without `TCP_NODELAY`, so the daemon connects itself and hands the
//! stream to `open_with_stream`, which then does TLS for `amqps` as `open` would.

use tokio::net::TcpStream;

/// Where a broker URL (`amqp://host:port`, `amqps://host[:port]`) points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: &'static str,
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// Parses the URL the configuration built; only the two AMQP schemes are known.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("{url} has no scheme"))?;
        let (scheme, default_port): (&'static str, u16) = match scheme {
            "amqp" => ("amqp", 5672),
            "amqps" => ("amqps", 5671),
            other => return Err(format!("unknown scheme {other} in {url}")),
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let authority = authority.rsplit('@').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                let port = port
                    .parse()
                    .map_err(|_| format!("bad port {port:?} in {url}"))?;
                (host, port)
            }
            _ => (authority, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url} has no host"));
        }
        Ok(Endpoint {
            scheme,
            host: host.to_owned(),
            port,
        })
    }

    /// The TLS server name: the host when it is a name, none for an IP address.
    pub fn domain(&self) -> Option<&str> {
        self.host
            .parse::<std::net::IpAddr>()
            .is_err()
            .then_some(self.host.as_str())
    }

    /// Connects with `TCP_NODELAY` set.
    pub async fn connect(&self) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect((self.host.as_str(), self.port)).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_of_the_configuration_parse() {
        let e = Endpoint::parse("amqp://127.0.0.1:5672").expect("emulator");
        assert_eq!(
            (e.scheme, e.host.as_str(), e.port),
            ("amqp", "127.0.0.1", 5672)
        );
        assert_eq!(e.domain(), None);
        let e = Endpoint::parse("amqps://ns.servicebus.windows.net:5671").expect("azure");
        assert_eq!(e.port, 5671);
        assert_eq!(e.domain(), Some("ns.servicebus.windows.net"));
        let e = Endpoint::parse("amqps://ns.servicebus.windows.net").expect("default port");
        assert_eq!(e.port, 5671);
        assert!(Endpoint::parse("http://x").is_err());
    }
}
