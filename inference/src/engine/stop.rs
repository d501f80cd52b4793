//! Stop strings over streamed text: text that could still become a stop string is held back, so
//! no client ever sees part of a stop string.

/// Outcome of feeding text to a [`StopMatcher`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopCheck {
    /// Text now safe to emit.
    pub emit: String,
    /// A stop string was found; nothing after it is emitted.
    pub stopped: bool,
}

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck {
                emit: text.to_owned(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let emit = self.held[..at].to_owned();
            self.held.clear();
            return StopCheck {
                emit,
                stopped: true,
            };
        }
        let keep = self.partial_suffix_len();
        let emit = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        StopCheck {
            emit,
            stopped: false,
        }
    }

    /// Release held-back text when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn partial_suffix_len(&self) -> usize {
        let held = self.held.as_str();
        (0..held.len())
            .filter(|&i| held.is_char_boundary(i))
            .map(|i| &held[i..])
            .find(|suffix| {
                self.stops
                    .iter()
                    .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            })
            .map_or(0, str::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let c = m.push(p);
            out.push(c.emit);
            if c.stopped {
                return (out, true);
            }
        }
        out.push(m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_across_pieces_is_cut_and_never_partially_emitted() {
        let (out, stopped) = run(&["###"], &["Hello #", "# wor", "ld ##", "# tail"]);
        assert!(stopped);
        // "#" is held until "# wor" shows it is "##", not "###"; "##" of "ld ##" is held and
        // completes the stop string with the next piece.
        assert_eq!(out, vec!["Hello ", "## wor", "ld ", ""]);
        assert_eq!(out.concat(), "Hello ## world ");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped) = run(&["b", "xyz", "cd", "a1"], &["zzc", "dab"]);
        assert!(stopped);
        assert_eq!(out.concat(), "zz");
    }

    #[test]
    fn held_prefix_is_released_when_it_does_not_complete() {
        let (out, stopped) = run(&["STOP"], &["ST", "OR", "E"]);
        assert!(!stopped);
        assert_eq!(out, vec!["", "STOR", "E", ""]);
        let (out, _) = run(&["STOP"], &["a S"]);
        assert_eq!(out, vec!["a ", "S"]);
    }

    #[test]
    fn multibyte_stop_strings() {
        let (out, stopped) = run(&["。\n"], &["你好", "。", "\n再见"]);
        assert!(stopped);
        assert_eq!(out.concat(), "你好");
    }
}
