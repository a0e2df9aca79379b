//! Links between threads: each shard's inbox (a crossbeam channel), its waker, and the
//! accounting of its depth that lets client work be shed when an inbox is full.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

use super::msg::ShardMsg;

/// A shard's address book: how to reach it from any thread.
///
/// The inbox is an unbounded channel whose *depth* (estimated bytes, messages) is counted
/// here: every send adds the message's [`ShardMsg::cost`], the shard subtracts it on receipt.
/// [`Link::try_send`] refuses a message that would take the depth over a bound; [`Link::send`]
/// never refuses (state-keeping messages, answers to admitted requests, the application's
/// operations). No sender ever blocks, so shards sending to each other cannot deadlock.
#[derive(Debug)]
pub struct Link {
    tx: Sender<Parcel>,
    waker: Waker,
    sleeping: AtomicBool,
    depth: Arc<InboxDepth>,
}

/// A message in an inbox, with the cost it added to the depth.
#[derive(Debug)]
pub struct Parcel {
    msg: ShardMsg,
    cost: u64,
}

impl Link {
    /// A link to a shard whose poll owns `waker`, and the inbox that shard receives on.
    pub fn new(waker: Waker) -> (Link, Receiver<Parcel>) {
        let (tx, inbox) = crossbeam_channel::unbounded();
        (Link { tx, waker, sleeping: AtomicBool::new(false), depth: Arc::default() }, inbox)
    }

    /// Queues a message whatever the depth; the shard is woken by [`Link::wake`].
    pub fn send(&self, msg: impl Into<ShardMsg>) {
        let msg = msg.into();
        let cost = msg.cost() as u64;
        self.enqueue(Parcel { msg, cost });
    }

    /// Queues a message unless the inbox would then hold more than `max_bytes`; gives the
    /// message back when it does not fit. (Check and add are not one atomic step: senders
    /// racing on the same inbox may overshoot the bound by one message each.)
    pub fn try_send(&self, msg: ShardMsg, max_bytes: u64) -> Result<(), ShardMsg> {
        let cost = msg.cost() as u64;
        if self.depth.bytes.load(Ordering::Relaxed).saturating_add(cost) > max_bytes {
            return Err(msg);
        }
        self.enqueue(Parcel { msg, cost });
        Ok(())
    }

    fn enqueue(&self, parcel: Parcel) {
        self.depth.bytes.fetch_add(parcel.cost, Ordering::Relaxed);
        self.depth.messages.fetch_add(1, Ordering::Relaxed);
        // A closed inbox means the shard has exited during shutdown; nothing to deliver to.
        if let Err(e) = self.tx.send(parcel) {
            self.received(&e.0);
        }
    }

    /// The shard took `parcel` out of its inbox: its cost leaves the depth.
    pub fn unpack(&self, parcel: Parcel) -> ShardMsg {
        self.received(&parcel);
        parcel.msg
    }

    /// The shard took `parcel` out of its inbox.
    fn received(&self, parcel: &Parcel) {
        self.depth.bytes.fetch_sub(parcel.cost, Ordering::Relaxed);
        self.depth.messages.fetch_sub(1, Ordering::Relaxed);
    }

    /// Estimated bytes queued in the inbox now.
    pub fn depth_bytes(&self) -> u64 {
        self.depth.bytes.load(Ordering::Relaxed)
    }

    /// Wakes the shard if it is (about to be) blocked in `epoll_wait`.
    pub fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
    }

    /// The shard is about to block in `epoll_wait` (`true`), or is awake (`false`).
    pub fn set_sleeping(&self, sleeping: bool) {
        self.sleeping.store(sleeping, Ordering::SeqCst);
    }

    /// The inbox's depth counters, for the metrics.
    pub fn depth(&self) -> &Arc<InboxDepth> {
        &self.depth
    }

    /// Sends and wakes.
    pub fn send_now(&self, msg: impl Into<ShardMsg>) {
        self.send(msg);
        self.wake();
    }
}

