//! `FleetClient::deploy_many`: many devices' deployments at once — batched reads, then pipelined compare-and-set writes.
//!
//! [`FleetClient::deploy`] costs about four round trips one after the other
//! (read the key, read the index, write the index, write the key). For many
//! devices the same steps run phase by phase, on batches of 512 devices (a
//! few batches at once, so that one's reads go while another's writes do):
//! the batch's keys and indexes in one batched read, then every index
//! written with the acknowledgements awaited together, then every key.
//! Each device's attempt is `deploy`'s own (the same [`Job`] and plan); one
//! that loses a compare-and-set goes on alone through `deploy`'s loop from
//! its second attempt, exactly as `deploy` would have.

use std::collections::HashMap;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use harmony_score_wire::names::status_key;
use harmony_score_wire::{DeviceId, DeviceInfo};

use crate::client::{decode_status, Buckets};
use crate::desired::{backoff, cas_write, index_written, key_written, latest_of, CasWrite, Job, Plan};
use crate::multi_get::MAX_SUBJECTS;
use crate::{error_chain, DeployRequest, Deployed, FleetClient, FleetError};

/// Devices whose first attempts run phase by phase together: their keys
/// and indexes are one batched read.
const DEVICES_PER_BATCH: usize = MAX_SUBJECTS / 2;
/// Batches of devices in flight at once.
const BATCHES_IN_FLIGHT: usize = 4;
/// Attempts planned at once (a plan reads nothing, except the history of a
/// key another tool wrote past its index).
const PLANS_IN_FLIGHT: usize = 64;
/// Devices going on through `deploy`'s loop at once, after losing a
/// compare-and-set in the pipelined attempt.
const RETRIES_IN_FLIGHT: usize = 256;

type Outcome = Result<Deployed, FleetError>;

/// A device's first attempt, planned, with what is left to write.
struct Pending {
    at: usize,
    job: Job,
    index: Option<CasWrite>,
    key: Option<CasWrite>,
    deployed: Deployed,
    lost: bool,
}

impl FleetClient {
    /// [`deploy`](Self::deploy) for many requests at once: one result per
    /// request, in order, each what `deploy` would have returned.
    ///
    /// Devices go in batches of 512, four batches at once. A batch's reads
    /// are one batched request (the key and the index of each device, and,
    /// beside it, the statuses of the devices not forced, for their
    /// supported Scores), then its index writes are pipelined (every
    /// compare-and-set sent before their acknowledgements are awaited),
    /// then its key writes.
    /// Numbering, the index rules and the compare-and-set of each device
    /// are `deploy`'s: a device whose write lost to another writer waits
    /// as `deploy` does and goes on through `deploy`'s loop.
    ///
    /// Requests for one device run one after the other, in their order (the
    /// device's first request with every other device's first, then its
    /// second, …): they share the device's index, so run together they
    /// would only conflict.
    pub async fn deploy_many(&self, requests: Vec<DeployRequest>) -> Vec<Result<Deployed, FleetError>> {
        let mut results: Vec<Option<Outcome>> = requests.iter().map(|_| None).collect();
        let mut rounds: Vec<Vec<(usize, DeployRequest)>> = Vec::new();
        let mut seen: HashMap<DeviceId, usize> = HashMap::new();
        for (at, request) in requests.into_iter().enumerate() {
            let round = seen.entry(request.device.clone()).or_insert(0);
            if rounds.len() <= *round {
                rounds.push(Vec::new());
            }
            rounds[*round].push((at, request));
            *round += 1;
        }
        for round in rounds {
            for (at, outcome) in self.deploy_round(round).await {
                results[at] = Some(outcome);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(FleetError::nats("deploy", "no result (a bug)"))))
            .collect()
    }

    /// Deploys `requests`, at most one per device.
    async fn deploy_round(&self, requests: Vec<(usize, DeployRequest)>) -> Vec<(usize, Outcome)> {
        let mut done: Vec<(usize, Outcome)> = Vec::new();
        let mut jobs: Vec<(usize, Job, bool)> = Vec::new();
        for (at, request) in requests {
            match Job::new(request) {
                Ok((job, force)) => jobs.push((at, job, force)),
                Err(err) => done.push((at, Err(err))),
            }
        }
        if jobs.is_empty() {
            return done;
        }
        let buckets = match self.buckets().await {
            Ok(buckets) => buckets,
            Err(err) => {
                let cause = error_chain(&err);
                let failed = |at| (at, Err(FleetError::nats("open the buckets", cause.clone())));
                done.extend(jobs.into_iter().map(|(at, ..)| failed(at)));
                return done;
            }
        };
        // Batches of devices one after the other, a few at once: a batch's
        // reads go while another's writes do.
        let mut batches = Vec::new();
        while !jobs.is_empty() {
            let rest = jobs.split_off(jobs.len().min(DEVICES_PER_BATCH));
            batches.push(std::mem::replace(&mut jobs, rest));
        }
        let firsts: Vec<_> = futures_util::stream::iter(batches)
            .map(|batch| self.first_attempts(buckets, batch))
            .buffer_unordered(BATCHES_IN_FLIGHT)
            .collect()
            .await;
        let mut retries = Vec::new();
        for (finished, lost) in firsts {
            done.extend(finished);
            retries.extend(lost);
        }
        let store = &buckets.desired;
        let retried: Vec<(usize, Outcome)> = futures_util::stream::iter(retries)
            .map(|(at, job)| async move {
                backoff(0).await;
                (at, self.run_job(store, job, 1).await)
            })
            .buffer_unordered(RETRIES_IN_FLIGHT)
            .collect()
            .await;
        done.extend(retried);
        done
    }

