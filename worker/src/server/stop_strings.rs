//! Stop sequences applied to generated text. Text that might be the start of a stop sequence is
//! held back until the next token shows whether it is, so a client never sees part of one.

/// What pushing new text released.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// Safe to show; generation goes on.
    Continue(String),
    /// A stop sequence matched: this is the text before it, and generation must end.
    Stopped(String),
}

#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// `stops` must not contain empty strings.
    pub fn new(stops: Vec<String>) -> Self {
        debug_assert!(stops.iter().all(|s| !s.is_empty()));
        Self {
            stops,
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Scan {
        self.held.push_str(text);
        let first_match = self.stops.iter().filter_map(|s| self.held.find(s)).min();
        if let Some(at) = first_match {
            self.held.truncate(at);
            return Scan::Stopped(std::mem::take(&mut self.held));
        }
        let keep = self.longest_partial_match();
        let rest = self.held.split_off(self.held.len() - keep);
        Scan::Continue(std::mem::replace(&mut self.held, rest))
    }

    /// The stream ended without a match: everything held back is ordinary text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of the held text that is a proper prefix of a stop sequence.
    fn longest_partial_match(&self) -> usize {
        self.stops
            .iter()
            .filter_map(|stop| {
                (1..stop.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&k| stop.is_char_boundary(k) && self.held.ends_with(&stop[..k]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut shown = Vec::new();
        for piece in pieces {
            match m.push(piece) {
                Scan::Continue(text) => shown.push(text),
                Scan::Stopped(text) => {
                    shown.push(text);
                    return (shown, true, String::new());
                }
            }
        }
        let tail = m.finish();
        (shown, false, tail)
    }

    #[test]
    fn without_stops_everything_passes_at_once() {
        let (shown, stopped, tail) = run(&[], &["ab", "c"]);
        assert_eq!(shown, vec!["ab", "c"]);
        assert!(!stopped && tail.is_empty());
    }

    #[test]
    fn partial_match_is_held_then_released() {
        let (shown, stopped, tail) = run(&["END"], &["hello E", "N", "o"]);
        assert_eq!(shown, vec!["hello ", "", "ENo"]);
        assert!(!stopped && tail.is_empty());
    }

    #[test]
    fn match_across_pieces_truncates() {
        let (shown, stopped, _) = run(&["END"], &["hello E", "N", "D and more"]);
        assert_eq!(shown.concat(), "hello ");
        assert!(stopped);
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (shown, stopped, _) = run(&["xyz", "b"], &["a b xyz"]);
        assert_eq!(shown.concat(), "a ");
        assert!(stopped);
    }

    #[test]
    fn held_text_is_returned_at_the_end() {
        let (shown, stopped, tail) = run(&["\n\n"], &["line\n"]);
        assert_eq!(shown, vec!["line"]);
        assert!(!stopped);
        assert_eq!(tail, "\n");
    }

    #[test]
    fn multibyte_stops_split_only_on_char_boundaries() {
        let (shown, stopped, tail) = run(&["é!"], &["caf", "é", "?"]);
        assert_eq!(shown.concat() + &tail, "café?");
        assert!(!stopped);
        let (shown, stopped, _) = run(&["é!"], &["café", "!"]);
        assert_eq!(shown.concat(), "caf");
        assert!(stopped);
    }
}
