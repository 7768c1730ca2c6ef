//! The moving parts of a session: flow, transfers in both directions, dispositions, detach.

use super::*;

/// Most delivery ids one disposition may name; bounds the work a peer can cause.
const MAX_DISPOSITION_RANGE: u32 = 10_000;

impl Session {
    /// Handles a client's Flow: session window, link credit, drain, echo.
    pub fn on_flow(&mut self, f: Flow, ctx: &mut Ctx<'_>) {
        self.remote_incoming_window = match f.next_incoming_id {
            Some(nid) => nid
                .wrapping_add(f.incoming_window)
                .wrapping_sub(self.next_outgoing_id),
            None => f.incoming_window,
        };
        let Some(h) = f.handle.map(|h| h.0) else {
            return;
        };
        let Some(link) = self.links.get_mut(&h) else {
            return;
        };
        tracing::debug!(
            handle = h,
            delivery_count = ?f.delivery_count,
            link_credit = ?f.link_credit,
            drain = f.drain,
            next_incoming_id = ?f.next_incoming_id,
            incoming_window = f.incoming_window,
            ours = link.delivery_count,
            "Flow from the client."
        );
        if link.is_sending() {
            let theirs = f.delivery_count.unwrap_or(link.delivery_count);
            let credit = theirs
                .wrapping_add(f.link_credit.unwrap_or(0))
                .wrapping_sub(link.delivery_count);
            link.credit = if credit > 1 << 30 { 0 } else { credit };
            link.drain = f.drain;
        }
        if f.echo
            && let Some(link) = self.links.get(&h)
        {
            let flow = self.link_flow(h, link, false);
            self.send(ctx, Performative::Flow(flow), &[]);
        }
    }

    /// Handles one transfer frame from a client sender.
    pub fn on_transfer(
        &mut self,
        t: Transfer,
        payload: Vec<u8>,
        ctx: &mut Ctx<'_>,
    ) -> Result<(), Fatal> {
        self.next_incoming_id = self.next_incoming_id.wrapping_add(1);
        self.incoming_left = self.incoming_left.saturating_sub(1);
        if self.incoming_left < WINDOW / 2 {
            self.incoming_left = WINDOW;
            let flow = Flow {
                next_incoming_id: Some(self.next_incoming_id),
                incoming_window: self.incoming_left,
                next_outgoing_id: self.next_outgoing_id,
                outgoing_window: WINDOW,
                handle: None,
                delivery_count: None,
                link_credit: None,
                available: None,
                drain: false,
                echo: false,
                properties: None,
            };
            self.send(ctx, Performative::Flow(flow), &[]);
        }
        let h = t.handle.0;
        let Some(link) = self.links.get_mut(&h) else {
            // Most often a transfer that crossed our detach (lock lost, token expired); the
            // link is gone, the connection need not be.
            tracing::debug!(
                handle = h,
                "Ignored a transfer on a handle that is not attached."
            );
            return Ok(());
        };
        if link.is_sending() {
            return Err(fatal(
                "amqp:session:errant-link",
                "transfer on a link where the broker is the sender",
            ));
        }
        let cap = match link.kind {
            LinkKind::Inbound(_) => MAX_MESSAGE + MESSAGE_SLACK,
            _ => MAX_REQUEST,
        };
        let partial = link.partial.get_or_insert_with(|| Partial {
            delivery_id: t.delivery_id.unwrap_or(0),
            settled: t.settled.unwrap_or(false),
            format: t.message_format.unwrap_or(0),
            ..Partial::default()
        });
        if t.aborted {
            link.partial = None;
            return Ok(());
        }
        if partial.bytes.len() + payload.len() > cap {
            partial.too_large = true;
        } else {
            partial.bytes.extend_from_slice(&payload);
        }
        if t.more {
            return Ok(());
        }
        let Some(done) = link.partial.take() else {
            return Ok(());
        };
        link.delivery_count = link.delivery_count.wrapping_add(1);
        link.credit = link.credit.saturating_sub(1);
        let kind = link.kind.clone();
        if link.credit < INBOUND_CREDIT / 2 {
            link.credit = INBOUND_CREDIT;
            let flow = self.link_flow(h, &self.links[&h], false);
            self.send(ctx, Performative::Flow(flow), &[]);
        }
        let state = match kind {
            LinkKind::Inbound(entity) => accept_message(&entity, &done, ctx),
            LinkKind::NodeIn(node) => {
                handle_request(&node, &done.bytes, ctx);
                DeliveryState::Accepted(Accepted {})
            }
            _ => DeliveryState::Accepted(Accepted {}),
        };
        if !done.settled {
            self.send(
                ctx,
                Performative::Disposition(Disposition {
                    role: Role::Receiver,
                    first: done.delivery_id,
                    last: None,
                    settled: true,
                    state: Some(state),
                    batchable: false,
                }),
                &[],
            );
        }
        Ok(())
    }

