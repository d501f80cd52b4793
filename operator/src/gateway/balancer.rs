//! Picks the pod for each request from the ready addresses of its model, counting the requests
//! this gateway replica has in flight to each pod.
//!
//! Selection and the increment happen under one lock, so a burst of simultaneous requests
//! spreads evenly instead of all seeing the same least-loaded pod. The count is released when the
//! returned [`Lease`] drops, which for a stream is when its body ends or the client leaves.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;

/// Virtual nodes per pod on the consistent-hash ring.
const RING_REPLICAS: u64 = 64;
/// `PrefixHash` skips a pod whose load exceeds this factor of the average (bounded load,
/// as KubeAI's CHWBL), so one hot prefix cannot pin a pod.
const LOAD_FACTOR: f64 = 1.25;

#[derive(Clone, Debug, Default)]
pub struct Balancer {
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
}

/// How to choose among the candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    LeastLoad,
    /// Consistent hash of this key, with bounded load.
    Hash(u64),
}

/// One request's claim on a pod; dropping it releases the count.
#[derive(Debug)]
pub struct Lease {
    address: String,
    balancer: Balancer,
}

impl Lease {
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut counts = self.balancer.lock();
        if let Some(count) = counts.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

impl Balancer {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Requests in flight from this gateway to `address`.
    pub fn load(&self, address: &str) -> usize {
        self.lock().get(address).copied().unwrap_or(0)
    }

    /// Leases a pod among `candidates` not in `tried` (all of them if every one was tried);
    /// `None` when there is no candidate.
    pub fn pick(&self, candidates: &[String], tried: &[String], how: Pick) -> Option<Lease> {
        let fresh: Vec<&String> = candidates.iter().filter(|c| !tried.contains(c)).collect();
        let pool: Vec<&String> = if fresh.is_empty() {
            candidates.iter().collect()
        } else {
            fresh
        };
        let mut counts = self.lock();
        let load = |a: &String| counts.get(a).copied().unwrap_or(0);
        let chosen = match how {
            Pick::LeastLoad => least_loaded(&pool, load),
            Pick::Hash(key) => bounded_hash(&pool, key, load),
        }?
        .clone();
        *counts.entry(chosen.clone()).or_default() += 1;
        Some(Lease {
            address: chosen,
            balancer: self.clone(),
        })
    }
}

fn least_loaded<'a>(pool: &[&'a String], load: impl Fn(&String) -> usize) -> Option<&'a String> {
    let min = pool.iter().map(|a| load(a)).min()?;
    let tied: Vec<&String> = pool.iter().copied().filter(|a| load(a) == min).collect();
    let i = rand::rng().random_range(0..tied.len());
    tied.get(i).copied()
}

/// Walks the ring from the key's point to the first pod under the load bound.
fn bounded_hash<'a>(
    pool: &[&'a String],
    key: u64,
    load: impl Fn(&String) -> usize,
) -> Option<&'a String> {
    if pool.is_empty() {
        return None;
    }
    let total: usize = pool.iter().map(|a| load(a)).sum();
    // Average load counting this request; ceil so that a single request always fits.
    let bound = ((total + 1) as f64 / pool.len() as f64 * LOAD_FACTOR).ceil() as usize;
    let mut ring: Vec<(u64, &String)> = pool
        .iter()
        .flat_map(|a| (0..RING_REPLICAS).map(move |i| (hash_of(&(a.as_str(), i)), *a)))
        .collect();
    ring.sort_unstable();
    let start = ring.partition_point(|(point, _)| *point < key);
    (0..ring.len())
        .map(|i| ring[(start + i) % ring.len()].1)
        .find(|a| load(a) < bound)
        .or_else(|| least_loaded(pool, &load))
}

/// A stable 64-bit hash (SipHash with fixed keys: the same on every gateway replica, so all
/// replicas send one prefix to the same pod).
pub fn hash_of(value: &impl Hash) -> u64 {
    #[allow(deprecated)]
    let mut hasher = std::hash::SipHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:8200")).collect()
    }

    #[test]
    fn least_load_spreads_evenly_and_releases_on_drop() {
        let balancer = Balancer::default();
        let pods = pods(3);
        let leases: Vec<Lease> = (0..31)
            .filter_map(|_| balancer.pick(&pods, &[], Pick::LeastLoad))
            .collect();
        let loads: Vec<usize> = pods.iter().map(|p| balancer.load(p)).collect();
        assert_eq!(loads.iter().sum::<usize>(), 31);
        assert!(loads.iter().all(|l| (10..=11).contains(l)), "{loads:?}");
        drop(leases);
        assert!(pods.iter().all(|p| balancer.load(p) == 0));
    }

    #[test]
    fn ties_are_broken_at_random() {
        let pods = pods(3);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            if let Some(lease) = Balancer::default().pick(&pods, &[], Pick::LeastLoad) {
                seen.insert(lease.address().to_owned());
            }
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn tried_pods_are_avoided_until_none_is_left() {
        let balancer = Balancer::default();
        let pods = pods(2);
        let tried = vec![pods[0].clone()];
        for _ in 0..20 {
            let lease = balancer.pick(&pods, &tried, Pick::LeastLoad);
            assert_eq!(lease.map(|l| l.address().to_owned()), Some(pods[1].clone()));
        }
        assert!(balancer.pick(&pods, &pods, Pick::LeastLoad).is_some());
        assert!(balancer.pick(&[], &[], Pick::LeastLoad).is_none());
    }

    #[test]
    fn prefix_hash_is_sticky_until_the_pod_is_overloaded() {
        let balancer = Balancer::default();
        let pods = pods(4);
        let key = hash_of(&"You are a helpful assistant.");
        let first = balancer.pick(&pods, &[], Pick::Hash(key));
        let home = first.as_ref().map(|l| l.address().to_owned());
        drop(first);
        for _ in 0..10 {
            let again = balancer.pick(&pods, &[], Pick::Hash(key));
            assert_eq!(again.map(|l| l.address().to_owned()), home);
        }
        // Held leases pile up on the home pod until the bound sends the overflow elsewhere.
        let held: Vec<Lease> = (0..40)
            .filter_map(|_| balancer.pick(&pods, &[], Pick::Hash(key)))
            .collect();
        let max = pods.iter().map(|p| balancer.load(p)).max().unwrap_or(0);
        assert!(
            max <= (40.0f64 / 4.0 * LOAD_FACTOR).ceil() as usize,
            "{max}"
        );
        assert_eq!(held.len(), 40);
        // Other keys land on other pods.
        let homes: std::collections::BTreeSet<String> = (0..50)
            .filter_map(|i| Balancer::default().pick(&pods, &[], Pick::Hash(hash_of(&i))))
            .map(|l| l.address().to_owned())
            .collect();
        assert!(homes.len() > 1);
    }
}
