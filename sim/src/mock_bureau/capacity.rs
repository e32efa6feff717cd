//! The capacity model: worker slots whose number changes live, and the bounded, timed queue in
//! front of them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use super::MockBureau;

/// Why a call got no worker.
#[derive(Debug, Clone, Copy)]
pub(super) enum Overload {
    QueueFull,
    QueueTimeout,
}

impl Overload {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Overload::QueueFull => "queue full",
            Overload::QueueTimeout => "queue timeout",
        }
    }
}

impl MockBureau {
    /// Waits for a worker (queue bounded unless [`UNBOUNDED`](super::UNBOUNDED), wait bounded by
    /// `queue_timeout`), then holds it for one service time.
    pub(super) async fn work(&self) -> Result<(), Overload> {
        let worker = match self.workers.try_acquire() {
            Some(w) => w,
            None => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.cfg.queue {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(Overload::QueueFull);
                }
                let waited = tokio::time::timeout(self.cfg.queue_timeout, self.workers.acquire()).await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                match waited {
                    Ok(Some(w)) => w,
                    _ => return Err(Overload::QueueTimeout),
                }
            }
        };
        let base = self.service_us.load(Ordering::Relaxed);
        let jitter = self.cfg.jitter.as_micros() as u64;
        let us = if jitter == 0 { base } else { (base + fastrand::u64(0..=2 * jitter)).saturating_sub(jitter) };
        if us > 0 {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
        drop(worker);
        Ok(())
    }
}

/// Worker slots whose number changes live without interrupting a call: more adds permits at
/// once; fewer forgets the free ones now and the rest as busy workers finish (`debt`).
pub(super) struct Workers {
    slots: Semaphore,
    /// The number of workers asked for; the lock also keeps two resizes from interleaving.
    target: Mutex<usize>,
    /// Permits still to forget as workers finish.
    debt: AtomicUsize,
    /// Workers busy now.
    pub(super) busy: AtomicI64,
}

impl Workers {
    pub(super) fn new(n: usize) -> Workers {
        Workers { slots: Semaphore::new(n), target: Mutex::new(n), debt: AtomicUsize::new(0), busy: AtomicI64::new(0) }
    }

    pub(super) fn target(&self) -> usize {
        *self.target.lock().expect("workers lock not poisoned")
    }

    pub(super) fn resize(&self, n: usize) {
        let mut target = self.target.lock().expect("workers lock not poisoned");
        if n >= *target {
            let mut add = n - *target;
            // Workers not yet retired first: they are still busy, so they count as new ones.
            let owed = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| Some(d - d.min(add)))
                .expect("the update always returns Some");
            add -= owed.min(add);
            self.slots.add_permits(add);
        } else {
            let cut = *target - n;
            let forgotten = self.slots.forget_permits(cut);
            self.debt.fetch_add(cut - forgotten, Ordering::AcqRel);
        }
        *target = n;
    }

    fn try_acquire(&self) -> Option<Worker<'_>> {
        self.slots.try_acquire().ok().map(|permit| Worker::busy(self, permit))
    }

    /// `None` only if the semaphore were closed, which it never is.
    async fn acquire(&self) -> Option<Worker<'_>> {
        self.slots.acquire().await.ok().map(|permit| Worker::busy(self, permit))
    }
}

/// One busy worker; dropping it frees the worker, or retires it if the bureau has shrunk.
struct Worker<'a> {
    permit: Option<SemaphorePermit<'a>>,
    workers: &'a Workers,
}

impl<'a> Worker<'a> {
    fn busy(workers: &'a Workers, permit: SemaphorePermit<'a>) -> Worker<'a> {
        workers.busy.fetch_add(1, Ordering::AcqRel);
        Worker { permit: Some(permit), workers }
    }
}

impl Drop for Worker<'_> {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else { return };
        self.workers.busy.fetch_sub(1, Ordering::AcqRel);
        let retire = self.workers.debt.fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1)).is_ok();
        if retire {
            permit.forget();
        }
    }
}