    /// The first attempt of each of `jobs` (`(position, job, forced)`, at
    /// most [`DEVICES_PER_BATCH`]): their results, and the jobs that lost a
    /// compare-and-set (to go on through `deploy`'s loop).
    async fn first_attempts(
        &self,
        buckets: &Buckets,
        jobs: Vec<(usize, Job, bool)>,
    ) -> (Vec<(usize, Outcome)>, Vec<(usize, Job)>) {
        let store = &buckets.desired;
        let mut done: Vec<(usize, Outcome)> = Vec::new();
        // The devices' reported Scores and features (for the requests not
        // forced), and each device's key and index: both in one batched
        // request, so read at one point in time. Were a page boundary to
        // fall between them, the first attempt still writes the index with
        // compare-and-set on the revision read, which fails if it changed.
        let checked: Vec<DeviceId> =
            jobs.iter().filter(|(_, _, force)| !force).map(|(_, job, _)| job.device.clone()).collect();
        let keys: Vec<String> =
            jobs.iter().flat_map(|(_, job, _)| [job.key.clone(), job.index_key.clone()]).collect();
        let (mut infos, latest) =
            tokio::join!(self.device_infos(&buckets.status, checked), self.latest_entries(store, keys));
        let mut latest: HashMap<String, Result<Option<kv::Entry>, FleetError>> = latest.into_iter().collect();
        let mut read = Vec::with_capacity(jobs.len());
        for (at, job, force) in jobs {
            if !force {
                let info = infos.remove(&job.device).unwrap_or(Ok(None));
                if let Err(err) = info.and_then(|info| job.check_device(info.as_ref())) {
                    done.push((at, Err(err)));
                    continue;
                }
            }
            let mut take = |key: &str| latest.remove(key).unwrap_or(Ok(None)).map(latest_of);
            match (take(&job.key), take(&job.index_key)) {
                (Ok(key), Ok(index)) => read.push((at, job, key, index)),
                (Err(err), _) | (_, Err(err)) => done.push((at, Err(err))),
            }
        }
        let planned: Vec<_> = futures_util::stream::iter(read)
            .map(|(at, mut job, key, index)| async move {
                let plan = self.plan(store, &mut job, key, index).await;
                (at, job, plan)
            })
            .buffer_unordered(PLANS_IN_FLIGHT)
            .collect()
            .await;
        let mut pending = Vec::with_capacity(planned.len());
        for (at, job, plan) in planned {
            match plan {
                Ok(Plan::Done(deployed)) => done.push((at, Ok(deployed))),
                Ok(Plan::Write { index, key, deployed }) => {
                    pending.push(Pending { at, job, index, key, deployed, lost: false })
                }
                Err(err) => done.push((at, Err(err))),
            }
        }
        // The indexes, then the keys of the devices whose index write won
        // (or that had none to write): `deploy`'s order for each device.
        let writes: Vec<_> = pending
            .iter_mut()
            .enumerate()
            .filter_map(|(p, w)| w.index.take().map(|write| (p, w.job.index_key.clone(), write)))
            .collect();
        let mut failed: HashMap<usize, FleetError> = HashMap::new();
        for (p, won) in cas_write_all(store, writes).await {
            let w = &mut pending[p];
            match won {
                Ok(won) => w.lost = !index_written(&mut w.job, &w.deployed, w.key.is_some(), won),
                Err(err) => {
                    failed.insert(p, err);
                }
            }
        }
        let writes: Vec<_> = pending
            .iter_mut()
            .enumerate()
            .filter(|(p, w)| !w.lost && !failed.contains_key(p))
            .filter_map(|(p, w)| w.key.take().map(|write| (p, w.job.key.clone(), write)))
            .collect();
        for (p, won) in cas_write_all(store, writes).await {
            let w = &mut pending[p];
            match won {
                Ok(won) => w.lost = !key_written(&w.job, &w.deployed, won),
                Err(err) => {
                    failed.insert(p, err);
                }
            }
        }
        let mut lost = Vec::new();
        for (p, w) in pending.into_iter().enumerate() {
            if let Some(err) = failed.remove(&p) {
                done.push((w.at, Err(err)));
            } else if w.lost {
                lost.push((w.at, w.job));
            } else {
                done.push((w.at, Ok(w.deployed)));
            }
        }
        (done, lost)
    }

    /// What each of `devices` last reported about itself (`None`: never
    /// reported), from one batched read of their status keys.
    async fn device_infos(
        &self,
        store: &kv::Store,
        devices: Vec<DeviceId>,
    ) -> HashMap<DeviceId, Result<Option<DeviceInfo>, FleetError>> {
        let keys = devices.iter().map(status_key).collect();
        devices
            .into_iter()
            .zip(self.latest_entries(store, keys).await)
            .map(|(device, (_, entry))| {
                let info = entry.and_then(|entry| decode_status(device.clone(), entry));
                (device, info.map(|found| found.and_then(|(status, _)| status.info)))
            })
            .collect()
    }
}

/// Sends every compare-and-set write of `writes` (`(tag, key, write)`, at
/// most a batch's) before any acknowledgement is awaited: whether each
/// won, by tag.
async fn cas_write_all(
    store: &kv::Store,
    writes: Vec<(usize, String, CasWrite)>,
) -> Vec<(usize, Result<bool, FleetError>)> {
    futures_util::stream::iter(writes)
        .map(|(tag, key, write)| async move { (tag, cas_write(store, &key, write.value, write.revision).await) })
        .buffer_unordered(DEVICES_PER_BATCH)
        .collect()
        .await
}
