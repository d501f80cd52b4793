use std::time::{Duration, Instant};

use glm_crds::{AutoscalingSpec, GLMModel};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;

use super::decide::{replicas_for, Bounds, Demand, History, Reason};
use super::discovery::targets_from_slices;
use super::effect::next_status;
use super::scrape::{parse, Counters, ModelFigures, Tick};

const WINDOW: Duration = Duration::from_secs(30);
const DELAY: Duration = Duration::from_secs(60);

fn bounds(min: i32, max: i32, target: i32) -> Bounds {
    Bounds {
        min,
        max,
        target,
        delay: DELAY,
    }
}

fn demand(in_flight: f64, held: f64, arrived: bool) -> Option<Demand> {
    Some(Demand {
        in_flight,
        held,
        arrived,
        complete: true,
    })
}

fn idle() -> Option<Demand> {
    demand(0.0, 0.0, false)
}

fn secs(t0: Instant, s: u64) -> Instant {
    t0 + Duration::from_secs(s)
}

#[test]
fn replicas_are_demand_over_target_rounded_up() {
    assert_eq!(replicas_for(0.0, 4), 0);
    assert_eq!(replicas_for(0.1, 4), 1);
    assert_eq!(replicas_for(4.0, 4), 1);
    assert_eq!(replicas_for(4.5, 4), 2);
    assert_eq!(replicas_for(f64::NAN, 4), 0);
    assert_eq!(replicas_for(f64::INFINITY, 4), 0);
    assert_eq!(replicas_for(1e300, 1), i32::MAX);
}

#[test]
fn the_window_averages_demand() {
    let t0 = Instant::now();
    let mut h = History::default();
    let b = bounds(1, 10, 4);
    // 16 in flight once, then nothing: averaged over the window, not the peak.
    let d = h.decide(t0, 1, &b, WINDOW, demand(16.0, 0.0, true));
    assert_eq!((d.desired, d.reason), (4, Reason::ScaledUp));
    let d = h.decide(secs(t0, 10), 4, &b, WINDOW, demand(0.0, 0.0, false));
    // (16 + 0) / 2 = 8 -> 2 replicas wanted, but down waits for the delay.
    assert_eq!((d.desired, d.reason), (4, Reason::ScaleDownPending));
    assert!(d.message.contains("average demand 8.00"), "{}", d.message);
    // Samples older than the window drop out: at t=40 only t=10.. remain.
    let d = h.decide(secs(t0, 20), 4, &b, WINDOW, demand(8.0, 0.0, true));
    assert!(d.message.contains("average demand 8.00"), "{}", d.message);
    let d = h.decide(secs(t0, 40), 4, &b, WINDOW, demand(8.0, 0.0, true));
    // Window (30 s) at t=40 holds t=20 and t=40: (8 + 8) / 2.
    assert!(d.message.contains("average demand 8.00"), "{}", d.message);
}

#[test]
fn scale_up_is_immediate_and_bounded_by_max() {
    let t0 = Instant::now();
    let mut h = History::default();
    let d = h.decide(t0, 1, &bounds(1, 3, 2), WINDOW, demand(50.0, 7.0, true));
    assert_eq!((d.desired, d.reason), (3, Reason::ScaledUp));
    // Held requests are demand too.
    let mut h = History::default();
    let d = h.decide(t0, 1, &bounds(1, 8, 2), WINDOW, demand(0.0, 5.0, true));
    assert_eq!((d.desired, d.reason), (3, Reason::ScaledUp));
}

#[test]
fn scale_down_waits_for_the_delay_of_lower_demand() {
    let t0 = Instant::now();
    let b = bounds(1, 10, 1);
    let mut h = History::default();
    assert_eq!(
        h.decide(t0, 3, &b, Duration::from_secs(1), demand(3.0, 0.0, true))
            .desired,
        3
    );
    // Demand drops to 1 (t=10): pending until a whole delay of lower recommendations.
    let d = h.decide(
        secs(t0, 10),
        3,
        &b,
        Duration::from_secs(1),
        demand(1.0, 0.0, true),
    );
    assert_eq!((d.desired, d.reason), (3, Reason::ScaleDownPending));
    let d = h.decide(
        secs(t0, 60),
        3,
        &b,
        Duration::from_secs(1),
        demand(1.0, 0.0, true),
    );
    assert_eq!(
        (d.desired, d.reason),
        (3, Reason::ScaleDownPending),
        "t=0 still in the delay"
    );
    let d = h.decide(
        secs(t0, 70),
        3,
        &b,
        Duration::from_secs(1),
        demand(1.0, 0.0, true),
    );
    assert_eq!(
        (d.desired, d.reason),
        (1, Reason::ScaledDown),
        "{}",
        d.message
    );
}

