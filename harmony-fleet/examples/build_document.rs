//! Builds a desired-state document from typed Scores and encodes it as CBOR.
//!
//! `cargo run -p harmony-fleet --example build_document -- motd.cbor`, then
//! `harmony-agent apply motd.cbor --root /tmp/device`.

use harmony_score_wire::{encode, to_json_pretty, DeploymentName, DesiredState, DeviceId};
use harmony_scores::{DirectoryScore, FileScore, PresenceState};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "motd.cbor".to_owned());
    let doc = DesiredState::new(
        DeviceId::new("dev-1")?,
        DeploymentName::new("motd")?,
        1,
        vec![
            Box::new(DirectoryScore {
                path: "/etc/harmony".into(),
                mode: Some(0o755),
                state: PresenceState::Present,
            }),
            Box::new(FileScore {
                path: "/etc/motd".into(),
                content: "Managed by Harmony\n".into(),
                mode: Some(0o644),
                state: PresenceState::Present,
            }),
        ],
    );
    let bytes = encode(&doc)?;
    std::fs::write(&out, &bytes)?;
    eprintln!("wrote {out} ({} bytes)", bytes.len());
    println!("{}", to_json_pretty(&doc)?);
    Ok(())
}
