//! The process-wide Stripe request budget: every attempt of every call (retries included)
//! takes a permit, at most `rate` a second, and when permits are short the calls a person is
//! waiting for (`Interactive`) are served before background work (`Background`).
//!
//! Stripe's rate limit belongs to the whole account, so without this a loop of one signed-in
//! user, a reconciliation or a webhook burst could take it all. The class of a call comes from
//! a task-local set by the HTTP layer around the user and admin routers, so the many call sites
//! between a handler and the send path need no extra argument; a task spawned from a request
//! starts as `Background` unless it is wrapped in [`with_priority`] (a spawned task is not the
//! request's: tokio does not carry task-locals into it).
//!
//! No task of its own: the waiter at the head of the line (interactive first, then background,
//! each first come first served) sleeps until the next permit is due; the others sleep until
//! someone ahead of them leaves and wakes the new head, so a permit wakes one or two tasks,
//! never the whole line. A waiter that gives up or is cancelled leaves the line on drop.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

/// Who waits for a Stripe call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A person waits for the answer: the user and admin routes.
    Interactive,
    /// Nobody waits on it now: outbox pushes, the webhook applier's re-fetches, reconciliation,
    /// the erasure worker.
    Background,
}

impl Priority {
    pub fn label(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Background => "background",
        }
    }

    fn line(self) -> usize {
        match self {
            Self::Interactive => 0,
            Self::Background => 1,
        }
    }
}

tokio::task_local! {
    static PRIORITY: Priority;
}

/// The class of the Stripe calls the current task makes: `Background` unless it runs inside
/// [`with_priority`].
pub fn current_priority() -> Priority {
    PRIORITY.try_with(|p| *p).unwrap_or(Priority::Background)
}

/// Runs `work` with its Stripe calls in `priority`'s class.
pub async fn with_priority<F: Future>(priority: Priority, work: F) -> F::Output {
    PRIORITY.scope(priority, work).await
}

/// No permit within the caller's bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted;

pub struct Budget {
    period: Duration,
    state: Mutex<State>,
}

struct State {
    /// When the next permit may be granted. Permits are spaced by `period`, so in any window
    /// of one second at most `rate` are granted; an idle budget grants at once.
    next: Instant,
    /// Interactive waiters, then background ones, each in arrival order.
    lines: [VecDeque<Waiter>; 2],
    last_id: u64,
}

struct Waiter {
    id: u64,
    wake: Arc<Notify>,
}

impl State {
    fn head(&self) -> Option<&Waiter> {
        self.lines[0].front().or_else(|| self.lines[1].front())
    }

    fn wake_head(&self) {
        if let Some(head) = self.head() {
            head.wake.notify_one();
        }
    }

    fn waiting(&self) -> usize {
        self.lines[0].len() + self.lines[1].len()
    }
}

/// A place in line; leaving it (granted, given up or cancelled) wakes whoever is head next.
struct Place<'b> {
    budget: &'b Budget,
    priority: Priority,
    id: u64,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut state = self.budget.lock();
        let line = &mut state.lines[self.priority.line()];
        if let Some(at) = line.iter().position(|w| w.id == self.id) {
            line.remove(at);
        }
        state.wake_head();
        drop(state);
        metrics::gauge!("billsync_stripe_budget_waiting", "priority" => self.priority.label())
            .decrement(1.0);
    }
}

