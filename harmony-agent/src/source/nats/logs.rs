//! The `logs` command: the last lines of a container this agent manages, bounded.
//!
//! Only containers with the label `harmony.managed=true` (the ones the
//! container Score creates) are answered: the fleet may read what it
//! deployed, not whatever else runs on the device. The container is looked
//! up once and its logs read by the id found, so a container swapped in
//! under the same name between the two is not read.

use harmony_score_wire::{
    bounded_text, from_cbor, DeviceId, LogsErrorKind, LogsReply, LogsRequest, LOGS_VERB,
    MAX_LOGS_REQUEST_BYTES, MAX_LOG_BYTES,
};
use harmony_scores::MANAGED_LABEL;
use harmony_topology::{ContainerError, ContainerRuntime};

use crate::AGENT_VERSION;

/// Answers a `logs` request whose body is `payload`, through `runtime`.
pub async fn answer(device: &DeviceId, runtime: &impl ContainerRuntime, payload: &[u8]) -> LogsReply {
    let reply = |outcome: Result<(Vec<String>, bool, String), (LogsErrorKind, String)>| {
        let (ok, message, error, lines, truncated) = match outcome {
            Ok((lines, truncated, message)) => (true, message, None, lines, truncated),
            Err((kind, message)) => (false, message, Some(kind), Vec::new(), false),
        };
        LogsReply {
            device_id: device.clone(),
            verb: LOGS_VERB.to_owned(),
            ok,
            message: bounded_text(&message, 1024),
            agent_version: AGENT_VERSION.to_owned(),
            error,
            lines,
            truncated,
        }
    };
    reply(read(runtime, payload).await)
}

async fn read(
    runtime: &impl ContainerRuntime,
    payload: &[u8],
) -> Result<(Vec<String>, bool, String), (LogsErrorKind, String)> {
    let request: LogsRequest = from_cbor(payload, MAX_LOGS_REQUEST_BYTES, "logs request")
        .map_err(|e| (LogsErrorKind::InvalidRequest, e.to_string()))?;
    request.check().map_err(|e| (LogsErrorKind::InvalidRequest, e))?;
    let name = &request.container;
    let container = match runtime.inspect_container(name).await {
        Ok(Some(container)) => container,
        Ok(None) => return Err((LogsErrorKind::NotFound, format!("no container named {name}"))),
        Err(err) => return Err(runtime_error(err)),
    };
    if container.labels.get(MANAGED_LABEL).map(String::as_str) != Some("true") {
        return Err((
            LogsErrorKind::NotManaged,
            format!("container {name} is not managed by this agent (no label {MANAGED_LABEL}=true); its logs are not served"),
        ));
    }
    // The inspection above found the log file: not inspected again.
    let logs = runtime.logs_of(&container, request.tail, MAX_LOG_BYTES).await.map_err(runtime_error)?;
    let message = match logs.truncated {
        true => format!(
            "{name}: last {} lines (older lines dropped: at most {MAX_LOG_BYTES} bytes)",
            logs.lines.len()
        ),
        false => format!("{name}: last {} lines", logs.lines.len()),
    };
    Ok((logs.lines, logs.truncated, message))
}

fn runtime_error(err: ContainerError) -> (LogsErrorKind, String) {
    let kind = match err {
        ContainerError::RuntimeUnavailable { .. } => LogsErrorKind::Unavailable,
        _ => LogsErrorKind::Failed,
    };
    (kind, err.to_string())
}
