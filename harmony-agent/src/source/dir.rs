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

use harmony_score_wire::DeploymentName;
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
        let now = match scan(&dir) {
            Ok(now) => now,
            Err(err) => {
                // An unreadable folder is not an empty one: delete nothing.
                warn!(dir = %dir.display(), cause = %err, "cannot scan document folder");
                continue;
            }
        };
        for (name, entry) in &now {
            if seen.get(name) == Some(entry) {
                continue;
            }
            let (path, format, _, _) = entry;
            match read_bounded(path) {
                Ok(bytes) => {
                    debug!(file = %path.display(), "document changed");
                    let input = Input::Document { deployment: name.clone(), bytes, format: *format };
                    if !inbox.send(input) {
                        return;
                    }
                }
                Err(err) => warn!(file = %path.display(), cause = %err, "cannot read document"),
            }
        }
        known.extend(now.keys().cloned());
        let gone: Vec<DeploymentName> =
            known.iter().filter(|name| !now.contains_key(*name)).cloned().collect();
        for name in gone {
            known.remove(&name);
            if !inbox.send(Input::Deleted { deployment: name }) {
                return;
            }
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

fn scan(dir: &Path) -> std::io::Result<Seen> {
    let mut out = BTreeMap::new();
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
            warn!(file = %path.display(), "file name is not a deployment name; ignored");
            continue;
        };
        let meta = std::fs::metadata(&path)?;
        out.insert(name, (path.clone(), format, meta.modified().ok(), meta.len()));
    }
    Ok(out)
}
