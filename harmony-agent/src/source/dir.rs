//! A folder of documents as the source, for air-gapped devices.
//!
//! Each file `<deployment>.cbor` or `<deployment>.json` is that deployment's
//! document; a deployment the device knows whose file is gone is deleted
//! (also when the file was removed while the agent was stopped). The folder
//! is scanned every two seconds and a file is re-read when its size or
//! mtime changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use harmony_score_wire::{log_text, DeploymentName};
use tracing::{debug, warn};

use crate::daemon::SourceContext;
use crate::inbox::Input;
use crate::store::DocumentFormat;

/// How often the folder is scanned.
const SCAN_EVERY: Duration = Duration::from_secs(2);

/// Largest file read (a document past 1 MiB is rejected anyway).
const MAX_FILE_BYTES: u64 = 1024 * 1024 + 1;

type Seen = BTreeMap<DeploymentName, (PathBuf, DocumentFormat, Option<SystemTime>, u64)>;

/// Scans `dir` and feeds the inbox until `stop` turns true.
pub async fn run(dir: PathBuf, context: SourceContext) {
    let SourceContext { inbox, known, mut stop, .. } = context;
    // Deployments this source answers for: those with state at start (a
    // file removed while the agent was stopped is a delete) and every file
    // seen since.
    let mut known: std::collections::BTreeSet<DeploymentName> = known.into_iter().collect();
    let mut seen: Seen = BTreeMap::new();
    let mut tick = tokio::time::interval(SCAN_EVERY);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let (mut now, unsure) = match scan(&dir) {
            Ok(scanned) => scanned,
            Err(err) => {
                // An unreadable folder is not an empty one: delete nothing.
                warn!(dir = %log_text(dir.display()), cause = %log_text(&err), "cannot scan document folder");
                continue;
            }
        };
        let mut unread = Vec::new();
        for (name, entry) in &now {
            if seen.get(name) == Some(entry) {
                continue;
            }
            let (path, format, _, _) = entry;
            match read_bounded(path) {
                Ok(bytes) => {
                    debug!(file = %log_text(path.display()), "document changed");
                    let input = Input::Document { deployment: name.clone(), bytes, format: *format };
                    if !inbox.send(input) {
                        return;
                    }
                }
                Err(err) => {
                    warn!(file = %log_text(path.display()), cause = %log_text(&err), "cannot read document; trying again");
                    unread.push(name.clone());
                }
            }
        }
        known.extend(now.keys().cloned());
        // A file that could not be examined is not a deleted one.
        let gone: Vec<DeploymentName> = known
            .iter()
            .filter(|name| !now.contains_key(*name) && !unsure.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            known.remove(&name);
            if !inbox.send(Input::Deleted { deployment: name }) {
                return;
            }
        }
        // Read again at the next scan, even if its size and mtime stay.
        for name in unread {
            now.remove(&name);
        }
        seen = now;
    }
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_FILE_BYTES).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The documents in `dir`, and the names of entries that could not be
/// examined or are not regular files (a dangling symlink, a FIFO): those
/// are neither read nor taken as deleted.
fn scan(dir: &Path) -> std::io::Result<(Seen, std::collections::BTreeSet<DeploymentName>)> {
    let mut out = BTreeMap::new();
    let mut unsure = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let (stem, format) = if let Some(stem) = file_name.strip_suffix(".cbor") {
            (stem, DocumentFormat::Cbor)
        } else if let Some(stem) = file_name.strip_suffix(".json") {
            (stem, DocumentFormat::Json)
        } else {
            continue;
        };
        let Ok(name) = DeploymentName::new(stem) else {
            warn!(file = %log_text(path.display()), "file name is not a deployment name; ignored");
            continue;
        };
        let meta = match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => {
                warn!(file = %log_text(path.display()), "not a regular file; ignored (its deployment is kept)");
                unsure.insert(name);
                continue;
            }
            Err(err) => {
                warn!(file = %log_text(path.display()), cause = %log_text(&err), "cannot examine file; ignored (its deployment is kept)");
                unsure.insert(name);
                continue;
            }
        };
        out.insert(name, (path.clone(), format, meta.modified().ok(), meta.len()));
    }
    Ok((out, unsure))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tokio::sync::watch;

    use super::*;
    use crate::inbox::{inbox, InboxReceiver, Item};

    fn start(dir: &Path) -> (InboxReceiver, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = inbox();
        let (stop_tx, stop) = watch::channel(false);
        let (_, status) = watch::channel(std::sync::Arc::new(harmony_score_wire::AgentStatus {
            device_id: harmony_score_wire::DeviceId::new("dev-1").unwrap(),
            agent_version: String::new(),
            updated_at_ms: 0,
            heartbeat_at_ms: 0,
            heartbeat_interval_ms: 0,
            info: None,
            deployments: BTreeMap::new(),
            instance_id: String::new(),
            errors: Vec::new(),
            keyset_version: None,
            truncated: false,
        }));
        let known = vec![DeploymentName::new("usb").unwrap()];
        let task = tokio::spawn(run(
            dir.to_owned(),
            SourceContext { inbox: tx, known, status, stop, artifacts: None },
        ));
        (rx, stop_tx, task)
    }

    /// The inputs the source queues within five seconds, with when each came.
    async fn inputs(rx: &mut InboxReceiver) -> Vec<(Input, Duration)> {
        let started = Instant::now();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Item::Input(input) = rx.recv().await {
                    out.push((input, started.elapsed()));
                }
            }
        })
        .await;
        out
    }

    fn web_within(got: &[(Input, Duration)], limit: Duration) -> bool {
        got.iter().any(|(i, at)| {
            matches!(i, Input::Document { deployment, .. } if deployment.as_str() == "web") && *at < limit
        })
    }

    // Attack: a document that is a symlink to removable media that was
    // unplugged. Its metadata failed, and that failed the whole scan: no
    // other deployment was updated while the dangling link stayed.
    #[tokio::test]
    async fn a_dangling_symlink_neither_stops_the_folder_nor_deletes_its_deployment() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/nonexistent/usb/usb.cbor", dir.path().join("usb.cbor")).unwrap();
        std::fs::write(dir.path().join("web.json"), b"{}").unwrap();
        let (mut rx, stop, task) = start(dir.path());
        let got = inputs(&mut rx).await;
        let _ = stop.send(true);
        task.await.unwrap();
        assert!(web_within(&got, Duration::from_secs(5)), "{got:?}");
        assert!(!got.iter().any(|(i, _)| matches!(i, Input::Deleted { .. })), "{got:?}");
    }

    // Attack: a FIFO (or a device file) named like a document. Opening it
    // for reading blocked the source (and its runtime thread) until some
    // process opened it for writing; here one does after eight seconds.
    #[tokio::test]
    async fn a_fifo_named_like_a_document_does_not_block_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("a-fifo.cbor");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        std::fs::write(dir.path().join("web.json"), b"{}").unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(8));
            // Read-write never blocks on a FIFO, and releases a stuck reader.
            drop(std::fs::OpenOptions::new().read(true).write(true).open(fifo));
        });
        let (mut rx, stop, task) = start(dir.path());
        let got = inputs(&mut rx).await;
        let _ = stop.send(true);
        task.await.unwrap();
        writer.join().unwrap();
        assert!(web_within(&got, Duration::from_secs(4)), "{got:?}");
    }
}
