//! The `harmony-fleet` subcommands, each a thin layer over `FleetClient` or `DeviceDeploymentScore`.

mod rollout;

pub use rollout::{rollout, rollouts, RolloutArgs};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harmony_fleet::report::{devices_table, status_table};
use harmony_fleet::{
    error_chain, BucketAction, DeployRequest, DeviceDeploymentScore, FleetClient, FleetError, FleetTopology,
};
use harmony_score_wire::names::{ARTIFACTS_BUCKET, DESIRED_STATE_BUCKET};
use harmony_score_wire::{
    encode, now_ms, read_document_file, to_json_pretty, DecodeLimits, DeploymentName, DesiredState, DeviceId,
};
use harmony_topology::{InterpretStatus, Inventory, Maestro};

/// Why a subcommand failed; `main` turns it into a message and an exit code.
#[derive(Debug)]
pub enum CliError {
    /// The input must change: a document that is not valid, a bad flag.
    Usage(String),
    /// The fleet refused or failed.
    Fleet(FleetError),
    /// An operation ran and reported failure (details already printed).
    Failed(String),
}

impl From<FleetError> for CliError {
    fn from(err: FleetError) -> Self {
        CliError::Fleet(err)
    }
}

/// Where the fleet's NATS is.
#[derive(Debug)]
pub struct Connection {
    /// Server URLs.
    pub urls: Vec<String>,
    /// Credentials file.
    pub creds: Option<PathBuf>,
    /// Signs every document written (`--sign-key`, `$HARMONY_SIGN_KEY`).
    pub sign_key: Option<PathBuf>,
    /// Replies under this prefix (`--inbox-prefix`, `$HARMONY_INBOX_PREFIX`).
    pub inbox_prefix: Option<String>,
    /// Public keys whose signed documents count when a signing client
    /// numbers generations, besides the signing key's own (`--trusted-key`).
    pub trusted_keys: Vec<PathBuf>,
}

impl Connection {
    async fn client(&self) -> Result<FleetClient, CliError> {
        let client = FleetClient::connect_with_inbox_prefix(
            &self.urls,
            self.creds.as_deref(),
            self.inbox_prefix.as_deref(),
        )
        .await?;
        let client = match &self.sign_key {
            Some(path) => client.with_signer(read_sign_key(path)?),
            None => client,
        };
        Ok(if self.trusted_keys.is_empty() {
            client
        } else {
            // One of them is enough for a document to count for numbering.
            client.with_trusted_keys(read_public_keys(&self.trusted_keys, 1)?)
        })
    }
}

/// Reads a public key file (`harmony.pub`: 64 hex digits).
pub fn read_public_key(path: &Path) -> Result<harmony_score_wire::VerifyingKey, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read public key {}: {e}", path.display())))?;
    harmony_score_wire::parse_public_key(&text)
        .map_err(|e| CliError::Usage(format!("public key {}: {e}", path.display())))
}

/// Reads public key files (one key counted once), `threshold` of which must sign.
pub fn read_public_keys(
    paths: &[PathBuf],
    threshold: usize,
) -> Result<harmony_score_wire::TrustedKeys, CliError> {
    let mut keys = paths.iter().map(|p| read_public_key(p)).collect::<Result<Vec<_>, _>>()?;
    keys.sort_by_key(|k| k.to_bytes());
    keys.dedup();
    if threshold == 0 || threshold > keys.len() {
        return Err(CliError::Usage(format!("a threshold of {threshold} needs 1 to {} keys", keys.len())));
    }
    Ok(harmony_score_wire::TrustedKeys::new(keys, threshold))
}

/// The fleet's root public keys, as `keyset publish` and `keyset show` take them.
#[derive(Debug, clap::Args)]
pub struct RootArgs {
    /// A root public key (`harmony.pub` of the root, as devices list it in
    /// `root_keys`); repeat for several. Only key sets it signed count.
    #[arg(long = "root-pub", required = true, value_name = "FILE")]
    root_pubs: Vec<PathBuf>,
    /// How many root keys must have signed (the devices' `root_threshold`).
    #[arg(long, default_value_t = 1, value_name = "N")]
    root_threshold: usize,
}

impl RootArgs {
    fn trust(&self) -> Result<harmony_score_wire::TrustedKeys, CliError> {
        read_public_keys(&self.root_pubs, self.root_threshold)
    }
}

/// Reads a secret key file (`harmony.key`: 64 hex digits).
pub fn read_sign_key(path: &Path) -> Result<harmony_score_wire::DocumentSigner, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read signing key {}: {e}", path.display())))?;
    harmony_score_wire::parse_secret_key(&text)
        .map_err(|e| CliError::Usage(format!("signing key {}: {e}", path.display())))
}