#[test]
fn a_spike_during_the_delay_restarts_it() {
    let t0 = Instant::now();
    let b = bounds(1, 10, 1);
    let w = Duration::from_secs(1);
    let mut h = History::default();
    h.decide(t0, 2, &b, w, demand(2.0, 0.0, true));
    h.decide(secs(t0, 61), 2, &b, w, demand(1.0, 0.0, true));
    // 2 again at t=90: the t=61.. run of 1s is broken.
    assert_eq!(
        h.decide(secs(t0, 90), 2, &b, w, demand(2.0, 0.0, true))
            .reason,
        Reason::Steady
    );
    let d = h.decide(secs(t0, 140), 2, &b, w, demand(1.0, 0.0, true));
    assert_eq!((d.desired, d.reason), (2, Reason::ScaleDownPending));
    // The t=90 recommendation held until the next tick (t=140): 60 s later, not before.
    let d = h.decide(secs(t0, 199), 2, &b, w, demand(1.0, 0.0, true));
    assert_eq!((d.desired, d.reason), (2, Reason::ScaleDownPending));
    let d = h.decide(secs(t0, 200), 2, &b, w, demand(1.0, 0.0, true));
    assert_eq!((d.desired, d.reason), (1, Reason::ScaledDown));
}

#[test]
fn zero_only_after_a_delay_without_any_request() {
    let t0 = Instant::now();
    let b = bounds(0, 4, 4);
    let w = Duration::from_secs(1);
    let mut h = History::default();
    assert_eq!(
        h.decide(t0, 1, &b, w, idle()).reason,
        Reason::ScaleDownPending
    );
    // A request that came and went between two scrapes (counter moved, gauges 0) counts.
    let d = h.decide(secs(t0, 50), 1, &b, w, demand(0.0, 0.0, true));
    assert_eq!((d.desired, d.reason), (1, Reason::Steady));
    let d = h.decide(secs(t0, 100), 1, &b, w, idle());
    assert_eq!((d.desired, d.reason), (1, Reason::ScaleDownPending));
    // The arrival seen at t=50 counts until the next scrape (t=100): zero 60 s after that.
    let d = h.decide(secs(t0, 159), 1, &b, w, idle());
    assert_eq!((d.desired, d.reason), (1, Reason::ScaleDownPending));
    let d = h.decide(secs(t0, 160), 1, &b, w, idle());
    assert_eq!(
        (d.desired, d.reason),
        (0, Reason::ScaledDown),
        "{}",
        d.message
    );
    // At zero with nothing arriving: steady at zero.
    assert_eq!(
        h.decide(secs(t0, 170), 0, &b, w, idle()).reason,
        Reason::Steady
    );
}

#[test]
fn min_replicas_above_zero_never_scales_to_zero() {
    let t0 = Instant::now();
    let mut h = History::default();
    let b = bounds(2, 4, 4);
    h.decide(t0, 3, &b, WINDOW, idle());
    let d = h.decide(secs(t0, 500), 3, &b, WINDOW, idle());
    assert_eq!((d.desired, d.reason), (2, Reason::ScaledDown));
}

#[test]
fn the_gateways_zero_to_one_is_kept_while_a_request_is_held() {
    let t0 = Instant::now();
    let b = bounds(0, 4, 4);
    let w = Duration::from_secs(1);
    let mut h = History::default();
    // Idle at zero for a long time.
    h.decide(t0, 0, &b, w, idle());
    h.decide(secs(t0, 100), 0, &b, w, idle());
    // The gateway scaled to 1 and holds a request while the pod starts: keep it.
    for t in [101, 200, 400] {
        let d = h.decide(secs(t0, t), 1, &b, w, demand(0.0, 1.0, false));
        assert_eq!((d.desired, d.reason), (1, Reason::Steady), "t={t}");
    }
    // Served, then idle: zero again only a whole delay after the last request.
    let d = h.decide(secs(t0, 401), 1, &b, w, demand(1.0, 0.0, true));
    assert_eq!(d.desired, 1);
    let d = h.decide(secs(t0, 460), 1, &b, w, idle());
    assert_eq!((d.desired, d.reason), (1, Reason::ScaleDownPending));
    let d = h.decide(secs(t0, 519), 1, &b, w, idle());
    assert_eq!((d.desired, d.reason), (1, Reason::ScaleDownPending));
    let d = h.decide(secs(t0, 520), 1, &b, w, idle());
    assert_eq!((d.desired, d.reason), (0, Reason::ScaledDown));
}

