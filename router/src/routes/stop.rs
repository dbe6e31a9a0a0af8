//! OpenAI's stop semantics on top of TGI's: the shard ends a request when a stop sequence
//! appears (and keeps it in the text); OpenAI answers must not contain it. Non-stream text is cut
//! where the shard says the match starts (`GeneratedText::text_before_stop`); streams hold back
//! any tail that could still become a stop sequence, here.

fn earliest_match(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Streaming filter: feed token texts, get the text that is safe to send.
#[derive(Debug, Default)]
pub(crate) struct StopFilter {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        StopFilter {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    /// Adds a token's text; returns what can be released now (possibly empty). After a stop
    /// sequence matched, nothing more is released.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(text);
        if let Some(at) = earliest_match(&self.pending, &self.stops) {
            self.stopped = true;
            self.pending.truncate(at);
            return std::mem::take(&mut self.pending);
        }
        let keep = self.longest_stop_prefix_suffix();
        let release = self.pending.len() - keep;
        let tail = self.pending.split_off(release);
        std::mem::replace(&mut self.pending, tail)
    }

    /// The end of the generation: held-back text that never became a stop sequence is real
    /// output.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.pending)
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper prefix of a stop
    /// sequence (always on a char boundary).
    fn longest_stop_prefix_suffix(&self) -> usize {
        let mut best = 0;
        for (start, _) in self.pending.char_indices() {
            let suffix = &self.pending[start..];
            if self.stops.iter().any(|s| s.starts_with(suffix)) {
                best = suffix.len();
                break;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn run(filter: &mut StopFilter, pieces: &[&str]) -> Vec<String> {
        pieces.iter().map(|p| filter.push(p)).collect()
    }

    #[test]
    fn holds_back_possible_stop_starts() {
        let mut f = StopFilter::new(stops(&["abc"]));
        assert_eq!(
            run(&mut f, &["xa", "b", "d", "e"]),
            vec!["x", "", "abd", "e"]
        );
        assert_eq!(f.finish(), "");
    }

    #[test]
    fn stops_across_tokens_and_drops_the_rest() {
        let mut f = StopFilter::new(stops(&["abc", "zz"]));
        assert_eq!(run(&mut f, &["1a", "bc2", "more"]), vec!["1", "", ""]);
        assert_eq!(f.finish(), "");
    }

    #[test]
    fn releases_held_text_at_the_end_when_no_stop_came() {
        let mut f = StopFilter::new(stops(&["abc"]));
        assert_eq!(run(&mut f, &["hello a", "b"]), vec!["hello ", ""]);
        assert_eq!(f.finish(), "ab");
    }

    #[test]
    fn overlapping_prefixes_and_multibyte_text() {
        let mut f = StopFilter::new(stops(&["aab"]));
        assert_eq!(run(&mut f, &["a", "a", "a", "b"]), vec!["", "", "a", ""]);
        let mut f = StopFilter::new(stops(&["é!"]));
        assert_eq!(run(&mut f, &["café", "?"]), vec!["caf", "é?"]);
    }

    #[test]
    fn without_stops_everything_passes_through() {
        let mut f = StopFilter::new(vec![]);
        assert_eq!(run(&mut f, &["a", "b"]), vec!["a", "b"]);
        assert_eq!(f.finish(), "");
    }
}
