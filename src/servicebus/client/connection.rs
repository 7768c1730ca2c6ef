//! Opening the connection (TCP without Nagle, SASL, the idle timeout, the session, the CBS
//! client and the jobs queue's management link) and authorising an entity on it with a token
//! put on `$cbs`, renewed once a fifth of its lifetime is left.

use super::*;

impl ServiceBusBroker {
    pub(super) async fn open(&self) -> Result<Live, BrokerError> {
        // Our own socket, with Nagle off (see `tcp`): otherwise ~40 ms per settlement.
        let endpoint = crate::servicebus::tcp::Endpoint::parse(&self.config.url)
            .map_err(|e| BrokerError::Connection(e.to_string()))?;
        let stream = endpoint
            .connect()
            .await
            .map_err(|e| connection_error(&format!("connecting to {}", self.config.url), e))?;
        let mut connection = Connection::builder()
            .container_id(format!("hybrid-worker-{}", Uuid::new_v4()))
            .hostname(self.config.hostname.as_str())
            .sasl_hostname(endpoint.host.as_str())
            .scheme(endpoint.scheme)
            .domain(endpoint.domain())
            .sasl_profile(SaslProfile::Anonymous)
            .idle_time_out(IDLE_TIMEOUT_MS)
            .alt_tls_establishment(true)
            .open_with_stream(stream)
            .await
            .map_err(|e| connection_error(&format!("connecting to {}", self.config.url), e))?;
        let mut session = Session::begin(&mut connection)
            .await
            .map_err(|e| connection_error("beginning a session", e))?;
        let cbs = CbsClient::builder()
            .client_node_addr(format!("cbs-{}", Uuid::new_v4()))
            .attach(&mut session)
            .await
            .map_err(|e| connection_error("attaching to $cbs", e))?;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::metrics::metrics().broker_connects.inc();
        tracing::info!(url = %self.config.url, generation, "Connected to Service Bus.");
        Ok(Live {
            generation,
            connection: Mutex::new(connection),
            session: Mutex::new(session),
            cbs: Mutex::new(cbs),
            tokens: Mutex::new(HashMap::new()),
            broken: AtomicBool::new(false),
        })
    }

    /// Puts a token for `entity` on `$cbs` unless a fresh one is there. A token is renewed
    /// once less than a fifth of its lifetime is left, so a link never outlives its token.
    pub(super) async fn authorize(&self, live: &Live, entity: &str) -> Result<(), BrokerError> {
        let audience = format!("{}/{}", self.config.audience_base, entity);
        let now = SystemTime::now();
        if let Some((put, expires)) = live.tokens.lock().await.get(&audience).copied() {
            let lifetime = expires.duration_since(put).unwrap_or_default();
            if expires.duration_since(now).unwrap_or_default() > lifetime / 5 {
                return Ok(());
            }
        }
        let token = self
            .config
            .credential
            .token(&audience)
            .await
            .map_err(|CredentialError(e)| BrokerError::Refused(e))?;
        let expires_ms = token
            .expires_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let amqp_token = AmqpCbsToken::new(
            token.value.as_str(),
            token.token_type,
            Some(Timestamp::from_milliseconds(
                i64::try_from(expires_ms).unwrap_or(i64::MAX),
            )),
        );
        let put = tokio::time::timeout(CONNECT_TIMEOUT, async {
            live.cbs
                .lock()
                .await
                .put_token(audience.as_str(), amqp_token)
                .await
        })
        .await;
        match put {
            Err(_) => Err(self.broken(
                live,
                BrokerError::Connection("putting a token on $cbs timed out".into()),
            )),
            // Service Bus answers a token for an entity that does not exist with 404.
            Ok(Err(fe2o3_amqp_management::error::Error::Status(status)))
                if status.code.0.get() == 404 =>
            {
                Err(BrokerError::NotFound(entity.to_owned()))
            }
            Ok(Err(fe2o3_amqp_management::error::Error::Status(status))) => {
                Err(BrokerError::Refused(format!(
                    "the token for {audience} was refused ({}: {})",
                    status.code.0,
                    status.description.unwrap_or_default()
                )))
            }
            Ok(Err(e)) => Err(self.broken(live, connection_error("putting a token on $cbs", e))),
            Ok(Ok(())) => {
                self.stats.token_puts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(audience, "Put a token on $cbs.");
                live.tokens
                    .lock()
                    .await
                    .insert(audience, (now, token.expires_at));
                Ok(())
            }
        }
    }
}
