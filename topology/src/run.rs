//! The context of one run of Scores: a cancellation signal an Interpret may honour, and the deployment it runs for.
//!
//! Harmony's `Interpret::execute` takes no cancellation parameter, and we
//! keep its signature. The agent runs each Interpret inside [`RunSignal::scope`];
//! a long Interpret (an image pull, a wait for health) can check
//! [`is_cancelled`] or `select!` on [`cancelled`] and stop early. One that
//! ignores the signal is still stopped at the next Score boundary. An
//! Interpret that labels what it creates can ask [`deployment`] whose it is.

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

tokio::task_local! {
    static SIGNAL: RunSignal;
}

/// Tells the Interprets of one run that the run is no longer wanted (a newer
/// generation superseded it, or the agent is shutting down).
#[derive(Debug, Clone, Default)]
pub struct RunSignal {
    token: CancellationToken,
    deployment: Option<Arc<str>>,
}

impl RunSignal {
    /// A signal not yet raised, for a run of no particular deployment.
    pub fn new() -> Self {
        Self::default()
    }

    /// A signal not yet raised, for a run of `deployment`'s Scores.
    pub fn for_deployment(deployment: &str) -> Self {
        Self { deployment: Some(Arc::from(deployment)), ..Self::default() }
    }

    /// Raises the signal.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// Whether the signal was raised.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once the signal is raised.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    /// Runs `work` with this signal as the current run's signal.
    pub async fn scope<F: Future>(&self, work: F) -> F::Output {
        SIGNAL.scope(self.clone(), work).await
    }
}

/// Whether the current run was cancelled; `false` outside a run.
pub fn is_cancelled() -> bool {
    SIGNAL.try_with(RunSignal::is_cancelled).unwrap_or(false)
}

/// The deployment the current run applies or prunes; `None` outside a run
/// and in runs of no deployment (`harmony-agent apply`).
pub fn deployment() -> Option<Arc<str>> {
    SIGNAL.try_with(|signal| signal.deployment.clone()).ok().flatten()
}

/// Resolves when the current run is cancelled; never outside a run.
pub async fn cancelled() {
    match SIGNAL.try_with(Clone::clone) {
        Ok(signal) => signal.cancelled().await,
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn interprets_see_the_signal_of_their_run_only() {
        assert!(!is_cancelled());
        let signal = RunSignal::new();
        let seen = signal
            .scope(async {
                let before = is_cancelled();
                SIGNAL.with(RunSignal::cancel);
                cancelled().await;
                (before, is_cancelled())
            })
            .await;
        assert_eq!(seen, (false, true));
        assert!(signal.is_cancelled());
        assert!(!is_cancelled(), "outside the scope nothing is cancelled");
    }

    #[tokio::test]
    async fn interprets_see_the_deployment_of_their_run() {
        assert_eq!(deployment(), None);
        assert_eq!(RunSignal::new().scope(async { deployment() }).await, None);
        let seen = RunSignal::for_deployment("web").scope(async { deployment() }).await;
        assert_eq!(seen.as_deref(), Some("web"));
    }
}
