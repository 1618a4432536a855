//! The hand-over between the replication reader and its consumer.
//!
//! The reader sends [`Event`]s on a bounded channel (so a slow consumer stops the reader,
//! and the back-pressure reaches PostgreSQL through TCP), and learns through [`Durable`]
//! which position the consumer has made durable. It never confirms anything beyond it.

use tokio::sync::{oneshot, watch};

use crate::model::{Lsn, Transaction};

/// What the reader hands to its consumer, in stream order.
#[derive(Debug)]
pub enum Event {
    /// The slot was just created with an exported snapshot: the consumer loads the
    /// initial state through it, makes that durable at `lsn`, and answers on `done`.
    /// No change is streamed before the answer (the snapshot dies when streaming starts).
    Snapshot(SnapshotRequest),
    /// A committed transaction.
    Commit(Transaction),
}

/// A request to load the initial state through an exported snapshot.
#[derive(Debug)]
pub struct SnapshotRequest {
    /// Snapshot name, for `SET TRANSACTION SNAPSHOT`.
    pub name: String,
    /// The slot's consistent point: the snapshot holds exactly what committed before it.
    pub lsn: Lsn,
    /// Answered once the loaded state is durable (or with why it could not be).
    pub done: oneshot::Sender<Result<(), String>>,
}

/// The consumer's side of acknowledgement: reports the end LSN of the last transaction
/// whose effects are durable. Positions only move forward.
#[derive(Debug, Clone)]
pub struct Durable(pub(crate) watch::Sender<Option<Lsn>>);

impl Durable {
    /// A new pair; the reader keeps the receiver.
    pub fn new(initial: Option<Lsn>) -> (Durable, watch::Receiver<Option<Lsn>>) {
        let (tx, rx) = watch::channel(initial);
        (Durable(tx), rx)
    }

    /// Everything up to `lsn` is durable. A lower position than one already reported is
    /// ignored: the flush position never goes backwards.
    pub fn report(&self, lsn: Lsn) {
        self.0.send_if_modified(|cur| {
            if cur.is_none_or(|c| lsn > c) {
                *cur = Some(lsn);
                true
            } else {
                false
            }
        });
    }

    /// The durable position so far.
    pub fn get(&self) -> Option<Lsn> {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_never_goes_backwards() {
        let (d, rx) = Durable::new(None);
        d.report(Lsn(10));
        d.report(Lsn(5));
        assert_eq!(*rx.borrow(), Some(Lsn(10)));
        d.report(Lsn(11));
        assert_eq!(d.get(), Some(Lsn(11)));
    }
}
