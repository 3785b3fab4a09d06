//! Commit or roll back: the pure decisions between a generation's apply and its commit, and what each does to the deployment's record.
//!
//! ```text
//!              accepted N (persisted: document N; the committed one kept as last good)
//!                   │
//!                applying ── a Score fails ──> failed (retried with backoff, as ever)
//!                   │ every Score held
//!        no checks ─┼─ checks ──> verifying (persisted "verifying N since T" first)
//!                   │                 │ all hold in one round   │ one fails at the deadline
//!                   v                 v                         v
//!               committed <───────────┘            last good G? ── yes ──> rolled_back:
//!   observed = N, last good = N                         │                 document G from disk,
//!                                                       no                N's extra resources pruned,
//!                                                       v                 N never tried again
//!                                              failed (health_check_failed):
//!                                              device left as N made it, N not run again
//! ```
//!
//! A restart during `verifying` applies N again and verifies it again, from
//! the start (never a silent commit); after [`MAX_INTERRUPTIONS`] such
//! restarts it counts as a failed check. A newer generation replaces all of
//! this at any point; the same document offered again changes nothing.

use crate::store::{DeploymentRecord, HealthFailure, StoredDocument, Verifying};

/// How many restarts may cut one generation's verification short before
/// the device stops trying it (a generation that makes the agent or the
/// device crash must not keep it verifying for ever).
pub const MAX_INTERRUPTIONS: u32 = 3;

/// The name of the pseudo-check a generation fails when its verification
/// was interrupted too often.
pub const INTERRUPTED_CHECK: &str = "verification";

/// Whether `doc` is the committed document (the observed one).
fn is_committed(record: &DeploymentRecord, doc: &StoredDocument) -> bool {
    record.observed_generation == doc.generation && record.observed_digest.as_deref() == Some(&doc.digest)
}

/// The last committed document: the record's own document when it is the
/// committed one, else the one kept aside when a newer one was accepted.
pub fn last_good(record: &DeploymentRecord) -> Option<&StoredDocument> {
    match &record.document {
        Some(doc) if is_committed(record, doc) => Some(doc),
        _ => record.last_good.as_ref(),
    }
}

/// A newer document `new` is accepted: the committed one stays on disk as
/// the rollback target; a verification or failure of an older one is over.
pub fn accept(record: &mut DeploymentRecord, new: StoredDocument) {
    if let Some(current) = record.document.take() {
        if is_committed(record, &current) {
            record.last_good = Some(current);
        }
    }
    record.document = Some(new);
    record.verifying = None;
    record.health_failure = None;
}

/// The deployment is deleted (or retired): nothing is left to roll back to.
pub fn forget(record: &mut DeploymentRecord) {
    record.document = None;
    record.last_good = None;
    record.verifying = None;
    record.health_failure = None;
}

/// What follows an apply of the record's document in which every Score held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterApply {
    /// Commit now: no checks, or already committed (a resync's re-apply).
    Commit,
    /// Persist this, then run the checks.
    Verify(Verifying),
    /// Verification was cut short too often: handle as a failed check.
    Fail { check: String, output: String },
}

/// Decides what follows an apply that held; `gated`: the document asks for
/// verification.
pub fn after_apply(record: &DeploymentRecord, gated: bool, now_ms: u64) -> AfterApply {
    let Some(doc) = &record.document else { return AfterApply::Commit };
    if !gated || is_committed(record, doc) {
        return AfterApply::Commit;
    }
    // Verifying it already, per the record: a restart cut that short.
    let interruptions = match &record.verifying {
        Some(v) if v.generation == doc.generation && v.digest == doc.digest => {
            v.interruptions.saturating_add(1)
        }
        _ => 0,
    };
    if interruptions > MAX_INTERRUPTIONS {
        return AfterApply::Fail {
            check: INTERRUPTED_CHECK.to_owned(),
            output: format!(
                "generation {} was being verified when the agent stopped, {interruptions} times: not tried again",
                doc.generation
            ),
        };
    }
    AfterApply::Verify(Verifying {
        generation: doc.generation,
        digest: doc.digest.clone(),
        since_ms: now_ms,
        interruptions,
    })
}