    /// Handles a client's Disposition of deliveries the broker sent (§5.1).
    pub fn on_disposition(&mut self, d: Disposition, ctx: &mut Ctx<'_>) {
        tracing::debug!(role = ?d.role, first = d.first, last = ?d.last, settled = d.settled, state = ?d.state, "Disposition from the client.");
        if d.role == Role::Sender {
            // The client settles its own sends; the broker settled them already.
            return;
        }
        let Some(outcome) = outcome_of(d.state.as_ref(), d.settled) else {
            return;
        };
        let last = d.last.unwrap_or(d.first);
        let span = last.wrapping_sub(d.first).min(MAX_DISPOSITION_RANGE);
        for i in 0..=span {
            let id = d.first.wrapping_add(i);
            let Some((_, token)) = self.unsettled.remove(&id) else {
                continue;
            };
            let result = ctx.shared.broker.settle(token, outcome.clone());
            if let Err(e) = &result {
                tracing::info!(error = %e, "A settlement failed.");
            }
            if !d.settled {
                let state = reply_state(d.state.as_ref(), &result);
                self.send(
                    ctx,
                    Performative::Disposition(Disposition {
                        role: Role::Sender,
                        first: id,
                        last: None,
                        settled: true,
                        state: Some(state),
                        batchable: false,
                    }),
                    &[],
                );
            }
        }
    }

    /// Handles a client's Detach.
    pub fn on_detach(&mut self, d: Detach, ctx: &mut Ctx<'_>) {
        let h = d.handle.0;
        let pending = self.pending.len();
        self.pending.retain(|p| p.attach.handle.0 != h);
        let attached = self.links.remove(&h);
        if let Some(link) = &attached {
            ctx.shared.broker.release_link(link.id);
            self.unsettled.retain(|_, (lh, _)| *lh != h);
        }
        if attached.is_none() && self.pending.len() == pending {
            // Our own detach (a refused attach, a link closed with an error) came first: this
            // one answers it, and answering again would reach whichever new link the client
            // has since attached on the same handle.
            return;
        }
        self.send(
            ctx,
            Performative::Detach(Detach {
                handle: d.handle,
                closed: d.closed,
                error: None,
            }),
            &[],
        );
    }

    fn detach_with_error(&mut self, h: u32, err: SbError, ctx: &mut Ctx<'_>) {
        if let Some(link) = self.links.remove(&h) {
            ctx.shared.broker.release_link(link.id);
            self.unsettled.retain(|_, (lh, _)| *lh != h);
        }
        self.send(
            ctx,
            Performative::Detach(Detach {
                handle: Handle(h),
                closed: true,
                error: Some(err.to_amqp()),
            }),
            &[],
        );
    }

    /// Releases everything this session's links hold (End or Close).
    pub fn release_all(&mut self, ctx: &Ctx<'_>) {
        for link in self.links.values() {
            ctx.shared.broker.release_link(link.id);
        }
        self.links.clear();
        self.unsettled.clear();
    }

    /// Ends the session at the client's request.
    pub fn end(&mut self, ctx: &mut Ctx<'_>) {
        self.release_all(ctx);
        self.send(ctx, Performative::End(End { error: None }), &[]);
    }

