//! When a request stops (max_new_tokens, EOS ids, stop sequences on the decoded text), and the
//! incremental detokenizer that gives each generated token its text.

use tokenizers::Tokenizer;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoppingParams {
    pub max_new_tokens: u32,
    pub stop_sequences: Vec<String>,
    pub ignore_eos: bool,
    /// Before this many tokens, no end id may be chosen and no stop sequence ends the output.
    pub min_new_tokens: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
}

/// One request's stop rules, checked once per generated token.
///
/// Stop sequences are matched on the decoded text, so a sequence split over several tokens (or
/// inside a multi-byte character) is found. Only a tail of the text is kept: the longest stop
/// sequence minus one byte, plus the newest text — enough for any match that ends in the newest
/// text, and earlier matches were already checked. Memory stays bounded however long the output.
#[derive(Debug, Clone)]
pub struct StopCriteria {
    params: StoppingParams,
    eos_token_ids: Vec<u32>,
    generated: u32,
    /// Bytes of the longest (non-empty) stop sequence.
    longest_stop: usize,
    /// The end of the decoded text (see the type's doc).
    tail: String,
    /// Once a stop sequence matched: which one, and how many bytes of text followed it (in the
    /// token that completed it).
    matched: Option<(usize, usize)>,
}

impl StopCriteria {
    /// `eos_token_ids`: every id that ends a generation for this model (config and generation
    /// config may name several).
    pub fn new(params: StoppingParams, eos_token_ids: &[u32]) -> Self {
        let longest_stop = params
            .stop_sequences
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        Self {
            params,
            eos_token_ids: eos_token_ids.to_vec(),
            generated: 0,
            longest_stop,
            tail: String::new(),
            matched: None,
        }
    }

    /// Called once per generated token with its id and the text it added (possibly empty while
    /// a multi-byte character is incomplete).
    ///
    /// Order: EOS id (unless `ignore_eos`), stop sequence, then `max_new_tokens`.
    pub fn check(&mut self, token: u32, new_text: &str) -> Option<FinishReason> {
        self.generated = self.generated.saturating_add(1);
        let early = self.generated <= self.params.min_new_tokens;
        if !self.params.ignore_eos && !early && self.eos_token_ids.contains(&token) {
            return Some(FinishReason::EosToken);
        }
        if early && self.longest_stop > 0 {
            // A stop sequence may still end in a later token, once past the minimum.
            self.tail.push_str(new_text);
            self.trim_tail();
        } else if self.longest_stop > 0 && !new_text.is_empty() {
            self.tail.push_str(new_text);
            // The earliest match in the tail (several stop sequences may end in this token).
            let earliest = self
                .params
                .stop_sequences
                .iter()
                .enumerate()
                .filter(|(_, stop)| !stop.is_empty())
                .filter_map(|(i, stop)| self.tail.find(stop.as_str()).map(|at| (at, i)))
                .min();
            if let Some((at, i)) = earliest {
                let end = at + self.params.stop_sequences[i].len();
                self.matched = Some((i, self.tail.len() - end));
                return Some(FinishReason::StopSequence);
            }
            self.trim_tail();
        }
        if self.generated >= self.params.max_new_tokens {
            return Some(FinishReason::Length);
        }
        None
    }

    /// Where the matched stop sequence starts in `text`, the whole output once it finished
    /// with [`FinishReason::StopSequence`]: found from the end (the match ended in the last
    /// token's text), and checked against `text`; `None` when no stop sequence matched.
    pub fn stop_start(&self, text: &str) -> Option<usize> {
        let (i, after) = self.matched?;
        let stop = &self.params.stop_sequences[i];
        let start = text.len().checked_sub(after + stop.len())?;
        if text.get(start..start + stop.len()) == Some(stop.as_str()) {
            return Some(start);
        }
        // The whole output decoded at once may differ from the token-by-token text it was
        // matched on (special tokens dropped, decoder clean-up): the last occurrence then.
        text.rfind(stop.as_str())
    }

