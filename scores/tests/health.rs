//! Health checks on the wire: the issue's JSON form, validation at decode, Score companions, and unchanged bytes for documents without checks.

use harmony_score_wire::{
    decode, decode_json, encode, Check, DecodeError, DecodeLimits, DesiredState, EncodeError, ErrorKind,
};
use serde_json::{json, Value};

const SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

fn doc(extra: Value, scores: Value) -> Value {
    harmony_scores::ensure_linked();
    let mut doc = json!({"device_id": "dev-1", "deployment": "web", "generation": 2, "scores": scores});
    for (key, value) in extra.as_object().unwrap() {
        doc[key] = value.clone();
    }
    doc
}

fn cbor_of(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).unwrap();
    out
}

fn file() -> Value {
    json!({"type": "harmony.file/v1", "path": "/etc/app.conf", "content": "hello"})
}

fn container() -> Value {
    json!({"type": "harmony.podman.container/v1", "name": "web", "image": "localhost/x:1"})
}

// Issue 11 §1: "This JSON form must work as written".
#[test]
fn the_issues_json_form_decodes_as_written() {
    harmony_scores::ensure_linked();
    let text = format!(
        r#"{{"device_id": "dev-1", "deployment": "web", "generation": 2,
        "scores": [{{"type": "harmony.file/v1", "path": "/etc/app.conf", "content": "hello"}}],
        "health": [{{"type": "tcp", "address": "127.0.0.1:8080"}}, {{"type": "http", "url": "http://127.0.0.1:8080/", "status": 200}}, {{"type": "file_sha256", "path": "/etc/app.conf", "sha256": "{SHA}"}}], "health_timeout_s": 30}}"#
    );
    let decoded = decode_json(text.as_bytes(), &DecodeLimits::default()).unwrap();
    assert_eq!(decoded.health.len(), 3);
    assert_eq!(decoded.health[1], Check::Http { url: "http://127.0.0.1:8080/".into(), status: 200 });
    assert_eq!(decoded.health_timeout_s, Some(30));
    let plan = decoded.health_plan().unwrap().expect("gated");
    assert_eq!(plan.timeout.as_secs(), 30);
    assert_eq!(plan.checks.len(), 3);
    // Through CBOR and back, unchanged.
    let cbor = encode(&decoded).unwrap();
    let again = decode(&cbor, &DecodeLimits::default()).unwrap();
    assert_eq!(again.health, decoded.health);
    assert_eq!(again.health_timeout_s, Some(30));
}

#[test]
fn a_document_without_checks_keeps_its_bytes_and_is_not_gated() {
    let value = doc(json!({}), json!([file(), container()]));
    let decoded: DesiredState = serde_json::from_value(value.clone()).unwrap();
    assert!(!decoded.is_health_gated());
    assert_eq!(decoded.health_plan().unwrap(), None, "a container alone does not ask for verification");
    let bytes = encode(&decoded).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("health"), "no health key is written for a document without checks");
    assert_eq!(bytes, encode(&decode(&cbor_of(&value), &DecodeLimits::default()).unwrap()).unwrap());
}

#[test]
fn scores_contribute_their_own_checks_to_a_gated_document() {
    let value = doc(
        json!({"health_timeout_s": 20}),
        json!([file(), container(), {"type": "harmony.systemd.unit/v1", "name": "app.service",
            "content": "[Service]\nExecStart=/bin/true\n"},
            {"type": "harmony.podman.container/v1", "name": "old", "state": "absent"}]),
    );
    let decoded = decode(&cbor_of(&value), &DecodeLimits::default()).unwrap();
    let plan = decoded.health_plan().unwrap().unwrap();
    let seen: Vec<(String, String)> =
        plan.checks.iter().map(|c| (c.check.to_string(), c.source.clone())).collect();
    assert_eq!(
        seen,
        [
            ("container_running web (stable 5 s)".to_owned(), "container [web]".to_owned()),
            ("unit_active app.service".into(), "systemd unit [app.service]".into()),
        ]
    );
}

fn refused(value: Value) -> DecodeError {
    let err = decode(&cbor_of(&value), &DecodeLimits::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidHealthCheck, "{err}");
    // The same document as JSON is refused the same way.
    let json_err = decode_json(&serde_json::to_vec(&value).unwrap(), &DecodeLimits::default()).unwrap_err();
    assert_eq!(json_err, err);
    err
}

// Attack: a check is outside input. Network hosts, header injection,
// paths out of the root, bad digests, unknown types and absurd deadlines
// are refused whole, with a typed error naming the check and the field.
#[test]
fn invalid_checks_reject_the_whole_document_with_a_typed_error() {
    let cases = [
        (json!({"health": [{"type": "tcp", "address": "10.0.0.1:22"}]}), 0, Some("address")),
        (
            json!({"health": [{"type": "tcp", "address": "127.0.0.1:1"},
                {"type": "http", "url": "http://169.254.169.254/latest/"}]}),
            1,
            Some("url"),
        ),
        (json!({"health": [{"type": "http", "url": "http://127.0.0.1/\r\nX: y"}]}), 0, Some("url")),
        (
            json!({"health": [{"type": "file_sha256", "path": "/../etc/shadow", "sha256": SHA}]}),
            0,
            Some("path"),
        ),
        (json!({"health": [{"type": "file_sha256", "path": "/etc/x", "sha256": "abc"}]}), 0, Some("sha256")),
        (json!({"health": [], "health_timeout_s": 0}), 0, Some("health_timeout_s")),
        (json!({"health_timeout_s": u64::MAX}), 0, Some("health_timeout_s")),
        (
            json!({"health": [{"type": "container_running", "name": "web", "stable_s": 30}]}),
            0,
            Some("stable_s"),
        ),
        (json!({"health": [{"type": "unit_active", "unit": "x"}]}), 0, Some("unit")),
    ];
    for (extra, index, field) in cases {
        let err = refused(doc(extra.clone(), json!([file()])));
        let DecodeError::InvalidHealthCheck { index: i, field: f, .. } = &err else { panic!("{err:?}") };
        assert_eq!((*i, f.as_deref()), (index, field), "{extra}: {err}");
    }
    // Unknown types and wrong shapes: named by index, no field.
    let err = refused(doc(
        json!({"health": [{"type": "tcp", "address": "127.0.0.1:1"}, {"type": "exec", "command": "reboot"}]}),
        json!([file()]),
    ));
    assert!(matches!(&err, DecodeError::InvalidHealthCheck { index: 1, .. }), "{err:?}");
    assert!(err.to_string().contains("unknown variant `exec`"), "{err}");
    let err = refused(doc(json!({"health": [{"type": "tcp"}]}), json!([file()])));
    assert!(err.to_string().contains("address"), "{err}");
    // A Score's own check is judged against the document's deadline too.
    let err = refused(doc(json!({"health_timeout_s": 5}), json!([container()])));
    assert!(err.to_string().contains("container [web]"), "{err}");
    // The operator is refused before anything is written.
    let bad: DesiredState =
        serde_json::from_value(doc(json!({"health": [{"type": "tcp", "address": "8.8.8.8:53"}]}), json!([])))
            .unwrap();
    assert!(matches!(
        encode(&bad),
        Err(EncodeError::WouldBeRejected(DecodeError::InvalidHealthCheck { .. }))
    ));
}
