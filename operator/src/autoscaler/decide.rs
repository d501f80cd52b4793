//! Pure decision logic: demand samples in, desired replicas out. No I/O and no clock of its own
//! (every call gets `now`), so each rule is unit-tested with made-up instants.
//!
//! The rules:
//! - demand = requests in flight + requests held at the gateways, averaged over the window;
//! - recommendation = ceil(average / targetInFlight) within [minReplicas, maxReplicas], and at
//!   least 1 while anything is in flight or held or a request arrived since the last scrape
//!   (so the gateway's 0 -> 1 is never undone while it holds a request);
//! - scale up at once to the recommendation;
//! - scale down to the highest recommendation of the last `scaleDownDelay` (each one holding
//!   until the next tick), and only once the autoscaler has watched the model for that long
//!   without a gap: a recommendation of 0 needs a whole delay in which no request arrived;
//! - no answer from any gateway: hold the current replicas and restart the delay.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use glm_crds::AutoscalingSpec;

/// A model's autoscaling settings, as the decision uses them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bounds {
    pub min: i32,
    pub max: i32,
    pub target: i32,
    pub delay: Duration,
}

impl Bounds {
    /// `None` when the spec is unusable (it passed no schema validation): the model is left alone.
    pub fn from_spec(spec: &AutoscalingSpec) -> Option<Self> {
        let valid = spec.min_replicas >= 0
            && spec.max_replicas >= 1
            && spec.min_replicas <= spec.max_replicas
            && spec.target_in_flight > 0;
        valid.then_some(())?;
        Some(Self {
            min: spec.min_replicas,
            max: spec.max_replicas,
            target: spec.target_in_flight,
            delay: spec.scale_down_delay()?,
        })
    }
}

/// One model's demand as summed over the gateways that answered a scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Demand {
    /// Requests being served (forwarded upstream).
    pub in_flight: f64,
    /// Requests waiting at a gateway (for a replica to become ready, or for capacity).
    pub held: f64,
    /// A request arrived since the previous scrape (some gateway's request counter moved).
    pub arrived: bool,
    /// Every gateway replica answered: without that, demand may be undercounted and the tick
    /// does not vote for a scale-down.
    pub complete: bool,
}

impl Demand {
    fn busy(&self) -> bool {
        self.arrived || self.in_flight > 0.0 || self.held > 0.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    ScaledUp,
    ScaledDown,
    /// Replicas match demand.
    Steady,
    /// Demand wants fewer replicas; waiting out `scaleDownDelay`.
    ScaleDownPending,
    /// No gateway answered: replicas held.
    MetricsUnavailable,
    /// `spec.replicas` was outside [minReplicas, maxReplicas] and was brought back.
    OutOfBounds,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ScaledUp => "ScaledUp",
            Reason::ScaledDown => "ScaledDown",
            Reason::Steady => "Steady",
            Reason::ScaleDownPending => "ScaleDownPending",
            Reason::MetricsUnavailable => "MetricsUnavailable",
            Reason::OutOfBounds => "OutOfBounds",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub desired: i32,
    pub reason: Reason,
    pub message: String,
}

/// What the autoscaler remembers about one model between ticks.
#[derive(Debug, Default)]
pub struct History {
    /// Demand samples of the averaging window.
    samples: VecDeque<(Instant, f64)>,
    /// Recommendations of the last `scaleDownDelay`.
    recommendations: VecDeque<(Instant, i32)>,
    /// Since when demand was observed without a gap.
    watched_since: Option<Instant>,
}

impl History {
    /// Decides the replicas of a model now running `current`, given this tick's demand (`None`:
    /// no gateway answered).
    pub fn decide(
        &mut self,
        now: Instant,
        current: i32,
        bounds: &Bounds,
        window: Duration,
        demand: Option<Demand>,
    ) -> Decision {
        let Some(demand) = demand else {
            self.watched_since = None;
            self.recommendations.clear();
            return self.hold_without_metrics(current, bounds);
        };
        let watched_since = *self.watched_since.get_or_insert(now);
        let average = self.average(now, window, demand.in_flight + demand.held);
        let by_load = replicas_for(average, bounds.target);
        let mut recommended = by_load.clamp(bounds.min, bounds.max);
        if demand.busy() {
            recommended = recommended.max(1);
        }
        // An incomplete tick only votes for keeping what runs (it may undercount).
        let vote = if demand.complete {
            recommended
        } else {
            recommended.max(current)
        };
        self.remember(now, bounds.delay, vote);
        let figures = format!(
            "average demand {average:.2} (in flight {:.0}, held {:.0}) over {}s / targetInFlight {} -> {recommended}",
            demand.in_flight,
            demand.held,
            window.as_secs(),
            bounds.target
        );
        if recommended > current {
            return decision(recommended, Reason::ScaledUp, figures);
        }
        if current > bounds.max {
            return decision(
                bounds.max,
                Reason::OutOfBounds,
                format!("above maxReplicas {}", bounds.max),
            );
        }
        if recommended >= current {
            return decision(current, Reason::Steady, figures);
        }
        let stable = self
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(current);
        let waited = now.saturating_duration_since(watched_since);
        if stable < current && waited >= bounds.delay {
            let note = format!(
                "{figures}; highest need over scaleDownDelay {}s: {stable}",
                bounds.delay.as_secs()
            );
            return decision(stable, Reason::ScaledDown, note);
        }
        let unheard = if demand.complete {
            ""
        } else {
            "; a gateway replica did not answer"
        };
        decision(
            current,
            Reason::ScaleDownPending,
            format!(
                "{figures}; fewer replicas once demand stays lower for scaleDownDelay {}s{unheard}",
                bounds.delay.as_secs()
            ),
        )
    }

    fn hold_without_metrics(&self, current: i32, bounds: &Bounds) -> Decision {
        let bounded = current.clamp(bounds.min, bounds.max);
        if bounded != current {
            let note = format!(
                "replicas {current} outside [{}, {}] (no gateway metrics)",
                bounds.min, bounds.max
            );
            return decision(bounded, Reason::OutOfBounds, note);
        }
        decision(
            current,
            Reason::MetricsUnavailable,
            format!("no gateway answered a scrape: holding {current} replicas"),
        )
    }

    /// Adds a sample and returns the window's average.
    fn average(&mut self, now: Instant, window: Duration, value: f64) -> f64 {
        self.samples.push_back((now, value.max(0.0)));
        while let Some((at, _)) = self.samples.front() {
            if self.samples.len() > 1 && now.saturating_duration_since(*at) >= window {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        let sum: f64 = self.samples.iter().map(|(_, v)| v).sum();
        sum / self.samples.len() as f64
    }

    /// Keeps the recommendations of the last `delay`, plus the one in force when it began
    /// (each holds until the next): the highest of them is what demand needed all along.
    fn remember(&mut self, now: Instant, delay: Duration, recommended: i32) {
        self.recommendations.push_back((now, recommended));
        while let Some((next, _)) = self.recommendations.get(1) {
            if now.saturating_duration_since(*next) >= delay {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
    }
}

fn decision(desired: i32, reason: Reason, message: String) -> Decision {
    Decision {
        desired,
        reason,
        message,
    }
}

/// ceil(demand / target), saturating; 0 for no demand.
pub fn replicas_for(demand: f64, target: i32) -> i32 {
    if !(demand.is_finite() && demand > 0.0) || target <= 0 {
        return 0;
    }
    let replicas = (demand / f64::from(target)).ceil();
    if replicas >= f64::from(i32::MAX) {
        i32::MAX
    } else {
        replicas as i32
    }
}
