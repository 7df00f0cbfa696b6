//! Which endpoints serve which traffic: the equivalent of kube-proxy's
//! `CategorizeEndpoints` (`pkg/proxy/topology.go`), as one pure function.
//!
//! - **Cluster** traffic uses the ready endpoints, narrowed by topology hints when
//!   every ready endpoint carries them and some are meant for this node (node hints,
//!   `PreferSameNode`) or its zone (zone hints, `PreferClose`/`PreferSameZone` and
//!   topology-mode `Auto`); with no ready endpoint anywhere, the serving-terminating
//!   ones.
//! - **Local** traffic (`internalTrafficPolicy: Local`, `externalTrafficPolicy: Local`)
//!   uses this node's ready endpoints; with none, this node's serving-terminating ones.
//!
//! Hints decide, as in kube-proxy: the Service's `trafficDistribution` (or annotation)
//! tells the EndpointSlice controller to write them.

use serde::Serialize;

/// What categorisation needs to know of one endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// On this node (`nodeName`).
    pub local: bool,
    pub zone_hints: &'a [String],
    pub node_hints: &'a [String],
}

/// The topology narrowing in effect for cluster traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Topology {
    /// Every ready endpoint.
    #[serde(rename = "none")]
    Any,
    PreferSameZone,
    PreferSameNode,
}

/// Why a listed endpoint is not used for a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exclusion {
    /// Not ready and not serving.
    NotReady,
    /// Terminating (still serving) while ready endpoints exist: existing connections
    /// drain, new ones go elsewhere.
    Terminating,
    /// On another node, and the traffic policy is Local.
    NotLocal,
    /// Hinted for another zone.
    OtherZone,
    /// Hinted for another node.
    OtherNode,
}

/// Indices (into the candidates) of the endpoints each kind of traffic uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Categorized {
    pub cluster: Vec<usize>,
    pub local: Vec<usize>,
    pub topology: Topology,
}

/// kube-proxy's `topologyModeFromHints`.
pub fn topology_mode(endpoints: &[Candidate], node_name: &str, zone: Option<&str>) -> Topology {
    let mut any_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for ep in endpoints.iter().filter(|ep| ep.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.iter().any(|n| n == node_name) {
            for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| ep.zone_hints.iter().any(|h| h == z)) {
            for_zone = true;
        }
    }
    if !any_ready {
        Topology::Any
    } else if all_node_hints && for_node {
        Topology::PreferSameNode
    } else if all_zone_hints && for_zone {
        Topology::PreferSameZone
    } else {
        Topology::Any
    }
}

fn available(ep: &Candidate, topology: Topology, node_name: &str, zone: Option<&str>) -> bool {
    match topology {
        Topology::Any => true,
        Topology::PreferSameNode => ep.node_hints.iter().any(|n| n == node_name),
        Topology::PreferSameZone => zone.is_some_and(|z| ep.zone_hints.iter().any(|h| h == z)),
    }
}

/// Splits endpoints into those cluster traffic and local traffic may use.
pub fn categorize(endpoints: &[Candidate], node_name: &str, zone: Option<&str>) -> Categorized {
    let topology = topology_mode(endpoints, node_name, zone);
    let pick = |keep: &dyn Fn(&Candidate) -> bool| -> Vec<usize> {
        endpoints
            .iter()
            .enumerate()
            .filter(|(_, ep)| keep(ep))
            .map(|(i, _)| i)
            .collect()
    };
    let mut cluster = pick(&|ep| ep.ready && available(ep, topology, node_name, zone));
    if cluster.is_empty() {
        // No ready endpoint anywhere (topology is already ignored when none is ready
        // for it): fall back to the terminating ones that still serve.
        cluster = pick(&|ep| ep.serving && ep.terminating);
    }
    let mut local = pick(&|ep| ep.local && ep.ready);
    if local.is_empty() {
        local = pick(&|ep| ep.local && ep.serving && ep.terminating);
    }
    Categorized {
        cluster,
        local,
        topology,
    }
}

