//! The service map's numbers: requests, errors and a latency histogram per
//! edge (caller → callee) and per route of a callee, in 30-second buckets
//! over the last 15 minutes. Memory is fixed by caps on edges and routes
//! (what a map can show anyway); past them calls are counted, not kept.
use foldhash::HashMap;

use serde::Serialize;

/// Seconds per bucket, and buckets kept (15 minutes).
pub const BUCKET_SECS: u64 = 30;
pub const BUCKETS: usize = 30;
/// Latency histogram: bucket 0 is < 200 µs, each next one √2 wider; the
/// last one holds everything from ~13 s up.
const LATENCY_BUCKETS: usize = 32;
const FIRST_BOUND_US: f64 = 200.0;
/// Edges and routes kept; more are counted in `overflow`.
pub const MAX_EDGES: usize = 256;
pub const MAX_ROUTES: usize = 512;
/// Routes kept per callee (the rest of its calls count on the edge only).
const MAX_ROUTES_PER_NODE: usize = 32;
/// Recent errors remembered per edge.
const RECENT_ERRORS: usize = 8;

/// One bucket's counts.
#[derive(Clone)]
struct Red {
    /// Which 30-second slot this is (unix time / BUCKET_SECS).
    slot: u64,
    requests: u32,
    errors: u32,
    latency: [u32; LATENCY_BUCKETS],
}

impl Red {
    const EMPTY: Red = Red {
        slot: 0,
        requests: 0,
        errors: 0,
        latency: [0; LATENCY_BUCKETS],
    };
}

/// Counts over the buckets of the last 15 minutes.
#[derive(Clone)]
struct Series(Box<[Red; BUCKETS]>);

impl Series {
    fn new() -> Self {
        Series(Box::new([Red::EMPTY; BUCKETS]))
    }

    fn record(&mut self, now_secs: u64, duration_us: u64, error: bool) {
        let slot = now_secs / BUCKET_SECS;
        let b = &mut self.0[(slot % BUCKETS as u64) as usize];
        if b.slot != slot {
            *b = Red { slot, ..Red::EMPTY };
        }
        b.requests = b.requests.saturating_add(1);
        b.errors = b.errors.saturating_add(u32::from(error));
        let i = latency_bucket(duration_us);
        b.latency[i] = b.latency[i].saturating_add(1);
    }

    /// Totals over the last `window_secs` (whole buckets, the current one included).
    fn window(&self, now_secs: u64, window_secs: u64) -> Totals {
        let newest = now_secs / BUCKET_SECS;
        let oldest = newest.saturating_sub(window_secs.div_ceil(BUCKET_SECS).saturating_sub(1));
        let mut t = Totals::default();
        for b in self
            .0
            .iter()
            .filter(|b| b.slot >= oldest && b.slot <= newest && b.requests > 0)
        {
            t.requests += u64::from(b.requests);
            t.errors += u64::from(b.errors);
            for (sum, n) in t.latency.iter_mut().zip(b.latency) {
                *sum += u64::from(n);
            }
        }
        t
    }
}

fn latency_bucket(us: u64) -> usize {
    if (us as f64) < FIRST_BOUND_US {
        return 0;
    }
    let steps = 2.0 * (us as f64 / FIRST_BOUND_US).log2();
    (steps as usize + 1).min(LATENCY_BUCKETS - 1)
}

/// Upper bound (ms) of latency bucket `i`.
fn bucket_upper_ms(i: usize) -> f64 {
    FIRST_BOUND_US * 2f64.powf(i as f64 / 2.0) / 1000.0
}

/// Summed counts of a window.
#[derive(Default)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    latency: [u64; LATENCY_BUCKETS],
}

