//! The wire form of every registered Score: golden fixtures, round trips, and rejected documents.

use std::path::PathBuf;

use harmony_score_wire::{
    decode, decode_json, encode, registered_scores, DecodeError, DecodeLimits, DeploymentName, DesiredState,
    DeviceId, DeviceScore,
};
use harmony_scores::{DirectoryScore, FileScore, PresenceState};
use serde_json::{json, Value};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/wire")
}

/// `harmony.file/v1` → `harmony.file@v1`: the fixture's file stem.
fn fixture_stem(tag: &str) -> String {
    tag.replace('/', "@")
}

fn as_json(doc: &DesiredState) -> Value {
    serde_json::to_value(doc).unwrap()
}

/// Every registered tag has `<stem>.json` (the expected value, written by
/// hand) and `<stem>.cbor` (its bytes, made once with HARMONY_BLESS=1 and
/// never rewritten). Today's code must read the CBOR as the JSON says and
/// write the JSON back as exactly those bytes.
#[test]
fn every_registered_tag_has_a_golden_fixture_that_still_decodes() {
    let bless = std::env::var_os("HARMONY_BLESS").is_some();
    let mut missing = Vec::new();
    for reg in registered_scores() {
        let stem = fixture_stem(reg.tag);
        let json_path = fixtures_dir().join(format!("{stem}.json"));
        let cbor_path = fixtures_dir().join(format!("{stem}.cbor"));
        let Ok(json_text) = std::fs::read(&json_path) else {
            missing.push(json_path.display().to_string());
            continue;
        };
        let expected: Value = serde_json::from_slice(&json_text).unwrap();
        let from_json = decode_json(&json_text, &DecodeLimits::default()).unwrap();
        assert!(
            from_json.scores.iter().any(|s| s.typetag_name() == reg.tag),
            "{stem}.json lacks a {} score",
            reg.tag
        );
        if !cbor_path.exists() && bless {
            std::fs::write(&cbor_path, encode(&from_json).unwrap()).unwrap();
        }
        let Ok(golden) = std::fs::read(&cbor_path) else {
            missing.push(cbor_path.display().to_string());
            continue;
        };
        let decoded = decode(&golden, &DecodeLimits::default()).unwrap();
        assert_eq!(as_json(&decoded), expected, "{stem}.cbor no longer decodes to {stem}.json");
        assert_eq!(encode(&decoded).unwrap(), golden, "{} changed its wire form", reg.tag);
    }
    assert!(
        missing.is_empty(),
        "registered tags without a golden fixture: {missing:?}; write the .json by hand, then run the tests once with HARMONY_BLESS=1"
    );
}

/// typetag keeps its own registry; its error for an unknown tag lists every
/// tag it knows. Both registries must agree, or the agent would list Scores
/// it cannot decode (or decode Scores it does not list).
#[test]
fn typetag_and_inventory_registries_agree() {
    let err = serde_json::from_value::<Box<dyn DeviceScore>>(json!({"type": "no.such/v0"})).unwrap_err();
    let text = err.to_string();
    let listed = text.split(", expected").nth(1).unwrap_or_else(|| panic!("unexpected error text: {text}"));
    let mut typetag_tags: Vec<&str> = listed.split('`').skip(1).step_by(2).collect();
    typetag_tags.sort();
    let inventory_tags: Vec<&str> = registered_scores().iter().map(|r| r.tag).collect();
    assert_eq!(typetag_tags, inventory_tags);
}

fn sample_document(scores: Vec<Box<dyn DeviceScore>>) -> DesiredState {
    DesiredState::new(DeviceId::new("dev-1").unwrap(), DeploymentName::new("motd").unwrap(), 7, scores)
}

fn sample_scores() -> Vec<Box<dyn DeviceScore>> {
    vec![
        Box::new(DirectoryScore {
            path: "/etc/app".into(),
            mode: Some(0o750),
            state: PresenceState::Present,
        }),
        Box::new(FileScore {
            path: "/etc/app/conf".into(),
            content: "a = 1\nü\n".into(),
            mode: None,
            state: PresenceState::Absent,
        }),
    ]
}

#[test]
fn documents_round_trip_through_cbor_and_json_unchanged() {
    let mut doc = sample_document(sample_scores());
    doc.expires_at = Some(4_000_000_000);
    let cbor = encode(&doc).unwrap();
    let back = decode(&cbor, &DecodeLimits::default()).unwrap();
    assert_eq!(as_json(&back), as_json(&doc));
    let json_text = serde_json::to_vec(&doc).unwrap();
    let from_json = decode_json(&json_text, &DecodeLimits::default()).unwrap();
    assert_eq!(as_json(&from_json), as_json(&doc));
    assert_eq!(encode(&from_json).unwrap(), cbor);
}