#[test]
fn missing_scrapes_hold_replicas_and_restart_the_delay() {
    let t0 = Instant::now();
    let b = bounds(0, 4, 4);
    let w = Duration::from_secs(1);
    let mut h = History::default();
    h.decide(t0, 2, &b, w, idle());
    let d = h.decide(secs(t0, 59), 2, &b, w, None);
    assert_eq!((d.desired, d.reason), (2, Reason::MetricsUnavailable));
    // Back at t=61: without the gap it would scale down now; the delay starts again instead.
    let d = h.decide(secs(t0, 61), 2, &b, w, idle());
    assert_eq!((d.desired, d.reason), (2, Reason::ScaleDownPending));
    let d = h.decide(secs(t0, 121), 2, &b, w, idle());
    assert_eq!((d.desired, d.reason), (0, Reason::ScaledDown));
}

#[test]
fn an_incomplete_scrape_scales_up_but_never_down() {
    let t0 = Instant::now();
    let b = bounds(0, 8, 1);
    let w = Duration::from_secs(1);
    let partial = |in_flight| {
        Some(Demand {
            in_flight,
            complete: false,
            ..Demand::default()
        })
    };
    let mut h = History::default();
    assert_eq!(h.decide(t0, 2, &b, w, partial(4.0)).desired, 4);
    for t in [10, 100, 200] {
        let d = h.decide(secs(t0, t), 4, &b, w, partial(0.0));
        assert_eq!(
            (d.desired, d.reason),
            (4, Reason::ScaleDownPending),
            "t={t}"
        );
        assert!(d.message.contains("did not answer"), "{}", d.message);
    }
}

#[test]
fn replicas_outside_the_bounds_are_brought_back() {
    let t0 = Instant::now();
    let b = bounds(2, 4, 4);
    let d = History::default().decide(t0, 9, &b, WINDOW, idle());
    assert_eq!((d.desired, d.reason), (4, Reason::OutOfBounds));
    let d = History::default().decide(t0, 0, &b, WINDOW, idle());
    assert_eq!((d.desired, d.reason), (2, Reason::ScaledUp));
    // Even without metrics.
    let d = History::default().decide(t0, 9, &b, WINDOW, None);
    assert_eq!((d.desired, d.reason), (4, Reason::OutOfBounds));
    let d = History::default().decide(t0, 3, &b, WINDOW, None);
    assert_eq!((d.desired, d.reason), (3, Reason::MetricsUnavailable));
}

#[test]
fn bounds_come_from_the_spec() {
    let spec = |min, max, target, delay: Option<&str>| AutoscalingSpec {
        min_replicas: min,
        max_replicas: max,
        target_in_flight: target,
        scale_down_delay: delay.map(str::to_owned),
    };
    assert_eq!(
        Bounds::from_spec(&spec(0, 3, 2, Some("90s"))),
        Some(Bounds {
            min: 0,
            max: 3,
            target: 2,
            delay: Duration::from_secs(90)
        })
    );
    assert_eq!(
        Bounds::from_spec(&spec(0, 3, 2, None)).map(|b| b.delay),
        Some(DELAY * 5)
    );
    assert_eq!(Bounds::from_spec(&spec(4, 3, 2, None)), None);
    assert_eq!(Bounds::from_spec(&spec(0, 3, 0, None)), None);
    assert_eq!(Bounds::from_spec(&spec(0, 3, 1, Some("soon"))), None);
}