/// `keygen`: a new ed25519 key pair, `harmony.key` (0600) and `harmony.pub`.
pub fn keygen(out: &Path) -> Result<(), CliError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| CliError::Failed(format!("cannot read random bytes: {e}")))?;
    let signer = harmony_score_wire::DocumentSigner::from_seed(seed);
    std::fs::create_dir_all(out)
        .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", out.display())))?;
    let write = |name: &str, text: String, mode: u32| -> Result<(), CliError> {
        let path = out.join(name);
        let failed = |e: std::io::Error| CliError::Failed(format!("cannot write {}: {e}", path.display()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(failed)?;
        file.write_all(text.as_bytes()).map_err(failed)
    };
    // Both names are checked first: a new secret beside an old public key
    // would sign documents no device accepts.
    for name in ["harmony.key", "harmony.pub"] {
        if out.join(name).exists() {
            return Err(CliError::Usage(format!("{} exists; not overwritten", out.join(name).display())));
        }
    }
    write("harmony.key", format!("{}\n", harmony_score_wire::to_hex32(&seed)), 0o600)?;
    write(
        "harmony.pub",
        format!("{}\n", harmony_score_wire::to_hex32(&signer.verifying_key().to_bytes())),
        0o644,
    )?;
    println!(
        "{}\t{}",
        harmony_score_wire::key_id(&signer.verifying_key()),
        out.join("harmony.pub").display()
    );
    Ok(())
}

/// `deploy`'s flags.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The device (default: the document's).
    #[arg(long)]
    device: Option<DeviceId>,
    /// The deployment (default: the document's).
    #[arg(long)]
    deployment: Option<DeploymentName>,
    /// The document, CBOR or (by its .json extension) JSON. Its own
    /// generation is ignored: the key's next one is written.
    doc: PathBuf,
    /// Write this generation instead of the next (it must be newer).
    #[arg(long)]
    generation: Option<u64>,
    /// Write only if the key still holds this generation (0: no document),
    /// read and written as one compare-and-set; else exit 3 and write
    /// nothing (another operator deployed or deleted since you looked).
    #[arg(long, value_name = "GENERATION")]
    if_generation: Option<u64>,
    /// Deploy even Score tags the device did not list as supported.
    #[arg(long)]
    force: bool,
    /// Wait until the device applied exactly this document (generation and
    /// digest); exit 1 when it failed, was superseded by a newer one, or did
    /// not land in time. (A document identical to the deployed one is then
    /// not written again.)
    #[arg(long)]
    wait: bool,
    /// Seconds to wait.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    timeout: u64,
}

fn read_doc(path: &Path) -> Result<DesiredState, CliError> {
    read_document_file(path, &DecodeLimits::default()).map_err(|e| CliError::Usage(e.to_string()))
}

/// `encode`: JSON document → CBOR.
pub fn encode_file(path: &Path, output: Option<&Path>, sign_key: Option<&Path>) -> Result<(), CliError> {
    let doc = read_doc(path)?;
    let bytes = encode(&doc).map_err(|e| CliError::Usage(error_chain(&e)))?;
    let bytes = match sign_key {
        Some(key) => read_sign_key(key)?.sign(bytes),
        None => bytes,
    };
    match output {
        Some(out) => std::fs::write(out, &bytes)
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", out.display()))),
        None => std::io::stdout().write_all(&bytes).map_err(|e| CliError::Failed(e.to_string())),
    }
}

/// `inspect`: document → JSON on standard output.
pub fn inspect_file(path: &Path) -> Result<(), CliError> {
    let doc = read_doc(path)?;
    println!("{}", to_json_pretty(&doc).map_err(|e| CliError::Usage(error_chain(&e)))?);
    Ok(())
}