/// What a failed generation leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Back to the last good generation (its number).
    RollBack(u64),
    /// No good generation before it: fail, leaving the device as it is.
    FailInPlace,
}

/// Decides what a failed check of the record's document leads to.
pub fn after_failure(record: &DeploymentRecord) -> AfterFailure {
    match (last_good(record), &record.document) {
        (Some(good), Some(doc)) if good.digest != doc.digest => AfterFailure::RollBack(good.generation),
        _ => AfterFailure::FailInPlace,
    }
}

/// The record's document is committed: observed, and the new last good.
pub fn commit(record: &mut DeploymentRecord, now_ms: u64) {
    let Some(doc) = &record.document else { return };
    record.observed_generation = doc.generation;
    record.observed_digest = Some(doc.digest.clone());
    record.last_applied_at_ms = now_ms;
    record.last_good = None;
    record.verifying = None;
}

/// The record's document failed `check`: with a last good document, that
/// becomes the document again (the caller re-applies it, pruning what the
/// failed one added); without one, [`fail_in_place`]. Returns the decision taken.
pub fn fail(record: &mut DeploymentRecord, check: String, output: String, now_ms: u64) -> AfterFailure {
    let (AfterFailure::RollBack(to), Some(good)) = (after_failure(record), last_good(record).cloned()) else {
        fail_in_place(record, check, output, now_ms);
        return AfterFailure::FailInPlace;
    };
    if let Some(failed) = record.document.replace(good) {
        record.health_failure = Some(HealthFailure {
            generation: failed.generation,
            digest: failed.digest,
            check,
            output,
            at_ms: now_ms,
            rolled_back_to: Some(to),
        });
    }
    record.last_good = None;
    record.verifying = None;
    AfterFailure::RollBack(to)
}

/// The record's document failed `check` and is left as it is: marked so
/// that it is never run again (a newer generation replaces it).
pub fn fail_in_place(record: &mut DeploymentRecord, check: String, output: String, now_ms: u64) {
    if let Some(failed) = &record.document {
        record.health_failure = Some(HealthFailure {
            generation: failed.generation,
            digest: failed.digest.clone(),
            check,
            output,
            at_ms: now_ms,
            rolled_back_to: None,
        });
    }
    record.verifying = None;
}

/// Whether the record's document failed its checks with nothing to roll
/// back to: it is left as it is and not run again.
pub fn failed_in_place(record: &DeploymentRecord) -> bool {
    match (&record.health_failure, &record.document) {
        (Some(f), Some(doc)) => {
            f.rolled_back_to.is_none() && f.generation == doc.generation && f.digest == doc.digest
        }
        _ => false,
    }
}

