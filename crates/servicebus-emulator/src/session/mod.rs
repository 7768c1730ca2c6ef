//! One AMQP session: its windows, its links, and the deliveries it has sent but not yet seen
//! settled. Handlers are synchronous and append encoded frames to [`Ctx::out`]; the
//! connection task writes them.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use fe2o3_amqp_types::definitions::{
    Error as AmqpError, Handle, ReceiverSettleMode, Role, SenderSettleMode,
};
use fe2o3_amqp_types::messaging::{Accepted, DeliveryState, Rejected, Source};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, Detach, Disposition, End, Flow, Performative, Transfer,
};
use fe2o3_amqp_types::primitives::{Binary, OrderedMap, Symbol, Value};
use uuid::Uuid;

mod deliver;

use super::Shared;
use super::cbs::Authz;
use super::error::{SbError, amqp_error};
use super::frame::encode_amqp;
use super::link::{Link, LinkKind, NodeAddr, Partial, source_address, target_address};
use super::management;
use super::message::{BATCH_FORMAT, MessageParts};
use super::outcome::{outcome_of, reply_state};
use super::queue::{EntityKind, EntityRef, LinkId, now_ms, strip_authority};
use super::request::{Node, Request, as_i64, response};

/// Session window we advertise and top up.
const WINDOW: u32 = 2048;
/// Link credit we give client senders.
const INBOUND_CREDIT: u32 = 500;
/// Largest message accepted on a queue link (Service Bus Standard), as advertised on attach.
pub const MAX_MESSAGE: usize = 262_144;
/// What a sender may go over [`MAX_MESSAGE`] by. The official SDKs fill a batch up to the
/// advertised size by their own estimate, which leaves out a few bytes of the batch's envelope
/// (azure-servicebus 7.15: an estimated 262 094 bytes encode to 262 150): refusing those would
/// fail a batch the SDK built as valid.
pub const MESSAGE_SLACK: usize = 4096;
/// Largest request accepted on a `$cbs`/`$management` link.
const MAX_REQUEST: usize = 1 << 20;
/// How long a next-available session receiver waits when the client names no timeout.
const DEFAULT_SESSION_WAIT: Duration = Duration::from_secs(60);

const SESSION_FILTER: &str = "com.microsoft:session-filter";
const LOCKED_UNTIL: &str = "com.microsoft:locked-until-utc";

/// Everything a session handler may touch besides its own state.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The namespace (queues and topics), SAS rules, link ids.
    pub shared: &'a Shared,
    /// The connection's CBS grants.
    pub authz: &'a mut Authz,
    /// Encoded frames to write.
    pub out: &'a mut Vec<u8>,
    /// The peer's max-frame-size.
    pub remote_max_frame: u32,
    /// Responses to hand to whichever session holds the matching reply link.
    pub routed: &'a mut Vec<Routed>,
    /// Set when a link stopped sending because [`OUT_BUDGET`] was reached; the connection
    /// writes what it has and pumps again before waiting for the next event.
    pub saturated: bool,
}

/// Bytes of frames one pump may produce before handing them to the socket, so a large
/// credit grant cannot build an unbounded buffer.
pub const OUT_BUDGET: usize = 1 << 20;

/// A `$cbs`/`$management` response looking for its reply link.
#[derive(Debug, Clone)]
pub struct Routed {
    /// Request `reply-to`, matched against link targets.
    pub reply_to: Option<String>,
    /// Node address (lower case), matched against link sources.
    pub node: String,
    /// Encoded response message.
    pub bytes: Vec<u8>,
}

/// A protocol violation that closes the connection.
#[derive(Debug)]
pub struct Fatal(pub AmqpError);

fn fatal(condition: &str, description: &str) -> Fatal {
    Fatal(amqp_error(condition, description))
}

#[derive(Debug)]
struct PendingAttach {
    attach: Attach,
    entity: EntityRef,
    id: LinkId,
    deadline: Instant,
}

/// Where an address leads.
enum Dest {
    Cbs,
    Management(EntityRef),
    Entity(EntityRef),
}

/// State of one session.
#[derive(Debug)]
pub struct Session {
    /// Our channel.
    pub local: u16,
    next_outgoing_id: u32,
    next_incoming_id: u32,
    remote_incoming_window: u32,
    incoming_left: u32,
    next_delivery_id: u32,
    links: HashMap<u32, Link>,
    unsettled: BTreeMap<u32, (u32, Uuid)>,
    pending: Vec<PendingAttach>,
}

impl Session {
    /// Answers a client's Begin and creates the session.
    pub fn begin(local: u16, remote: u16, begin: &Begin, ctx: &mut Ctx<'_>) -> Session {
        let mut s = Session {
            local,
            next_outgoing_id: 1,
            next_incoming_id: begin.next_outgoing_id,
            remote_incoming_window: begin.incoming_window,
            incoming_left: WINDOW,
            next_delivery_id: 0,
            links: HashMap::new(),
            unsettled: BTreeMap::new(),
            pending: Vec::new(),
        };
        s.send(
            ctx,
            Performative::Begin(Begin {
                remote_channel: Some(remote),
                next_outgoing_id: s.next_outgoing_id,
                incoming_window: WINDOW,
                outgoing_window: WINDOW,
                handle_max: Handle(u32::MAX),
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            }),
            &[],
        );
        s
    }

