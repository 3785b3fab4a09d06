//! The `Maestro`: runs Scores' Interprets against one topology.

use std::sync::{Arc, RwLock};

use tracing::{debug, warn};

use crate::{log_text, InterpretError, Inventory, Outcome, PreparationError, Score, Topology};

/// Why the Maestro could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MaestroError {
    /// The topology's `ensure_ready` failed.
    #[error("topology not ready")]
    PreparationFailed(#[source] PreparationError),
}

/// Runs Scores against one prepared topology, as Harmony's Maestro does.
pub struct Maestro<T: Topology> {
    inventory: Inventory,
    topology: T,
    scores: Arc<RwLock<Vec<Box<dyn Score<T>>>>>,
}

impl<T: Topology> std::fmt::Debug for Maestro<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maestro").field("topology", &self.topology.name()).finish_non_exhaustive()
    }
}

impl<T: Topology> Maestro<T> {
    /// Prepares `topology` (its `ensure_ready`) and returns a Maestro for it.
    pub async fn initialize(inventory: Inventory, topology: T) -> Result<Self, MaestroError> {
        let prepared = topology.ensure_ready().await.map_err(MaestroError::PreparationFailed)?;
        debug!(topology = topology.name(), ?prepared, "topology ready");
        Ok(Self { inventory, topology, scores: Arc::new(RwLock::new(Vec::new())) })
    }

    /// The topology Scores run against.
    pub fn topology(&self) -> &T {
        &self.topology
    }

    /// The inventory Scores run with.
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// Adds Scores to the list [`Maestro::interpret_all`] runs.
    pub fn register_all(&self, scores: Vec<Box<dyn Score<T>>>) {
        // A poisoned lock only means another thread panicked while pushing;
        // the Vec itself is still whole.
        let mut list = self.scores.write().unwrap_or_else(|p| p.into_inner());
        list.extend(scores);
    }

    /// Names of the registered Scores, in order.
    pub fn list_scores(&self) -> Vec<String> {
        let list = self.scores.read().unwrap_or_else(|p| p.into_inner());
        list.iter().map(|s| s.name()).collect()
    }

    /// Runs one Score's Interpret.
    pub async fn interpret(&self, score: &dyn Score<T>) -> Result<Outcome, InterpretError> {
        let interpret = score.create_interpret();
        debug!(score = %log_text(score.name()), interpret = %interpret.get_name(), "running");
        let result = interpret.execute(&self.inventory, &self.topology).await;
        if let Err(err) = &result {
            warn!(score = %log_text(score.name()), cause = %log_text(err), "interpret failed");
        }
        result
    }

    /// Runs every registered Score in order; a failure does not stop the rest.
    pub async fn interpret_all(&self) -> Vec<(String, Result<Outcome, InterpretError>)> {
        let interprets: Vec<_> = {
            let list = self.scores.read().unwrap_or_else(|p| p.into_inner());
            list.iter().map(|s| (s.name(), s.create_interpret())).collect()
        };
        let mut results = Vec::with_capacity(interprets.len());
        for (name, interpret) in interprets {
            results.push((name, interpret.execute(&self.inventory, &self.topology).await));
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;
    use crate::{Id, Interpret, InterpretName, InterpretStatus, PreparationOutcome, Version};

    #[derive(Debug)]
    struct Counter(std::sync::atomic::AtomicU32);

    #[async_trait]
    impl Topology for Counter {
        fn name(&self) -> &str {
            "counter"
        }
        async fn ensure_ready(&self) -> Result<PreparationOutcome, PreparationError> {
            Ok(PreparationOutcome::Noop)
        }
    }

    /// Adds its number to the counter; fails on zero.
    #[derive(Debug, Clone)]
    struct AddScore(u32);

    impl Score<Counter> for AddScore {
        fn create_interpret(&self) -> Box<dyn Interpret<Counter>> {
            Box::new(self.clone())
        }
        fn name(&self) -> String {
            format!("add [{}]", self.0)
        }
    }

    #[async_trait]
    impl Interpret<Counter> for AddScore {
        async fn execute(&self, _: &Inventory, topology: &Counter) -> Result<Outcome, InterpretError> {
            if self.0 == 0 {
                return Err(InterpretError::new("zero"));
            }
            topology.0.fetch_add(self.0, std::sync::atomic::Ordering::SeqCst);
            Ok(Outcome::success(format!("added {}", self.0)))
        }
        fn get_name(&self) -> InterpretName {
            InterpretName::Custom("Add")
        }
        fn get_version(&self) -> Version {
            Version::from("1.0.0")
        }
        fn get_status(&self) -> InterpretStatus {
            InterpretStatus::QUEUED
        }
        fn get_children(&self) -> Vec<Id> {
            Vec::new()
        }
    }

    #[tokio::test]
    async fn runs_registered_scores_in_order_and_a_failure_does_not_stop_the_rest() {
        let maestro = Maestro::initialize(Inventory::empty(), Counter(0.into())).await.unwrap();
        maestro.register_all(vec![Box::new(AddScore(2)), Box::new(AddScore(0)), Box::new(AddScore(5))]);
        assert_eq!(maestro.list_scores(), ["add [2]", "add [0]", "add [5]"]);
        let results = maestro.interpret_all().await;
        let statuses: Vec<_> =
            results.iter().map(|(n, r)| (n.as_str(), r.as_ref().map(|o| o.status).ok())).collect();
        assert_eq!(
            statuses,
            [
                ("add [2]", Some(InterpretStatus::SUCCESS)),
                ("add [0]", None),
                ("add [5]", Some(InterpretStatus::SUCCESS))
            ]
        );
        assert_eq!(maestro.topology().0.load(std::sync::atomic::Ordering::SeqCst), 7);
        assert_eq!(maestro.interpret(&AddScore(1)).await.unwrap().message, "added 1");
    }

    #[derive(Debug)]
    struct Broken;

    #[async_trait]
    impl Topology for Broken {
        fn name(&self) -> &str {
            "broken"
        }
        async fn ensure_ready(&self) -> Result<PreparationOutcome, PreparationError> {
            Err(PreparationError::new("no root"))
        }
    }

    #[tokio::test]
    async fn a_topology_that_cannot_get_ready_is_an_error() {
        let err = Maestro::initialize(Inventory::empty(), Broken).await.unwrap_err();
        assert!(matches!(err, MaestroError::PreparationFailed(_)));
    }
}