const PAGE: &str = r#"# HELP glm_gateway_model_in_flight Requests being served
# TYPE glm_gateway_model_in_flight gauge
glm_gateway_model_in_flight{namespace="ai",model="chat"} 3
glm_gateway_model_in_flight{namespace="ai",model="embed"} 0
# TYPE glm_gateway_model_held gauge
glm_gateway_model_held{namespace="ai",model="chat"} 2
# TYPE glm_gateway_model_requests_total counter
glm_gateway_model_requests_total{namespace="ai",model="chat"} 41
glm_gateway_model_requests_total{namespace="ai",model="embed"} 7
# TYPE glm_gateway_requests_total counter
glm_gateway_requests_total{model="chat",route="/v1/chat/completions",status="200"} 41
# TYPE glm_gateway_model_latency_seconds histogram
glm_gateway_model_latency_seconds_bucket{namespace="ai",model="chat",le="+Inf"} 41
glm_gateway_model_latency_seconds_sum{namespace="ai",model="chat"} 12.5
glm_gateway_model_latency_seconds_count{namespace="ai",model="chat"} 41
"#;

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_owned(), name.to_owned())
}

#[test]
fn the_scrape_contract_is_read_from_the_text_format() {
    let report = parse(PAGE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        report.get(&key("ai", "chat")),
        Some(&ModelFigures {
            in_flight: 3.0,
            held: 2.0,
            requests: 41.0
        })
    );
    assert_eq!(
        report.get(&key("ai", "embed")),
        Some(&ModelFigures {
            in_flight: 0.0,
            held: 0.0,
            requests: 7.0
        })
    );
    assert_eq!(report.len(), 2, "{report:?}");
    assert!(parse("").unwrap_or_else(|e| panic!("{e}")).is_empty());
}

fn page(in_flight: u32, held: u32, requests: u32) -> String {
    format!(
        "glm_gateway_model_in_flight{{namespace=\"ai\",model=\"chat\"}} {in_flight}\n\
         glm_gateway_model_held{{namespace=\"ai\",model=\"chat\"}} {held}\n\
         glm_gateway_model_requests_total{{namespace=\"ai\",model=\"chat\"}} {requests}\n"
    )
}

fn tick(asked: &[&str], answers: &[(&str, String)]) -> Tick {
    Tick {
        asked: asked.iter().map(|s| s.to_string()).collect(),
        answers: answers
            .iter()
            .map(|(g, p)| (g.to_string(), parse(p).unwrap_or_else(|e| panic!("{e}"))))
            .collect(),
        optional_failures: 0,
    }
}

#[test]
fn replicas_are_summed_and_arrivals_seen_in_counters() {
    let mut counters = Counters::default();
    let chat = key("ai", "chat");
    let both = ["a", "b"];
    let t = counters
        .observe(&tick(&both, &[("a", page(2, 1, 5)), ("b", page(1, 0, 0))]))
        .unwrap_or_else(|| panic!("answers"));
    let d = t.demand(&chat);
    assert_eq!(
        (d.in_flight, d.held, d.arrived, d.complete),
        (3.0, 1.0, true, true)
    );
    // Same counters: no arrival.
    let t = counters
        .observe(&tick(&both, &[("a", page(0, 0, 5)), ("b", page(0, 0, 0))]))
        .unwrap_or_else(|| panic!("answers"));
    assert!(!t.demand(&chat).arrived);
    // b restarted (counter reset) after serving one request: an arrival.
    let t = counters
        .observe(&tick(&both, &[("a", page(0, 0, 5)), ("b", page(0, 0, 1))]))
        .unwrap_or_else(|| panic!("answers"));
    assert!(t.demand(&chat).arrived);
    // A model no replica mentions has zero demand.
    let other = t.demand(&key("ai", "other"));
    assert_eq!(
        (other.in_flight, other.arrived, other.complete),
        (0.0, false, true)
    );
}

#[test]
fn a_silent_replica_is_skipped_and_the_tick_marked_incomplete() {
    let mut counters = Counters::default();
    let chat = key("ai", "chat");
    counters.observe(&tick(
        &["a", "b"],
        &[("a", page(0, 0, 5)), ("b", page(0, 0, 3))],
    ));
    // b does not answer: a's figures alone, incomplete.
    let t = counters
        .observe(&tick(&["a", "b"], &[("a", page(4, 0, 5))]))
        .unwrap_or_else(|| panic!("answers"));
    let d = t.demand(&chat);
    assert_eq!((d.in_flight, d.arrived, d.complete), (4.0, false, false));
    // b answers again: the requests it counted meanwhile are seen.
    let t = counters
        .observe(&tick(
            &["a", "b"],
            &[("a", page(0, 0, 5)), ("b", page(0, 0, 9))],
        ))
        .unwrap_or_else(|| panic!("answers"));
    assert!(t.demand(&chat).arrived && t.complete);
    // A terminating replica's silence does not make the tick incomplete.
    let mut quiet = tick(&["a", "b"], &[("a", page(0, 0, 5))]);
    quiet.optional_failures = 1;
    assert!(counters.observe(&quiet).is_some_and(|t| t.complete));
    // Nobody answers: no figures at all.
    assert_eq!(counters.observe(&tick(&["a", "b"], &[])), None);
    assert_eq!(counters.observe(&tick(&[], &[])), None);
}

