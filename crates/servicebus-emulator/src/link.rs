//! Link state: what a link is attached to, its credit, and transfers being reassembled.

use std::collections::VecDeque;

use fe2o3_amqp_types::messaging::{Source, Target, TargetArchetype};

use super::queue::{EntityRef, LinkId};

/// The node at the other end of a request/response link pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAddr {
    /// `$cbs`.
    Cbs,
    /// `<entity>/$management`.
    Management(EntityRef),
}

/// What a link carries, from the broker's point of view.
#[derive(Debug, Clone)]
pub enum LinkKind {
    /// The client sends messages to a queue.
    Inbound(EntityRef),
    /// The client receives messages from a queue (or its DLQ).
    Outbound {
        /// The queue.
        entity: EntityRef,
        /// Locked session of a session receiver.
        session: Option<String>,
        /// Peek-lock (unsettled, 16-byte tags) or receive-and-delete (pre-settled).
        peek_lock: bool,
    },
    /// The client sends requests to a node.
    NodeIn(NodeAddr),
    /// The client receives a node's responses.
    NodeOut {
        /// Lower-case node address (source).
        source: String,
        /// The client's own address (target), matched against `reply-to`.
        target: Option<String>,
    },
}

/// A transfer whose frames are still arriving (`more=true`).
#[derive(Debug, Default)]
pub struct Partial {
    /// Delivery id from the first frame.
    pub delivery_id: u32,
    /// The sender settled it already.
    pub settled: bool,
    /// Message format from the first frame.
    pub format: u32,
    /// Bytes so far (capped; `too_large` records an overflow).
    pub bytes: Vec<u8>,
    /// The message exceeded the allowed size.
    pub too_large: bool,
}

/// One attached link.
#[derive(Debug)]
pub struct Link {
    /// Link name from the attach.
    pub name: String,
    /// Identity for locks and session locks.
    pub id: LinkId,
    /// What it carries.
    pub kind: LinkKind,
    /// Credit left: ours to spend (sending links) or the client's (receiving links).
    pub credit: u32,
    /// Deliveries sent (sending links) or received (receiving links).
    pub delivery_count: u32,
    /// The client asked us to use up or return all credit.
    pub drain: bool,
    /// Responses waiting for credit (`NodeOut`).
    pub outbox: VecDeque<Vec<u8>>,
    /// Incoming transfer under reassembly.
    pub partial: Option<Partial>,
}

impl Link {
    /// A fresh link.
    pub fn new(name: String, id: LinkId, kind: LinkKind) -> Link {
        Link {
            name,
            id,
            kind,
            credit: 0,
            delivery_count: 0,
            drain: false,
            outbox: VecDeque::new(),
            partial: None,
        }
    }

    /// Whether the broker sends on this link.
    pub fn is_sending(&self) -> bool {
        matches!(
            self.kind,
            LinkKind::Outbound { .. } | LinkKind::NodeOut { .. }
        )
    }
}

/// The address of a source terminus.
pub fn source_address(source: Option<&Source>) -> Option<&str> {
    source?.address.as_deref()
}

/// The address of a target terminus.
pub fn target_address(target: Option<&TargetArchetype>) -> Option<&str> {
    match target? {
        TargetArchetype::Target(Target { address, .. }) => address.as_deref(),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}