    /// Places a response on this session's reply link: the one whose target is the request's
    /// `reply-to`, or with `by_node`, any link reading from the node that answered. Hands it
    /// back when there is none.
    pub fn offer(&mut self, r: Routed, by_node: bool) -> Option<Routed> {
        let reply_to = r.reply_to.as_deref().map(normalize);
        let link = self.links.values_mut().find(|l| match &l.kind {
            LinkKind::NodeOut { target, source } => {
                (target.is_some() && *target == reply_to) || (by_node && *source == r.node)
            }
            _ => false,
        });
        match link {
            Some(l) => {
                l.outbox.push_back(r.bytes);
                None
            }
            None => Some(r),
        }
    }

    /// Sends what links with credit can take, answers drains, retries held session
    /// attaches and detaches session links whose lock was lost.
    pub fn pump(&mut self, ctx: &mut Ctx<'_>) {
        self.retry_pending(ctx);
        self.drop_expired_tokens(ctx);
        let handles: Vec<u32> = self.links.keys().copied().collect();
        for h in handles {
            self.pump_link(h, ctx);
        }
    }

    /// Service Bus detaches links whose token expired (§2); so do we.
    fn drop_expired_tokens(&mut self, ctx: &mut Ctx<'_>) {
        let now_s = now_ms() / 1000;
        let expired: Vec<u32> = self
            .links
            .iter()
            .filter(|(_, l)| match &l.kind {
                LinkKind::Inbound(e) | LinkKind::Outbound { entity: e, .. } => {
                    !ctx.authz.allows(e, now_s)
                }
                _ => false,
            })
            .map(|(h, _)| *h)
            .collect();
        for h in expired {
            let err = SbError::Unauthorized("the token for this entity expired".into());
            self.detach_with_error(h, err, ctx);
        }
    }

    fn pump_link(&mut self, h: u32, ctx: &mut Ctx<'_>) {
        loop {
            let Some(link) = self.links.get_mut(&h) else {
                return;
            };
            if !link.is_sending() {
                return;
            }
            if let LinkKind::Outbound {
                entity,
                session: Some(sid),
                ..
            } = &link.kind
                && !ctx.shared.broker.holds_session(entity, sid, link.id)
            {
                return self.detach_with_error(h, SbError::SessionLockLost, ctx);
            }
            if link.credit == 0 || self.remote_incoming_window == 0 {
                break;
            }
            if ctx.out.len() >= OUT_BUDGET {
                ctx.saturated = true;
                return;
            }
            let next = match &link.kind {
                LinkKind::NodeOut { .. } => link.outbox.pop_front().map(|b| (None, b)),
                LinkKind::Outbound {
                    entity,
                    session,
                    peek_lock,
                } => {
                    match ctx
                        .shared
                        .broker
                        .acquire(entity, session.as_deref(), link.id, *peek_lock)
                    {
                        Ok(d) => d.map(|d| (d.token, d.bytes)),
                        Err(e) => {
                            tracing::warn!(error = %e, "Could not take a message for a receiver.");
                            None
                        }
                    }
                }
                _ => None,
            };
            let Some((token, bytes)) = next else {
                break;
            };
            link.credit -= 1;
            link.delivery_count = link.delivery_count.wrapping_add(1);
            let id = self.next_delivery_id;
            self.next_delivery_id = id.wrapping_add(1);
            let tag = match token {
                Some(t) => {
                    self.unsettled.insert(id, (h, t));
                    t.to_bytes_le().to_vec()
                }
                None => id.to_be_bytes().to_vec(),
            };
            tracing::debug!(
                handle = h,
                delivery_id = id,
                len = bytes.len(),
                "Sending a delivery."
            );
            self.send_transfer(h, id, tag, token.is_none(), &bytes, ctx);
        }
        if let Some(link) = self.links.get_mut(&h)
            && link.drain
            && link.credit > 0
        {
            link.delivery_count = link.delivery_count.wrapping_add(link.credit);
            link.credit = 0;
            let flow = self.link_flow(h, &self.links[&h], true);
            self.send(ctx, Performative::Flow(flow), &[]);
        }
    }