#[test]
fn gateway_replicas_come_from_the_endpoint_slices() {
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "glm-gateway-abc"},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
            {"addresses": ["10.0.0.1"]},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
            {"addresses": ["10.0.0.4"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.0.0.5"], "conditions": {"ready": false, "serving": false, "terminating": true}}
        ]
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let v6: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "glm-gateway-v6"},
        "addressType": "IPv6",
        "ports": [{"name": "metrics", "port": 9}, {"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["fd00::1"]}]
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let targets = targets_from_slices(&[slice, v6]);
    let urls: Vec<(&str, bool)> = targets
        .iter()
        .map(|t| (t.url.as_str(), t.terminating))
        .collect();
    assert_eq!(
        urls,
        [
            ("http://10.0.0.1:8080/metrics", false),
            ("http://10.0.0.2:8080/metrics", false),
            ("http://10.0.0.4:8080/metrics", true),
            ("http://[fd00::1]:8080/metrics", false),
        ]
    );
}

fn model_with(status: serde_json::Value) -> GLMModel {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "kubeglm.io/v1alpha1", "kind": "GLMModel",
        "metadata": {"name": "m", "namespace": "ai"},
        "spec": {"task": "chat", "source": "/m", "replicas": 2,
                 "autoscaling": {"minReplicas": 0, "maxReplicas": 4, "targetInFlight": 2}},
        "status": status,
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn status_is_written_when_the_decision_changes_only() {
    let now = Timestamp::from_second(1_800_000_000).unwrap_or_else(|e| panic!("{e}"));
    let steady = super::decide::Decision {
        desired: 2,
        reason: Reason::Steady,
        message: "average demand 3.00".into(),
    };
    let fresh = model_with(serde_json::json!({}));
    let status = next_status(&fresh, &steady, false, now).unwrap_or_else(|| panic!("first"));
    assert_eq!(
        (status.desired_replicas, status.reason.as_str()),
        (2, "Steady")
    );
    assert_eq!(status.last_scale_time, None);
    // The same decision with other figures: no write.
    let written = model_with(serde_json::json!({"autoscaling": status}));
    let figures = super::decide::Decision {
        message: "average demand 3.50".into(),
        ..steady.clone()
    };
    assert_eq!(next_status(&written, &figures, false, now), None);
    // A scale stamps the time.
    let up = super::decide::Decision {
        desired: 4,
        reason: Reason::ScaledUp,
        message: String::new(),
    };
    let scaled = next_status(&written, &up, true, now).unwrap_or_else(|| panic!("scaled"));
    assert_eq!(scaled.last_scale_time.map(|t| t.0), Some(now));
}

#[test]
fn the_text_format_parser_handles_escapes_timestamps_and_garbage() {
    let page =
        "glm_gateway_model_in_flight{model=\"a\\\"b\",namespace=\"x\\\\y\"} 2 1700000000000\n\
                glm_gateway_model_held { namespace = \"ns\" , model=\"m\", } +Inf\n\
                glm_gateway_model_requests_total{namespace=\"ns\",model=\"m\"} 1e3\n\
                glm_gateway_model_in_flight 5\n\
                other_metric{namespace=\"ns\",model=\"m\"} 9\n";
    let report = parse(page).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        report.get(&key("x\\y", "a\"b")).map(|f| f.in_flight),
        Some(2.0)
    );
    // +Inf is skipped (not a usable figure); the counter reads 1000.
    assert_eq!(
        report.get(&key("ns", "m")),
        Some(&ModelFigures {
            requests: 1000.0,
            ..ModelFigures::default()
        })
    );
    assert_eq!(report.len(), 2);
    for bad in [
        "<html>Not Found</html>",
        "glm_gateway_model_held{namespace=\"ns\" 1",
        "glm_gateway_model_held{namespace=\"ns\"} one",
        "glm_gateway_model_held 1 2 3",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
}
