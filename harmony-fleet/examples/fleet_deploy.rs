//! Fleet automation as a Score: deploys a message of the day to devices and waits for each.
//!
//! `cargo run -p harmony-fleet --example fleet_deploy -- nats://127.0.0.1:4222 dev-1 dev-2`
//! (each device needs a running `harmony-agent` that reported the `harmony.file/v1` tag).

use harmony_fleet::{DeviceDeploymentScore, FleetTopology};
use harmony_score_wire::{DeploymentName, DeviceId};
use harmony_scores::{FileScore, PresenceState};
use harmony_topology::{Inventory, Maestro};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let devices = args.map(DeviceId::new).collect::<Result<Vec<_>, _>>()?;

    let score = DeviceDeploymentScore {
        devices,
        deployment: DeploymentName::new("motd")?,
        scores: vec![Box::new(FileScore {
            path: "/etc/motd".into(),
            content: "Managed by Harmony\n".into(),
            mode: Some(0o644),
            state: PresenceState::Present,
        })],
        wait: Some(60),
        force: false,
        generation: None,
        expires_at: None,
        health: Vec::new(),
        health_timeout_s: None,
    };
    let maestro =
        Maestro::initialize(Inventory::empty(), FleetTopology::connect(&[url], None).await?).await?;
    let outcome = maestro.interpret(&score).await?;
    println!("{}: {}", outcome.status, outcome.message);
    for line in &outcome.details {
        println!("  {line}");
    }
    Ok(())
}