/// `deploy`: without `--wait`, one compare-and-set write; with it, the
/// `DeviceDeploymentScore` for this one device, run by a `Maestro`.
pub async fn deploy(conn: &Connection, args: DeployArgs) -> Result<(), CliError> {
    let doc = read_doc(&args.doc)?;
    let device = args.device.unwrap_or(doc.device_id);
    let deployment = args.deployment.unwrap_or(doc.deployment);
    let client = conn.client().await?;
    if !args.wait || args.if_generation.is_some() {
        let request = DeployRequest::new(device.clone(), deployment.clone(), doc.scores)
            .generation(args.generation)
            .if_generation(args.if_generation)
            .expires_at(doc.expires_at)
            .health(doc.health, doc.health_timeout_s)
            .force(args.force)
            .skip_unchanged(args.wait);
        let deployed = client.deploy(request).await?;
        println!("{device}/{deployment}: generation {} written", deployed.generation);
        if args.wait {
            let timeout = Duration::from_secs(args.timeout);
            client
                .wait_for_generation(
                    &device,
                    &deployment,
                    deployed.generation,
                    Some(&deployed.digest),
                    timeout,
                )
                .await?;
            println!("{device}/{deployment}: generation {} applied", deployed.generation);
        }
        return Ok(());
    }
    // Refuse before the Maestro runs, so that a refusal keeps its own exit code.
    if !args.force {
        client.check_supported(&device, &doc.scores).await?;
        if !doc.health.is_empty() || doc.health_timeout_s.is_some() {
            client.check_feature(&device, harmony_score_wire::HEALTH_FEATURE).await?;
        }
    }
    let maestro = Maestro::initialize(Inventory::empty(), FleetTopology::from_client(client))
        .await
        .map_err(|e| CliError::Failed(error_chain(&e)))?;
    let score = DeviceDeploymentScore {
        devices: vec![device],
        deployment,
        scores: doc.scores,
        wait: Some(args.timeout),
        force: args.force,
        generation: args.generation,
        expires_at: doc.expires_at,
        health: doc.health,
        health_timeout_s: doc.health_timeout_s,
    };
    let outcome = maestro.interpret(&score).await.map_err(|e| CliError::Failed(e.to_string()))?;
    println!("{}: {}", outcome.status, outcome.message);
    for line in &outcome.details {
        println!("  {line}");
    }
    match outcome.status {
        InterpretStatus::FAILURE => Err(CliError::Failed("deployment did not land".into())),
        _ => Ok(()),
    }
}

/// `delete`: the key gets a delete marker and leaves the index; with a wait,
/// until the device reports it pruned.
pub async fn delete(
    conn: &Connection,
    device: &DeviceId,
    deployment: &DeploymentName,
    wait: Option<Duration>,
) -> Result<(), CliError> {
    let client = conn.client().await?;
    if client.delete(device, deployment).await? {
        println!("{device}/{deployment}: deleted");
    } else {
        println!("{device}/{deployment}: was not deployed");
    }
    if let Some(timeout) = wait {
        client.wait_for_prune(device, deployment, timeout).await?;
        println!("{device}/{deployment}: pruned");
    }
    Ok(())
}

