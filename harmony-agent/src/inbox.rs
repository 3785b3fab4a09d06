//! The mailbox between a source and the controller: never blocks the sender, keeps only the newest input per deployment.
//!
//! A bounded channel made the NATS follower wait in `send` while a long
//! Score ran, freezing commands and reconnect handling; an unbounded one
//! would grow with every write to a busy key. Here a sender replaces the
//! queued input of the same deployment (the controller only ever wants the
//! newest value of a key), so the queue holds at most one input per
//! deployment plus the pending commands.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use harmony_score_wire::DeploymentName;
use tokio::sync::{oneshot, Notify};

use crate::store::DocumentFormat;

/// What a source tells the controller about one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The current value of a deployment's key.
    Document { deployment: DeploymentName, bytes: Vec<u8>, format: DocumentFormat },
    /// The deployment's key is gone.
    Deleted { deployment: DeploymentName },
}

impl Input {
    /// The deployment the input is about.
    pub fn deployment(&self) -> &DeploymentName {
        match self {
            Input::Document { deployment, .. } | Input::Deleted { deployment } => deployment,
        }
    }
}

/// A request to the controller that wants an answer.
#[derive(Debug)]
pub enum Command {
    /// Run every deployment again now; the reply says what was scheduled.
    ReconcileNow { reply: oneshot::Sender<String> },
}

/// What the controller takes out of the inbox.
#[derive(Debug)]
pub enum Item {
    /// The newest input of one deployment.
    Input(Input),
    /// A command.
    Command(Command),
    /// The fleet's key set, as read from its key.
    KeySet(Vec<u8>),
}

#[derive(Debug, Default)]
struct Queue {
    inputs: HashMap<DeploymentName, Input>,
    /// Deployments with a queued input, oldest first (each once).
    order: VecDeque<DeploymentName>,
    commands: VecDeque<Command>,
    /// The newest key set read, taken before any document so documents
    /// queued with it are judged under it.
    keyset: Option<Vec<u8>>,
    closed: bool,
    /// Inputs replaced before the controller took them, for tests and logs.
    coalesced: u64,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; a poisoned lock still holds a whole queue.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending half, cheap to clone.
#[derive(Debug, Clone)]
pub struct InboxSender(Arc<Shared>);

/// The receiving half, owned by the controller.
#[derive(Debug)]
pub struct InboxReceiver(Arc<Shared>);

/// A new, empty inbox.
pub fn inbox() -> (InboxSender, InboxReceiver) {
    let shared = Arc::new(Shared::default());
    (InboxSender(shared.clone()), InboxReceiver(shared))
}

impl InboxSender {
    /// Queues `input`, replacing a queued input of the same deployment.
    /// Returns `false` when the controller is gone.
    pub fn send(&self, input: Input) -> bool {
        let mut queue = self.0.lock();
        if queue.closed {
            return false;
        }
        let name = input.deployment().clone();
        if queue.inputs.insert(name.clone(), input).is_some() {
            queue.coalesced += 1;
        } else {
            queue.order.push_back(name);
        }
        drop(queue);
        self.0.ready.notify_one();
        true
    }

    /// Queues the fleet's key set as read, replacing one still queued.
    /// Returns `false` when the controller is gone.
    pub fn keyset(&self, bytes: Vec<u8>) -> bool {
        let mut queue = self.0.lock();
        if queue.closed {
            return false;
        }
        if queue.keyset.replace(bytes).is_some() {
            queue.coalesced += 1;
        }
        drop(queue);
        self.0.ready.notify_one();
        true
    }

    /// Queues a command. Returns `false` when the controller is gone.
    pub fn command(&self, command: Command) -> bool {
        let mut queue = self.0.lock();
        if queue.closed {
            return false;
        }
        queue.commands.push_back(command);
        drop(queue);
        self.0.ready.notify_one();
        true
    }
}

impl InboxReceiver {
    /// The next item: commands first, then a key set, then inputs in the
    /// order their deployments were first queued. Waits while the inbox is empty.
    pub async fn recv(&mut self) -> Item {
        loop {
            // Register interest before looking, so a send in between is not missed.
            let notified = self.0.ready.notified();
            if let Some(item) = self.try_recv() {
                return item;
            }
            notified.await;
        }
    }

    /// The next item, if one is queued.
    pub fn try_recv(&self) -> Option<Item> {
        let mut queue = self.0.lock();
        if let Some(command) = queue.commands.pop_front() {
            return Some(Item::Command(command));
        }
        if let Some(bytes) = queue.keyset.take() {
            return Some(Item::KeySet(bytes));
        }
        let name = queue.order.pop_front()?;
        queue.inputs.remove(&name).map(Item::Input)
    }

    /// How many inputs were replaced by newer ones before being taken.
    pub fn coalesced(&self) -> u64 {
        self.0.lock().coalesced
    }
}

impl Drop for InboxReceiver {
    fn drop(&mut self) {
        self.0.lock().closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, byte: u8) -> Input {
        Input::Document {
            deployment: DeploymentName::new(name).unwrap(),
            bytes: vec![byte],
            format: DocumentFormat::Cbor,
        }
    }

    #[test]
    fn the_newest_input_per_deployment_wins_and_order_is_kept() {
        let (tx, rx) = inbox();
        for i in 0..1000u32 {
            assert!(tx.send(doc("a", (i % 256) as u8)));
        }
        tx.send(doc("b", 1));
        tx.send(Input::Deleted { deployment: DeploymentName::new("a").unwrap() });
        let (reply, _) = oneshot::channel();
        tx.command(Command::ReconcileNow { reply });
        assert!(matches!(rx.try_recv(), Some(Item::Command(_))));
        assert!(matches!(rx.try_recv(), Some(Item::Input(Input::Deleted { .. }))));
        assert_eq!(rx.try_recv().map(|i| matches!(i, Item::Input(i) if i == doc("b", 1))), Some(true));
        assert!(rx.try_recv().is_none());
        assert_eq!(rx.coalesced(), 1000);
        drop(rx);
        assert!(!tx.send(doc("a", 0)), "a closed inbox refuses");
    }

    #[tokio::test]
    async fn recv_wakes_on_a_send_from_another_task() {
        let (tx, mut rx) = inbox();
        let sender = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.send(doc("a", 7));
        });
        let item = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await.unwrap();
        assert!(matches!(item, Item::Input(i) if i == doc("a", 7)));
        sender.await.unwrap();
    }
}
