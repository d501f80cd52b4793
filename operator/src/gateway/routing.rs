//! The routing table: which GLMModel serves which model name, and how to route to it.
//!
//! Pure data, built from a snapshot of [`ModelRecord`]s (one per GLMModel) so that every rule here is
//! unit-testable without a cluster. The gateway rebuilds the whole table on each watch event: tables
//! are small (one entry per model) and a rebuild keeps the rules in one place. Which pods serve a
//! route comes from EndpointSlices ([`super::endpoints`]), joined at request time by
//! [`Route::service_key`].

use std::collections::BTreeMap;
use std::time::Duration;

use glm_crds::RoutingStrategy;
use reqwest::Url;

/// Per-model routing settings (`spec.routing`), resolved against the gateway's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteSettings {
    pub strategy: RoutingStrategy,
    /// Characters of the chat prompt hashed by `PrefixHash`.
    pub prefix_chars: usize,
    /// `spec.routing.holdTimeoutSeconds`; `None`: the gateway's `--gateway-hold-timeout`.
    pub hold_timeout: Option<Duration>,
}

/// What the gateway needs to know about one GLMModel, independent of the CRD's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRecord {
    pub namespace: String,
    /// `metadata.name` of the GLMModel; its Service has the same name.
    pub name: String,
    /// The name clients use in `"model"`: `spec.name`, defaulting to `metadata.name`.
    pub served_name: String,
    pub aliases: Vec<String>,
    /// `status.endpoint`, the base URL of the model's Service (used to match
    /// `--gateway-connect-to` overrides, never to route in-cluster).
    pub endpoint: Option<String>,
    /// `status.conditions[type=Ready].status == "True"`.
    pub ready: bool,
    /// `spec.replicas`: 0 means a request must scale the model up first.
    pub replicas: i32,
    pub settings: RouteSettings,
    /// Seconds since the epoch of `metadata.creationTimestamp` (0 when unknown).
    pub created: i64,
}

impl ModelRecord {
    /// `namespace/name`, the identity used in logs and to break ties.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Where requests for one served name go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The name the client asked for (primary name or alias).
    pub requested: String,
    /// The model's primary served name: the name the upstream knows it by.
    pub served_name: String,
    /// `metadata.name` of the GLMModel (and of its Service).
    pub name: String,
    pub namespace: String,
    /// `status.endpoint`, parsed; only for `--gateway-connect-to` overrides.
    pub endpoint: Option<Url>,
    /// The GLMModel's `Ready` condition: only ready models are listed by `/v1/models`.
    pub ready: bool,
    pub replicas: i32,
    pub settings: RouteSettings,
    /// `namespace/name` of the GLMModel behind the route.
    pub source: String,
    pub created: i64,
}

impl Route {
    /// True when the client used an alias the upstream does not know.
    pub fn is_alias(&self) -> bool {
        self.requested != self.served_name
    }

    /// The model's Service, as EndpointSlices name it (`kubernetes.io/service-name`).
    pub fn service_key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

/// Result of looking a requested model name up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// A GLMModel has this name, ready or not: requests wait for a ready pod (see
    /// [`super::hold`]).
    Found(&'a Route),
    Unknown,
}

/// A name claimed by more than one GLMModel; `winner` got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub name: String,
    pub winner: String,
    pub losers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingTable {
    routes: BTreeMap<String, Route>,
    conflicts: Vec<Conflict>,
}

/// One claim of a name by one model; ordered so that the best claim sorts first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    /// A ready model beats one that is not.
    not_ready: bool,
    /// A model's own served name beats another model's alias of the same name.
    is_alias: bool,
    /// Then the oldest model keeps the name, so a newcomer cannot hijack traffic.
    created: i64,
    /// Then `namespace/name`, so the result never depends on watch order.
    source: String,
}

