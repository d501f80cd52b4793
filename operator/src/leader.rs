//! Leader election on a `coordination.k8s.io/v1` Lease (kube-rs 5 ships none).
//!
//! Same protocol as client-go's leaderelection: the holder renews `renewTime` every
//! `retry_period`; others take the Lease over only once `renewTime + leaseDurationSeconds` has
//! passed. Every write is a `replace` carrying the read `resourceVersion`, so two candidates
//! racing for an expired Lease cannot both win: the loser gets 409 Conflict.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tracing::{info, warn};

use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// A leader that failed to renew for this long steps down (must be < lease_duration).
    pub renew_deadline: Duration,
    /// Pause between acquire/renew attempts.
    pub retry_period: Duration,
}

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {0} was taken by another replica")]
    Lost(String),
    #[error("could not renew lease {name} for {elapsed:?}: {source}")]
    RenewDeadline {
        name: String,
        elapsed: Duration,
        source: kube::Error,
    },
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
        }
    }

    /// One round: create, renew or take over the Lease. `Ok(true)` when we hold it now.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.held_spec(now, now, 0)),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let next = match holder {
            Some(h) if h == self.cfg.identity => {
                let acquired = spec.acquire_time.map_or(now, |t| t.0);
                self.held_spec(acquired, now, spec.lease_transitions.unwrap_or(0))
            }
            Some(_) if !expired(&spec, now) => return Ok(false),
            _ => self.held_spec(now, now, spec.lease_transitions.unwrap_or(0) + 1),
        };
        let updated = Lease {
            metadata: lease.metadata,
            spec: Some(next),
        };
        conflict_is_false(
            self.api
                .replace(&self.cfg.name, &PostParams::default(), &updated)
                .await,
        )
    }

    /// Give the Lease up on a clean shutdown so a standby takes over without waiting it out.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        let released = Lease {
            metadata: lease.metadata,
            spec: Some(spec),
        };
        conflict_is_false(
            self.api
                .replace(&self.cfg.name, &PostParams::default(), &released)
                .await,
        )
        .map(|_| ())
    }

    fn held_spec(&self, acquired: Timestamp, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(secs(self.cfg.lease_duration)),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = &spec.renew_time else {
        return true;
    };
    let valid_ms = i64::from(spec.lease_duration_seconds.unwrap_or(0)) * 1000;
    renewed.0.as_millisecond().saturating_add(valid_ms) < now.as_millisecond()
}

/// 409 means someone else wrote the Lease between our read and write: we are not leader.
fn conflict_is_false<T>(res: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match res {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Campaigns until leader (or `shutdown`), then runs `work` while renewing. Returns when `work`
/// ends (after releasing the Lease), and errs when leadership is lost: the caller should exit so
/// the pod restarts and campaigns again, never running two controllers at once.
pub async fn run_as_leader<W>(
    elector: LeaderElector,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
    work: W,
) -> anyhow::Result<()>
where
    W: Future<Output = anyhow::Result<()>>,
{
    let cfg = elector.cfg.clone();
    tokio::pin!(shutdown);
    info!(lease = %cfg.name, identity = %cfg.identity, "campaigning for leadership");
    loop {
        match elector.try_acquire_or_renew(Timestamp::now()).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => warn!(error = %e, "leader election round failed"),
        }
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(cfg.retry_period) => {}
        }
    }
    info!(lease = %cfg.name, "became leader");
    metrics.leader.set(1);
    let result = lead(&elector, work).await;
    metrics.leader.set(0);
    if result.is_ok() {
        if let Err(e) = elector.release().await {
            warn!(error = %e, "releasing the lease failed; a standby waits for it to expire");
        }
    }
    result
}

async fn lead<W>(elector: &LeaderElector, work: W) -> anyhow::Result<()>
where
    W: Future<Output = anyhow::Result<()>>,
{
    let cfg = &elector.cfg;
    tokio::pin!(work);
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            res = &mut work => return res,
            () = tokio::time::sleep(cfg.retry_period) => {}
        }
        match elector.try_acquire_or_renew(Timestamp::now()).await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => return Err(LeaderError::Lost(cfg.name.clone()).into()),
            Err(source) if renewed.elapsed() >= cfg.renew_deadline => {
                return Err(LeaderError::RenewDeadline {
                    name: cfg.name.clone(),
                    elapsed: renewed.elapsed(),
                    source,
                }
                .into())
            }
            Err(e) => warn!(error = %e, "lease renewal failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests;
