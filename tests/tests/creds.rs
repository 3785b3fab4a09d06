//! The agent authenticates with a NATS credentials file (a user JWT and
//! its nkey seed) against a server in operator mode: the agent reads the
//! file with its own parser (no regex engine in the device binary), the
//! operator's tools with async-nats' own, and both reach the same server.
//!
//! The operator, account and user JWTs are made here, as `nsc` makes them
//! (ed25519 nkeys, `{"typ":"JWT","alg":"ed25519-nkey"}`), so the test
//! needs nothing beyond the pinned nats-server.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use harmony_e2e::{AgentProcess, NatsServer, WAIT};
use harmony_fleet::{DeployRequest, FleetClient};
use harmony_score_wire::{DeploymentName, DeviceId};
use nkeys::KeyPair;
use serde_json::json;

/// A JWT of `nats` claims about `subject`, signed by `issuer`.
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({
        "jti": format!("JTI{iat}{name}").to_uppercase(),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let signed = format!("{header}.{payload}");
    let signature = URL_SAFE_NO_PAD.encode(issuer.sign(signed.as_bytes()).unwrap());
    format!("{signed}.{signature}")
}

/// A credentials file's text, as `nsc generate creds` writes it.
fn creds(user_jwt: &str, user: &KeyPair) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n",
        user.seed().unwrap()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_authenticates_with_a_credentials_file_and_converges() {
    harmony_scores::ensure_linked();
    let operator = KeyPair::new_operator();
    let account = KeyPair::new_account();
    let (fleet_user, device_user, stranger) = (KeyPair::new_user(), KeyPair::new_user(), KeyPair::new_user());
    let operator_jwt =
        jwt(&operator, &operator.public_key(), "op", json!({"type": "operator", "version": 2}));
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "FLEET",
        json!({"limits": unlimited, "type": "account", "version": 2}),
    );
    let user_claims =
        json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2});
    // JetStream in operator mode needs a system account.
    let system = KeyPair::new_account();
    let system_jwt = jwt(&operator, &system.public_key(), "SYS", json!({"type": "account", "version": 2}));
    let conf = format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{ {sys}: \"{system_jwt}\", {acc}: \"{account_jwt}\" }}\n",
        sys = system.public_key(),
        acc = account.public_key()
    );
    let nats = NatsServer::start_with_config(&conf);
    let dir = tempfile::tempdir().unwrap();
    let write_creds = |name: &str, user: &KeyPair| {
        let path = dir.path().join(format!("{name}.creds"));
        let user_jwt = jwt(&account, &user.public_key(), name, user_claims.clone());
        std::fs::write(&path, creds(&user_jwt, user)).unwrap();
        path
    };
    let fleet_creds = write_creds("fleet", &fleet_user);
    let device_creds = write_creds("dev-1", &device_user);

    // Without credentials the server refuses; with the operator's file
    // (read by async-nats) it accepts.
    let refused = tokio::time::timeout(WAIT, FleetClient::connect(&[nats.url()], None)).await.unwrap();
    assert!(refused.is_err(), "an operator-mode server let a client in without credentials");
    let client = FleetClient::connect(&[nats.url()], Some(&fleet_creds)).await.unwrap();
    client.ensure_buckets().await.unwrap();
    let (device, app) = (DeviceId::new("dev-1").unwrap(), DeploymentName::new("app").unwrap());
    let deployed = client
        .deploy(
            DeployRequest::new(device.clone(), app.clone(), vec![harmony_e2e::file_score("/etc/app", "v1")])
                .force(true),
        )
        .await
        .unwrap();

    std::fs::create_dir(dir.path().join("root")).unwrap();
    let (state, root) = (dir.path().join("state"), dir.path().join("root"));
    let agent_args = |creds: &std::path::Path| {
        let mut args = harmony_e2e::agent_args("dev-1", &nats.url(), &state, &root);
        args.extend(["--creds".to_owned(), creds.to_str().unwrap().to_owned()]);
        args
    };
    let args = agent_args(&device_creds);
    let agent = AgentProcess::start(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &dir.path().join("agent.log"),
    );
    let status =
        client.wait_for_generation(&device, &app, deployed.generation, Some(&deployed.digest), WAIT).await;
    assert!(status.is_ok(), "{status:?}\n{}", agent.log_text());
    assert_eq!(std::fs::read_to_string(root.join("etc/app")).unwrap(), "v1");
    assert!(client.ping(&device, Duration::from_secs(5)).await.unwrap().ok);
    drop(agent);

    // A seed that is not the JWT's subject: the server refuses the
    // signature, and the agent says it cannot connect, quoting no secret.
    let forged = dir.path().join("forged.creds");
    let user_jwt = jwt(&account, &device_user.public_key(), "dev-1", user_claims.clone());
    std::fs::write(&forged, creds(&user_jwt, &stranger)).unwrap();
    // And a file that is not a credentials file at all.
    let garbage = dir.path().join("garbage.creds");
    std::fs::write(&garbage, "not a credentials file\n").unwrap();
    for (file, what) in [(&forged, "forged seed"), (&garbage, "no blocks")] {
        let args = agent_args(file);
        let agent = AgentProcess::start(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &dir.path().join(format!("{what}.log")),
        );
        let refused = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let log = agent.log_text();
                if log.contains("cannot read NATS credentials") || log.contains("uthorization") {
                    return log;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: no refusal logged:\n{}", agent.log_text()));
        assert!(!refused.contains(&stranger.seed().unwrap()), "{what}: the log quotes the seed");
        assert!(!refused.contains(&device_user.seed().unwrap()), "{what}: the log quotes a seed");
    }
}