impl RoutingTable {
    /// Builds the table. Every model is routable (one that is not ready gets its requests held
    /// until a pod is ready); `/v1/models` lists the ready ones.
    ///
    /// When several models claim one name the winner is, in order: a ready model, the model
    /// whose served name it is (over one that lists it as an alias), the oldest, the smallest
    /// `namespace/name`.
    pub fn build(records: &[ModelRecord]) -> Self {
        let mut claims: BTreeMap<String, Vec<(Claim, Route)>> = BTreeMap::new();
        for record in records {
            let endpoint = record.endpoint.as_deref().and_then(parse_endpoint);
            for (name, is_alias) in record_names(record) {
                let claim = Claim {
                    not_ready: !record.ready,
                    is_alias,
                    created: record.created,
                    source: record.key(),
                };
                let route = Route {
                    requested: name.to_owned(),
                    served_name: record.served_name.clone(),
                    name: record.name.clone(),
                    namespace: record.namespace.clone(),
                    endpoint: endpoint.clone(),
                    ready: record.ready,
                    replicas: record.replicas,
                    settings: record.settings.clone(),
                    source: record.key(),
                    created: record.created,
                };
                claims
                    .entry(name.to_owned())
                    .or_default()
                    .push((claim, route));
            }
        }

        let mut routes = BTreeMap::new();
        let mut conflicts = Vec::new();
        for (name, mut named) in claims {
            named.sort_by(|a, b| a.0.cmp(&b.0));
            // The same model may list its served name again as an alias: not a conflict.
            named.dedup_by(|later, first| later.0.source == first.0.source);
            let mut named = named.into_iter();
            let Some((_, winner)) = named.next() else {
                continue;
            };
            let losers: Vec<String> = named
                .filter(|(claim, _)| !claim.not_ready)
                .map(|(claim, _)| claim.source)
                .collect();
            if !losers.is_empty() {
                conflicts.push(Conflict {
                    name: name.clone(),
                    winner: winner.source.clone(),
                    losers,
                });
            }
            routes.insert(name, winner);
        }
        Self { routes, conflicts }
    }

