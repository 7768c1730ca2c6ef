//! Tokens for jobs: a job asks the daemon for an Entra ID access token for one of its worker's
//! `azure_scopes`; the daemon gets it with its own identity (the credential of
//! `servicebus.credential`, built by [`crate::servicebus::credential::entra_credential`]),
//! caches it until shortly before it expires, logs the issuance (job id, worker, scope, never
//! the token) and counts it in `/metrics`. The job never holds the daemon's credential.
//!
//! The request path: the job writes `{"t":"token","id":N,"scopes":[...]}` on its channel (read
//! by [`crate::runner::output::read_channel`], whose line limit bounds it), and the daemon
//! answers one JSON line on the job's input pipe, which stays open for jobs of workers that
//! declare scopes. Asks are queued at most [`ASKS_IN_FLIGHT`] deep (more are dropped and
//! logged), at most [`MAX_ASKS_PER_JOB`] are answered; each answer is written within [`REPLY_WRITE_TIMEOUT`] or the pipe is closed, and
//! each token is fetched within [`FETCH_TIMEOUT`]: a job that floods, or never reads its
//! answers, only stalls itself.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::telemetry::metrics::metrics;

/// How many asks of one job may wait for an answer.
pub const ASKS_IN_FLIGHT: usize = 4;
/// Most asks one job is answered (each is logged): past it the daemon stops answering, so a
/// job cannot flood the daemon's log.
pub const MAX_ASKS_PER_JOB: usize = 256;
/// Most scopes one ask may name.
pub const MAX_SCOPES_PER_ASK: usize = 8;
/// How long writing one answer to the job may take.
pub const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long getting one token from Entra ID may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// A cached token is renewed when less than this is left of it.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// A job's request for a token, as read from its channel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TokenAsk {
    pub id: u64,
    pub scopes: Vec<String>,
}

/// A token handed to a job. Never printed.
#[derive(Clone)]
pub struct Issued {
    pub token: String,
    /// Unix seconds.
    pub expires_on: i64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Issued(<redacted>, expires_on {})", self.expires_on)
    }
}

/// Why no token was handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The worker does not declare the scope (`PolicyDenied` in the handler).
    #[error("{0}")]
    Denied(String),
    /// The daemon's identity could not get the token.
    #[error("{0}")]
    Failed(String),
}

/// The daemon's token source for jobs, shared by every job.
pub struct TokenBroker {
    credential: Arc<dyn TokenCredential>,
    cache: Mutex<HashMap<String, Issued>>,
}

impl std::fmt::Debug for TokenBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenBroker({:?})", self.credential)
    }
}

fn now_unix() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    i64::try_from(now.map(|d| d.as_secs()).unwrap_or_default()).unwrap_or(i64::MAX)
}

