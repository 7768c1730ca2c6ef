//! The settlement replies of `docs/servicebus-protocol.md` §5.1 checked on the wire, with a raw
//! AMQP client: the SDKs check lock expiry on their side, so only a raw client reaches the
//! broker's lock-lost path.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp_types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp_types::messaging::{
    Accepted, AmqpValue, ApplicationProperties, Data, DeliveryState, MessageId, Properties,
    Rejected, Source, Target, TargetArchetype,
};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, ChannelMax, Disposition, Flow, MaxFrameSize, Open, Performative, Transfer,
};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, SimpleValue, Value};
use servicebus_emulator::clock::ManualClock;
use servicebus_emulator::error::amqp_error;
use servicebus_emulator::frame::{AMQP_HEADER, AmqpFrame, decode_amqp, encode_amqp, read_frame};
use servicebus_emulator::message::MessageParts;
use servicebus_emulator::sas::{SasRule, sign};
use servicebus_emulator::{Emulator, EmulatorConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

type TestResult = Result<(), Box<dyn std::error::Error>>;
type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Raw {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Raw {
    async fn send(&mut self, p: Performative, payload: &[u8]) -> Res<()> {
        self.wr.write_all(&encode_amqp(0, &p, payload)?).await?;
        Ok(())
    }

    /// The next frame matching `want`, skipping others (flows, heartbeats).
    async fn expect(&mut self, want: impl Fn(&Performative) -> bool) -> Res<AmqpFrame> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let raw =
                tokio::time::timeout_at(deadline, read_frame(&mut self.rd, 1 << 20)).await??;
            if let Some(frame) = decode_amqp(raw)?
                && want(&frame.performative)
            {
                return Ok(frame);
            }
        }
    }
}

fn attach(name: &str, handle: u32, role: Role, address: &str) -> Performative {
    Performative::Attach(Attach {
        name: name.into(),
        handle: Handle(handle),
        role,
        snd_settle_mode: SenderSettleMode::Unsettled,
        rcv_settle_mode: ReceiverSettleMode::Second,
        source: Some(Box::new(Source {
            address: Some(address.into()),
            ..Default::default()
        })),
        target: Some(Box::new(TargetArchetype::Target(Target {
            address: Some(address.into()),
            ..Default::default()
        }))),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: Some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    })
}

fn flow(handle: u32, delivery_count: u32, credit: u32) -> Performative {
    Performative::Flow(Flow {
        next_incoming_id: Some(1),
        incoming_window: 1000,
        next_outgoing_id: 0,
        outgoing_window: 1000,
        handle: Some(Handle(handle)),
        delivery_count: Some(delivery_count),
        link_credit: Some(credit),
        available: None,
        drain: false,
        echo: false,
        properties: None,
    })
}

fn transfer(handle: u32, id: u32) -> Performative {
    Performative::Transfer(Transfer {
        handle: Handle(handle),
        delivery_id: Some(id),
        delivery_tag: Some(Binary::from(id.to_be_bytes().to_vec())),
        message_format: Some(0),
        settled: Some(false),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    })
}

fn settle(id: u32, state: DeliveryState) -> Performative {
    Performative::Disposition(Disposition {
        role: Role::Receiver,
        first: id,
        last: None,
        settled: false,
        state: Some(state),
        batchable: false,
    })
}

fn is_transfer_on(h: u32) -> impl Fn(&Performative) -> bool {
    move |p| matches!(p, Performative::Transfer(t) if t.handle.0 == h)
}

fn reply_to(id: u32) -> impl Fn(&Performative) -> bool {
    move |p| matches!(p, Performative::Disposition(d) if d.role == Role::Sender && d.first == id)
}