#[test]
fn the_short_json_form_takes_defaults() {
    let text = br#"{"device_id":"dev-1","deployment":"motd","generation":1,"scores":[{"type":"harmony.file/v1","path":"/etc/motd","content":"hello\n"}]}"#;
    let doc = decode_json(text, &DecodeLimits::default()).unwrap();
    assert_eq!((doc.format, doc.issued_at, doc.expires_at), (1, 0, None));
    assert_eq!(doc.scores[0].resource().to_string(), "path:/etc/motd");
}

fn json_doc(scores: Value) -> Value {
    json!({"device_id": "dev-1", "deployment": "motd", "generation": 1, "scores": scores})
}

fn cbor_of(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).unwrap();
    out
}

#[test]
fn unknown_tags_are_all_named_and_reject_the_whole_document() {
    let value = json_doc(json!([
        {"type": "harmony.file/v1", "path": "/a", "content": ""},
        {"type": "acme.widget/v3"},
        {"type": "harmony.file/v9", "path": "/b"},
        {"type": "acme.widget/v3"},
    ]));
    let err = decode(&cbor_of(&value), &DecodeLimits::default()).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnknownScoreTags { tags: vec!["acme.widget/v3".into(), "harmony.file/v9".into()] }
    );
    assert_eq!(err.to_string(), "unknown score tags: acme.widget/v3, harmony.file/v9");
    assert_eq!(err.kind().as_str(), "unknown_score_tags");
    let json_err = decode_json(value.to_string().as_bytes(), &DecodeLimits::default()).unwrap_err();
    assert_eq!(json_err, err);
}

#[test]
fn truncated_and_garbage_cbor_are_rejected_with_typed_errors() {
    let cbor = encode(&sample_document(sample_scores())).unwrap();
    for cut in [1, cbor.len() / 2, cbor.len() - 1] {
        assert_eq!(
            decode(&cbor[..cut], &DecodeLimits::default()).unwrap_err(),
            DecodeError::Truncated,
            "cut {cut}"
        );
    }
    assert_eq!(decode(&[], &DecodeLimits::default()).unwrap_err(), DecodeError::Truncated);
    let mut trailing = cbor.clone();
    trailing.push(0);
    assert!(matches!(decode(&trailing, &DecodeLimits::default()), Err(DecodeError::Malformed { .. })));
    let err = decode(&[0xff, 0x00, 0x13], &DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, DecodeError::Malformed { .. }), "{err:?}");
    assert!(!err.to_string().contains('\n'));
    assert!(matches!(
        decode(&cbor_of(&json!([1, 2])), &DecodeLimits::default()),
        Err(DecodeError::Malformed { .. })
    ));
    assert_eq!(
        decode_json(b"{\"device_id\":", &DecodeLimits::default()).unwrap_err(),
        DecodeError::Truncated
    );
}

#[test]
fn size_count_and_depth_are_bounded() {
    let big = "x".repeat(2 * 1024 * 1024);
    let value = json_doc(json!([{"type": "harmony.file/v1", "path": "/a", "content": big}]));
    let cbor = cbor_of(&value);
    assert!(matches!(
        decode(&cbor, &DecodeLimits::default()),
        Err(DecodeError::TooLarge { limit: 1048576, .. })
    ));
    assert!(decode(&cbor, &DecodeLimits::default().max_bytes(4 * 1024 * 1024)).is_ok());

    let many: Vec<Value> =
        (0..1025).map(|i| json!({"type": "harmony.file/v1", "path": format!("/f{i}")})).collect();
    let err = decode(&cbor_of(&json_doc(Value::Array(many))), &DecodeLimits::default()).unwrap_err();
    assert_eq!(err, DecodeError::TooManyScores { count: 1025, limit: 1024 });

    let mut deep = json!(1);
    for _ in 0..40 {
        deep = json!([deep]);
    }
    let value = json_doc(json!([{"type": "harmony.file/v1", "path": "/a", "extra": deep}]));
    assert_eq!(
        decode(&cbor_of(&value), &DecodeLimits::default()).unwrap_err(),
        DecodeError::TooDeep { limit: 32 }
    );
    // Deeper than ciborium's own recursion guard must not overflow the stack either.
    let mut bomb = vec![0x81u8; 100_000];
    bomb.push(0x01);
    assert!(matches!(decode(&bomb, &DecodeLimits::default()), Err(DecodeError::TooDeep { .. })));
}

