//! Warnings that come in floods (one per object of a large, uniformly broken input)
//! are summarised: the first few of each shape in full, then one line with the count.

use std::collections::BTreeMap;

use tracing::warn;

/// Warnings logged in full per shape and per sync.
pub const IN_FULL: usize = 5;

/// Collects the warnings of one sync (or one scan).
#[derive(Debug, Default)]
pub struct Summary {
    /// Shape -> (warnings seen, an example of the ones not logged).
    shapes: BTreeMap<String, (usize, Option<String>)>,
}

/// What makes two warnings "the same": their text without numbers and quoted names,
/// so `Service a/x: port 70000 ...` and `Service b/y: port 70001 ...` group together.
pub fn shape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                out.push('"');
            }
            _ if quoted => {}
            c if c.is_ascii_digit() => {}
            c => out.push(c),
        }
    }
    out
}

impl Summary {
    /// Logs `text` unless `IN_FULL` warnings of its shape (keyed by `shape_of`, or the
    /// text's own shape) were already logged in this summary.
    pub fn warn(&mut self, shape_of: Option<&str>, text: &str) {
        let key = shape_of.map_or_else(|| shape(text), str::to_string);
        let (count, example) = self.shapes.entry(key).or_default();
        *count += 1;
        if *count <= IN_FULL {
            warn!("{text}");
        } else if example.is_none() {
            *example = Some(text.to_string());
        }
    }

    /// Logs one line per shape that had more warnings than were shown.
    pub fn finish(self) {
        for (count, example) in self.shapes.into_values() {
            if let Some(example) = example {
                warn!(
                    "... and {} more warnings like this one (not shown): {example}",
                    count - IN_FULL
                );
            }
        }
    }

    /// Number of warnings of all shapes.
    #[cfg(test)]
    pub fn total(&self) -> usize {
        self.shapes.values().map(|(n, _)| n).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_of_one_shape_group_together() {
        assert_eq!(
            shape("Service pods/a-1: port 70000 is out of range"),
            shape("Service pods/a-22: port 70001 is out of range")
        );
        assert_ne!(shape("port 7 is bad"), shape("protocol \"ICMP\" is bad"));
        assert_eq!(shape("x \"abc\" y"), shape("x \"defgh\" y"));
        let mut summary = Summary::default();
        for i in 0..20 {
            summary.warn(None, &format!("Service pods/s-{i}: port {i} is SCTP"));
        }
        summary.warn(Some("other"), "something else");
        assert_eq!(summary.total(), 21);
        assert_eq!(summary.shapes.len(), 2);
    }
}
