//! The daemon's own client library, fe2o3-amqp, against the emulator: SASL, CBS put-token,
//! send, peek-lock receive with a 16-byte lock token, settlement, and transfers split across
//! frames because the client announces a tiny max-frame-size.

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::ReceiverSettleMode;
use fe2o3_amqp::types::messaging::{Body, Message, Outcome};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use fe2o3_amqp_management::client::MgmtClient;
use fe2o3_amqp_management::error::Error as MgmtError;
use fe2o3_amqp_management::request::Request;
use fe2o3_amqp_management::response::Response;
use fe2o3_amqp_types::primitives::{Array, OrderedMap, Uuid as AmqpUuid};
use servicebus_emulator::sas::{SasRule, sign};
use servicebus_emulator::{Emulator, EmulatorConfig, EmulatorHandle};

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn start() -> Result<EmulatorHandle, Box<dyn std::error::Error>> {
    Ok(Emulator::start(EmulatorConfig::new(([127, 0, 0, 1], 0).into())).await?)
}

async fn connect(
    handle: &EmulatorHandle,
    max_frame: u32,
) -> Result<(ConnectionHandle<()>, SessionHandle<()>), Box<dyn std::error::Error>> {
    connect_idle(handle, max_frame, None).await
}

async fn connect_idle(
    handle: &EmulatorHandle,
    max_frame: u32,
    idle_ms: Option<u32>,
) -> Result<(ConnectionHandle<()>, SessionHandle<()>), Box<dyn std::error::Error>> {
    let mut builder = Connection::builder()
        .container_id("fe2o3-test")
        .hostname("127.0.0.1")
        .sasl_profile(SaslProfile::Anonymous)
        .max_frame_size(max_frame);
    if let Some(ms) = idle_ms {
        builder = builder.idle_time_out(ms);
    }
    let mut conn = builder
        .open(format!("amqp://{}", handle.local_addr()).as_str())
        .await?;
    let session = Session::begin(&mut conn).await?;
    Ok((conn, session))
}

async fn authorize(
    session: &mut SessionHandle<()>,
    handle: &EmulatorHandle,
    entity: &str,
    rule: &SasRule,
) -> Result<(), Box<dyn std::error::Error>> {
    let audience = format!("sb://{}/{entity}", handle.local_addr());
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64
        + 3600;
    let token = sign(&audience, rule, expiry);
    let mut cbs = CbsClient::attach(session).await?;
    let result = cbs
        .put_token(
            audience,
            CbsToken::new(token, "servicebus.windows.net:sastoken", None),
        )
        .await;
    cbs.close().await?;
    Ok(result?)
}

