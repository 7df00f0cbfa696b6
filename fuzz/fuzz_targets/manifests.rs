//! Any text a manifest file may hold: the parser never panics, every problem names
//! its file, and whatever it accepts the model can compute frontends from.
#![no_main]

use std::sync::Arc;

use lb::{
    model::{
        Model, NodeContext,
        workloads::{Detection, decide},
    },
    source::{Object, manifests::parse_text},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (objects, problems) = parse_text(text);
    for problem in &problems {
        assert!(problem.to_string().starts_with("fuzz.yaml"), "{problem}");
    }
    let mut model = Model::default();
    model.set_node(NodeContext {
        name: "node-a".into(),
        zone: Some("zone-a".into()),
        addresses: vec![
            "10.253.0.2".parse().unwrap(),
            "fd00:253::2".parse().unwrap(),
        ],
        node_port_range: Some((30000, 32767)),
        ..Default::default()
    });
    for object in objects {
        match object {
            Object::Service(s) => model.upsert_service(s),
            Object::Slice(s) => model.upsert_slice(s),
            Object::Node(n) => model.set_node(NodeContext {
                name: n.name.clone(),
                zone: n.zone.clone(),
                addresses: n.addresses.clone(),
                node_port_range: Some((30000, 32767)),
                ..Default::default()
            }),
            // Whatever a Pod says, its mode is decided, and at most its own and its
            // Namespace's annotations are reported.
            Object::Pod(p) => {
                let decision = decide(&p, Some("nonsense"), &Detection::default());
                assert!(decision.problems.len() <= 2, "{:?}", decision.problems);
            }
            Object::Namespace(_) => {}
        }
    }
    let changes = model.recompute_until(&|| false);
    for frontend in changes.frontends.values().flatten() {
        assert!(
            frontend.backends.windows(2).all(|w| w[0] < w[1]),
            "backends sorted, unique"
        );
        let _ = Arc::strong_count(frontend);
    }
});
