//! Memory held by stream requests: a process-wide budget of request bytes, across every
//! stream and connection (gRPC and HTTP's NDJSON streams alike).
//!
//! A stream reads ahead of the engine (up to 32 requests each), and a request is decoded
//! before the engine's token pools can admit it. Without a bound, a few streams of requests
//! at the size limits held gigabytes while they waited for queue room (issue #30: 4 streams
//! of 32 took a server to 1.4 GiB). Here a decoded request holds its size in bytes from
//! [`PendingBytes`] until it is answered. When there is none left, the stream stops reading
//! (back-pressure: the rest wait in the client, behind HTTP/2 flow control) and its one
//! decoded request is *parked* until room comes back, counted in a second pool of the same
//! size; with that full too, the request is answered RESOURCE_EXHAUSTED at once and dropped,
//! and its stream reads nothing more until a request of that size could be parked. So the
//! server never holds more than twice the budget of decoded stream requests, and a client
//! sending faster than the server answers is held back rather than refused in a loop.

use std::sync::Arc;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// The two pools of request bytes; cheap to clone.
#[derive(Debug, Clone)]
pub struct PendingBytes {
    held: Arc<Semaphore>,
    parked: Arc<Semaphore>,
    limit: usize,
}

/// What a decoded request gets.
#[derive(Debug)]
pub enum Hold {
    /// Room: it may go on to the engine, holding this until it is answered.
    Room(OwnedSemaphorePermit),
    /// No room now: it waits (its stream reads nothing more meanwhile), holding this.
    Parked(OwnedSemaphorePermit),
    /// Neither: answer RESOURCE_EXHAUSTED.
    Refused,
}

impl PendingBytes {
    /// Pools of `limit` bytes each (at least 1).
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            held: Arc::new(Semaphore::new(limit)),
            parked: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// The budget, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes of one pool a request of `bytes` takes: all of it, at most (a request larger
    /// than the budget waits for the whole pool instead of never running).
    fn permits(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.clamp(1, self.limit)).unwrap_or(u32::MAX)
    }

    /// Room for a decoded request of `bytes`, without waiting.
    pub fn try_hold(&self, bytes: usize) -> Hold {
        let n = self.permits(bytes);
        let hold = if let Ok(p) = self.held.clone().try_acquire_many_owned(n) {
            Hold::Room(p)
        } else if let Ok(p) = self.parked.clone().try_acquire_many_owned(n) {
            Hold::Parked(p)
        } else {
            metrics::counter!("tidings_stream_requests_refused_total").increment(1);
            Hold::Refused
        };
        self.publish();
        hold
    }

    /// Room for a parked request of `bytes`, once there is some (first come, first served).
    pub async fn hold(self, bytes: usize) -> Result<OwnedSemaphorePermit, AcquireError> {
        let n = self.permits(bytes);
        let permit = self.held.clone().acquire_many_owned(n).await;
        self.publish();
        permit
    }

    /// Resolves once `bytes` could be parked (the room is not kept): a stream whose request
    /// was refused reads its next one only then, instead of decoding and refusing requests
    /// as fast as its client sends them.
    pub async fn parking_room(self, bytes: usize) {
        let n = self.permits(bytes);
        let _ = self.parked.acquire_many_owned(n).await;
    }

    /// Bytes held and parked now.
    pub fn in_use(&self) -> (usize, usize) {
        (
            self.limit - self.held.available_permits(),
            self.limit - self.parked.available_permits(),
        )
    }

    /// Sets the `tidings_stream_pending_bytes` gauges.
    fn publish(&self) {
        let (held, parked) = self.in_use();
        metrics::gauge!("tidings_stream_pending_bytes", "state" => "held").set(held as f64);
        metrics::gauge!("tidings_stream_pending_bytes", "state" => "parked").set(parked as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_hold_then_park_then_are_refused() {
        let p = PendingBytes::new(100);
        let Hold::Room(a) = p.try_hold(60) else {
            panic!("room")
        };
        let Hold::Parked(parked) = p.try_hold(60) else {
            panic!("parked")
        };
        assert!(matches!(p.try_hold(60), Hold::Refused));
        assert_eq!(p.in_use(), (60, 60));
        // The parked one gets room when the first is answered.
        let waiting = tokio::spawn(p.clone().hold(60));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(a);
        let b = waiting.await.unwrap().unwrap();
        drop(parked);
        assert_eq!(p.in_use(), (60, 0));
        // Larger than the budget: takes all of it.
        drop(b);
        let Hold::Room(all) = p.try_hold(1 << 30) else {
            panic!("room")
        };
        assert_eq!(p.in_use(), (100, 0));
        drop(all);
    }
}