#[test]
fn invalid_ids_formats_and_fields_are_typed() {
    let limits = DecodeLimits::default();
    let mut value = json_doc(json!([]));
    value["device_id"] = json!("Dev_1");
    assert!(matches!(decode(&cbor_of(&value), &limits), Err(DecodeError::InvalidDeviceId { .. })));
    let mut value = json_doc(json!([]));
    value["deployment"] = json!("a.b");
    assert!(matches!(decode(&cbor_of(&value), &limits), Err(DecodeError::InvalidDeploymentName { .. })));
    let mut value = json_doc(json!([]));
    value["format"] = json!(2);
    assert_eq!(decode(&cbor_of(&value), &limits).unwrap_err(), DecodeError::UnsupportedFormat { format: 2 });
    let value =
        json_doc(json!([{"type": "harmony.file/v1", "path": "/a"}, {"type": "harmony.file/v1", "path": 5}]));
    let err = decode(&cbor_of(&value), &limits).unwrap_err();
    assert!(
        matches!(&err, DecodeError::InvalidScore { index: 1, tag, .. } if tag == "harmony.file/v1"),
        "{err:?}"
    );
    let mut value = json_doc(json!([]));
    value.as_object_mut().unwrap().remove("generation");
    assert!(matches!(decode(&cbor_of(&value), &limits), Err(DecodeError::Malformed { .. })));
}

#[test]
fn two_scores_owning_one_resource_reject_the_document() {
    let value = json_doc(json!([
        {"type": "harmony.file/v1", "path": "/a", "content": "1"},
        {"type": "harmony.file/v1", "path": "/a", "content": "2"},
    ]));
    let err = decode(&cbor_of(&value), &DecodeLimits::default()).unwrap_err();
    assert_eq!(err, DecodeError::DuplicateResource { resource: "path:/a".into() });
}

// Issue 6 §3: `/shared` and `//shared/` were two resources, and a file and a
// directory at one path were not seen to collide.
#[test]
fn aliases_of_one_path_and_a_file_and_directory_at_one_path_collide() {
    for (a, b) in [
        (
            json!({"type": "harmony.file/v1", "path": "/shared"}),
            json!({"type": "harmony.file/v1", "path": "//shared/"}),
        ),
        (
            json!({"type": "harmony.file/v1", "path": "/etc/x"}),
            json!({"type": "harmony.file/v1", "path": "/./etc/x"}),
        ),
        (
            json!({"type": "harmony.file/v1", "path": "/d"}),
            json!({"type": "harmony.directory/v1", "path": "/d/"}),
        ),
    ] {
        let err = decode(&cbor_of(&json_doc(json!([a, b]))), &DecodeLimits::default()).unwrap_err();
        assert_eq!(err.kind(), harmony_score_wire::ErrorKind::DuplicateResource, "{err}");
    }
}

// Issue 6 §2: an invalid Score was accepted and then failed forever at run time.
#[test]
fn an_invalid_score_rejects_the_document_naming_index_tag_and_field() {
    let cases = [
        (json!({"type": "harmony.file/v1", "path": "relative"}), "path"),
        (json!({"type": "harmony.file/v1", "path": "/a/../../etc/passwd"}), "path"),
        (json!({"type": "harmony.file/v1", "path": "/a\nb"}), "path"),
        (json!({"type": "harmony.file/v1", "path": "/x", "mode": 6637}), "mode"), // 0o14755
        (json!({"type": "harmony.directory/v1", "path": "/x", "mode": 4096}), "mode"), // 0o10000
        (json!({"type": "harmony.directory/v1", "path": "/"}), "path"),
    ];
    for (bad, field) in cases {
        let value = json_doc(json!([{"type": "harmony.file/v1", "path": "/ok"}, bad]));
        let err = decode(&cbor_of(&value), &DecodeLimits::default()).unwrap_err();
        match &err {
            DecodeError::InvalidScore { index: 1, field: Some(f), .. } if f == field => {}
            other => panic!("{bad}: {other:?}"),
        }
        assert_eq!(err.kind().as_str(), "invalid_score");
        // The operator's encoder refuses the same document.
        let doc: harmony_score_wire::DesiredState = serde_json::from_value(value).unwrap();
        assert!(matches!(
            harmony_score_wire::encode(&doc),
            Err(harmony_score_wire::EncodeError::WouldBeRejected(DecodeError::InvalidScore { .. }))
        ));
    }
}

// Issue 7 §5: a setuid or setgid mode used to be refused at decode, on every
// device and by the operator's encoder. It is valid now; the Score declares
// the privilege and each device's policy decides (`allow_setuid`).
#[test]
fn a_setuid_mode_decodes_and_declares_the_setuid_privilege() {
    use harmony_score_wire::Privilege;
    let value = json_doc(json!([
        {"type": "harmony.file/v1", "path": "/usr/bin/x", "mode": 2541}, // 0o4755
        {"type": "harmony.directory/v1", "path": "/srv/shared", "mode": 1528}, // 0o2770
        {"type": "harmony.file/v1", "path": "/ok", "mode": 420},
    ]));
    let doc = decode(&cbor_of(&value), &DecodeLimits::default()).expect("setuid is not invalid");
    let privileges: Vec<Vec<Privilege>> = doc.scores.iter().map(|s| s.privileges()).collect();
    assert_eq!(privileges, [vec![Privilege::SetuidMode], vec![Privilege::SetuidMode], vec![]]);
    assert!(harmony_score_wire::encode(&doc).is_ok(), "the operator's encoder leaves it to the device");
}

