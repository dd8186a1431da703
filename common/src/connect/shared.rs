//! One source call shared by the tasks of a process that need the same answer at about the
//! same time.
//!
//! A pipeline's tasks start together, and so list their source together: four Kinesis tasks on
//! two leaves made five ListShards calls at START (one to plan, one per task) and four more at
//! every periodic refresh. Every call costs the source the same, and AWS limits ListShards per
//! stream. With [`SharedCalls`], a task that may use a recent answer joins a call another task
//! of the process started within the window, or is still waiting on, instead of making its own.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

struct Call<V> {
    started: Instant,
    answer: tokio::sync::OnceCell<V>,
}

type SharedCall<T, E> = Arc<Call<Result<T, E>>>;

/// Calls keyed by what they ask (e.g. the stream, its endpoint and credentials), each shared
/// for `window` after it started. Failed answers are shared only with callers that were
/// already waiting: a later caller asks again.
pub struct SharedCalls<K, T, E> {
    window: Duration,
    calls: Mutex<HashMap<K, SharedCall<T, E>>>,
}

impl<K: Eq + Hash, T: Clone, E: Clone> SharedCalls<K, T, E> {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// The answer to `key`, and when the call that gave it started. With `fresh`, a call
    /// started now (which later callers within the window may share); without, the answer of
    /// a call started within the window, or of a new call if there is none.
    pub async fn get<F, Fut>(&self, key: K, fresh: bool, call: F) -> (Instant, Result<T, E>)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let shared = {
            let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
            let window = self.window;
            calls.retain(|_, c| c.started.elapsed() <= window);
            let reusable = calls
                .get(&key)
                .filter(|c| !fresh && !c.answer.get().is_some_and(|a| a.is_err()))
                .cloned();
            reusable.unwrap_or_else(|| {
                let c = Arc::new(Call {
                    started: Instant::now(),
                    answer: tokio::sync::OnceCell::new(),
                });
                calls.insert(key, c.clone());
                c
            })
        };
        // If the caller running the call is cancelled, the next waiter runs its own.
        let answer = shared.answer.get_or_init(call).await.clone();
        (shared.started, answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn counted(
        calls: &AtomicUsize,
        delay: Duration,
        answer: Result<u32, String>,
    ) -> Result<u32, String> {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        answer
    }

    #[tokio::test]
    async fn callers_at_the_same_time_share_one_call() {
        let shared = SharedCalls::new(Duration::from_secs(1));
        let n = AtomicUsize::new(0);
        let slow = Duration::from_millis(50);
        let (a, b, c) = tokio::join!(
            shared.get("s", false, || counted(&n, slow, Ok(1))),
            shared.get("s", false, || counted(&n, slow, Ok(2))),
            shared.get("other", false, || counted(&n, slow, Ok(3))),
        );
        assert_eq!((a.1, b.1, c.1), (Ok(1), Ok(1), Ok(3)));
        assert_eq!(a.0, b.0);
        assert_eq!(n.load(Ordering::SeqCst), 2, "one call per key");
        // Within the window, a later caller reuses the answer; a fresh one asks again.
        assert_eq!(
            shared.get("s", false, || counted(&n, slow, Ok(4))).await.1,
            Ok(1)
        );
        assert_eq!(
            shared.get("s", true, || counted(&n, slow, Ok(5))).await.1,
            Ok(5)
        );
        assert_eq!(n.load(Ordering::SeqCst), 3);
        // ... and the fresh answer is the one shared from then on.
        assert_eq!(
            shared.get("s", false, || counted(&n, slow, Ok(6))).await.1,
            Ok(5)
        );
    }

    #[tokio::test]
    async fn answers_expire_after_the_window() {
        let shared = SharedCalls::new(Duration::from_millis(30));
        let n = AtomicUsize::new(0);
        let (first, _) = shared
            .get("s", false, || counted(&n, Duration::ZERO, Ok(1)))
            .await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        let (second, answer) = shared
            .get("s", false, || counted(&n, Duration::ZERO, Ok(2)))
            .await;
        assert_eq!(answer, Ok(2));
        assert!(second > first);
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failure_is_not_reused_by_later_callers() {
        let shared = SharedCalls::new(Duration::from_secs(1));
        let n = AtomicUsize::new(0);
        let failed = shared.get("s", false, || {
            counted(&n, Duration::ZERO, Err("down".into()))
        });
        assert_eq!(failed.await.1, Err("down".to_string()));
        let retried = shared.get("s", false, || counted(&n, Duration::ZERO, Ok(7)));
        assert_eq!(retried.await.1, Ok(7));
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_cancelled_caller_leaves_the_call_to_the_next() {
        let shared = SharedCalls::new(Duration::from_secs(1));
        let n = AtomicUsize::new(0);
        // Far longer than the timeout, so that even a stalled test thread sees the timeout first.
        let slow = Duration::from_secs(30);
        // The first caller gives up while its call runs; the second runs its own.
        let first = tokio::time::timeout(
            Duration::from_millis(20),
            shared.get("s", false, || counted(&n, slow, Ok(1))),
        );
        assert!(first.await.is_err());
        let second = shared.get("s", false, || counted(&n, Duration::ZERO, Ok(2)));
        assert_eq!(second.await.1, Ok(2));
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }
}
