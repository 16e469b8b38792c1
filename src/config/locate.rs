//! Maps a YAML path (`routes[2].targets[0].provider`) to its line and column in the file.
//!
//! serde reports line and column for syntax and type errors, but the cross-checks in
//! `snapshot::build` run on deserialized values that have lost their position. This walks the
//! file's YAML events once, only when a config is invalid, so `lumen check` can point at the line.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Line (1-based) and column (1-based) of every path in `text`; empty if it does not parse.
pub fn positions(text: &str) -> HashMap<String, (usize, usize)> {
    let mut walker = Walker::default();
    let mut parser = Parser::new_from_str(text);
    if parser.load(&mut walker, false).is_err() {
        return HashMap::new();
    }
    walker.found
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    found: HashMap<String, (usize, usize)>,
}

impl Walker {
    /// The path of the value about to start, or `None` when the next scalar is a mapping key.
    fn value_path(&self) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Map { key: None, .. }) => None,
            Some(Frame::Map { path, key: Some(k) }) if path.is_empty() => Some(k.clone()),
            Some(Frame::Map { path, key: Some(k) }) => Some(format!("{path}.{k}")),
            Some(Frame::Seq { path, index }) => Some(format!("{path}[{index}]")),
        }
    }

    /// A value finished: the parent map wants a key next, the parent sequence the next item.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { index, .. }) => *index += 1,
            None => {}
        }
    }

    fn record(&mut self, path: &str, mark: Marker) {
        self.found
            .insert(path.to_string(), (mark.line(), mark.col() + 1));
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => match self.value_path() {
                None => {
                    if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                        let child = if path.is_empty() {
                            value.clone()
                        } else {
                            format!("{path}.{value}")
                        };
                        *key = Some(value);
                        self.record(&child, mark);
                    }
                }
                Some(path) => {
                    self.record(&path, mark);
                    self.value_done();
                }
            },
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = self.value_path().unwrap_or_default();
                self.found
                    .entry(path.clone())
                    .or_insert((mark.line(), mark.col() + 1));
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { path, key: None }
                } else {
                    Frame::Seq { path, index: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.value_done();
            }
            Event::Alias(_) => self.value_done(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_block_and_flow_positions() {
        let text = "providers:\n  a: { base_url: \"http://x\" }\nroutes:\n  - model: fast\n    targets:\n      - provider: nope\n";
        let pos = positions(text);
        assert_eq!(pos["providers.a.base_url"], (2, 18));
        assert_eq!(pos["routes[0].model"], (4, 12));
        assert_eq!(pos["routes[0].targets[0].provider"], (6, 19));
    }
}