impl Totals {
    /// The bucket bound under which `q` of the requests fell (ms).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.requests == 0 {
            return None;
        }
        let want = (q * self.requests as f64).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(bucket_upper_ms(i));
            }
        }
        Some(bucket_upper_ms(LATENCY_BUCKETS - 1))
    }

    fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (a, b) in self.latency.iter_mut().zip(other.latency) {
            *a += b;
        }
    }

    fn stats(&self, window_secs: u64) -> Stats {
        Stats {
            requests: self.requests,
            errors: self.errors,
            rps: self.requests as f64 / window_secs as f64,
            error_rate: if self.requests == 0 {
                0.0
            } else {
                self.errors as f64 / self.requests as f64
            },
            p50_ms: self.quantile_ms(0.5),
            p99_ms: self.quantile_ms(0.99),
        }
    }
}

/// RED numbers of a node, edge or route over a window.
#[derive(Debug, Serialize, PartialEq)]
pub struct Stats {
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub error_rate: f64,
    /// Upper bound of the latency bucket holding the quantile.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A failed call, as the map's detail panel lists it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RecentError {
    pub unix_secs: u64,
    pub route: String,
    pub status: String,
    pub trace_id: String,
}

/// One observed call, in the map's terms.
pub struct Call<'a> {
    pub source: &'a str,
    pub target: &'a str,
    pub route: &'a str,
    pub duration_us: u64,
    /// Some(status text) when the call failed.
    pub error: Option<String>,
    /// Spelled out only for a failed call (kept in its recent errors).
    pub trace_id: &'a crate::trace_context::TraceId,
}

struct Edge {
    series: Series,
    errors: Vec<RecentError>,
    last_secs: u64,
}

impl Edge {
    fn record(&mut self, call: &Call, now_secs: u64) {
        self.last_secs = now_secs;
        self.series.record(now_secs, call.duration_us, call.error.is_some());
        if let Some(status) = &call.error {
            if self.errors.len() == RECENT_ERRORS {
                self.errors.remove(0);
            }
            self.errors.push(RecentError {
                unix_secs: now_secs,
                route: crate::http::cut(call.route, 256).to_owned(),
                status: status.clone(),
                trace_id: call.trace_id.to_string(),
            });
        }
    }
}

/// Edges and routes, bounded. Keyed in two levels so that a call to a known
/// edge and route is looked up with the call's borrowed names: only a new
/// edge or route allocates (this runs for every request).
#[derive(Default)]
pub struct Graph {
    /// caller → callee → edge.
    edges: HashMap<String, HashMap<String, Edge>>,
    edge_count: usize,
    /// callee → route → (series, last seen).
    routes: HashMap<String, HashMap<String, (Series, u64)>>,
    route_count: usize,
    /// When stale edges and routes were last forgotten.
    expired_at: u64,
    /// Calls not kept because a cap was reached.
    pub overflow: u64,
}

/// The map for a window, as `/api/graph` serves it.
#[derive(Debug, Serialize)]
pub struct GraphView {
    pub window_secs: u64,
    pub nodes: Vec<NodeView>,
    pub edges: Vec<EdgeView>,
    /// Calls past the edge/route caps since the agent started.
    pub overflow: u64,
}

#[derive(Debug, Serialize)]
pub struct NodeView {
    pub id: String,
    /// Calls into this node (sum of its inbound edges).
    pub inbound: Stats,
    pub routes: Vec<RouteView>,
}

#[derive(Debug, Serialize)]
pub struct EdgeView {
    pub source: String,
    pub target: String,
    #[serde(flatten)]
    pub stats: Stats,
    pub recent_errors: Vec<RecentError>,
}

#[derive(Debug, Serialize)]
pub struct RouteView {
    pub route: String,
    #[serde(flatten)]
    pub stats: Stats,
}

