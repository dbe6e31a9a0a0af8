//! A real byte-level BPE tokenizer, learned at run time from a fixed English text with a small
//! deterministic merge loop, so tests need no downloaded `tokenizer.json`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizedString, PreTokenizer, Tokenizer};

/// Special tokens, at ids 0, 1, 2 (SmolLM2's layout).
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const SPECIAL_TOKENS: [&str; 3] = [ENDOFTEXT, IM_START, IM_END];

/// How many merges the loop learns at most (it stops earlier once no pair repeats).
const MAX_MERGES: usize = 320;

/// The text merges are learned from: plain English with some numbers, code and chat markup, so
/// that common words become single tokens.
const CORPUS: &str = "\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs into \
the forest. What is the capital of France? The capital of France is Paris. What is the capital \
of Italy? The capital of Italy is Rome. Hello, how are you today? I am fine, thank you. \
Can you tell me a story about a little robot who wanted to learn how to paint? Once upon a \
time there was a little robot. The robot wanted to paint the sky, the sea and the mountains. \
Every morning the robot walked to the hill and painted what it saw. The people of the town \
came to see the paintings, and they were happy. In the year 2024 there were 365 days and 12 \
months; in 2025 there were 365 days too. One, two, three, four, five, six, seven, eight, nine, \
ten. def main(): print(\"hello world\") return 0. fn main() { println!(\"hello\"); } \
The model answers the question of the user. The user asks the model a question and the \
assistant writes an answer. You are a helpful assistant. Please answer the question in one \
sentence. The weather is nice today, so we will go to the park and play with the dog. \
The cat and the dog are friends; they play in the garden of the house every day. \
Machine learning models read tokens, not letters: a tokenizer splits the text into tokens. \
";

/// The learned vocabulary: tokens in id order and merges in rank order.
pub(crate) struct TinyVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<(String, String)>,
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes stand for
/// themselves, the others are shifted past U+0100 in byte order.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("Latin-1 is valid")
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).expect("below the surrogates")
            }
        })
        .collect()
}

pub(crate) fn tiny_vocab() -> &'static TinyVocab {
    static VOCAB: OnceLock<TinyVocab> = OnceLock::new();
    VOCAB.get_or_init(learn_vocab)
}

fn learn_vocab() -> TinyVocab {
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_chars().into_iter().map(String::from));

    // Words as the ByteLevel pre-tokenizer cuts them, in byte-level characters.
    let mut pretokenized = PreTokenizedString::from(CORPUS);
    ByteLevel::new(false, true, true)
        .pre_tokenize(&mut pretokenized)
        .expect("ByteLevel pre-tokenizes any text");
    let mut word_counts: BTreeMap<String, u32> = BTreeMap::new();
    for (word, _, _) in pretokenized.get_splits(
        tokenizers::OffsetReferential::Original,
        tokenizers::OffsetType::Byte,
    ) {
        *word_counts.entry(word.to_string()).or_default() += 1;
    }
    // A BTreeMap keeps every step independent of hash order: the merges are the same each run.
    let mut words: Vec<(Vec<String>, u32)> = word_counts
        .into_iter()
        .map(|(word, count)| (word.chars().map(String::from).collect(), count))
        .collect();

    let mut merges = Vec::new();
    while merges.len() < MAX_MERGES {
        let mut pair_counts: BTreeMap<(&str, &str), u32> = BTreeMap::new();
        for (symbols, count) in &words {
            for pair in symbols.windows(2) {
                *pair_counts.entry((&pair[0], &pair[1])).or_default() += count;
            }
        }
        // Most frequent pair; ties go to the smallest pair (first in the map's order).
        let Some(((left, right), count)) = pair_counts.into_iter().fold(
            None,
            |best: Option<((&str, &str), u32)>, (pair, count)| match best {
                Some((_, best_count)) if best_count >= count => best,
                _ => Some((pair, count)),
            },
        ) else {
            break;
        };
        if count < 2 {
            break;
        }
        let (left, right) = (left.to_string(), right.to_string());
        let merged = format!("{left}{right}");
        for (symbols, _) in &mut words {
            let mut i = 0;
            while i + 1 < symbols.len() {
                if symbols[i] == left && symbols[i + 1] == right {
                    symbols[i] = merged.clone();
                    symbols.remove(i + 1);
                }
                i += 1;
            }
        }
        if !tokens.contains(&merged) {
            tokens.push(merged);
        }
        merges.push((left, right));
    }
    TinyVocab { tokens, merges }
}

/// A byte-level BPE tokenizer (~550 tokens) with `<|endoftext|>` = 0, `<|im_start|>` = 1 and
/// `<|im_end|>` = 2 as special tokens; it round-trips any UTF-8 text.
pub fn tiny_tokenizer() -> Tokenizer {
    let vocab = tiny_vocab();
    let ids: Vocab = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(ids, vocab.merges.clone())
        .build()
        .expect("the learned merges only name vocabulary tokens");
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
        false, true, true,
    ))));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, true, true)));
    tokenizer
        .add_special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)))
        .expect("adding special tokens");
    tokenizer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_chars_are_a_bijection_onto_byte_level_alphabet() {
        let chars = byte_chars();
        let alphabet = ByteLevel::alphabet();
        assert_eq!(chars.len(), 256);
        assert!(chars.iter().all(|c| alphabet.contains(c)));
        let unique: std::collections::HashSet<_> = chars.iter().collect();
        assert_eq!(unique.len(), 256);
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn vocabulary_is_deterministic_and_sized() {
        let a = learn_vocab();
        let b = learn_vocab();
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.merges, b.merges);
        assert!((400..=600).contains(&a.tokens.len()), "{}", a.tokens.len());
        assert_eq!(&a.tokens[..3], &SPECIAL_TOKENS.map(String::from));
    }

    #[test]
    fn round_trips_varied_utf8() {
        let tokenizer = tiny_tokenizer();
        let texts = [
            "The capital of France is Paris.",
            "  leading and trailing spaces  ",
            "tabs\tand\nnew\r\nlines\n\n",
            "numbers 1234567890 and 3.14159",
            "accents: café, naïve, Straße, Ærø",
            "CJK: 你好，世界。日本語のテキスト",
            "emoji 🦀🚀 and combining e\u{301}",
            "code: fn main() { println!(\"{}\", 1 + 2); }",
            "",
        ];
        for text in texts {
            let encoding = tokenizer.encode(text, false).unwrap();
            let decoded = tokenizer.decode(encoding.get_ids(), false).unwrap();
            assert_eq!(decoded, text);
        }
    }

    #[test]
    fn common_words_are_merged_and_specials_are_whole() {
        let tokenizer = tiny_tokenizer();
        let encoding = tokenizer.encode("the capital of France", false).unwrap();
        // Learned merges make these far shorter than their 21 bytes.
        assert!(encoding.get_ids().len() <= 8, "{:?}", encoding.get_tokens());
        assert!(encoding.get_tokens().contains(&"Ġcapital".to_string()));

        let text = "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>";
        let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(ids[0], 1);
        assert!(ids.contains(&2));
        assert_eq!(*ids.last().unwrap(), 0);
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), "user\nHi\n");
    }
}