/// What a shed message was, for `customws_inbox_shed_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedKind {
    /// `data_request` to a user (P2P) or a targeted presence event.
    Deliver,
    /// `data_request` broadcast, or presence with `presence_scope = "all"`.
    Broadcast,
    /// A room publish, or a join/left event to a room.
    Room,
    /// A presence update to its home shard, or its fan-out to watchers and rooms.
    Presence,
    /// `presence_subscribe` / `presence_unsubscribe` to the watcher's home shard.
    Watch,
    /// `room_presence` gathering members and their presences.
    Roster,
}

impl ShedKind {
    /// Every kind, in label order.
    pub const ALL: [ShedKind; 6] = [
        ShedKind::Deliver,
        ShedKind::Broadcast,
        ShedKind::Room,
        ShedKind::Presence,
        ShedKind::Watch,
        ShedKind::Roster,
    ];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            ShedKind::Deliver => "deliver",
            ShedKind::Broadcast => "broadcast",
            ShedKind::Room => "room",
            ShedKind::Presence => "presence",
            ShedKind::Watch => "watch",
            ShedKind::Roster => "roster",
        }
    }
}

/// What one shard's inbox holds now: written by every sender (add) and the shard (subtract).
#[derive(Debug, Default)]
pub struct InboxDepth {
    /// Estimated bytes held by queued messages.
    pub bytes: AtomicU64,
    /// Queued messages.
    pub messages: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mio::{Poll, Token};

    use crate::core::ConnKey;
    use crate::route::msg::{DeliverMsg, DirMsg, PresenceMsg, RoomMsg};

    fn link() -> (Link, Receiver<Parcel>, Poll) {
        let poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), Token(0)).unwrap();
        let (link, rx) = Link::new(waker);
        (link, rx, poll)
    }

    fn deliver(len: usize) -> ShardMsg {
        DeliverMsg::Deliver { users: vec![1], frame: Bytes::from(vec![b'x'; len]) }.into()
    }

    #[test]
    fn the_depth_counts_bytes_in_and_out_and_try_send_refuses_over_the_bound() {
        let (link, rx, _poll) = link();
        let cost = deliver(1000).cost() as u64;
        assert!(cost >= 1008, "a message costs at least what it carries: {cost}");
        assert!(link.try_send(deliver(1000), 2 * cost).is_ok());
        assert!(link.try_send(deliver(1000), 2 * cost).is_ok());
        assert!(link.try_send(deliver(1000), 2 * cost).is_err(), "a third one is over the bound");
        link.send(DirMsg::Replica { user: 1, shard: 0, present: true }); // never refused
        assert_eq!(link.depth.messages.load(Ordering::Relaxed), 3);
        while let Ok(parcel) = rx.try_recv() {
            link.received(&parcel);
        }
        assert_eq!((link.depth_bytes(), link.depth.messages.load(Ordering::Relaxed)), (0, 0));
    }

    #[test]
    fn only_client_work_may_be_shed() {
        assert_eq!(deliver(1).shed_kind(), Some(ShedKind::Deliver));
        let states: [ShardMsg; 6] = [
            DirMsg::Replica { user: 1, shard: 0, present: false }.into(),
            DirMsg::HomeClosed { user: 1, seq: 1 }.into(),
            RoomMsg::RoomCount { room: Arc::from("r"), shard: 0, count: 0 }.into(),
            PresenceMsg::Unwatch { watcher: 1, targets: vec![2] }.into(),
            RoomMsg::RosterPart { roster: 0, users: vec![] }.into(),
            DeliverMsg::DeliverFrames { key: ConnKey { index: 0, generation: 0 }, frames: vec![] }.into(),
        ];
        for state in states {
            assert_eq!(state.shed_kind(), None, "{state:?} must never be shed");
        }
    }
}