#[tokio::test]
async fn settlement_replies_follow_section_5_1() -> TestResult {
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let mut config = EmulatorConfig::new(([127, 0, 0, 1], 0).into());
    config.clock = clock.clone();
    let handle = Emulator::start(config).await?;
    let stream = TcpStream::connect(handle.local_addr()).await?;
    let (rd, mut wr) = stream.into_split();
    wr.write_all(&AMQP_HEADER).await?;
    let mut raw = Raw {
        rd: BufReader::new(rd),
        wr,
    };
    let mut header = [0u8; 8];
    raw.rd.read_exact(&mut header).await?;
    assert_eq!(header, AMQP_HEADER);
    raw.send(
        Performative::Open(Open {
            container_id: "raw".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(65536),
            channel_max: ChannelMax(1),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }),
        &[],
    )
    .await?;
    raw.expect(|p| matches!(p, Performative::Open(_))).await?;
    raw.send(
        Performative::Begin(Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 1000,
            outgoing_window: 1000,
            handle_max: Handle(16),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }),
        &[],
    )
    .await?;
    raw.expect(|p| matches!(p, Performative::Begin(_))).await?;

    // CBS: put a token for `jobs` (request message-id is a ulong; it must come back as one).
    raw.send(attach("cbs-out", 0, Role::Sender, "$cbs"), &[])
        .await?;
    raw.send(attach("cbs-in", 1, Role::Receiver, "$cbs"), &[])
        .await?;
    raw.send(flow(1, 0, 10), &[]).await?;
    let audience = format!("sb://{}/jobs", handle.local_addr());
    let mut props = OrderedMap::new();
    props.insert(
        "operation".to_string(),
        SimpleValue::String("put-token".into()),
    );
    props.insert(
        "type".to_string(),
        SimpleValue::String("servicebus.windows.net:sastoken".into()),
    );
    props.insert("name".to_string(), SimpleValue::String(audience.clone()));
    let token = sign(&audience, &SasRule::default(), 4_000_000_000);
    let request = MessageParts {
        properties: Some(Properties {
            message_id: Some(MessageId::Ulong(7)),
            ..Default::default()
        }),
        app_props: Some(ApplicationProperties(props)),
        body: serde_amqp::to_vec(&AmqpValue(Value::String(token)))?,
        ..Default::default()
    };
    raw.send(transfer(0, 0), &request.encode()?).await?;
    let response = raw.expect(is_transfer_on(1)).await?;
    let response = MessageParts::parse(&response.payload)?;
    let status = response
        .app_props
        .as_ref()
        .and_then(|p| p.0.get("status-code").cloned());
    assert_eq!(status, Some(SimpleValue::Int(202)));
    let correlation = response.properties.and_then(|p| p.correlation_id);
    assert_eq!(correlation, Some(MessageId::Ulong(7)), "same AMQP type");

    // Send two messages, then receive them under peek-lock.
    raw.send(attach("send", 2, Role::Sender, "jobs"), &[])
        .await?;
    for id in 1..=2 {
        let m = MessageParts {
            body: serde_amqp::to_vec(&Data(Binary::from(vec![id as u8])))?,
            ..Default::default()
        };
        raw.send(transfer(2, id), &m.encode()?).await?;
        let d = raw
            .expect(move |p| matches!(p, Performative::Disposition(d) if d.first == id))
            .await?;
        let Performative::Disposition(d) = d.performative else {
            return Err("not a disposition".into());
        };
        assert!(d.settled);
        assert!(matches!(d.state, Some(DeliveryState::Accepted(_))));
    }
    raw.send(attach("recv", 3, Role::Receiver, "jobs"), &[])
        .await?;
    raw.send(flow(3, 0, 1), &[]).await?;
    let first = raw.expect(is_transfer_on(3)).await?;
    let Performative::Transfer(t) = first.performative else {
        return Err("not a transfer".into());
    };
    assert_eq!(t.delivery_tag.map(|t| t.len()), Some(16));
    let first_id = t.delivery_id.ok_or("no delivery id")?;

    // Dead-letter: the settled reply is `rejected` with no error.
    let mut dead_letter = amqp_error("com.microsoft:dead-letter", "bad");
    let mut info = OrderedMap::new();
    info.insert("DeadLetterReason".into(), Value::String("Bad".into()));
    dead_letter.info = Some(Box::new(info));
    raw.send(
        settle(
            first_id,
            DeliveryState::Rejected(Rejected {
                error: Some(dead_letter),
            }),
        ),
        &[],
    )
    .await?;
    let reply = raw.expect(reply_to(first_id)).await?;
    let Performative::Disposition(d) = reply.performative else {
        return Err("not a disposition".into());
    };
    assert!(d.settled);
    assert!(matches!(
        d.state,
        Some(DeliveryState::Rejected(Rejected { error: None }))
    ));

    // A stale lock: the reply carries com.microsoft:message-lock-lost.
    raw.send(flow(3, 1, 1), &[]).await?;
    let second = raw.expect(is_transfer_on(3)).await?;
    let Performative::Transfer(t) = second.performative else {
        return Err("not a transfer".into());
    };
    let second_id = t.delivery_id.ok_or("no delivery id")?;
    clock.advance(61_000);
    tokio::time::sleep(Duration::from_millis(300)).await; // the sweep runs every 100 ms
    raw.send(settle(second_id, DeliveryState::Accepted(Accepted {})), &[])
        .await?;
    let reply = raw.expect(reply_to(second_id)).await?;
    let Performative::Disposition(d) = reply.performative else {
        return Err("not a disposition".into());
    };
    let condition = match d.state {
        Some(DeliveryState::Rejected(Rejected { error: Some(e) })) => format!("{:?}", e.condition),
        other => return Err(format!("unexpected reply {other:?}").into()),
    };
    assert!(
        condition.contains("com.microsoft:message-lock-lost"),
        "{condition}"
    );
    handle.shutdown().await;
    Ok(())
}