impl Budget {
    /// `rate` permits a second (at least one).
    pub fn per_second(rate: u32) -> Self {
        Self {
            period: Duration::from_secs(1) / rate.max(1),
            state: Mutex::new(State {
                next: Instant::now(),
                lines: [VecDeque::new(), VecDeque::new()],
                last_id: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while the lock is held; a poisoned lock still holds a consistent line.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Calls waiting for a permit now.
    pub fn waiting(&self) -> usize {
        self.lock().waiting()
    }

    /// Waits for a permit, at most `bound`; how long it waited.
    pub async fn acquire(
        &self,
        priority: Priority,
        bound: Duration,
    ) -> Result<Duration, Exhausted> {
        let started = Instant::now();
        let deadline = started + bound;
        let wake = Arc::new(Notify::new());
        let id = {
            let mut state = self.lock();
            state.last_id += 1;
            let id = state.last_id;
            state.lines[priority.line()].push_back(Waiter {
                id,
                wake: wake.clone(),
            });
            id
        };
        metrics::gauge!("billsync_stripe_budget_waiting", "priority" => priority.label())
            .increment(1.0);
        let _place = Place {
            budget: self,
            priority,
            id,
        };
        loop {
            let wake_at = {
                let mut state = self.lock();
                let now = Instant::now();
                let is_head = state.head().is_some_and(|w| w.id == id);
                if is_head && state.next <= now {
                    state.next = now + self.period;
                    drop(state); // `_place` leaves the line and wakes the next head
                    let waited = now - started;
                    metrics::histogram!("billsync_stripe_budget_wait_seconds",
                        "priority" => priority.label())
                    .record(waited.as_secs_f64());
                    return Ok(waited);
                }
                if now >= deadline {
                    return Err(Exhausted);
                }
                // The head sleeps until its permit is due; the others until someone ahead
                // leaves (or their bound runs out).
                if is_head {
                    state.next.min(deadline)
                } else {
                    deadline
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(wake_at) => {}
                () = wake.notified() => {}
            }
        }
    }
}

/// The test builds here have no paused clock (tokio's `test-util` would rebuild the whole
/// dependency tree for tests), so these use short real durations and assert order and counts,
/// never how long something took.
#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn an_idle_budget_grants_at_once_and_then_paces() {
        let budget = Budget::per_second(20);
        let started = Instant::now();
        let mut grants = Vec::new();
        for _ in 0..6 {
            budget
                .acquire(Priority::Background, Duration::from_secs(5))
                .await
                .unwrap();
            grants.push(Instant::now() - started);
        }
        // Permits are at least a period (50 ms) apart: never more than the rate in a second.
        for pair in grants.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(49), "{grants:?}");
        }
        assert_eq!(budget.waiting(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_interactive_calls_go_before_queued_background_ones() {
        let budget = Arc::new(Budget::per_second(4));
        let order = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut tasks = Vec::new();
        let mut queued = 0;
        for (priority, name) in [
            (Priority::Background, "b0"),
            (Priority::Background, "b1"),
            (Priority::Background, "b2"),
            (Priority::Background, "b3"),
            (Priority::Interactive, "i0"),
            (Priority::Interactive, "i1"),
        ] {
            let (budget_, order_) = (budget.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                budget_
                    .acquire(priority, Duration::from_secs(30))
                    .await
                    .unwrap();
                order_.lock().unwrap().push(name.to_owned());
            }));
            // One at a time, so each is in line (or served) before the next arrives.
            queued += 1;
            while budget.waiting() + order.lock().unwrap().len() < queued {
                tokio::task::yield_now().await;
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        // b0 had the idle budget's permit at once; the interactive calls, arriving later,
        // overtake every background call still in line (b1 at most had its permit by then).
        let first_interactive = order.iter().position(|n| n == "i0").unwrap();
        assert!(first_interactive <= 2, "{order:?}");
        assert_eq!(order[first_interactive + 1], "i1", "{order:?}");
        let background: Vec<_> = order.iter().filter(|n| n.starts_with('b')).collect();
        assert_eq!(
            background,
            ["b0", "b1", "b2", "b3"],
            "first come, first served"
        );
        assert_eq!(order.last().unwrap(), "b3", "{order:?}");
    }

    #[tokio::test]
    async fn a_waiter_gives_up_after_its_bound_and_leaves_the_line() {
        let budget = Budget::per_second(1);
        budget
            .acquire(Priority::Background, Duration::from_secs(1))
            .await
            .unwrap();
        // The next permit is a second away; a 50 ms bound runs out first.
        let answer = budget
            .acquire(Priority::Interactive, Duration::from_millis(50))
            .await;
        assert_eq!(answer, Err(Exhausted));
        assert_eq!(budget.waiting(), 0);
        // A cancelled waiter leaves too, and the one behind it still gets its permit.
        let cancelled = tokio::time::timeout(
            Duration::from_millis(20),
            budget.acquire(Priority::Interactive, Duration::from_secs(10)),
        )
        .await;
        assert!(cancelled.is_err());
        assert_eq!(budget.waiting(), 0);
        budget
            .acquire(Priority::Background, Duration::from_secs(5))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn the_class_comes_from_the_task_and_defaults_to_background() {
        assert_eq!(current_priority(), Priority::Background);
        let inside = with_priority(Priority::Interactive, async { current_priority() }).await;
        assert_eq!(inside, Priority::Interactive);
        // A task spawned inside does not inherit it.
        let spawned = with_priority(Priority::Interactive, async {
            tokio::spawn(async { current_priority() }).await.unwrap()
        })
        .await;
        assert_eq!(spawned, Priority::Background);
    }
}