    /// The end ids the next token may not be (none once `min_new_tokens` are made).
    pub fn banned_ids(&self) -> &[u32] {
        if self.generated < self.params.min_new_tokens {
            &self.eos_token_ids
        } else {
            &[]
        }
    }

    /// Tokens checked so far (each call of [`StopCriteria::check`] is one generated token).
    pub fn generated_tokens(&self) -> u32 {
        self.generated
    }

    /// Keeps the last `longest_stop - 1` bytes (a few more when that cuts a character): a
    /// future match needs at least one new byte, so it starts no earlier than that.
    fn trim_tail(&mut self) {
        let keep = self.longest_stop - 1;
        if self.tail.len() <= keep {
            return;
        }
        let mut cut = self.tail.len() - keep;
        while !self.tail.is_char_boundary(cut) {
            cut -= 1;
        }
        self.tail.drain(..cut);
    }
}

/// How many prompt tokens before the first generated one are decoded with it, so that the
/// decoder sees context (a leading space, a merge across the boundary) as TGI does.
const PROMPT_CONTEXT: usize = 5;

/// Incremental detokenization with prefix/read offsets into `all_ids` (prompt + generated).
///
/// TGI's scheme: decode `all_ids[prefix..read]` (text already emitted, with some context) and
/// `all_ids[prefix..]`; the difference is the new text. While the new text ends in U+FFFD (a
/// multi-byte character is still incomplete) nothing is emitted and the offsets stay, so the
/// character comes out whole with a later token. Each step decodes only a few tokens.
#[derive(Debug, Clone)]
pub struct Detokenizer {
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// `prompt_len`: tokens of `all_ids` that are prompt.
    pub fn new(prompt_len: usize) -> Self {
        Self {
            prefix_offset: prompt_len.saturating_sub(PROMPT_CONTEXT),
            read_offset: prompt_len,
        }
    }

    /// Text added by the last id of `all_ids` ("" while it ends in an incomplete character).
    ///
    /// Special tokens keep their text (`skip_special_tokens = false`).
    pub fn next_text(
        &mut self,
        tokenizer: &Tokenizer,
        all_ids: &[u32],
    ) -> tokenizers::Result<String> {
        let read = self.read_offset.min(all_ids.len());
        let prefix = self.prefix_offset.min(read);
        let prefix_text = tokenizer.decode(&all_ids[prefix..read], false)?;
        let new_text = tokenizer.decode(&all_ids[prefix..], false)?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let added = match new_text.strip_prefix(prefix_text.as_str()) {
            Some(added) => added.to_string(),
            // A decoder may render the context differently once more tokens follow (e.g. a
            // cleanup rule): fall back to TGI's character count.
            None => new_text.chars().skip(prefix_text.chars().count()).collect(),
        };
        self.prefix_offset = read;
        self.read_offset = all_ids.len();
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_tokenizer, IM_END};

    fn criteria(
        max_new_tokens: u32,
        stops: &[&str],
        ignore_eos: bool,
        eos: &[u32],
    ) -> StopCriteria {
        let params = StoppingParams {
            max_new_tokens,
            stop_sequences: stops.iter().map(|s| s.to_string()).collect(),
            ignore_eos,
            min_new_tokens: 0,
        };
        StopCriteria::new(params, eos)
    }

    #[test]
    fn nothing_ends_the_output_before_min_new_tokens() {
        let mut c = StopCriteria::new(
            StoppingParams {
                max_new_tokens: 10,
                stop_sequences: vec!["END".into()],
                ignore_eos: false,
                min_new_tokens: 3,
            },
            &[7, 8],
        );
        assert_eq!(c.banned_ids(), &[7, 8]);
        assert_eq!(c.check(7, ""), None, "an end id before the minimum");
        assert_eq!(c.check(1, "EN"), None);
        assert_eq!(c.banned_ids(), &[7, 8]);
        assert_eq!(
            c.check(1, "D"),
            None,
            "a stop sequence completed before the minimum"
        );
        assert_eq!(c.banned_ids(), &[] as &[u32]);
        assert_eq!(c.check(1, " END"), Some(FinishReason::StopSequence));
        let mut c = StopCriteria::new(
            StoppingParams {
                max_new_tokens: 10,
                min_new_tokens: 1,
                ..Default::default()
            },
            &[7],
        );
        assert_eq!(c.check(2, ""), None);
        assert_eq!(c.check(7, ""), Some(FinishReason::EosToken));
    }

