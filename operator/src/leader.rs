//! Leader election on a `coordination.k8s.io/v1` Lease (kube-rs 5 ships none).
//!
//! Same protocol as client-go's leaderelection: the holder renews `renewTime` every
//! `retry_period`; others take the Lease over only once it went `leaseDurationSeconds` without
//! change, measured on their own monotonic clock from when they first saw the current record
//! (never by comparing the holder's `renewTime` with the local clock, so clock skew between
//! nodes cannot hand leadership to two replicas). Every write is a `replace` carrying the read
//! `resourceVersion`, so two candidates racing for an expired Lease cannot both win: the loser
//! gets 409 Conflict. Every API call has a deadline.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::time::Instant;
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

/// The Lease record as last read, and when this replica first saw it.
struct Observed {
    spec: LeaseSpec,
    at: Instant,
}

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    observed: Mutex<Option<Observed>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {0} was taken by another replica")]
    Lost(String),
    #[error("could not renew lease {name} within {deadline:?}: {reason}")]
    RenewDeadline {
        name: String,
        deadline: Duration,
        reason: String,
    },
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: Mutex::new(None),
        }
    }

    #[cfg(test)]
    fn new_with_api(api: Api<Lease>, cfg: LeaseConfig) -> Self {
        Self {
            api,
            cfg,
            observed: Mutex::new(None),
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// One round: create, renew or take over the Lease. `Ok(true)` when we hold it now. `now` is
    /// only written into the Lease (`renewTime`); expiry uses the monotonic clock.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool, kube::Error> {
        self.try_acquire_or_renew_at(now, Instant::now()).await
    }

    /// [`Self::try_acquire_or_renew`] with the monotonic time given (tests step it).
    async fn try_acquire_or_renew_at(
        &self,
        now: Timestamp,
        seen_at: Instant,
    ) -> Result<bool, kube::Error> {
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
        let expired = self.observe(&spec, seen_at);
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let next = match holder {
            Some(h) if h == self.cfg.identity => {
                let acquired = spec.acquire_time.as_ref().map_or(now, |t| t.0);
                self.held_spec(acquired, now, spec.lease_transitions.unwrap_or(0))
            }
            Some(_) if !expired => return Ok(false),
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

    /// Records `spec` as observed (restarting the clock when it changed); returns whether it
    /// went unchanged for its whole `leaseDurationSeconds`.
    fn observe(&self, spec: &LeaseSpec, now: Instant) -> bool {
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let at = match observed.as_ref() {
            Some(o) if o.spec == *spec => o.at,
            _ => now,
        };
        *observed = Some(Observed {
            spec: spec.clone(),
            at,
        });
        let valid = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        );
        now.duration_since(at) >= valid
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

    /// [`Self::try_acquire_or_renew`] bounded by `limit`: a hung API call counts as a failure.
    async fn attempt(&self, limit: Duration) -> Result<bool, String> {
        match tokio::time::timeout(limit, self.try_acquire_or_renew(Timestamp::now())).await {
            Ok(Ok(held)) => Ok(held),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// 409 means someone else wrote the Lease between our read and write: we are not leader.
fn conflict_is_false<T>(res: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match res {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Campaigns until leader (or `shutdown`), then runs the work `start` makes while renewing.
/// Losing the Lease (taken, or not renewed within the deadline) drops the work at once, so two
/// replicas never act together, and campaigns again in the same process: an API outage costs
/// leadership, not a restart. Returns when `shutdown` resolves (releasing the Lease), or with the
/// work's own error.
pub async fn run_as_leader<F, W>(
    elector: LeaderElector,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
    mut start: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> W,
    W: Future<Output = anyhow::Result<()>>,
{
    let cfg = elector.cfg.clone();
    tokio::pin!(shutdown);
    loop {
        info!(lease = %cfg.name, identity = %cfg.identity, "campaigning for leadership");
        loop {
            match elector.attempt(cfg.renew_deadline).await {
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
        let result = lead(&elector, start()).await;
        metrics.leader.set(0);
        match result {
            Err(Led::Lost(e)) => warn!(error = %e, "stopped leading; campaigning again"),
            Err(Led::Work(e)) => {
                release(&elector).await;
                return Err(e);
            }
            Ok(()) => {
                release(&elector).await;
                return Ok(());
            }
        }
    }
}

async fn release(elector: &LeaderElector) {
    match tokio::time::timeout(elector.cfg.renew_deadline, elector.release()).await {
        Ok(Ok(())) => info!(lease = %elector.cfg.name, "released the lease"),
        Ok(Err(e)) => {
            warn!(error = %e, "releasing the lease failed; a standby waits for it to expire")
        }
        Err(_) => warn!("releasing the lease timed out; a standby waits for it to expire"),
    }
}

enum Led {
    Lost(LeaderError),
    Work(anyhow::Error),
}

async fn lead<W>(elector: &LeaderElector, work: W) -> Result<(), Led>
where
    W: Future<Output = anyhow::Result<()>>,
{
    let cfg = &elector.cfg;
    tokio::pin!(work);
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            res = &mut work => return res.map_err(Led::Work),
            () = tokio::time::sleep(cfg.retry_period) => {}
        }
        // Retry until the deadline, each call bounded by what is left of it (client-go renews
        // under a context with the renew deadline).
        loop {
            let left = cfg.renew_deadline.saturating_sub(renewed.elapsed());
            if left.is_zero() {
                return Err(Led::Lost(LeaderError::RenewDeadline {
                    name: cfg.name.clone(),
                    deadline: cfg.renew_deadline,
                    reason: "deadline passed".into(),
                }));
            }
            match elector.attempt(left).await {
                Ok(true) => {
                    renewed = Instant::now();
                    break;
                }
                Ok(false) => return Err(Led::Lost(LeaderError::Lost(cfg.name.clone()))),
                Err(reason) if renewed.elapsed() >= cfg.renew_deadline => {
                    return Err(Led::Lost(LeaderError::RenewDeadline {
                        name: cfg.name.clone(),
                        deadline: cfg.renew_deadline,
                        reason,
                    }))
                }
                Err(e) => warn!(error = %e, "lease renewal failed; retrying"),
            }
            tokio::select! {
                res = &mut work => return res.map_err(Led::Work),
                () = tokio::time::sleep(cfg.retry_period.min(left)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