    fn send(&mut self, ctx: &mut Ctx<'_>, p: Performative, payload: &[u8]) {
        match encode_amqp(self.local, &p, payload) {
            Ok(bytes) => ctx.out.extend(bytes),
            Err(e) => tracing::error!(error = %e, "Could not encode a frame; this is a bug."),
        }
    }

    fn classify(&self, address: &str, ctx: &Ctx<'_>) -> Result<Dest, SbError> {
        let path = strip_authority(address).trim_matches('/');
        if path.eq_ignore_ascii_case("$cbs") {
            return Ok(Dest::Cbs);
        }
        let lower = path.to_ascii_lowercase();
        let (entity_path, mgmt) = match lower.strip_suffix("/$management") {
            Some(p) => (p, true),
            None => (lower.as_str(), false),
        };
        let broker = &ctx.shared.broker;
        let entity = broker
            .resolve(entity_path)
            .ok_or_else(|| SbError::EntityNotFound(entity_path.to_string()))?;
        if !ctx.authz.allows(&entity, now_ms() / 1000) {
            return Err(SbError::Unauthorized(format!(
                "no valid token for {}; put one on $cbs first",
                entity.path()
            )));
        }
        Ok(if mgmt {
            Dest::Management(entity)
        } else {
            Dest::Entity(entity)
        })
    }

    /// Handles a client's Attach.
    pub fn on_attach(&mut self, a: Attach, ctx: &mut Ctx<'_>) -> Result<(), Fatal> {
        let h = a.handle.0;
        if self.links.contains_key(&h) || self.pending.iter().any(|p| p.attach.handle.0 == h) {
            return Err(fatal(
                "amqp:session:handle-in-use",
                "handle already attached",
            ));
        }
        let id = ctx.shared.next_link_id();
        match a.role {
            Role::Sender => self.attach_inbound(a, id, ctx),
            Role::Receiver => self.attach_outbound(a, id, ctx),
        }
        Ok(())
    }

    fn attach_inbound(&mut self, a: Attach, id: LinkId, ctx: &mut Ctx<'_>) {
        let address = target_address(a.target.as_deref())
            .unwrap_or("")
            .to_string();
        let kind = match self.classify(&address, ctx) {
            Ok(Dest::Cbs) => LinkKind::NodeIn(NodeAddr::Cbs),
            Ok(Dest::Management(e)) => LinkKind::NodeIn(NodeAddr::Management(e)),
            Ok(Dest::Entity(e)) if e.dlq => {
                let err = SbError::NotAllowed("cannot send to a dead-letter queue".into());
                return self.refuse(a, err, ctx);
            }
            Ok(Dest::Entity(e)) if ctx.shared.broker.kind(&e) == EntityKind::Subscription => {
                let err = SbError::NotAllowed("cannot send to a subscription".into());
                return self.refuse(a, err, ctx);
            }
            Ok(Dest::Entity(e)) => LinkKind::Inbound(e),
            Err(e) => return self.refuse(a, e, ctx),
        };
        tracing::debug!(link = %a.name, kind = ?kind, "Attached a link the broker receives on.");
        let h = a.handle.0;
        let max = match kind {
            LinkKind::Inbound(_) => MAX_MESSAGE,
            _ => MAX_REQUEST,
        };
        let mut link = Link::new(a.name.clone(), id, kind);
        link.credit = INBOUND_CREDIT;
        link.delivery_count = a.initial_delivery_count.unwrap_or(0);
        let reply = Attach {
            role: Role::Receiver,
            rcv_settle_mode: ReceiverSettleMode::First,
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: None,
            max_message_size: Some(max as u64),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
            ..a
        };
        self.send(ctx, Performative::Attach(reply), &[]);
        let flow = self.link_flow(h, &link, false);
        self.links.insert(h, link);
        self.send(ctx, Performative::Flow(flow), &[]);
    }