/// Whether `generation` with `digest` is the document that failed its
/// checks: offered again (a resync, a reconnect), it changes nothing.
pub fn is_failed_document(record: &DeploymentRecord, generation: u64, digest: &str) -> bool {
    record.health_failure.as_ref().is_some_and(|f| f.generation == generation && f.digest == digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DocumentFormat;

    fn doc(generation: u64) -> StoredDocument {
        StoredDocument {
            bytes: vec![generation as u8],
            format: DocumentFormat::Cbor,
            digest: format!("sha256:{generation}"),
            generation,
        }
    }

    /// A record whose generation `good` is committed, then `next` accepted.
    fn with_next(good: Option<u64>, next: u64) -> DeploymentRecord {
        let mut record = DeploymentRecord::default();
        if let Some(good) = good {
            accept(&mut record, doc(good));
            commit(&mut record, 1);
        }
        accept(&mut record, doc(next));
        record
    }

    #[test]
    fn a_document_without_checks_commits_at_once_and_keeps_one_copy() {
        let mut record = with_next(Some(1), 2);
        assert_eq!(record.last_good, Some(doc(1)), "the committed one is kept while 2 is not committed");
        assert_eq!(after_apply(&record, false, 5), AfterApply::Commit);
        commit(&mut record, 5);
        assert_eq!((record.observed_generation, record.last_good.as_ref()), (2, None));
        assert_eq!(last_good(&record), Some(&doc(2)));
        // A resync's re-apply of a committed, gated generation verifies nothing.
        assert_eq!(after_apply(&record, true, 6), AfterApply::Commit);
    }

    #[test]
    fn checks_that_hold_commit_and_the_old_generation_is_let_go() {
        let mut record = with_next(Some(1), 2);
        let AfterApply::Verify(v) = after_apply(&record, true, 7) else { panic!() };
        assert_eq!((v.generation, v.since_ms, v.interruptions), (2, 7, 0));
        record.verifying = Some(v);
        commit(&mut record, 9);
        assert_eq!((record.observed_generation, record.verifying.as_ref()), (2, None));
        assert_eq!(record.last_good, None);
    }

    #[test]
    fn a_failed_check_rolls_back_to_the_last_good_document_from_the_record() {
        let mut record = with_next(Some(1), 2);
        record.verifying =
            Some(Verifying { generation: 2, digest: "sha256:2".into(), since_ms: 3, interruptions: 0 });
        assert_eq!(fail(&mut record, "http x".into(), "refused".into(), 4), AfterFailure::RollBack(1));
        assert_eq!(record.document, Some(doc(1)));
        assert_eq!(
            (record.observed_generation, record.verifying.as_ref(), record.last_good.as_ref()),
            (1, None, None)
        );
        let failure = record.health_failure.clone().unwrap();
        assert_eq!(
            (failure.generation, failure.rolled_back_to, failure.check.as_str()),
            (2, Some(1), "http x")
        );
        assert!(is_failed_document(&record, 2, "sha256:2"));
        assert!(!is_failed_document(&record, 2, "sha256:other"));
        assert!(!failed_in_place(&record), "the rolled-back document runs (drift repair, restarts)");
        // The rolled-back-to generation is committed: re-applying it verifies nothing.
        assert_eq!(after_apply(&record, true, 5), AfterApply::Commit);
        // A later generation is tried normally, rolling back to 1 again if it fails.
        accept(&mut record, doc(3));
        assert_eq!((record.health_failure.as_ref(), record.last_good.clone()), (None, Some(doc(1))));
        assert!(matches!(after_apply(&record, true, 6), AfterApply::Verify(_)));
        assert_eq!(after_failure(&record), AfterFailure::RollBack(1));
    }

    #[test]
    fn with_no_good_generation_the_device_is_left_as_it_is() {
        let mut record = with_next(None, 1);
        assert_eq!(fail(&mut record, "tcp".into(), "refused".into(), 4), AfterFailure::FailInPlace);
        assert_eq!(record.document, Some(doc(1)), "nothing to go back to");
        assert!(failed_in_place(&record));
        // A failed generation N whose predecessor also never committed: same.
        let mut never_committed = with_next(None, 1);
        accept(&mut never_committed, doc(2));
        assert_eq!(after_failure(&never_committed), AfterFailure::FailInPlace);
    }

    // A generation that crashes the agent (or the device) during its
    // verification must not keep it verifying for ever, nor be committed.
    #[test]
    fn restarts_during_verification_resume_it_then_give_up() {
        let mut record = with_next(Some(1), 2);
        for expected in 0..=MAX_INTERRUPTIONS {
            let AfterApply::Verify(v) = after_apply(&record, true, 10) else { panic!("{expected}") };
            assert_eq!(v.interruptions, expected);
            record.verifying = Some(v); // persisted, then the agent is killed
        }
        let AfterApply::Fail { check, output } = after_apply(&record, true, 10) else { panic!() };
        assert_eq!(check, INTERRUPTED_CHECK);
        assert!(output.contains("4 times"), "{output}");
        assert_eq!(record.observed_generation, 1, "never committed along the way");
        // Another document under the same generation starts from zero.
        record.verifying.as_mut().unwrap().digest = "sha256:x".into();
        assert!(matches!(
            after_apply(&record, true, 10),
            AfterApply::Verify(Verifying { interruptions: 0, .. })
        ));
    }

    #[test]
    fn a_delete_forgets_what_it_could_roll_back_to() {
        let mut record = with_next(Some(1), 2);
        forget(&mut record);
        assert_eq!((record.document.as_ref(), last_good(&record)), (None, None));
        accept(&mut record, doc(5));
        assert_eq!(after_failure(&record), AfterFailure::FailInPlace);
    }
}