    fn send_transfer(
        &mut self,
        h: u32,
        id: u32,
        tag: Vec<u8>,
        settled: bool,
        bytes: &[u8],
        ctx: &mut Ctx<'_>,
    ) {
        let mut rest = bytes;
        let mut first = true;
        loop {
            let mut t = Transfer {
                handle: Handle(h),
                delivery_id: first.then_some(id),
                delivery_tag: first.then(|| Binary::from(tag.clone())),
                message_format: first.then_some(0),
                settled: Some(settled),
                more: true,
                rcv_settle_mode: None,
                state: None,
                resume: false,
                aborted: false,
                batchable: false,
            };
            let overhead =
                super::super::codec::encode("transfer", &Performative::Transfer(t.clone()))
                    .map(|b| b.len() + 8)
                    .unwrap_or(64);
            let room = (ctx.remote_max_frame as usize)
                .saturating_sub(overhead)
                .max(64);
            let chunk = rest.len().min(room);
            t.more = chunk < rest.len();
            let more = t.more;
            self.send(ctx, Performative::Transfer(t), &rest[..chunk]);
            self.next_outgoing_id = self.next_outgoing_id.wrapping_add(1);
            self.remote_incoming_window = self.remote_incoming_window.saturating_sub(1);
            rest = &rest[chunk..];
            first = false;
            if !more {
                break;
            }
        }
    }

    fn retry_pending(&mut self, ctx: &mut Ctx<'_>) {
        if self.pending.is_empty() {
            return;
        }
        let now = Instant::now();
        for p in std::mem::take(&mut self.pending) {
            match ctx.shared.broker.lock_session(&p.entity, None, p.id) {
                Ok(Some((sid, until))) => {
                    let peek_lock = p.attach.snd_settle_mode != SenderSettleMode::Settled;
                    let kind = LinkKind::Outbound {
                        entity: p.entity,
                        session: Some(sid),
                        peek_lock,
                    };
                    self.complete_outbound(p.attach, p.id, kind, Some(until), ctx);
                }
                Ok(None) if now < p.deadline => self.pending.push(p),
                Ok(None) => {
                    let err = SbError::Timeout("no session became available in time".into());
                    self.refuse(p.attach, err, ctx);
                }
                Err(e) => self.refuse(p.attach, e, ctx),
            }
        }
    }
}

fn accept_message(entity: &EntityRef, done: &Partial, ctx: &Ctx<'_>) -> DeliveryState {
    let result = if done.too_large {
        Err(SbError::MessageTooLarge(format!(
            "the message is larger than {MAX_MESSAGE} bytes"
        )))
    } else {
        MessageParts::parse(&done.bytes)
            .and_then(|m| {
                if done.format == BATCH_FORMAT {
                    m.unpack_batch()
                } else {
                    Ok(vec![m])
                }
            })
            .map_err(|e| SbError::Argument(e.to_string()))
            .and_then(|msgs| ctx.shared.broker.enqueue(entity, msgs))
    };
    match result {
        Ok(_) => DeliveryState::Accepted(Accepted {}),
        Err(e) => {
            tracing::info!(entity = %entity.path(), error = %e, "Refused a message.");
            DeliveryState::Rejected(Rejected {
                error: Some(e.to_amqp()),
            })
        }
    }
}

fn handle_request(node: &NodeAddr, bytes: &[u8], ctx: &mut Ctx<'_>) {
    let req = match Request::parse(bytes) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(error = %e, "Ignored a malformed request.");
            return;
        }
    };
    let (node_name, encoded) = match node {
        NodeAddr::Cbs => {
            let (status, desc) = ctx.authz.put_token(
                &ctx.shared.broker,
                &ctx.shared.rules,
                ctx.shared.accept_jwt,
                &req,
                now_ms() / 1000,
            );
            (
                "$cbs".to_string(),
                response(&req.parts, Node::Cbs, status, &desc, None, None),
            )
        }
        NodeAddr::Management(entity) => {
            let r = management::handle(&ctx.shared.broker, entity, 0, &req);
            (
                format!("{}/$management", entity.path().to_ascii_lowercase()),
                response(
                    &req.parts,
                    Node::Management,
                    r.status,
                    &r.description,
                    r.condition,
                    r.body,
                ),
            )
        }
    };
    match encoded {
        Ok(bytes) => ctx.routed.push(Routed {
            reply_to: req.reply_to().map(str::to_string),
            node: node_name,
            bytes,
        }),
        Err(e) => tracing::error!(error = %e, "Could not encode a response; this is a bug."),
    }
}