impl Graph {
    pub fn record(&mut self, call: &Call, now_secs: u64) {
        if now_secs >= self.expired_at + BUCKET_SECS {
            self.expire(now_secs);
        }
        // A known edge and route are found with the call's borrowed names
        // (one lookup each); only a new one allocates its key.
        let error = call.error.is_some();
        match self.edges.get_mut(call.source).and_then(|t| t.get_mut(call.target)) {
            Some(edge) => edge.record(call, now_secs),
            None if self.edge_count >= MAX_EDGES => {
                self.overflow += 1;
                return;
            }
            None => {
                self.edge_count += 1;
                let mut edge = Edge {
                    series: Series::new(),
                    errors: Vec::new(),
                    last_secs: now_secs,
                };
                edge.record(call, now_secs);
                self.edges
                    .entry(call.source.to_owned())
                    .or_default()
                    .insert(call.target.to_owned(), edge);
            }
        }
        let routes = self.routes.get_mut(call.target);
        let per_node = routes.as_ref().map_or(0, |r| r.len());
        match routes.and_then(|r| r.get_mut(call.route)) {
            Some((series, last)) => {
                series.record(now_secs, call.duration_us, error);
                *last = now_secs;
            }
            None if self.route_count >= MAX_ROUTES || per_node >= MAX_ROUTES_PER_NODE => self.overflow += 1,
            None => {
                self.route_count += 1;
                let mut series = Series::new();
                series.record(now_secs, call.duration_us, error);
                self.routes
                    .entry(call.target.to_owned())
                    .or_default()
                    .insert(call.route.to_owned(), (series, now_secs));
            }
        }
    }

    /// Forgets edges and routes not seen for the whole 15 minutes (checked
    /// once a bucket, so a full map makes room within 30 s of expiry).
    fn expire(&mut self, now_secs: u64) {
        self.expired_at = now_secs;
        let horizon = now_secs.saturating_sub(BUCKET_SECS * BUCKETS as u64);
        for targets in self.edges.values_mut() {
            targets.retain(|_, e| e.last_secs >= horizon);
        }
        self.edges.retain(|_, t| !t.is_empty());
        self.edge_count = self.edges.values().map(HashMap::len).sum();
        for routes in self.routes.values_mut() {
            routes.retain(|_, (_, last)| *last >= horizon);
        }
        self.routes.retain(|_, r| !r.is_empty());
        self.route_count = self.routes.values().map(HashMap::len).sum();
    }

    /// Upper bound of the bytes held (the caps make it fixed).
    pub fn bytes(&self) -> usize {
        let series = std::mem::size_of::<[Red; BUCKETS]>();
        (self.edge_count + self.route_count) * (series + 128)
    }