    #[test]
    fn the_earliest_stop_is_reported_where_it_starts() {
        // Two stop sequences end in the same token; the earlier one wins, and the text after
        // it is not part of the answer OpenAI gets.
        let mut c = criteria(100, &["END", "\n\n"], true, &[]);
        assert_eq!(c.check(1, "hel"), None);
        assert_eq!(c.check(1, "lo\n\nEND!"), Some(FinishReason::StopSequence));
        assert_eq!(c.stop_start("hello\n\nEND!"), Some(5));

        // A match spread over several tokens, with text after it in the last one.
        let mut c = criteria(100, &["END"], true, &[]);
        for piece in ["so E", "N"] {
            assert_eq!(c.check(1, piece), None);
        }
        assert_eq!(c.check(1, "D."), Some(FinishReason::StopSequence));
        assert_eq!(c.stop_start("so END."), Some(3));
        // The whole output decoded at once lost a special token's text before the match: the
        // stop sequence is still found.
        assert_eq!(c.stop_start("soEND."), Some(2));
        // No stop sequence matched: nothing to report.
        let mut c = criteria(2, &["END"], true, &[]);
        assert_eq!(c.check(1, "a"), None);
        assert_eq!(c.check(1, "b"), Some(FinishReason::Length));
        assert_eq!(c.stop_start("ab"), None);
    }

    #[test]
    fn any_eos_id_stops_unless_ignored() {
        let mut c = criteria(100, &[], false, &[7, 9]);
        assert_eq!(c.check(3, "a"), None);
        assert_eq!(c.check(9, ""), Some(FinishReason::EosToken));
        let mut c = criteria(100, &[], false, &[7, 9]);
        assert_eq!(c.check(7, ""), Some(FinishReason::EosToken));
        let mut c = criteria(3, &[], true, &[7, 9]);
        assert_eq!(c.check(7, ""), None);
        assert_eq!(c.check(9, ""), None);
        assert_eq!(c.check(7, ""), Some(FinishReason::Length));
    }

    #[test]
    fn length_counts_generated_tokens() {
        let mut c = criteria(3, &[], false, &[0]);
        assert_eq!(c.check(5, "a"), None);
        assert_eq!(c.check(5, ""), None);
        assert_eq!(c.generated_tokens(), 2);
        assert_eq!(c.check(5, "b"), Some(FinishReason::Length));
        assert_eq!(c.generated_tokens(), 3);
    }

    #[test]
    fn eos_then_stop_sequence_then_length() {
        // On the last allowed token, EOS and a stop sequence both win over the length.
        let mut c = criteria(1, &["x"], false, &[0]);
        assert_eq!(c.check(0, "x"), Some(FinishReason::EosToken));
        let mut c = criteria(1, &["x"], false, &[0]);
        assert_eq!(c.check(4, "x"), Some(FinishReason::StopSequence));
        let mut c = criteria(1, &["x"], false, &[0]);
        assert_eq!(c.check(4, "y"), Some(FinishReason::Length));
    }

    #[test]
    fn stop_sequence_split_over_tokens() {
        let mut c = criteria(100, &["world", "never"], false, &[0]);
        assert_eq!(c.check(5, "Hello wo"), None);
        assert_eq!(c.check(6, "r"), None);
        assert_eq!(c.check(7, ""), None);
        assert_eq!(c.check(8, "ld!"), Some(FinishReason::StopSequence));
        // Text before the stop sequence that merely resembles it does not stop.
        let mut c = criteria(100, &["world"], false, &[0]);
        assert_eq!(c.check(5, "worl"), None);
        assert_eq!(c.check(5, "d"), Some(FinishReason::StopSequence));
    }