// A refusal names the generation it refused, also of a document that does
// not decode (unknown tags) or that is signed; never of a truncated one.
#[test]
fn peek_generation_reads_the_generation_of_bare_signed_and_undecodable_documents() {
    let limits = DecodeLimits::default();
    let unknown = cbor_of(&json!({"device_id": "dev-1", "deployment": "d", "generation": 7,
        "scores": [{"type": "future.thing/v9", "path": "/x"}]}));
    assert_eq!(harmony_score_wire::peek_generation(&unknown, &limits), Some(7));
    let signed = harmony_score_wire::DocumentSigner::from_seed([1; 32]).sign(unknown.clone());
    assert_eq!(harmony_score_wire::peek_generation(&signed, &limits), Some(7));
    assert_eq!(harmony_score_wire::peek_generation(&unknown[..unknown.len() - 3], &limits), None);
    let huge = cbor_of(&json!({"generation": u64::MAX, "scores": []}));
    assert_eq!(harmony_score_wire::peek_generation(&huge, &limits), Some(u64::MAX));
    assert_eq!(harmony_score_wire::peek_generation(&cbor_of(&json!({"generation": -1})), &limits), None);
}

/// A map in the order given (serde_json's maps sort their keys).
fn ordered(entries: Vec<(&str, ciborium::Value)>) -> ciborium::Value {
    ciborium::Value::Map(entries.into_iter().map(|(k, v)| (ciborium::Value::Text(k.into()), v)).collect())
}

fn cbor_value(value: &ciborium::Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).unwrap();
    out
}

// Issue 7 §6: a document padded with a junk array was built into a value
// tree twice its size. Junk anywhere, before or after a Score's `type`,
// is skipped, and the document decodes to what it says without it.
#[test]
fn junk_fields_anywhere_are_skipped_and_a_late_type_is_found() {
    use ciborium::Value as V;
    let junk = || V::Array(vec![V::from(0); 100_000]);
    let file = |junk_first: bool, junk_after: bool| {
        let mut entries = Vec::new();
        if junk_first {
            entries.push(("junk", junk()));
        }
        entries.push(("type", V::Text("harmony.file/v1".into())));
        if junk_after {
            entries.push(("junk2", junk()));
        }
        entries.push(("path", V::Text("/etc/app/conf".into())));
        entries.push(("content", V::Text("a = 1\n".into())));
        ordered(entries)
    };
    let document = |padded: bool, score: ciborium::Value| {
        let mut entries = vec![
            ("device_id", V::Text("dev-1".into())),
            ("deployment", V::Text("motd".into())),
            ("generation", V::from(7)),
        ];
        if padded {
            entries.insert(1, ("junk", junk()));
        }
        entries.push(("scores", V::Array(vec![score])));
        cbor_value(&ordered(entries))
    };
    let limits = DecodeLimits::default();
    let plain = as_json(&decode(&document(false, file(false, false)), &limits).unwrap());
    for (padded, junk_first, junk_after) in [(true, false, false), (false, true, false), (false, false, true)]
    {
        let bytes = document(padded, file(junk_first, junk_after));
        assert_eq!(as_json(&decode(&bytes, &limits).unwrap()), plain, "{padded} {junk_first} {junk_after}");
    }
    // The same in JSON, whose objects become indefinite-length CBOR maps.
    let text = r#"{"junk": [0, [1, {"a": null}]], "device_id": "dev-1", "deployment": "motd", "generation": 7,
        "scores": [{"junk": [0, 0], "path": "/etc/app/conf", "content": "a = 1\n", "type": "harmony.file/v1"}]}"#;
    assert_eq!(as_json(&decode_json(text.as_bytes(), &limits).unwrap()), plain);
}

#[test]
fn a_tagged_or_indefinite_document_is_read_as_cbor_says() {
    let limits = DecodeLimits::default();
    let cbor = encode(&sample_document(sample_scores())).unwrap();
    let mut tagged = vec![0xd9, 0xd9, 0xf7]; // the self-described CBOR tag
    tagged.extend(&cbor);
    assert!(
        matches!(decode(&tagged, &limits), Err(DecodeError::Malformed { .. })),
        "a document is an untagged map"
    );
    // The JSON route writes every object and array with indefinite length.
    let json_text = serde_json::to_vec(&sample_document(sample_scores())).unwrap();
    assert_eq!(
        as_json(&decode_json(&json_text, &limits).unwrap()),
        as_json(&decode(&cbor, &limits).unwrap())
    );
}
