//! The engine's [`Broker`] on Service Bus: receive with credit equal to the free slots,
//! settle and renew through the management node by lock token, send and schedule.

use super::*;

#[async_trait]
impl Broker for ServiceBusBroker {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BrokerError> {
        let live = self.live().await?;
        self.authorize(&live, &self.config.jobs_queue).await?;
        let mut slot = self.receiver.lock().await;
        let stale = slot
            .as_ref()
            .is_none_or(|r| r.generation != live.generation || r.delivered >= RECEIVER_RECYCLE);
        if stale {
            // Messages the old link still holds keep their locks; they are settled by lock
            // token through the management node.
            if let Some(old) = slot.take().filter(|old| old.generation == live.generation) {
                let _ = old.receiver.close().await;
            }
            let receiver = self.attach_receiver(&live).await?;
            *slot = Some(ReceiverLink {
                generation: live.generation,
                receiver,
                delivered: 0,
            });
        }
        let Some(link) = slot.as_mut() else {
            return Err(BrokerError::Connection("no receiver".into()));
        };
        let credit = u32::try_from(max).unwrap_or(u32::MAX);
        if let Err(e) = link.receiver.set_credit(credit).await {
            *slot = None;
            return Err(self.broken(&live, connection_error("granting credit", e)));
        }
        let mut out = Vec::new();
        let mut budget = wait;
        while out.len() < max {
            let next = tokio::time::timeout(budget, link.receiver.recv::<Body<Value>>()).await;
            match next {
                Err(_) => break,
                Ok(Ok(delivery)) => {
                    link.delivered += 1;
                    let tag = delivery.delivery_tag().to_vec();
                    match to_delivery(&tag, delivery.message(), DEFAULT_LOCK) {
                        Some(d) => out.push(d),
                        None => {
                            tracing::error!("A delivery without a lock token was released.");
                            let _ = link.receiver.release(&delivery).await;
                        }
                    }
                    budget = GATHER;
                }
                Ok(Err(e)) => {
                    *slot = None;
                    if out.is_empty() {
                        return Err(self.broken(&live, connection_error("receiving", e)));
                    }
                    live.broken.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn stop_receiving(&self) {
        let mut slot = self.receiver.lock().await;
        let Some(link) = slot.as_mut() else { return };
        if link.receiver.set_credit(0).await.is_err() {
            return;
        }
        // Whatever arrived on credit that was still open goes back to the queue unlocked.
        while let Ok(Ok(delivery)) = tokio::time::timeout(
            Duration::from_millis(50),
            link.receiver.recv::<Body<Value>>(),
        )
        .await
        {
            let _ = link.receiver.release(&delivery).await;
        }
    }

    async fn complete(&self, lock_token: Uuid) -> Result<(), BrokerError> {
        self.update_disposition(lock_token, "completed", None, &BTreeMap::new())
            .await
    }

    async fn abandon(&self, lock_token: Uuid) -> Result<(), BrokerError> {
        self.update_disposition(lock_token, "abandoned", None, &BTreeMap::new())
            .await
    }

    async fn dead_letter_keeping(
        &self,
        lock_token: Uuid,
        reason: &str,
        description: &str,
        keep: &BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        self.update_disposition(lock_token, "suspended", Some((reason, description)), keep)
            .await
    }

    async fn renew_lock(&self, lock_token: Uuid) -> Result<tokio::time::Instant, BrokerError> {
        let request = MgmtRequest::new("com.microsoft:renew-lock")
            .with("lock-tokens", lock_tokens(lock_token));
        let response = self.management_retried(request).await?;
        status_result(&response)?;
        let until = match response.field("expirations") {
            Some(Value::Array(a)) => a.iter().next().cloned(),
            Some(Value::List(l)) => l.first().cloned(),
            _ => None,
        };
        let Some(Value::Timestamp(until)) = until else {
            return Err(BrokerError::Refused(
                "renew-lock answered without an expiration".into(),
            ));
        };
        let until =
            UNIX_EPOCH + Duration::from_millis(u64::try_from(until.milliseconds()).unwrap_or(0));
        let left = until.duration_since(SystemTime::now()).unwrap_or_default();
        Ok(tokio::time::Instant::now() + left)
    }

    async fn send(&self, queue: &str, message: OutgoingMessage) -> Result<(), BrokerError> {
        self.send_retried(queue, &to_amqp(&message, None)).await
    }

    async fn accept_session(
        &self,
        wait: Duration,
    ) -> Result<Option<Box<dyn crate::broker::session::SessionReceiver>>, BrokerError> {
        let session = self.accept_next_session(wait).await?;
        Ok(session.map(|s| Box::new(s) as Box<dyn crate::broker::session::SessionReceiver>))
    }

    async fn schedule(
        &self,
        queue: &str,
        message: OutgoingMessage,
        delay: Duration,
    ) -> Result<(), BrokerError> {
        self.send_retried(queue, &to_amqp(&message, Some(SystemTime::now() + delay)))
            .await
    }
}
