//! The scrape contract with the gateway, and summing its replicas' figures per model.
//!
//! Each gateway replica's `/metrics` (Prometheus text format) carries, per GLMModel (labels
//! `namespace` and `model`: the object's namespace and metadata.name):
//! - `glm_gateway_model_in_flight` (gauge): requests being served;
//! - `glm_gateway_model_held` (gauge): requests waiting (scale from zero, capacity);
//! - `glm_gateway_model_requests_total` (counter): requests received.

use std::collections::{BTreeMap, HashMap};

use super::decide::Demand;

pub const IN_FLIGHT: &str = "glm_gateway_model_in_flight";
pub const HELD: &str = "glm_gateway_model_held";
pub const REQUESTS: &str = "glm_gateway_model_requests_total";

/// A GLMModel: namespace and name.
pub type ModelKey = (String, String);

/// One model's figures at one gateway replica.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ModelFigures {
    pub in_flight: f64,
    pub held: f64,
    pub requests: f64,
}

/// What one gateway replica reported.
pub type Report = BTreeMap<ModelKey, ModelFigures>;

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("no answer within --autoscaler-scrape-timeout")]
    Timeout,
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("reading the body: {0}")]
    Body(String),
    #[error("not the Prometheus text format: {0}")]
    Parse(String),
}

impl ScrapeError {
    /// The `reason` label of `glm_operator_autoscaler_scrape_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ScrapeError::Connect(_) => "connect",
            ScrapeError::Timeout => "timeout",
            ScrapeError::Status(_) => "status",
            ScrapeError::Body(_) => "body",
            ScrapeError::Parse(_) => "parse",
        }
    }
}

/// Reads the three per-model series out of a `/metrics` page; other series are ignored. A line
/// that is not a comment, a blank or a sample fails the page (it is not the text format).
pub fn parse(text: &str) -> Result<Report, ScrapeError> {
    let mut report = Report::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample = sample(line)
            .ok_or_else(|| ScrapeError::Parse(format!("line {}: {line:.80}", number + 1)))?;
        if ![IN_FLIGHT, HELD, REQUESTS].contains(&sample.name) || !sample.value.is_finite() {
            continue;
        }
        let label = |key: &str| {
            sample
                .labels
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let (Some(ns), Some(model)) = (label("namespace"), label("model")) else {
            continue;
        };
        let figures = report.entry((ns, model)).or_default();
        match sample.name {
            IN_FLIGHT => figures.in_flight += sample.value,
            HELD => figures.held += sample.value,
            _ => figures.requests += sample.value,
        }
    }
    Ok(report)
}

struct Sample<'a> {
    name: &'a str,
    labels: Vec<(String, String)>,
    value: f64,
}

/// `name{label="value",...} value [timestamp]` (the labels optional).
fn sample(line: &str) -> Option<Sample<'_>> {
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let (name, mut rest) = line.split_at(end);
    if name.is_empty() {
        return None;
    }
    let mut labels = Vec::new();
    if let Some(inner) = rest.trim_start().strip_prefix('{') {
        let (parsed, after) = label_pairs(inner)?;
        labels = parsed;
        rest = after;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next()?.parse::<f64>().ok()?;
    // An optional timestamp, then nothing.
    if fields.next().is_some_and(|t| t.parse::<i64>().is_err()) || fields.next().is_some() {
        return None;
    }
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The pairs of `key="value",...}` and what follows the closing brace.
fn label_pairs(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut pairs = Vec::new();
    loop {
        text = text.trim_start();
        if let Some(after) = text.strip_prefix('}') {
            return Some((pairs, after));
        }
        let (key, after) = text.split_once('=')?;
        let mut chars = after.trim_start().strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let close = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        pairs.push((key.trim().to_owned(), value));
        let quoted = after.trim_start().strip_prefix('"')?;
        text = quoted[close + 1..].trim_start();
        text = text.strip_prefix(',').unwrap_or(text);
    }
}

/// Request counters per gateway replica and model, from the previous scrape: a counter that
/// moved means a request arrived in between (a gateway answering again after a missed scrape
/// still shows what it counted meanwhile).
#[derive(Debug, Default)]
pub struct Counters {
    last: HashMap<String, Report>,
}

/// One tick's scrape results.
#[derive(Debug, Default)]
pub struct Tick {
    /// Gateway replicas asked (their URLs).
    pub asked: Vec<String>,
    /// The reports of those that answered, by gateway URL.
    pub answers: Vec<(String, Report)>,
    /// Gateway replicas whose failure does not make the tick incomplete (terminating ones).
    pub optional_failures: usize,
}

impl Counters {
    /// Sums the answering replicas' figures per model. `None` when no replica answered (the
    /// autoscaler then holds replicas); models no replica mentions have zero demand.
    pub fn observe(&mut self, tick: &Tick) -> Option<Totals> {
        if tick.answers.is_empty() {
            return None;
        }
        let answered = tick.answers.len() + tick.optional_failures;
        let complete = answered >= tick.asked.len();
        let mut totals = Totals {
            complete,
            models: BTreeMap::new(),
        };
        for (gateway, report) in &tick.answers {
            let previous = self.last.get(gateway);
            for (key, figures) in report {
                let before = previous
                    .and_then(|p| p.get(key))
                    .map_or(0.0, |f| f.requests);
                let demand = totals.models.entry(key.clone()).or_insert(Demand {
                    complete,
                    ..Demand::default()
                });
                demand.in_flight += figures.in_flight;
                demand.held += figures.held;
                // A reset (the replica restarted) with requests since counts as an arrival.
                demand.arrived |= figures.requests != before && figures.requests > 0.0;
            }
        }
        for (gateway, report) in &tick.answers {
            self.last.insert(gateway.clone(), report.clone());
        }
        // Replicas no longer discovered are gone (pod IPs churn): forget them.
        self.last.retain(|g, _| tick.asked.contains(g));
        Some(totals)
    }
}

/// Per-model demand of one tick.
#[derive(Debug, Default, PartialEq)]
pub struct Totals {
    pub complete: bool,
    pub models: BTreeMap<ModelKey, Demand>,
}

impl Totals {
    /// The demand of `key`: zero when no replica mentions it.
    pub fn demand(&self, key: &ModelKey) -> Demand {
        self.models.get(key).copied().unwrap_or(Demand {
            complete: self.complete,
            ..Demand::default()
        })
    }
}
