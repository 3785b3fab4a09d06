//! Artifacts: files Scores name by name and sha256 (container image archives), in the fleet's Object Store bucket.
//!
//! The operator uploads a file once; every device that needs it reads it
//! over its own NATS connection (read-only, see `nats_config`). A name
//! pins its content: uploading other content under a taken name is
//! refused unless asked for, because Scores already deployed name the old
//! digest and devices without a cached copy could no longer load it.

use std::path::Path;

use async_nats::jetstream::{object_store, stream};
use futures_util::TryStreamExt;
use harmony_score_wire::names::{artifact_meta_subjects, artifacts_stream, ARTIFACTS_BUCKET};
use harmony_score_wire::validate::check_artifact_name;
use sha2::{Digest, Sha256};
use tracing::info;

use crate::client::BucketAction;
use crate::{FleetClient, FleetError};

/// An artifact in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactInfo {
    /// Its name.
    pub name: String,
    /// Its sha256, 64 lowercase hex digits (what a Score names).
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What [`FleetClient::put_artifact`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutArtifact {
    /// The artifact as the bucket now holds it.
    pub artifact: ArtifactInfo,
    /// Whether bytes were uploaded (`false`: the bucket already held this
    /// content under this name).
    pub uploaded: bool,
    /// Other content the name held before (`--replace`), by its sha256.
    pub replaced: Option<String>,
}

impl FleetClient {
    /// Creates the artifacts bucket where missing; gives an existing one
    /// direct gets if it lacks them (devices read with direct gets only).
    pub(crate) async fn ensure_artifacts_bucket(&self) -> Result<BucketAction, FleetError> {
        let name = ARTIFACTS_BUCKET;
        match self.stream_exists(&artifacts_stream()).await? {
            Some(existing) if existing.cached_info().config.allow_direct => {
                self.rescale(name, &existing.cached_info().config).await
            }
            Some(existing) => {
                let config = &existing.cached_info().config;
                let fixed = stream::Config {
                    allow_direct: true,
                    num_replicas: self.rescale_to(config).unwrap_or(config.num_replicas),
                    ..config.clone()
                };
                self.js
                    .update_stream(fixed)
                    .await
                    .map_err(|e| FleetError::nats(format!("allow direct get on bucket {name}"), e))?;
                Ok(BucketAction::Repaired)
            }
            None => {
                self.js
                    .create_object_store(object_store::Config {
                        bucket: name.to_owned(),
                        description: Some(
                            "Harmony artifacts: image archives Scores name by name and sha256".into(),
                        ),
                        storage: stream::StorageType::File,
                        num_replicas: self.new_bucket_replicas(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| FleetError::nats(format!("create bucket {name}"), e))?;
                info!(bucket = name, "created bucket");
                Ok(BucketAction::Created)
            }
        }
    }

    async fn artifacts(&self) -> Result<object_store::ObjectStore, FleetError> {
        self.ensure_artifacts_bucket().await?;
        self.js
            .get_object_store(ARTIFACTS_BUCKET)
            .await
            .map_err(|e| FleetError::nats(format!("open bucket {ARTIFACTS_BUCKET}"), e))
    }

    /// Uploads the file at `path` as the artifact `name`, unless the bucket
    /// already holds exactly this content under it. Other content under a
    /// taken name is refused ([`FleetError::ArtifactExists`]) unless `replace`.
    pub async fn put_artifact(
        &self,
        path: &Path,
        name: &str,
        replace: bool,
    ) -> Result<PutArtifact, FleetError> {
        check_artifact_name("name", name)
            .map_err(|e| FleetError::InvalidArtifact { message: e.to_string() })?;
        let (sha256, size) = hash_file(path)
            .await
            .map_err(|source| FleetError::ReadFailed { path: path.to_owned(), source })?;
        let store = self.artifacts().await?;
        let mut replaced = None;
        match store.info(name).await {
            Ok(existing) if !existing.deleted => {
                let existing = artifact_info(&existing);
                if existing.sha256 == sha256 {
                    return Ok(PutArtifact { artifact: existing, uploaded: false, replaced: None });
                }
                if !replace {
                    return Err(FleetError::ArtifactExists {
                        name: name.to_owned(),
                        sha256: existing.sha256,
                    });
                }
                replaced = Some(existing.sha256);
            }
            Ok(_) => {}
            Err(err) if err.kind() == object_store::InfoErrorKind::NotFound => {}
            Err(err) => return Err(FleetError::nats(format!("look up artifact {name}"), err)),
        }
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|source| FleetError::ReadFailed { path: path.to_owned(), source })?;
        let meta = object_store::ObjectMetadata {
            name: name.to_owned(),
            description: Some(format!("sha256 {sha256}")),
            ..Default::default()
        };
        let stored = store
            .put(meta, &mut file)
            .await
            .map_err(|e| FleetError::nats(format!("upload artifact {name}"), e))?;
        let stored = artifact_info(&stored);
        if stored.sha256 != sha256 || stored.size != size {
            return Err(FleetError::InvalidArtifact {
                message: format!(
                    "{} changed while it was uploaded (sha256 {} before, {} uploaded); upload it again",
                    path.display(),
                    sha256,
                    stored.sha256
                ),
            });
        }
        Ok(PutArtifact { artifact: stored, uploaded: true, replaced })
    }

    /// Every artifact in the bucket, sorted by name.
    ///
    /// Listed from the stream's info (its metadata subjects) and read with
    /// direct gets, as statuses are: no consumer against the stream's budget.
    pub async fn list_artifacts(&self) -> Result<Vec<ArtifactInfo>, FleetError> {
        self.ensure_artifacts_bucket().await?;
        let stream = self
            .js
            .get_stream(artifacts_stream())
            .await
            .map_err(|e| FleetError::nats(format!("open bucket {ARTIFACTS_BUCKET}"), e))?;
        let subjects: Vec<String> = stream
            .info_with_subjects(artifact_meta_subjects())
            .await
            .map_err(|e| FleetError::nats("list artifacts", e))?
            .map_ok(|(subject, _)| subject)
            .try_collect()
            .await
            .map_err(|e| FleetError::nats("list artifacts", e))?;
        let mut artifacts = Vec::new();
        for subject in subjects {
            let message = stream
                .direct_get_last_for_subject(subject.as_str())
                .await
                .map_err(|e| FleetError::nats("read artifact metadata", e))?;
            let info: object_store::ObjectInfo = serde_json::from_slice(&message.payload).map_err(|e| {
                FleetError::BadReply { subject: subject.clone(), message: format!("artifact metadata: {e}") }
            })?;
            if !info.deleted {
                artifacts.push(artifact_info(&info));
            }
        }
        artifacts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(artifacts)
    }

    /// The Object Store handle of the artifacts bucket (for tests and tools).
    pub async fn artifact_store(&self) -> Result<object_store::ObjectStore, FleetError> {
        self.artifacts().await
    }
}

fn artifact_info(info: &object_store::ObjectInfo) -> ArtifactInfo {
    ArtifactInfo {
        name: info.name.clone(),
        sha256: info.digest.as_deref().and_then(sha256_hex).unwrap_or_default(),
        size: info.size as u64,
    }
}

/// `SHA-256=<base64url>` as Object Store clients write it, as hex.
fn sha256_hex(digest: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE.decode(digest.strip_prefix("SHA-256=")?).ok()?;
    (bytes.len() == 32).then(|| bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The sha256 (hex) and size of the file at `path`.
async fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher)?;
        Ok((hasher.finalize().iter().map(|b| format!("{b:02x}")).collect(), size))
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    #[test]
    fn object_store_digests_read_as_hex() {
        use base64::Engine as _;
        let digest = [7u8; 32];
        let text = format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(digest));
        assert_eq!(super::sha256_hex(&text), Some("07".repeat(32)));
        assert_eq!(super::sha256_hex("SHA-256=AAAA"), None);
    }
}
