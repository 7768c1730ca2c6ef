//! The engine's [`Broker`] on Service Bus: receive with credit equal to the free slots, settle
//! on the receive link (by lock token through the management node once that link is gone),
//! renew through the management node, send and schedule.

use super::settle::LinkOutcome;
use super::*;
use fe2o3_amqp::link::delivery::DeliveryInfo;

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
            if let Some(old) = slot.take() {
                self.deliveries.gone(old.serial);
                if old.generation == live.generation {
                    let _ = old.receiver.close().await;
                }
            }
            let receiver = self.attach_receiver(&live).await?;
            let serial = self.receiver_serial.fetch_add(1, Ordering::Relaxed) + 1;
            self.deliveries.opened(serial, receiver.disposer());
            *slot = Some(ReceiverLink {
                generation: live.generation,
                serial,
                receiver,
                delivered: 0,
            });
        }
        let Some(link) = slot.as_mut() else {
            return Err(BrokerError::Connection("no receiver".into()));
        };
        let credit = u32::try_from(max).unwrap_or(u32::MAX);
        if let Err(e) = link.receiver.set_credit(credit).await {
            self.deliveries.gone(link.serial);
            *slot = None;
            return Err(self.broken(&live, connection_error("granting credit", e)));
        }
        let mut out = Vec::new();
        let mut budget = wait;
        // A settlement that needs the receiver (see `settle`) asks for it: return what there is.
        let wanted = self.receiver_wanted.notified();
        tokio::pin!(wanted);
        wanted.as_mut().enable();
        while out.len() < max {
            let next = tokio::select! {
                next = tokio::time::timeout(budget, link.receiver.recv::<Body<Value>>()) => next,
                () = &mut wanted => break,
            };
            match next {
                Err(_) => break,
                Ok(Ok(delivery)) => {
                    link.delivered += 1;
                    let tag = delivery.delivery_tag().to_vec();
                    match to_delivery(&tag, delivery.message(), DEFAULT_LOCK) {
                        Some(d) => {
                            self.deliveries.delivered(
                                link.serial,
                                d.lock_token,
                                DeliveryInfo::from(&delivery),
                                d.locked_until,
                            );
                            out.push(d);
                        }
                        None => {
                            tracing::error!("A delivery without a lock token was released.");
                            let _ = link.receiver.release(&delivery).await;
                        }
                    }
                    budget = GATHER;
                }
                Ok(Err(e)) => {
                    self.deliveries.gone(link.serial);
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
        if self.settle_on_link(lock_token, LinkOutcome::Complete).await {
            return Ok(());
        }
        self.update_disposition(lock_token, "completed", None, &BTreeMap::new())
            .await
    }

    async fn abandon(&self, lock_token: Uuid) -> Result<(), BrokerError> {
        if self.settle_on_link(lock_token, LinkOutcome::Abandon).await {
            return Ok(());
        }
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
        // Properties to keep go through the management node (see `settle`).
        let outcome = LinkOutcome::DeadLetter {
            reason,
            description,
        };
        if keep.is_empty() && self.settle_on_link(lock_token, outcome).await {
            return Ok(());
        }
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
        let until = tokio::time::Instant::now() + left;
        self.deliveries.renewed(lock_token, until);
        Ok(until)
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