/// `status`: the table (or JSON) of what devices report.
pub async fn status(conn: &Connection, device: Option<&DeviceId>, json: bool) -> Result<(), CliError> {
    let client = conn.client().await?;
    let statuses = match device {
        Some(device) => match client.device_status(device).await? {
            Some((status, _)) => vec![status],
            None => return Err(CliError::Failed(format!("device {device} has not reported a status"))),
        },
        None => client.list_statuses().await?,
    };
    if json {
        let text = serde_json::to_string_pretty(&statuses).map_err(|e| CliError::Failed(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", status_table(&statuses, now_ms()));
    }
    Ok(())
}

/// `devices`: one line per device that reported.
pub async fn devices(conn: &Connection) -> Result<(), CliError> {
    let statuses = conn.client().await?.list_statuses().await?;
    print!("{}", devices_table(&statuses, now_ms()));
    Ok(())
}

/// `ping` and `reconcile`: a request to the device's agent.
pub async fn command(
    conn: &Connection,
    device: &DeviceId,
    verb: &str,
    timeout: Duration,
) -> Result<(), CliError> {
    let client = conn.client().await?;
    let reply = match verb {
        "reconcile" => client.reconcile(device, timeout).await?,
        _ => client.ping(device, timeout).await?,
    };
    let version = if reply.agent_version.is_empty() {
        String::new()
    } else {
        format!(" (agent {})", reply.agent_version)
    };
    println!("{}: {}{version}", reply.device_id, reply.message);
    if reply.ok {
        Ok(())
    } else {
        Err(CliError::Failed(format!("{device} answered that {verb} failed")))
    }
}

/// `artifact put`: uploads `file` as `name` (default: the file's name),
/// unless the bucket holds it already; prints name, sha256 and size.
pub async fn artifact_put(
    conn: &Connection,
    file: &Path,
    name: Option<&str>,
    replace: bool,
) -> Result<(), CliError> {
    let name = match name {
        Some(name) => name.to_owned(),
        None => file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| CliError::Usage(format!("{}: name the artifact with --name", file.display())))?
            .to_owned(),
    };
    let put = conn.client().await?.put_artifact(file, &name, replace).await?;
    let what = match (put.uploaded, &put.replaced) {
        (false, _) => "already present".to_owned(),
        (true, None) => "uploaded".to_owned(),
        (true, Some(old)) => format!("uploaded, replacing sha256 {old}"),
    };
    let a = &put.artifact;
    println!("{}\t{}\t{} bytes\t{what}", a.name, a.sha256, a.size);
    Ok(())
}

/// `artifact list`: one line per artifact: name, sha256, size.
pub async fn artifact_list(conn: &Connection) -> Result<(), CliError> {
    for a in conn.client().await?.list_artifacts().await? {
        println!("{}\t{}\t{} bytes", a.name, a.sha256, a.size);
    }
    Ok(())
}

/// `logs`: a managed container's last lines, each escaped (the container
/// wrote them: a control character could rewrite the terminal).
pub async fn logs(
    conn: &Connection,
    device: &DeviceId,
    container: &str,
    tail: u32,
    timeout: Duration,
) -> Result<(), CliError> {
    let reply = conn.client().await?.logs(device, container, tail, timeout).await?;
    let mut out = std::io::stdout().lock();
    for line in &reply.lines {
        let shown = harmony_score_wire::bounded_text(line, harmony_score_wire::MAX_LOG_BYTES);
        writeln!(out, "{shown}").map_err(|e| CliError::Failed(e.to_string()))?;
    }
    if reply.truncated {
        eprintln!(
            "harmony-fleet: older lines dropped: a reply holds at most {} bytes",
            harmony_score_wire::MAX_LOG_BYTES
        );
    }
    Ok(())
}

/// `init`: the buckets, created where missing (with `replicas` copies, to
/// which existing ones are changed too, when given).
pub async fn init(conn: &Connection, replicas: Option<usize>) -> Result<(), CliError> {
    let client = conn.client().await?;
    let client = match replicas {
        Some(n) => client.with_replicas(n),
        None => client,
    };
    for report in client.ensure_buckets().await? {
        let rescaled;
        let what = match (report.action, report.bucket) {
            (BucketAction::Created, _) => "created",
            (BucketAction::Existed, _) => "exists",
            (BucketAction::Rescaled { from, to }, _) => {
                rescaled = format!("replicas changed from {from} to {to}");
                &rescaled
            }
            (BucketAction::Repaired, DESIRED_STATE_BUCKET) => {
                "repaired (writes republished as hints to harmony.hint.>, direct get allowed)"
            }
            (BucketAction::Repaired, ARTIFACTS_BUCKET) => "repaired (direct get allowed)",
            (BucketAction::Repaired, _) => "repaired (rollups disabled, direct get allowed)",
        };
        println!("{}: {what}", report.bucket);
    }
    Ok(())
}

/// `harmony-fleet nats-config`: writes `nats-server.conf`, `operator.env`
/// (`HARMONY_NATS=…`), `<device>.toml` (an agent configuration) and, for the
/// roles asked for, `monitor.env` and `commander.env` (`HARMONY_NATS=…` and
/// the role's `HARMONY_INBOX_PREFIX=…`) into `out`, each readable by its
/// owner only: they hold passwords.
pub fn nats_config(
    devices: &[DeviceId],
    out: &Path,
    url: &str,
    roles: harmony_fleet::nats_config::Roles,
) -> Result<(), CliError> {
    use harmony_fleet::nats_config::{IMPORTED_REPLY_PREFIX, MONITOR_INBOX_PREFIX, RESERVED_USERS};
    use harmony_score_wire::names::COMMANDER_INBOX_PREFIX;
    use std::os::unix::fs::OpenOptionsExt;
    // The URL is written into a TOML file and a shell environment file.
    if url.is_empty() || !url.chars().all(|c| c.is_ascii_alphanumeric() || "-._:/[]".contains(c)) {
        return Err(CliError::Usage(format!("--url {url:?}: only a plain scheme://host:port is allowed")));
    }
    let mut seen = std::collections::BTreeSet::new();
    for device in devices {
        // Reserved whether or not the roles are asked for now: they may be
        // added later, and a device `monitor` would share the monitor's inbox.
        if RESERVED_USERS.contains(&device.as_str()) || !seen.insert(device.clone()) {
            return Err(CliError::Usage(format!("device id {device} is reserved or repeated")));
        }
    }
    let config = harmony_fleet::nats_config::generate_with(devices, roles)
        .map_err(|e| CliError::Failed(format!("cannot read random bytes for passwords: {e}")))?;
    std::fs::create_dir_all(out)
        .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", out.display())))?;
    let write = |name: &str, text: String| -> Result<(), CliError> {
        use std::io::Write;
        let path = out.join(name);
        let failed = |e: std::io::Error| CliError::Failed(format!("cannot write {}: {e}", path.display()));
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(failed)?;
        file.write_all(text.as_bytes()).map_err(failed)?;
        println!("{}", path.display());
        Ok(())
    };
    write("nats-server.conf", config.server_conf.clone())?;
    write("operator.env", format!("HARMONY_NATS={}\n", config.operator.url(url)))?;
    for (device, principal) in &config.devices {
        write(
            &format!("{device}.toml"),
            format!(
                "device_id = \"{device}\"\nnats = [\"{}\"]\n\
                 # Commands reach the device through the DEVICES account's service import.\n\
                 trusted_inbox_prefix = \"{IMPORTED_REPLY_PREFIX}\"\n",
                principal.url(url)
            ),
        )?;
    }
    for (principal, prefix) in
        [(&config.monitor, MONITOR_INBOX_PREFIX), (&config.commander, COMMANDER_INBOX_PREFIX)]
    {
        if let Some(principal) = principal {
            write(
                &format!("{}.env", principal.user),
                format!("HARMONY_NATS={}\nHARMONY_INBOX_PREFIX={prefix}\n", principal.url(url)),
            )?;
        }
    }
    Ok(())
}

/// `keyset sign`'s flags.
#[derive(Debug, clap::Args)]
pub struct KeysetSignArgs {
    /// A root secret key (`harmony.key` from `keygen`); repeat for a root threshold.
    #[arg(long = "root-key", required = true, value_name = "FILE")]
    root_keys: Vec<PathBuf>,
    /// An online public key (`harmony.pub`) that may sign documents; repeat for several.
    #[arg(long = "key", required = true, value_name = "FILE")]
    keys: Vec<PathBuf>,
    /// How many of the keys must sign a document.
    #[arg(long, default_value_t = 1)]
    threshold: usize,
    /// The key set's version: above every key set published before.
    #[arg(long)]
    version: u64,
    /// Days until the key set expires (devices then refuse new documents until a newer one).
    #[arg(long, default_value_t = 365, value_name = "DAYS")]
    expires_in_days: u64,
    /// Where to write the signed key set.
    #[arg(long)]
    out: PathBuf,
}

/// `keyset sign`: the root signs a key set, offline.
pub fn keyset_sign(args: &KeysetSignArgs) -> Result<(), CliError> {
    let roots = args.root_keys.iter().map(|p| read_sign_key(p)).collect::<Result<Vec<_>, _>>()?;
    let keys = args.keys.iter().map(|path| read_public_key(path)).collect::<Result<Vec<_>, _>>()?;
    let now = now_ms() / 1000;
    let expires_at =
        args.expires_in_days.checked_mul(86_400).and_then(|s| s.checked_add(now)).ok_or_else(|| {
            CliError::Usage(format!("--expires-in-days {} is too far", args.expires_in_days))
        })?;
    let keyset = harmony_score_wire::KeySet::new(args.version, now, expires_at, args.threshold, &keys);
    keyset.check().map_err(|e| CliError::Usage(e.to_string()))?;
    let signed = keyset.sign(&roots.iter().collect::<Vec<_>>());
    std::fs::write(&args.out, signed)
        .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", args.out.display())))?;
    println!(
        "key set version {} ({} keys, threshold {}) written to {}",
        keyset.version,
        keys.len(),
        keyset.threshold,
        args.out.display()
    );
    Ok(())
}

/// `keyset publish FILE --root-pub ROOT.pub`.
pub async fn keyset_publish(conn: &Connection, file: &Path, root: &RootArgs) -> Result<(), CliError> {
    let root = root.trust()?;
    let bytes =
        std::fs::read(file).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
    let version = conn.client().await?.publish_keyset(&bytes, &root).await?;
    println!("published key set version {version}");
    Ok(())
}

/// `keyset show --root-pub ROOT.pub`: the key set in force, if the root signed it.
pub async fn keyset_show(conn: &Connection, root: &RootArgs) -> Result<(), CliError> {
    let root = root.trust()?;
    match conn.client().await?.keyset(&root).await? {
        Some(keyset) => {
            println!(
                "version {}\nissued_at {}\nexpires_at {}\nthreshold {}",
                keyset.version, keyset.issued_at, keyset.expires_at, keyset.threshold
            );
            for key in &keyset.keys {
                // Checked when read: every key parses.
                let id = harmony_score_wire::parse_public_key(key).map(|k| harmony_score_wire::key_id(&k));
                println!("key {}\t{key}", id.unwrap_or_default());
            }
        }
        None => println!("no key set signed by the root published"),
    }
    Ok(())
}
