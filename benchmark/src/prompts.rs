//! The prompts a run sends: slices of a built-in corpus cut to an approximate token length, or
//! the lines of a file.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::arrivals::SplitMix64;

/// Plain English prose, written for this tool. Prompts are windows onto it, cycled.
const CORPUS: &str = "The harbour town woke before the sun. Fishermen carried nets down the stone steps \
while the baker on the corner pulled the first loaves from an oven that had burned all night. \
Gulls argued over the scraps near the market, and a boy with a bucket of paint began, once again, \
to cover the words someone had written on the sea wall. Nobody in the town remembered who had built \
that wall, only that it had held through every winter storm for as long as the oldest of them could \
recall. The lighthouse keeper kept a ledger of the ships that passed. Most nights the entries were \
short: a cargo vessel heading north, a ferry late by twenty minutes, a sailing boat that should not \
have been out in that weather. Yet the ledger had grown to fill a whole shelf, and the keeper liked \
to say that the history of the coast was written there more truly than in any book at the library. \
In spring the schoolteacher took her pupils along the cliff path to count the nesting birds. She \
taught them to tell a guillemot from a razorbill by the shape of the beak, and to keep quiet when \
the wind dropped, because sound carries over water further than one expects. The children wrote \
their counts in notebooks and compared them with the numbers from the year before, arguing about \
whether the difference meant anything at all. A clockmaker had his workshop above the post office. \
He repaired watches for the whole valley and claimed he could tell a customer's trade from the wear \
on the crown of the watch: farmers wound theirs hard and often, sailors rarely, and lawyers never, \
since they always had someone to ask the time. Whether this was true or merely a story he enjoyed \
telling, the customers kept coming, and the small room was full of ticking from morning to evening. \
When the railway finally reached the town, people expected everything to change. Some of it did. \
Visitors came in summer and bought postcards of the lighthouse; the baker hired two assistants; the \
old inn added a floor. But the tides kept their own schedule, and the fishing boats still left in the \
dark, and every autumn the first storm came in from the west and reminded everyone how small the \
town really was against the sea. Engineers who visited to inspect the harbour wall measured it, \
drilled into it, and wrote long reports. Their conclusion, after many pages, was that the wall was \
sound and would likely outlast the reports. The mayor had the sentence framed and hung it in the \
council chamber, where it remains, slightly faded, above the table where decisions are argued over \
late into the evening. ";

/// About four characters of English make one token for common tokenizers: good enough to choose
/// text of roughly the asked length; reported token counts come from the server.
pub const CHARS_PER_TOKEN: usize = 4;

/// Where a run's prompts come from.
#[derive(Debug, Clone)]
pub enum PromptSource {
    /// Windows of the built-in corpus of about `tokens` tokens, at seeded offsets so that
    /// requests do not share one prefix (a prefix cache would flatter the server).
    Corpus { tokens: usize, seed: u64 },
    /// Prompts from a file, sent in turn.
    File(Vec<String>),
}

impl PromptSource {
    /// The prompt of the `index`-th request of a run.
    pub fn prompt(&self, index: usize) -> String {
        match self {
            PromptSource::Corpus { tokens, seed } => {
                corpus_window(tokens * CHARS_PER_TOKEN, seed.wrapping_add(index as u64))
            }
            PromptSource::File(prompts) => prompts[index % prompts.len()].clone(),
        }
    }

    /// The prompt length in tokens the run asked for, when known before the server answers.
    pub fn approximate_tokens(&self, index: usize) -> u64 {
        match self {
            PromptSource::Corpus { tokens, .. } => *tokens as u64,
            PromptSource::File(_) => self.prompt(index).len().div_ceil(CHARS_PER_TOKEN) as u64,
        }
    }
}