    fn attach_outbound(&mut self, a: Attach, id: LinkId, ctx: &mut Ctx<'_>) {
        let address = source_address(a.source.as_deref())
            .unwrap_or("")
            .to_string();
        let entity = match self.classify(&address, ctx) {
            Ok(Dest::Cbs) | Ok(Dest::Management(_)) => {
                let kind = LinkKind::NodeOut {
                    source: strip_authority(&address)
                        .trim_matches('/')
                        .to_ascii_lowercase(),
                    target: target_address(a.target.as_deref()).map(normalize),
                };
                return self.complete_outbound(a, id, kind, None, ctx);
            }
            Ok(Dest::Entity(e)) if ctx.shared.broker.kind(&e) == EntityKind::Topic => {
                let err = SbError::NotAllowed(
                    "cannot receive from a topic; receive from one of its subscriptions".into(),
                );
                return self.refuse(a, err, ctx);
            }
            Ok(Dest::Entity(e)) => e,
            Err(e) => return self.refuse(a, e, ctx),
        };
        let peek_lock = a.snd_settle_mode != SenderSettleMode::Settled;
        if !ctx.shared.broker.requires_session(&entity) {
            let kind = LinkKind::Outbound {
                entity,
                session: None,
                peek_lock,
            };
            return self.complete_outbound(a, id, kind, None, ctx);
        }
        let requested = session_filter(a.source.as_deref());
        match ctx
            .shared
            .broker
            .lock_session(&entity, requested.as_deref(), id)
        {
            Ok(Some((sid, until))) => {
                let kind = LinkKind::Outbound {
                    entity,
                    session: Some(sid.clone()),
                    peek_lock,
                };
                self.complete_outbound(a, id, kind, Some(until), ctx);
            }
            Ok(None) => {
                let wait = a
                    .properties
                    .as_ref()
                    .and_then(|p| p.get(&Symbol::from("com.microsoft:timeout")))
                    .and_then(as_i64)
                    .map(|ms| Duration::from_millis(ms.max(0) as u64))
                    .unwrap_or(DEFAULT_SESSION_WAIT);
                self.pending.push(PendingAttach {
                    attach: a,
                    entity,
                    id,
                    deadline: Instant::now() + wait,
                });
            }
            Err(e) => self.refuse(a, e, ctx),
        }
    }

    fn complete_outbound(
        &mut self,
        a: Attach,
        id: LinkId,
        kind: LinkKind,
        locked_until: Option<i64>,
        ctx: &mut Ctx<'_>,
    ) {
        let mut source = a.source.clone();
        let mut properties = None;
        if let (
            LinkKind::Outbound {
                session: Some(sid), ..
            },
            Some(until),
        ) = (&kind, locked_until)
        {
            let src = source.get_or_insert_with(|| Box::new(Source::default()));
            src.filter
                .get_or_insert_with(OrderedMap::new)
                .insert(Symbol::from(SESSION_FILTER), Value::String(sid.clone()));
            let mut props = OrderedMap::new();
            props.insert(Symbol::from(LOCKED_UNTIL), Value::Long(dotnet_ticks(until)));
            properties = Some(props);
        }
        tracing::debug!(link = %a.name, kind = ?kind, "Attached a link the broker sends on.");
        let reply = Attach {
            role: Role::Sender,
            source,
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: Some(MAX_REQUEST as u64),
            offered_capabilities: None,
            desired_capabilities: None,
            properties,
            ..a
        };
        let h = reply.handle.0;
        let name = reply.name.clone();
        self.send(ctx, Performative::Attach(reply), &[]);
        self.links.insert(h, Link::new(name, id, kind));
    }

    /// Refuses an attach: an attach with a null terminus, then a closing detach (§3.4).
    fn refuse(&mut self, a: Attach, err: SbError, ctx: &mut Ctx<'_>) {
        // No session free within the wait is routine for a next-available receiver.
        if matches!(err, SbError::Timeout(_)) {
            tracing::debug!(link = %a.name, error = %err, "Refused a link.");
        } else {
            tracing::info!(link = %a.name, error = %err, "Refused a link.");
        }
        let h = a.handle.clone();
        let ours = match a.role {
            Role::Sender => Role::Receiver,
            Role::Receiver => Role::Sender,
        };
        let reply = Attach {
            role: ours.clone(),
            source: if ours == Role::Sender { None } else { a.source },
            target: if ours == Role::Receiver {
                None
            } else {
                a.target
            },
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: (ours == Role::Sender).then_some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
            ..a
        };
        self.send(ctx, Performative::Attach(reply), &[]);
        self.send(
            ctx,
            Performative::Detach(Detach {
                handle: h,
                closed: true,
                error: Some(err.to_amqp()),
            }),
            &[],
        );
    }

    fn link_flow(&self, h: u32, link: &Link, drain: bool) -> Flow {
        Flow {
            next_incoming_id: Some(self.next_incoming_id),
            incoming_window: self.incoming_left,
            next_outgoing_id: self.next_outgoing_id,
            outgoing_window: WINDOW,
            handle: Some(Handle(h)),
            delivery_count: Some(link.delivery_count),
            link_credit: Some(link.credit),
            available: None,
            drain,
            echo: false,
            properties: None,
        }
    }
}

fn normalize(address: &str) -> String {
    strip_authority(address)
        .trim_matches('/')
        .to_ascii_lowercase()
}

/// The session id asked for in `source.filter`: `Some(id)`, or `None` for next-available.
fn session_filter(source: Option<&Source>) -> Option<String> {
    let value = source?
        .filter
        .as_ref()?
        .get(&Symbol::from(SESSION_FILTER))?;
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Described(d) => match &d.value {
            Value::String(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// .NET ticks for a Unix-ms time, as `com.microsoft:locked-until-utc` wants (§3.4).
pub fn dotnet_ticks(unix_ms: i64) -> i64 {
    unix_ms * 10_000 + 621_355_968_000_000_000
}