    #[test]
    fn stop_sequence_inside_multibyte_text() {
        let mut c = criteria(1000, &["本🎉"], false, &[0]);
        // Many multi-byte characters first, so the tail is trimmed on char boundaries often.
        for _ in 0..50 {
            assert_eq!(c.check(5, "日本é"), None);
            assert_eq!(c.check(5, "🎉"), None);
        }
        assert_eq!(c.check(5, "日"), None);
        assert_eq!(c.check(5, "本"), None);
        assert_eq!(c.check(5, ""), None);
        assert_eq!(c.check(5, "🎉 と"), Some(FinishReason::StopSequence));
    }

    #[test]
    fn the_text_tail_stays_bounded() {
        let mut c = criteria(u32::MAX, &["stop here"], false, &[0]);
        for _ in 0..10_000 {
            assert_eq!(c.check(5, "abc def "), None);
        }
        assert!(c.tail.len() <= "stop here".len(), "{}", c.tail.len());
        assert_eq!(c.check(5, "stop"), None);
        assert_eq!(c.check(5, " here"), Some(FinishReason::StopSequence));
    }

    #[test]
    fn empty_stop_sequences_are_ignored() {
        let mut c = criteria(10, &[""], false, &[0]);
        assert_eq!(c.check(5, "anything"), None);
    }

    /// Feeds `generated` after `prompt` one id at a time and returns every emitted text.
    fn detokenize(tokenizer: &Tokenizer, prompt: &[u32], generated: &[u32]) -> Vec<String> {
        let mut detok = Detokenizer::new(prompt.len());
        let mut all = prompt.to_vec();
        generated
            .iter()
            .map(|&id| {
                all.push(id);
                detok.next_text(tokenizer, &all).unwrap()
            })
            .collect()
    }

    #[test]
    fn incremental_text_equals_decoding_at_once() {
        let tokenizer = tiny_tokenizer();
        let encode = |s: &str| tokenizer.encode(s, false).unwrap().get_ids().to_vec();
        let prompt = encode("The user says:");
        let text = " héllo 日本 🎉 the capital of France is Paris. ok";
        let generated = encode(text);
        // Multi-byte characters span several byte-level tokens.
        assert!(generated.len() > text.split(' ').count() + 6);

        let pieces = detokenize(&tokenizer, &prompt, &generated);
        assert_eq!(
            pieces.concat(),
            tokenizer.decode(&generated, false).unwrap()
        );
        assert_eq!(pieces.concat(), text);
        // Incomplete characters are held back, never emitted as U+FFFD.
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
        assert!(pieces.iter().any(String::is_empty));
        assert!(pieces.iter().any(|p| p.contains('🎉')));

        // Without a prompt, too.
        let pieces = detokenize(&tokenizer, &[], &generated);
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn special_tokens_keep_their_text() {
        let tokenizer = tiny_tokenizer();
        let im_end = tokenizer.token_to_id(IM_END).unwrap();
        let mut generated = tokenizer
            .encode(" the end", false)
            .unwrap()
            .get_ids()
            .to_vec();
        generated.push(im_end);
        let pieces = detokenize(&tokenizer, &[], &generated);
        assert_eq!(pieces.last().unwrap(), IM_END);
        assert_eq!(pieces.concat(), format!(" the end{IM_END}"));
    }

    #[test]
    fn detokenized_stop_sequence_across_a_multibyte_split() {
        // The detokenizer and the stop criteria together: "日本" arrives as 6 byte tokens.
        let tokenizer = tiny_tokenizer();
        let generated = tokenizer
            .encode("a 日本 b", false)
            .unwrap()
            .get_ids()
            .to_vec();
        let mut detok = Detokenizer::new(0);
        let mut stop = criteria(100, &["日本"], false, &[0]);
        let mut all = Vec::new();
        let mut reason = None;
        let mut text = String::new();
        for &id in &generated {
            all.push(id);
            let piece = detok.next_text(&tokenizer, &all).unwrap();
            text.push_str(&piece);
            reason = stop.check(id, &piece);
            if reason.is_some() {
                break;
            }
        }
        assert_eq!(reason, Some(FinishReason::StopSequence));
        assert_eq!(text, "a 日本");
    }
}