impl TokenBroker {
    pub fn new(credential: Arc<dyn TokenCredential>) -> Self {
        Self {
            credential,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// A token for `scopes`, from the cache while more than [`REFRESH_BEFORE`] is left of it;
    /// the flag says whether it came from the cache.
    pub async fn token(&self, scopes: &[String]) -> Result<(Issued, bool), TokenError> {
        let key = scopes.join(" ");
        let fresh_until = now_unix() + REFRESH_BEFORE.as_secs() as i64;
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .filter(|t| t.expires_on > fresh_until)
        {
            return Ok((hit.clone(), true));
        }
        let refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let got = tokio::time::timeout(FETCH_TIMEOUT, self.credential.get_token(&refs, None))
            .await
            .map_err(|_| {
                TokenError::Failed(format!(
                    "the daemon's identity got no token for {key} within {}s",
                    FETCH_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| {
                TokenError::Failed(format!(
                    "the daemon's identity could not get a token for {key}: {e}"
                ))
            })?;
        let issued = Issued {
            token: got.token.secret().to_owned(),
            expires_on: got.expires_on.unix_timestamp(),
        };
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, issued.clone());
        Ok((issued, false))
    }
}

/// Who asks, and what they may ask for.
#[derive(Debug, Clone)]
pub struct JobTokens {
    pub broker: Option<Arc<TokenBroker>>,
    pub job_id: String,
    pub worker: String,
    /// The worker's `azure_scopes`.
    pub allowed: Vec<String>,
    /// The job's scrubber: each token handed to it is added.
    pub scrubber: Option<crate::secrets::scrub::SharedScrubber>,
}

/// Longest text of a job's request the daemon writes into its log.
const SHOWN_CHARS: usize = 300;

impl JobTokens {
    /// `text` from the job (a scope it asked for), as the daemon may log it: cut to
    /// [`SHOWN_CHARS`] and scrubbed of the job's secrets and tokens, so that a job cannot get a
    /// secret into the daemon's log by asking for it as a scope.
    fn shown(&self, text: &str) -> String {
        let cut: String = text.chars().take(SHOWN_CHARS).collect();
        let was_cut = cut.len() < text.len();
        match &self.scrubber {
            Some(scrubber) => {
                let scrubber = scrubber.lock().unwrap_or_else(|e| e.into_inner());
                if was_cut {
                    scrubber.cut_text(&cut)
                } else {
                    scrubber.text(&cut).into_owned()
                }
            }
            None => cut,
        }
    }

    /// Answers one ask: the policy check, then the broker; logs and counts either way.
    pub async fn answer(&self, ask: &TokenAsk) -> Result<Issued, TokenError> {
        let scope = self.shown(&ask.scopes.join(" "));
        let denied = if ask.scopes.is_empty() || ask.scopes.len() > MAX_SCOPES_PER_ASK {
            Some(format!(
                "a token request must name 1 to {MAX_SCOPES_PER_ASK} scopes"
            ))
        } else {
            ask.scopes
                .iter()
                .find(|s| !self.allowed.contains(s))
                .map(|s| {
                    format!(
                        "scope {:?} is not declared in worker {:?}'s azure_scopes (declared: {:?})",
                        self.shown(s),
                        self.worker,
                        self.allowed
                    )
                })
        };
        if let Some(why) = denied {
            metrics().token_denied(&self.worker);
            tracing::warn!(job_id = %self.job_id, worker = %self.worker, scope = %scope, "Refused a job a token: {why}");
            return Err(TokenError::Denied(why));
        }
        let Some(broker) = &self.broker else {
            return Err(TokenError::Failed(
                "this daemon hands out no tokens (it was started without an Entra ID credential)"
                    .into(),
            ));
        };
        match broker.token(&ask.scopes).await {
            Ok((issued, cached)) => {
                if let Some(scrubber) = &self.scrubber {
                    scrubber
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .add("token", &issued.token);
                }
                metrics().token_issued(&self.worker);
                tracing::info!(job_id = %self.job_id, worker = %self.worker, scope = %scope, cached, expires_on = issued.expires_on, "Issued an Entra ID token to a job.");
                Ok(issued)
            }
            Err(e) => {
                tracing::warn!(job_id = %self.job_id, worker = %self.worker, scope = %scope, error = %e, "Could not get a token for a job.");
                Err(e)
            }
        }
    }
}

/// The token service's end of a job's asks, with whom it answers for.
pub type TokenService = (mpsc::Receiver<TokenAsk>, JobTokens);

/// Writes the job document (one line) on the job's input pipe, then, when `asks` is given,
/// answers each ask on it until the channel's reader drops its sender (the job ended) or the
/// job stops reading. Without `asks` the pipe is closed after the document.
pub async fn serve(pipe: OwnedFd, mut document: Vec<u8>, asks: Option<TokenService>) {
    let Ok(mut tx) = tokio::net::unix::pipe::Sender::from_owned_fd(pipe) else {
        return;
    };
    document.push(b'\n');
    // A job that exits without reading its input is judged by its exit, not here.
    if tx.write_all(&document).await.is_err() {
        return;
    }
    drop(document);
    let Some((mut asks, tokens)) = asks else {
        return;
    };
    let mut answered = 0;
    while let Some(ask) = asks.recv().await {
        answered += 1;
        if answered > MAX_ASKS_PER_JOB {
            tracing::warn!(job_id = %tokens.job_id, worker = %tokens.worker, "A job asked for more than {MAX_ASKS_PER_JOB} tokens; no more are answered.");
            return;
        }
        let reply = match tokens.answer(&ask).await {
            Ok(t) => json!({"id": ask.id, "token": t.token, "expires_on": t.expires_on}),
            Err(TokenError::Denied(why)) => json!({"id": ask.id, "denied": why}),
            Err(TokenError::Failed(why)) => json!({"id": ask.id, "error": why}),
        };
        let mut line = serde_json::to_vec(&reply).unwrap_or_default();
        line.push(b'\n');
        match tokio::time::timeout(REPLY_WRITE_TIMEOUT, tx.write_all(&line)).await {
            Ok(Ok(())) => {}
            _ => {
                tracing::warn!(job_id = %tokens.job_id, worker = %tokens.worker, "A job did not read its token answers; no more are sent.");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::credentials::{AccessToken, TokenRequestOptions};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A local token issuer: counts its calls, tokens valid an hour.
    #[derive(Debug, Default)]
    struct Issuer(AtomicUsize);

    #[async_trait::async_trait]
    impl TokenCredential for Issuer {
        async fn get_token(
            &self,
            scopes: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            let expires = azure_core::time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
            Ok(AccessToken::new(
                format!("tok-{n}-{}", scopes.join(",")),
                expires,
            ))
        }
    }

    fn job(broker: Arc<TokenBroker>) -> JobTokens {
        JobTokens {
            broker: Some(broker),
            job_id: "j1".into(),
            worker: "w".into(),
            allowed: vec!["https://storage.azure.com/.default".into()],
            scrubber: None,
        }
    }

    #[tokio::test]
    async fn one_job_is_answered_a_bounded_number_of_times_then_its_pipe_closes() {
        use tokio::io::AsyncReadExt;
        let (read, write) = nix::unistd::pipe().expect("pipe");
        let (tx, rx) = mpsc::channel(ASKS_IN_FLIGHT);
        let tokens = job(Arc::new(TokenBroker::new(Arc::new(Issuer::default()))));
        let service = tokio::spawn(serve(write, b"{}".to_vec(), Some((rx, tokens))));
        let asker = tokio::spawn(async move {
            for id in 0..(MAX_ASKS_PER_JOB as u64 + 50) {
                let scopes = vec!["https://storage.azure.com/.default".to_owned()];
                if tx.send(TokenAsk { id, scopes }).await.is_err() {
                    break;
                }
            }
        });
        let mut answers = String::new();
        let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(read).expect("receiver");
        rx.read_to_string(&mut answers).await.expect("read");
        service.await.expect("service");
        asker.await.expect("asker");
        let lines: Vec<&str> = answers.lines().collect();
        assert_eq!(lines[0], "{}", "the job document comes first");
        assert_eq!(lines.len() - 1, MAX_ASKS_PER_JOB);
        assert!(lines[1].contains("\"token\""), "{}", lines[1]);
    }

    #[tokio::test]
    async fn declared_scopes_are_issued_once_and_cached_others_denied() {
        let issuer = Arc::new(Issuer::default());
        let broker = Arc::new(TokenBroker::new(issuer.clone()));
        let tokens = job(broker);
        let ask = TokenAsk {
            id: 1,
            scopes: vec!["https://storage.azure.com/.default".into()],
        };
        let first = tokens.answer(&ask).await.expect("issued");
        let second = tokens.answer(&ask).await.expect("issued");
        assert_eq!(first.token, "tok-0-https://storage.azure.com/.default");
        assert_eq!(second.token, first.token);
        assert_eq!(
            issuer.0.load(Ordering::SeqCst),
            1,
            "the second came from the cache"
        );
        let other = TokenAsk {
            id: 2,
            scopes: vec!["https://vault.azure.net/.default".into()],
        };
        assert!(matches!(
            tokens.answer(&other).await,
            Err(TokenError::Denied(_))
        ));
        let none = TokenAsk {
            id: 3,
            scopes: vec![],
        };
        assert!(matches!(
            tokens.answer(&none).await,
            Err(TokenError::Denied(_))
        ));
        assert_eq!(issuer.0.load(Ordering::SeqCst), 1);
        let text = metrics().encode();
        assert!(
            text.contains("hybrid_token_issued_total{worker=\"w\"}"),
            "{text}"
        );
        assert!(
            text.contains("hybrid_token_denied_total{worker=\"w\"}"),
            "{text}"
        );
    }
}