/// About `chars` characters of the corpus, starting at a word chosen by `seed` and ending at a
/// word boundary; the corpus is cycled as often as needed.
pub fn corpus_window(chars: usize, seed: u64) -> String {
    let starts: Vec<usize> = std::iter::once(0)
        .chain(CORPUS.match_indices(' ').map(|(i, _)| i + 1))
        .filter(|&i| i < CORPUS.len())
        .collect();
    let start = starts[(SplitMix64::new(seed).next_u64() % starts.len() as u64) as usize];
    let cycled = CORPUS.repeat(chars / CORPUS.len() + 2);
    let text = &cycled[start..];
    let end = match text[..chars.min(text.len())].rfind(' ') {
        Some(space) if space > 0 && chars > 0 => space,
        _ => text.find(' ').unwrap_or(text.len()), // at least one word
    };
    text[..end].to_string()
}

/// One prompt per non-empty line: plain text, or JSON — a string, or an object with `prompt`,
/// `text` or `content`, or `messages` (the contents joined by blank lines).
pub fn load_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompts from {}", path.display()))?;
    let mut prompts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let prompt =
            parse_line(line).with_context(|| format!("{} line {}", path.display(), n + 1))?;
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        bail!("no prompt in {}", path.display());
    }
    Ok(prompts)
}

fn parse_line(line: &str) -> anyhow::Result<String> {
    let trimmed = line.trim_start();
    if !(trimmed.starts_with('{') || trimmed.starts_with('"')) {
        return Ok(line.to_string());
    }
    // Plain text that merely starts with a brace or quote is still plain text.
    let Ok(value) = serde_json::from_str::<Value>(trimmed) else {
        return Ok(line.to_string());
    };
    if let Some(s) = value.as_str() {
        return Ok(s.to_string());
    }
    for key in ["prompt", "text", "content"] {
        if let Some(s) = value[key].as_str() {
            return Ok(s.to_string());
        }
    }
    if let Some(messages) = value["messages"].as_array() {
        let contents: Vec<&str> = messages
            .iter()
            .filter_map(|m| m["content"].as_str())
            .collect();
        if !contents.is_empty() {
            return Ok(contents.join("\n\n"));
        }
    }
    bail!("a JSON line needs a `prompt`, `text`, `content` or `messages` field")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_ascii_so_byte_cuts_are_char_cuts() {
        assert!(CORPUS.is_ascii());
    }

    #[test]
    fn windows_have_about_the_asked_length() {
        for tokens in [1, 16, 128, 1024, 4096] {
            let chars = tokens * CHARS_PER_TOKEN;
            for seed in 0..20 {
                let w = corpus_window(chars, seed);
                assert!(!w.is_empty());
                assert!(w.len() <= chars.max(w.split(' ').next().unwrap().len()));
                // Cut at the last space: shorter by less than one word.
                if tokens >= 16 {
                    assert!(w.len() + 20 > chars, "{tokens} tokens: {} chars", w.len());
                }
                assert!(!w.starts_with(' ') && !w.ends_with(' '));
            }
        }
    }

    #[test]
    fn seeds_move_the_window() {
        let a = corpus_window(400, 1);
        assert_eq!(a, corpus_window(400, 1));
        let distinct: std::collections::HashSet<String> =
            (0..10).map(|s| corpus_window(400, s)).collect();
        assert!(distinct.len() > 5);
    }

    #[test]
    fn file_lines_plain_and_json() {
        let dir = std::env::temp_dir().join(format!("wick-bench-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.jsonl");
        std::fs::write(
            &path,
            "plain prompt\r\n\n{\"prompt\":\"from json\"}\n\"a string\"\n\
             {\"messages\":[{\"role\":\"system\",\"content\":\"s\"},{\"role\":\"user\",\"content\":\"u\"}]}\n\
             {not json} but text\n",
        )
        .unwrap();
        let prompts = load_file(&path).unwrap();
        assert_eq!(
            prompts,
            [
                "plain prompt",
                "from json",
                "a string",
                "s\n\nu",
                "{not json} but text"
            ]
        );
        std::fs::write(&path, "{\"other\":1}\n").unwrap();
        let err = load_file(&path).unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
        std::fs::write(&path, "\n \n").unwrap();
        assert!(load_file(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();

        let source = PromptSource::File(vec!["a".into(), "b".into()]);
        assert_eq!(
            (source.prompt(0), source.prompt(3)),
            ("a".into(), "b".into())
        );
    }
}