#[tokio::test]
async fn send_receive_complete_with_small_frames() -> TestResult {
    let handle = start().await?;
    let (mut conn, mut session) = connect(&handle, 512).await?;
    authorize(&mut session, &handle, "jobs", &SasRule::default()).await?;

    let body = "x".repeat(5000);
    let mut sender = Sender::attach(&mut session, "sender-1", "jobs").await?;
    let outcome = sender.send(Message::from(body.clone())).await?;
    assert!(matches!(outcome, Outcome::Accepted(_)));

    let mut receiver = Receiver::builder()
        .name("receiver-1")
        .source("jobs")
        .receiver_settle_mode(ReceiverSettleMode::Second)
        .credit_mode(CreditMode::Manual)
        .attach(&mut session)
        .await?;
    receiver.set_credit(1).await?;
    let delivery = receiver.recv::<Body<Value>>().await?;
    let locked = handle.counts("jobs").map(|c| c.locked);
    assert_eq!(locked, Some(1));
    assert_eq!(delivery.delivery_tag().len(), 16, "lock token tag");
    match delivery.body() {
        Body::Value(v) => assert_eq!(v.0, Value::String(body)),
        other => panic!("unexpected body {other:?}"),
    }
    let tag: [u8; 16] = delivery.delivery_tag().as_slice().try_into()?;
    let token = uuid::Uuid::from_bytes_le(tag);
    let annotated = delivery
        .message()
        .delivery_annotations
        .as_ref()
        .and_then(|a| {
            a.0.get(
                &fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(
                    "x-opt-lock-token".into(),
                ),
            )
        })
        .cloned();
    assert_eq!(
        annotated,
        Some(Value::Uuid(AmqpUuid::from(*token.as_bytes()))),
        "x-opt-lock-token is the tag's GUID in RFC 4122 order"
    );
    let info = DeliveryInfo::from(delivery);

    // Renew the lock through $management; fe2o3 numbers its requests with ulong ids, and
    // the response must keep that type for the client to match it.
    let mut mgmt = MgmtClient::builder()
        .management_node_address("jobs/$management")
        .client_node_addr("fe2o3-test-mgmt")
        .attach(&mut session)
        .await?;
    let renewed: RenewLockResponse = mgmt.call(RenewLock(vec![token])).await?;
    assert_eq!(renewed.0.len(), 1);
    mgmt.close().await?;

    receiver.accept(info).await?;

    // fe2o3's accept does not wait for the broker's reply, so poll until it has landed.
    let empty = servicebus_emulator::queue::Counts::default();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while handle.counts("jobs") != Some(empty) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(handle.counts("jobs"), Some(empty), "completed and gone");
    assert_eq!(handle.counts("nope"), None);

    // Nothing left: a drain must come back with the credit used up.
    receiver.set_credit(5).await?;
    receiver.drain().await?;

    receiver.close().await?;
    sender.close().await?;
    session.end().await?;
    conn.close().await?;
    handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn wrong_key_and_unknown_entity_are_refused() -> TestResult {
    let handle = start().await?;
    let (mut conn, mut session) = connect(&handle, 65536).await?;
    let wrong = SasRule {
        key: "not-the-key".into(),
        ..SasRule::default()
    };
    assert!(
        authorize(&mut session, &handle, "jobs", &wrong)
            .await
            .is_err()
    );
    assert!(
        authorize(&mut session, &handle, "nope", &SasRule::default())
            .await
            .is_err()
    );
    // Without a token the link is refused.
    assert!(Sender::attach(&mut session, "s", "jobs").await.is_err());
    let _ = session.end().await;
    let _ = conn.close().await;
    handle.shutdown().await;
    Ok(())
}

/// `com.microsoft:renew-lock` as the daemon would send it.
struct RenewLock(Vec<uuid::Uuid>);

struct RenewLockResponse(Vec<Value>);

impl Request for RenewLock {
    const OPERATION: &'static str = "com.microsoft:renew-lock";
    type Response = RenewLockResponse;
    type Body = Value;

    fn encode_body(self) -> Value {
        let tokens = self
            .0
            .iter()
            .map(|t| Value::Uuid(AmqpUuid::from(*t.as_bytes())))
            .collect();
        let mut map = OrderedMap::new();
        map.insert(
            Value::String("lock-tokens".into()),
            Value::Array(Array(tokens)),
        );
        Value::Map(map)
    }
}

impl Response for RenewLockResponse {
    const STATUS_CODE: u16 = 200;
    type Body = Value;
    type Error = MgmtError;

    fn decode_message(message: Message<Value>) -> Result<Self, MgmtError> {
        let expirations = match message.body {
            Value::Map(map) => match map.get(&Value::String("expirations".into())) {
                Some(Value::Array(a)) => a.0.clone(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        Ok(RenewLockResponse(expirations))
    }
}

#[tokio::test]
async fn jwt_is_accepted_only_when_switched_on() -> TestResult {
    use base64::Engine;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 600;
    let payload = format!(r#"{{"aud":"https://servicebus.azure.net","exp":{exp}}}"#);
    let jwt = format!(
        "e30.{}.unsigned",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload)
    );
    for accept in [false, true] {
        let mut config = EmulatorConfig::new(([127, 0, 0, 1], 0).into());
        config.accept_jwt = accept;
        let handle = Emulator::start(config).await?;
        let (mut conn, mut session) = connect(&handle, 65536).await?;
        let audience = format!("sb://{}/jobs", handle.local_addr());
        let mut cbs = CbsClient::attach(&mut session).await?;
        let result = cbs
            .put_token(audience, CbsToken::new(jwt.as_str(), "jwt", None))
            .await;
        assert_eq!(result.is_ok(), accept, "accept_jwt = {accept}");
        if accept {
            let mut sender = Sender::attach(&mut session, "s", "jobs").await?;
            let outcome = sender.send(Message::from("with a jwt")).await?;
            assert!(matches!(outcome, Outcome::Accepted(_)));
            sender.close().await?;
        }
        let _ = cbs.close().await;
        let _ = session.end().await;
        let _ = conn.close().await;
        handle.shutdown().await;
    }
    Ok(())
}

#[tokio::test]
async fn idle_connection_is_kept_alive_by_heartbeats() -> TestResult {
    let handle = start().await?;
    // The client closes the connection if the broker stays silent for 600 ms.
    let (mut conn, mut session) = connect_idle(&handle, 65536, Some(600)).await?;
    authorize(&mut session, &handle, "jobs", &SasRule::default()).await?;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let mut sender = Sender::attach(&mut session, "after-idle", "jobs").await?;
    let outcome = sender.send(Message::from("still here")).await?;
    assert!(matches!(outcome, Outcome::Accepted(_)));
    sender.close().await?;
    session.end().await?;
    conn.close().await?;
    handle.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_large_credit_grant_is_served_in_budgeted_rounds() -> TestResult {
    let handle = start().await?;
    let (mut conn, mut session) = connect(&handle, 65536).await?;
    authorize(&mut session, &handle, "jobs", &SasRule::default()).await?;
    let mut sender = Sender::attach(&mut session, "bulk-sender", "jobs").await?;
    let body = "y".repeat(100_000);
    for _ in 0..30 {
        let outcome = sender.send(Message::from(body.clone())).await?;
        assert!(matches!(outcome, Outcome::Accepted(_)));
    }
    let mut receiver = Receiver::builder()
        .name("bulk-receiver")
        .source("jobs")
        .receiver_settle_mode(ReceiverSettleMode::Second)
        .credit_mode(CreditMode::Manual)
        .attach(&mut session)
        .await?;
    receiver.set_credit(30).await?;
    for _ in 0..30 {
        let delivery = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            receiver.recv::<Body<Value>>(),
        )
        .await??;
        receiver.accept(DeliveryInfo::from(delivery)).await?;
    }
    receiver.close().await?;
    sender.close().await?;
    session.end().await?;
    conn.close().await?;
    handle.shutdown().await;
    Ok(())
}

/// Polls until `jobs` holds `want`, or five seconds pass (fe2o3 does not wait for the broker's
/// answer to a disposition).
async fn await_counts(handle: &EmulatorHandle, want: servicebus_emulator::queue::Counts) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while handle.counts("jobs") != Some(want) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(handle.counts("jobs"), Some(want));
}

/// The daemon's settlement on the receive link: one disposition over a range of delivery ids
/// settles each of them, and `rejected` with `com.microsoft:dead-letter` dead-letters with the
/// reason and description of the error's info (as the azure-servicebus SDK sends them).
#[tokio::test]
async fn link_dispositions_settle_ranges_and_dead_letter_with_their_reason() -> TestResult {
    use fe2o3_amqp::types::definitions::{Error as AmqpError, ErrorCondition, Fields};
    use fe2o3_amqp::types::messaging::Modified;
    use fe2o3_amqp::types::primitives::{SimpleValue, Symbol};
    use servicebus_emulator::queue::Counts;

    let handle = start().await?;
    let (mut conn, mut session) = connect(&handle, 65536).await?;
    authorize(&mut session, &handle, "jobs", &SasRule::default()).await?;
    let mut sender = Sender::attach(&mut session, "range-sender", "jobs").await?;
    for i in 0..5 {
        sender.send(Message::from(format!("m{i}"))).await?;
    }
    let mut receiver = Receiver::builder()
        .name("range-receiver")
        .source("jobs")
        .receiver_settle_mode(ReceiverSettleMode::Second)
        .credit_mode(CreditMode::Manual)
        .attach(&mut session)
        .await?;
    receiver.set_credit(5).await?;
    let mut got = Vec::new();
    for _ in 0..5 {
        let d = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            receiver.recv::<Body<Value>>(),
        )
        .await??;
        got.push(DeliveryInfo::from(d));
    }
    // Three consecutive delivery ids: fe2o3 sends one disposition, first..last.
    receiver.accept_all(got.drain(..3)).await?;
    let locked_two = Counts {
        locked: 2,
        ..Default::default()
    };
    await_counts(&handle, locked_two).await;
    let mut info = Fields::new();
    info.insert(
        Symbol::from("DeadLetterReason"),
        Value::String("InvalidInput".into()),
    );
    info.insert(
        Symbol::from("DeadLetterErrorDescription"),
        Value::String("the input was bad".into()),
    );
    let error = AmqpError::new(
        ErrorCondition::Custom(Symbol::from("com.microsoft:dead-letter")),
        Some("the input was bad".to_owned()),
        Some(info),
    );
    receiver.reject(got.remove(0), error).await?;
    let abandoned = Modified {
        delivery_failed: Some(true),
        undeliverable_here: Some(false),
        message_annotations: None,
    };
    receiver.modify(got.remove(0), abandoned).await?;
    let after = Counts {
        active: 1,
        dead_lettered: 1,
        ..Default::default()
    };
    await_counts(&handle, after).await;

    let mut dlq = Receiver::builder()
        .name("dlq-receiver")
        .source("jobs/$DeadLetterQueue")
        .receiver_settle_mode(ReceiverSettleMode::Second)
        .credit_mode(CreditMode::Manual)
        .attach(&mut session)
        .await?;
    dlq.set_credit(1).await?;
    let dead = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        dlq.recv::<Body<Value>>(),
    )
    .await??;
    let props = dead
        .message()
        .application_properties
        .as_ref()
        .ok_or("no application properties")?;
    assert_eq!(
        props.0.get("DeadLetterReason"),
        Some(&SimpleValue::String("InvalidInput".into()))
    );
    assert_eq!(
        props.0.get("DeadLetterErrorDescription"),
        Some(&SimpleValue::String("the input was bad".into()))
    );
    dlq.accept(DeliveryInfo::from(dead)).await?;
    dlq.close().await?;
    receiver.close().await?;
    sender.close().await?;
    session.end().await?;
    conn.close().await?;
    handle.shutdown().await;
    Ok(())
}