    pub fn view(&self, now_secs: u64, window_secs: u64) -> GraphView {
        let mut nodes: HashMap<&str, Totals> = HashMap::default();
        let mut edges = Vec::new();
        for (source, target, e) in self
            .edges
            .iter()
            .flat_map(|(s, targets)| targets.iter().map(move |(t, e)| (s, t, e)))
        {
            let t = e.series.window(now_secs, window_secs);
            if t.requests == 0 {
                continue;
            }
            nodes.entry(source).or_default();
            nodes.entry(target).or_default().add(&t);
            let horizon = now_secs.saturating_sub(window_secs);
            edges.push(EdgeView {
                source: source.clone(),
                target: target.clone(),
                stats: t.stats(window_secs),
                recent_errors: e.errors.iter().filter(|r| r.unix_secs >= horizon).cloned().collect(),
            });
        }
        edges.sort_by(|a, b| (&a.source, &a.target).cmp(&(&b.source, &b.target)));
        let mut out: Vec<NodeView> = nodes
            .into_iter()
            .map(|(id, inbound)| {
                let mut routes: Vec<RouteView> = self
                    .routes
                    .get(id)
                    .into_iter()
                    .flatten()
                    .map(|(route, (s, _))| (route, s.window(now_secs, window_secs)))
                    .filter(|(_, t)| t.requests > 0)
                    .map(|(route, t)| RouteView {
                        route: route.clone(),
                        stats: t.stats(window_secs),
                    })
                    .collect();
                routes.sort_by(|a, b| b.stats.requests.cmp(&a.stats.requests).then(a.route.cmp(&b.route)));
                NodeView {
                    id: id.to_owned(),
                    inbound: inbound.stats(window_secs),
                    routes,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        GraphView {
            window_secs,
            nodes: out,
            edges,
            overflow: self.overflow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: crate::trace_context::TraceId = crate::trace_context::TraceId([7; 16]);

    fn call<'a>(source: &'a str, target: &'a str, route: &'a str, ms: u64, error: bool) -> Call<'a> {
        Call {
            source,
            target,
            route,
            duration_us: ms * 1000,
            error: error.then(|| "500".to_owned()),
            trace_id: &TRACE,
        }
    }

    #[test]
    fn an_edge_counts_requests_errors_and_latency_within_the_window() {
        let mut g = Graph::default();
        let now = 10_000;
        for i in 0..100 {
            g.record(
                &call("web", "api", "/users/*", if i == 99 { 900 } else { 2 }, i % 10 == 0),
                now,
            );
        }
        g.record(&call("web", "api", "/users/*", 1, false), now - 600);
        let v = g.view(now, 60);
        assert_eq!(v.edges.len(), 1);
        let e = &v.edges[0];
        assert_eq!(
            (e.stats.requests, e.stats.errors),
            (100, 10),
            "the old call is outside 1 m"
        );
        assert!((e.stats.rps - 100.0 / 60.0).abs() < 1e-9);
        let p50 = e.stats.p50_ms.expect("p50");
        assert!((2.0..2.9).contains(&p50), "p50 bucket bound {p50}");
        assert!(e.stats.p99_ms.expect("p99") < 900.0 && e.stats.p99_ms.expect("p99") >= 2.0);
        assert_eq!(e.recent_errors.len(), 8, "bounded list of recent errors");
        assert_eq!(g.view(now, 900).edges[0].stats.requests, 101, "15 m sees it");
        let api = v.nodes.iter().find(|n| n.id == "api").expect("callee node");
        assert_eq!(api.inbound.requests, 100);
        assert_eq!(api.routes[0].route, "/users/*");
        assert!(v.nodes.iter().any(|n| n.id == "web" && n.inbound.requests == 0));
    }

    #[test]
    fn edges_and_routes_past_their_caps_are_counted_not_kept() {
        let mut g = Graph::default();
        for i in 0..MAX_EDGES + 10 {
            g.record(&call("a", &format!("svc{i}"), "/", 1, false), 100);
        }
        assert_eq!(g.edge_count, MAX_EDGES);
        for i in 0..MAX_ROUTES_PER_NODE + 5 {
            g.record(&call("a", "svc0", &format!("/r{i}"), 1, false), 100);
        }
        assert_eq!(g.routes["svc0"].len(), MAX_ROUTES_PER_NODE);
        assert!(g.overflow >= 15);
    }

    #[test]
    fn edges_unseen_for_fifteen_minutes_make_room_for_new_ones() {
        let mut g = Graph::default();
        for i in 0..MAX_EDGES {
            g.record(&call("a", &format!("svc{i}"), "/", 1, false), 100);
        }
        g.record(&call("a", "new", "/", 1, false), 100 + 16 * 60);
        assert_eq!(g.edge_count, 1, "old edges expired, the new one kept");
        assert_eq!(g.overflow, 0);
    }

    #[test]
    fn routes_unseen_for_fifteen_minutes_make_room_on_a_known_edge() {
        let mut g = Graph::default();
        for i in 0..MAX_ROUTES_PER_NODE {
            g.record(&call("a", "svc", &format!("/old{i}"), 1, false), 100);
        }
        g.record(&call("a", "svc", "/new", 1, false), 100 + 16 * 60);
        let v = g.view(100 + 16 * 60, 60);
        assert_eq!(v.nodes.iter().find(|n| n.id == "svc").map(|n| n.routes.len()), Some(1));
        assert_eq!((g.route_count, g.overflow), (1, 0), "the stale routes gave way");
    }

    #[test]
    fn an_empty_graph_is_an_empty_view() {
        let v = Graph::default().view(1000, 300);
        assert!(v.nodes.is_empty() && v.edges.is_empty());
        assert_eq!(v.window_secs, 300);
    }
}
