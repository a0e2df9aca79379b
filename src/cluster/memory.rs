//! An in-process broker for unit tests: a [`Hub`] plays the broker server, each
//! [`MemoryBroker`] one node's connection to it. Delivery is synchronous and in order; the hub
//! can be taken down and brought back to exercise the state events.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use crossbeam_channel::Sender;

use super::broker::{Broker, BrokerError, BrokerStats, Event, Shared};

#[derive(Debug, Default)]
struct HubState {
    up: bool,
    next_id: u64,
    clients: HashMap<u64, (Arc<Shared>, HashSet<String>)>,
}

/// The in-process broker server.
#[derive(Debug, Clone)]
pub struct Hub {
    state: Arc<Mutex<HubState>>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    /// A hub that is up.
    pub fn new() -> Hub {
        Hub { state: Arc::new(Mutex::new(HubState { up: true, ..HubState::default() })) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects a client whose events go to `events`.
    pub fn connect(&self, events: Sender<Event>) -> MemoryBroker {
        let shared = Shared::new(usize::MAX, events);
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        state.clients.insert(id, (shared.clone(), HashSet::new()));
        if state.up {
            shared.set_up(true, "");
            shared.emit(Event::Resubscribed(0));
        }
        MemoryBroker { hub: self.clone(), id, shared }
    }

    /// Stops (`false`) or restarts (`true`) the hub; clients get `Down`, or `Up` then
    /// `Resubscribed` with their subscriptions kept (as the engines resubscribe by themselves).
    pub fn set_up(&self, up: bool) {
        let mut state = self.lock();
        state.up = up;
        for (shared, subjects) in state.clients.values() {
            shared.set_up(up, "hub stopped");
            if up {
                shared.emit(Event::Resubscribed(subjects.len()));
            }
        }
    }

    fn publish(&self, subject: &str, payload: &Bytes) -> Result<u32, BrokerError> {
        let state = self.lock();
        if !state.up {
            return Err(BrokerError::Down);
        }
        let mut n = 0;
        for (shared, subjects) in state.clients.values() {
            if subjects.contains(subject) {
                n += 1;
                shared.emit(Event::Message { subject: subject.to_string(), payload: payload.clone() });
            }
        }
        Ok(n)
    }
}

/// One node's connection to a [`Hub`]; dropping it is a connection loss (subscriptions vanish).
#[derive(Debug)]
pub struct MemoryBroker {
    hub: Hub,
    id: u64,
    shared: Arc<Shared>,
}

impl Broker for MemoryBroker {
    fn publish(&self, subject: &str, payload: Bytes, token: Option<u64>) -> Result<(), BrokerError> {
        let n = self.hub.publish(subject, &payload)?;
        self.shared.count_published(1);
        if let Some(token) = token {
            self.shared.emit(Event::Receivers { token, n });
        }
        Ok(())
    }

    fn request(&self, subject: &str, payload: Bytes, token: u64) -> Result<(), BrokerError> {
        let n = self.hub.publish(subject, &payload)?;
        self.shared.count_published(1);
        self.shared.emit(Event::Receivers { token, n: n.min(1) });
        Ok(())
    }

    fn subscribe(&self, subjects: Vec<String>) {
        let mut state = self.hub.lock();
        let up = state.up;
        if let Some((shared, set)) = state.clients.get_mut(&self.id) {
            set.extend(subjects.iter().cloned());
            if up {
                shared.emit(Event::Subscribed(subjects));
            }
        }
    }

    fn unsubscribe(&self, subjects: Vec<String>) {
        let mut state = self.hub.lock();
        let up = state.up;
        if let Some((shared, set)) = state.clients.get_mut(&self.id) {
            for subject in &subjects {
                set.remove(subject);
            }
            if up {
                shared.emit(Event::Unsubscribed(subjects));
            }
        }
    }

    fn is_up(&self) -> bool {
        self.shared.is_up()
    }

    fn stats(&self) -> BrokerStats {
        self.shared.stats()
    }
}

impl Drop for MemoryBroker {
    fn drop(&mut self) {
        self.hub.lock().clients.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_counts_subscribed_clients_and_fails_fast_when_down() {
        let hub = Hub::new();
        let (tx_a, rx_a) = crossbeam_channel::unbounded();
        let (tx_b, rx_b) = crossbeam_channel::unbounded();
        let a = hub.connect(tx_a);
        let b = hub.connect(tx_b);
        b.subscribe(vec!["p.u.1".into()]);
        a.publish("p.u.1", Bytes::from_static(b"x"), Some(7)).unwrap();
        a.publish("p.u.2", Bytes::from_static(b"y"), Some(8)).unwrap();
        let a_events: Vec<Event> = rx_a.try_iter().collect();
        assert!(a_events.contains(&Event::Receivers { token: 7, n: 1 }));
        assert!(a_events.contains(&Event::Receivers { token: 8, n: 0 }));
        let got: Vec<Event> = rx_b.try_iter().filter(|e| matches!(e, Event::Message { .. })).collect();
        assert_eq!(got, [Event::Message { subject: "p.u.1".into(), payload: Bytes::from_static(b"x") }]);
        hub.set_up(false);
        assert_eq!(a.publish("p.u.1", Bytes::new(), None), Err(BrokerError::Down));
        assert!(!a.is_up());
        assert!(rx_a.try_iter().any(|e| matches!(e, Event::Down(_))));
        hub.set_up(true);
        assert_eq!(
            rx_b.try_iter().collect::<Vec<_>>(),
            [Event::Down("hub stopped".into()), Event::Up, Event::Resubscribed(1)]
        );
        drop(b);
        a.request("p.u.1", Bytes::new(), 9).unwrap();
        assert!(rx_a.try_iter().any(|e| e == Event::Receivers { token: 9, n: 0 }));
    }
}