/// Why `ep` is not among the endpoints a frontend uses (`local_policy`: the frontend
/// follows a Local traffic policy).
pub fn exclusion(
    ep: &Candidate,
    local_policy: bool,
    topology: Topology,
    node_name: &str,
    zone: Option<&str>,
) -> Exclusion {
    if local_policy && !ep.local {
        Exclusion::NotLocal
    } else if !ep.ready {
        if ep.serving && ep.terminating {
            Exclusion::Terminating
        } else {
            Exclusion::NotReady
        }
    } else if !local_policy && !available(ep, topology, node_name, zone) {
        match topology {
            Topology::PreferSameNode => Exclusion::OtherNode,
            _ => Exclusion::OtherZone,
        }
    } else {
        // Ready and eligible endpoints are always chosen; anything else is not ready.
        Exclusion::NotReady
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compact endpoint description for the tables:
    /// (ready, serving, terminating, local, zone hints, node hints).
    type Row = (
        bool,
        bool,
        bool,
        bool,
        &'static [&'static str],
        &'static [&'static str],
    );

    struct Owned {
        ready: bool,
        serving: bool,
        terminating: bool,
        local: bool,
        zones: Vec<String>,
        nodes: Vec<String>,
    }

    fn owned(rows: &[Row]) -> Vec<Owned> {
        rows.iter()
            .map(|(ready, serving, terminating, local, zones, nodes)| Owned {
                ready: *ready,
                serving: *serving,
                terminating: *terminating,
                local: *local,
                zones: zones.iter().map(|s| s.to_string()).collect(),
                nodes: nodes.iter().map(|s| s.to_string()).collect(),
            })
            .collect()
    }

    fn candidates(owned: &[Owned]) -> Vec<Candidate<'_>> {
        owned
            .iter()
            .map(|o| Candidate {
                ready: o.ready,
                serving: o.serving,
                terminating: o.terminating,
                local: o.local,
                zone_hints: &o.zones,
                node_hints: &o.nodes,
            })
            .collect()
    }

    const NONE: &[&str] = &[];
    const READY: (bool, bool, bool) = (true, true, false);
    const TERMINATING: (bool, bool, bool) = (false, true, true);
    const DEAD: (bool, bool, bool) = (false, false, true);

    fn row(
        state: (bool, bool, bool),
        local: bool,
        zones: &'static [&'static str],
        nodes: &'static [&'static str],
    ) -> Row {
        (state.0, state.1, state.2, local, zones, nodes)
    }

    /// (case, endpoints, node zone, expected cluster set, expected local set, topology).
    type Case = (
        &'static str,
        Vec<Row>,
        Option<&'static str>,
        Vec<usize>,
        Vec<usize>,
        Topology,
    );

    /// Every rule of kube-proxy's categorisation, as (case, endpoints, node zone,
    /// expected cluster set, expected local set, expected topology). The node is
    /// "node-a".
    #[test]
    fn categorisation_table() {
        let cases: Vec<Case> = vec![
            (
                "ready endpoints are used, not-ready ones never",
                vec![
                    row(READY, false, NONE, NONE),
                    row((false, false, false), true, NONE, NONE),
                ],
                None,
                vec![0],
                vec![],
                Topology::Any,
            ),
            (
                "terminating endpoints only when none is ready",
                vec![
                    row(TERMINATING, true, NONE, NONE),
                    row(READY, false, NONE, NONE),
                ],
                None,
                vec![1],
                vec![0],
                Topology::Any,
            ),
            (
                "no ready anywhere: serving-terminating fallback, never non-serving",
                vec![
                    row(TERMINATING, false, NONE, NONE),
                    row(DEAD, true, NONE, NONE),
                ],
                None,
                vec![0],
                vec![],
                Topology::Any,
            ),
            (
                "local: this node's ready endpoints only",
                vec![row(READY, true, NONE, NONE), row(READY, false, NONE, NONE)],
                None,
                vec![0, 1],
                vec![0],
                Topology::Any,
            ),
            (
                "local: a local terminating endpoint is used when no local one is ready, even if remote ones are",
                vec![
                    row(TERMINATING, true, NONE, NONE),
                    row(READY, false, NONE, NONE),
                ],
                None,
                vec![1],
                vec![0],
                Topology::Any,
            ),
            (
                "local: nothing on this node",
                vec![row(READY, false, NONE, NONE)],
                None,
                vec![0],
                vec![],
                Topology::Any,
            ),
            (
                "zone hints for this zone narrow cluster traffic",
                vec![
                    row(READY, false, &["zone-a"], NONE),
                    row(READY, false, &["zone-b"], NONE),
                ],
                Some("zone-a"),
                vec![0],
                vec![],
                Topology::PreferSameZone,
            ),
            (
                "zone hints ignored when one ready endpoint lacks them",
                vec![
                    row(READY, false, &["zone-a"], NONE),
                    row(READY, false, NONE, NONE),
                ],
                Some("zone-a"),
                vec![0, 1],
                vec![],
                Topology::Any,
            ),
            (
                "a not-ready endpoint without hints does not disable them",
                vec![
                    row(READY, false, &["zone-a"], NONE),
                    row(READY, false, &["zone-b"], NONE),
                    row(TERMINATING, false, NONE, NONE),
                ],
                Some("zone-a"),
                vec![0],
                vec![],
                Topology::PreferSameZone,
            ),
            (
                "zone hints ignored when none is for this zone",
                vec![
                    row(READY, false, &["zone-b"], NONE),
                    row(READY, false, &["zone-c"], NONE),
                ],
                Some("zone-a"),
                vec![0, 1],
                vec![],
                Topology::Any,
            ),
            (
                "zone hints ignored when the node has no zone label",
                vec![
                    row(READY, false, &["zone-a"], NONE),
                    row(READY, false, &["zone-b"], NONE),
                ],
                None,
                vec![0, 1],
                vec![],
                Topology::Any,
            ),
            (
                "an endpoint may be hinted for several zones",
                vec![
                    row(READY, false, &["zone-b", "zone-a"], NONE),
                    row(READY, false, &["zone-b"], NONE),
                ],
                Some("zone-a"),
                vec![0],
                vec![],
                Topology::PreferSameZone,
            ),
            (
                "node hints for this node win over zone hints",
                vec![
                    row(READY, true, &["zone-a"], &["node-a"]),
                    row(READY, false, &["zone-a"], &["node-b"]),
                ],
                Some("zone-a"),
                vec![0],
                vec![0],
                Topology::PreferSameNode,
            ),
            (
                "node hints not for this node fall back to zone hints",
                vec![
                    row(READY, false, &["zone-a"], &["node-b"]),
                    row(READY, false, &["zone-b"], &["node-c"]),
                ],
                Some("zone-a"),
                vec![0],
                vec![],
                Topology::PreferSameZone,
            ),
            (
                "node hints ignored when one endpoint lacks them",
                vec![
                    row(READY, true, NONE, &["node-a"]),
                    row(READY, false, NONE, NONE),
                ],
                None,
                vec![0, 1],
                vec![0],
                Topology::Any,
            ),
            (
                "topology never applies to local traffic",
                vec![
                    row(READY, true, &["zone-b"], NONE),
                    row(READY, false, &["zone-a"], NONE),
                ],
                Some("zone-a"),
                vec![1],
                vec![0],
                Topology::PreferSameZone,
            ),
            (
                "no endpoints at all",
                vec![],
                Some("zone-a"),
                vec![],
                vec![],
                Topology::Any,
            ),
            (
                "hints on terminating endpoints only: fallback ignores topology",
                vec![row(TERMINATING, false, &["zone-b"], NONE)],
                Some("zone-a"),
                vec![0],
                vec![],
                Topology::Any,
            ),
        ];
        for (name, rows, zone, cluster, local, topology) in cases {
            let owned = owned(&rows);
            let eps = candidates(&owned);
            let got = categorize(&eps, "node-a", zone);
            assert_eq!(
                got,
                Categorized {
                    cluster,
                    local,
                    topology
                },
                "case: {name}"
            );
        }
    }

    #[test]
    fn exclusion_reasons() {
        let owned = owned(&[
            row(READY, false, &["zone-b"], NONE),
            row(TERMINATING, true, NONE, NONE),
            row((false, false, false), true, NONE, NONE),
            row(READY, false, NONE, &["node-b"]),
        ]);
        let eps = candidates(&owned);
        let why = |i: usize, local: bool, topology: Topology| {
            exclusion(&eps[i], local, topology, "node-a", Some("zone-a"))
        };
        assert_eq!(why(0, true, Topology::Any), Exclusion::NotLocal);
        assert_eq!(
            why(0, false, Topology::PreferSameZone),
            Exclusion::OtherZone
        );
        assert_eq!(
            why(3, false, Topology::PreferSameNode),
            Exclusion::OtherNode
        );
        assert_eq!(why(1, false, Topology::Any), Exclusion::Terminating);
        assert_eq!(why(1, true, Topology::Any), Exclusion::Terminating);
        assert_eq!(why(2, false, Topology::Any), Exclusion::NotReady);
    }
}