    pub fn lookup(&self, name: &str) -> Lookup<'_> {
        match self.routes.get(name) {
            Some(route) => Lookup::Found(route),
            None => Lookup::Unknown,
        }
    }

    /// The route to use when a request names no model: only unambiguous when exactly one model
    /// is ready (the seed's `/tokenize` has no `model` field).
    pub fn sole_route(&self) -> Option<&Route> {
        let mut routes = self.ready_routes();
        let first = routes.next()?;
        routes.all(|r| r.source == first.source).then_some(first)
    }

    /// Every name of a ready model (primary names and aliases), sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.ready_routes().map(|r| r.requested.as_str())
    }

    /// Routes of ready models, by name.
    pub fn ready_routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values().filter(|r| r.ready)
    }

    /// Every route, ready or not.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.values()
    }

    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    /// Names of ready models.
    pub fn len(&self) -> usize {
        self.ready_routes().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The served name first, then the aliases; empty and repeated names dropped.
fn record_names(record: &ModelRecord) -> impl Iterator<Item = (&str, bool)> {
    let primary = std::iter::once((record.served_name.as_str(), false));
    let aliases = record
        .aliases
        .iter()
        .map(|alias| (alias.as_str(), alias != &record.served_name));
    primary
        .chain(aliases)
        .filter(|(name, _)| !name.trim().is_empty())
}

fn parse_endpoint(raw: &str) -> Option<Url> {
    let url = Url::parse(raw.trim()).ok()?;
    matches!(url.scheme(), "http" | "https")
        .then_some(url)
        .filter(|u| u.host_str().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ns: &str, name: &str, served: &str, aliases: &[&str], ready: bool) -> ModelRecord {
        ModelRecord {
            namespace: ns.into(),
            name: name.into(),
            served_name: served.into(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            endpoint: Some(format!("http://{name}.{ns}.svc:8080")),
            ready,
            replicas: 1,
            settings: RouteSettings::default(),
            created: 100,
        }
    }

    fn source_of(table: &RoutingTable, name: &str) -> Option<String> {
        match table.lookup(name) {
            Lookup::Found(route) => Some(route.source.clone()),
            Lookup::Unknown => None,
        }
    }

    #[test]
    fn model_is_routed_by_served_name_and_aliases() {
        let table = RoutingTable::build(&[record("ml", "glm4", "glm-4-9b-chat", &["glm4"], true)]);
        assert_eq!(
            source_of(&table, "glm-4-9b-chat").as_deref(),
            Some("ml/glm4")
        );
        let Lookup::Found(alias) = table.lookup("glm4") else {
            panic!("alias must be routed");
        };
        assert!(alias.is_alias());
        assert_eq!(alias.served_name, "glm-4-9b-chat");
        assert_eq!(alias.service_key(), ("ml".to_owned(), "glm4".to_owned()));
        assert_eq!(
            alias.endpoint.as_ref().map(Url::as_str),
            Some("http://glm4.ml.svc:8080/")
        );
        assert_eq!(table.names().collect::<Vec<_>>(), ["glm-4-9b-chat", "glm4"]);
    }

    #[test]
    fn not_ready_model_is_routed_for_holding_but_not_listed() {
        let table = RoutingTable::build(&[record("ml", "bge", "bge-m3", &["bge"], false)]);
        assert_eq!(source_of(&table, "bge-m3").as_deref(), Some("ml/bge"));
        assert_eq!(source_of(&table, "bge").as_deref(), Some("ml/bge"));
        assert_eq!(table.lookup("gpt-4"), Lookup::Unknown);
        assert!(table.is_empty());
        assert_eq!(table.names().count(), 0);
        assert_eq!(table.routes().count(), 2);
    }

    #[test]
    fn an_unusable_status_endpoint_is_ignored() {
        let mut bad_scheme = record("ml", "b", "b", &[], true);
        bad_scheme.endpoint = Some("grpc://b:9000".into());
        let mut garbage = record("ml", "c", "c", &[], true);
        garbage.endpoint = Some("not a url".into());
        let table = RoutingTable::build(&[bad_scheme, garbage]);
        assert!(table.routes().all(|r| r.endpoint.is_none()));
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn duplicate_served_names_oldest_wins_then_key() {
        let mut young = record("a", "young", "qwen", &[], true);
        young.created = 200;
        let old = record("z", "old", "qwen", &[], true);
        let table = RoutingTable::build(&[young.clone(), old.clone()]);
        assert_eq!(source_of(&table, "qwen").as_deref(), Some("z/old"));
        assert_eq!(
            table.conflicts(),
            [Conflict {
                name: "qwen".into(),
                winner: "z/old".into(),
                losers: vec!["a/young".into()],
            }]
        );

        // Same age: namespace/name decides, whatever the input order.
        young.created = old.created;
        for records in [[young.clone(), old.clone()], [old.clone(), young.clone()]] {
            let table = RoutingTable::build(&records);
            assert_eq!(source_of(&table, "qwen").as_deref(), Some("a/young"));
        }
    }

    #[test]
    fn served_name_beats_another_models_alias() {
        let mut aliasing = record("a", "aliasing", "big", &["small"], true);
        aliasing.created = 1; // older, yet an alias still loses to a served name
        let owner = record("b", "owner", "small", &[], true);
        let table = RoutingTable::build(&[aliasing, owner]);
        assert_eq!(source_of(&table, "small").as_deref(), Some("b/owner"));
        assert_eq!(source_of(&table, "big").as_deref(), Some("a/aliasing"));
    }

    #[test]
    fn ready_claim_wins_over_not_ready_duplicate() {
        for records in [
            [
                record("a", "down", "m", &[], false),
                record("b", "up", "m", &[], true),
            ],
            [
                record("b", "up", "m", &[], true),
                record("a", "down", "m", &[], false),
            ],
        ] {
            let table = RoutingTable::build(&records);
            assert_eq!(source_of(&table, "m").as_deref(), Some("b/up"));
            assert!(table.conflicts().is_empty());
        }
    }

    #[test]
    fn self_alias_and_empty_names_are_ignored() {
        let table = RoutingTable::build(&[record("a", "m", "m", &["m", "", " "], true)]);
        assert_eq!(table.names().collect::<Vec<_>>(), ["m"]);
        assert!(table.conflicts().is_empty());
        let Lookup::Found(route) = table.lookup("m") else {
            panic!("m must be routed");
        };
        assert!(!route.is_alias());
    }

    #[test]
    fn sole_route_only_when_one_model_is_ready() {
        let one = RoutingTable::build(&[
            record("a", "m", "m", &["alias"], true),
            record("a", "cold", "cold", &[], false),
        ]);
        assert_eq!(one.sole_route().map(|r| r.served_name.as_str()), Some("m"));
        let two = RoutingTable::build(&[
            record("a", "m", "m", &[], true),
            record("a", "n", "n", &[], true),
        ]);
        assert!(two.sole_route().is_none());
        assert!(RoutingTable::default().sole_route().is_none());
    }
}
