//! What the CLI does with the client besides the engine's [`Broker`] calls: send one message
//! as a flow does (`submit`), and take a reply from a session (`submit --wait`).

use super::*;

impl ServiceBusBroker {
    /// Sends a finished AMQP message (any body section, any property types) to `queue`,
    /// retried across a reconnect like every send: what `dlq replay` uses to carry a dead
    /// letter unchanged.
    pub async fn send_message(
        &self,
        queue: &str,
        message: Message<Body<Value>>,
    ) -> Result<(), BrokerError> {
        self.send_retried(queue, &message).await
    }

    /// Receives one message of session `session_id` on the session-enabled `queue`, waiting
    /// up to `wait`, and completes it: how a flow (or `submit --wait`) takes its own reply.
    /// `None` when nothing came in time.
    pub async fn receive_session(
        &self,
        queue: &str,
        session_id: &str,
        wait: Duration,
    ) -> Result<Option<Delivery>, BrokerError> {
        let live = self.live().await?;
        self.authorize(&live, queue).await?;
        let id = Uuid::new_v4();
        let source = Source::builder()
            .address(queue)
            .add_to_filter_using_legacy_format(
                Symbol::from("com.microsoft:session-filter"),
                Value::String(session_id.to_owned()),
            )
            .build();
        let mut session = live.session.lock().await;
        let attach = Receiver::builder()
            .name(format!("session-receiver-{id}"))
            .source(source)
            .target(format!("receiver-{id}"))
            .sender_settle_mode(SenderSettleMode::Unsettled)
            .receiver_settle_mode(ReceiverSettleMode::Second)
            .credit_mode(CreditMode::Manual)
            .auto_accept(false)
            .attach(&mut session);
        let attached = tokio::time::timeout(wait.max(CONNECT_TIMEOUT), attach).await;
        drop(session);
        let mut receiver = match attached {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return Err(BrokerError::Refused(format!(
                    "cannot receive from session {session_id} of {queue}: {e}"
                )));
            }
            Err(_) => {
                return Err(BrokerError::Connection(format!(
                    "attaching to session {session_id} timed out"
                )));
            }
        };
        let result = async {
            receiver
                .set_credit(1)
                .await
                .map_err(|e| connection_error("granting credit", e))?;
            let delivery = match tokio::time::timeout(wait, receiver.recv::<Body<Value>>()).await {
                Err(_) => return Ok(None),
                Ok(Err(e)) => return Err(connection_error("receiving a reply", e)),
                Ok(Ok(d)) => d,
            };
            let converted = to_delivery(
                delivery.delivery_tag().as_ref(),
                delivery.message(),
                DEFAULT_LOCK,
            );
            receiver
                .accept(&delivery)
                .await
                .map_err(|e| connection_error("completing a reply", e))?;
            Ok(converted)
        }
        .await;
        let _ = receiver.close().await;
        result
    }
}
