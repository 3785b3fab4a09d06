//! The `Maestro`: runs Scores' Interprets against one topology.

use std::sync::{Arc, RwLock};

use tracing::{debug, warn};

use crate::{InterpretError, Inventory, Outcome, PreparationError, Score, Topology};

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
        debug!(score = %score.name(), interpret = %interpret.get_name(), "running");
        let result = interpret.execute(&self.inventory, &self.topology).await;
        if let Err(err) = &result {
            warn!(score = %score.name(), cause = %err, "interpret failed");
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
