//! A test-only Score that takes time: it writes `started-<name>` under the
//! device root, sleeps, then writes `slept-<name>`. With `honour_cancel` it
//! ends (as `Cancelled`) when its run is cancelled; without, it sleeps on.

use std::time::Duration;

use harmony_score_wire::{device_score, DeviceScore, ResourceId, ScoreValidationError};
use harmony_topology::{
    async_trait, Id, Interpret, InterpretError, InterpretErrorKind, InterpretName, InterpretStatus,
    Inventory, LocalDeviceTopology, Outcome, Score, Version,
};
use serde::{Deserialize, Serialize};

/// See the module.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SleepScore {
    /// Names its markers and its resource.
    pub name: String,
    /// How long it sleeps.
    pub millis: u64,
    /// Ends when its run is cancelled.
    #[serde(default)]
    pub honour_cancel: bool,
}

/// A [`SleepScore`] that ignores cancellation.
pub fn sleep_score(name: &str, millis: u64) -> Box<dyn DeviceScore> {
    Box::new(SleepScore { name: name.into(), millis, honour_cancel: false })
}

impl Score<LocalDeviceTopology> for SleepScore {
    fn create_interpret(&self) -> Box<dyn Interpret<LocalDeviceTopology>> {
        Box::new(SleepInterpret(self.clone()))
    }
    fn name(&self) -> String {
        format!("sleep [{}]", self.name)
    }
}

#[derive(Debug)]
struct SleepInterpret(SleepScore);

#[async_trait]
impl Interpret<LocalDeviceTopology> for SleepInterpret {
    async fn execute(
        &self,
        _: &Inventory,
        topology: &LocalDeviceTopology,
    ) -> Result<Outcome, InterpretError> {
        let marker = |what: &str| {
            std::fs::write(topology.root().join(format!("{what}-{}", self.0.name)), b"")
                .map_err(|e| InterpretError::new(e.to_string()))
        };
        marker("started")?;
        let sleep = tokio::time::sleep(Duration::from_millis(self.0.millis));
        if self.0.honour_cancel {
            tokio::select! {
                () = sleep => {}
                () = harmony_topology::run::cancelled() => {
                    return Err(InterpretError::with_kind(InterpretErrorKind::Cancelled, "cancelled"));
                }
            }
        } else {
            sleep.await;
        }
        marker("slept")?;
        Ok(Outcome::success("slept"))
    }
    fn get_name(&self) -> InterpretName {
        InterpretName::Custom("Sleep")
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

device_score! {
    tag: "test.e2e-sleep/v1",
    summary: "test only: sleeps, then writes a marker",
    impl DeviceScore for SleepScore {
        fn validate(&self) -> Result<(), ScoreValidationError> {
            harmony_score_wire::validate::check_text("name", &self.name, 64)
        }
        fn resource(&self) -> ResourceId {
            ResourceId::named("sleep", &self.name).expect("validated name")
        }
        fn undo(&self) -> Option<Box<dyn DeviceScore>> {
            None
        }
    }
}
