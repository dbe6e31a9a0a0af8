//! A `tokenizers::Tokenizer` rebuilt from the tokenizer metadata of a GGUF file, so that a lone
//! `.gguf` serves with the same token ids as the Hugging Face `tokenizer.json` it was converted
//! from.
//!
//! Two GGUF tokenizer models are supported:
//! - `gpt2`: byte-level BPE (`tokenizer.ggml.tokens` + `tokenizer.ggml.merges`), with the
//!   pre-tokenizer chosen by `tokenizer.ggml.pre` (the same families llama.cpp's `llama-vocab`
//!   tells apart) and a ByteLevel decoder;
//! - `llama`: SentencePiece BPE (`tokenizer.ggml.scores`, `<0xNN>` byte-fallback tokens), rebuilt
//!   as Hugging Face's converter does for Llama: merges derived from the scores, `▁` for spaces.
//!
//! Control tokens (GGUF token type 3) become added *special* tokens: matched whole in the input
//! and dropped by `decode(.., skip_special_tokens = true)`. User-defined tokens (type 4) become
//! added tokens that are matched whole but kept when decoding — llama.cpp's converter writes
//! exactly the special added tokens of `tokenizer.json` as control and the others as user-defined.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer,
};

/// A tokenizer and the chat facts a GGUF file carries.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template` (Jinja), when present.
    pub chat_template: Option<String>,
    /// The text of the BOS token, when `tokenizer.ggml.bos_token_id` names one.
    pub bos_token: Option<String>,
    /// The text of the EOS token, when `tokenizer.ggml.eos_token_id` names one.
    pub eos_token: Option<String>,
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_NORMAL: i32 = 1;

/// SentencePiece's word-boundary marker.
const SPM_SPACE: &str = "\u{2581}";

/// Llama 3's split (from its `tokenizer.json`): letters, numbers in runs of up to three digits.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: like Llama 3's but one digit at a time.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How text is cut into words before byte-level BPE, by `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizerKind {
    /// GPT-2's regex (ByteLevel with `use_regex`).
    Gpt2,
    /// Every digit alone, then GPT-2's regex (SmolLM, StarCoder).
    DigitsThenGpt2,
    /// Llama 3's regex (numbers in runs of up to 3 digits); merges are skipped for whole-vocab words.
    Llama3,
    /// Qwen2's regex.
    Qwen2,
}

impl PreTokenizerKind {
    /// Names as llama.cpp's converter writes them (`convert_hf_to_gguf_update.py`).
    fn from_gguf_name(name: &str) -> Option<Self> {
        Some(match name {
            "default" | "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" => Self::Gpt2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => Self::DigitsThenGpt2,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "dbrx" | "smaug-bpe" => Self::Llama3,
            "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => Self::Qwen2,
            _ => return None,
        })
    }

    fn build(self) -> Result<PreTokenizerWrapper> {
        let byte_level = |use_regex| ByteLevel::new(false, true, use_regex).into();
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            Ok(Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(anyhow::Error::msg)?
            .into())
        };
        Ok(match self {
            Self::Gpt2 => byte_level(true),
            Self::DigitsThenGpt2 => {
                PreTokenizerSequence::new(vec![Digits::new(true).into(), byte_level(true)]).into()
            }
            Self::Llama3 => {
                PreTokenizerSequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false)]).into()
            }
            Self::Qwen2 => {
                PreTokenizerSequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false)]).into()
            }
        })
    }
}

/// Typed access to the `tokenizer.*` metadata.
struct Metadata<'a>(&'a HashMap<String, Value>);

impl Metadata<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        self.get(key)
            .map(|v| {
                v.to_string()
                    .cloned()
                    .with_context(|| format!("reading GGUF metadata {key}"))
            })
            .transpose()
    }

    fn u32(&self, key: &str) -> Result<Option<u32>> {
        self.get(key)
            .map(|v| match v {
                Value::I32(i) => u32::try_from(*i).context("negative"),
                Value::I64(i) => u32::try_from(*i).context("out of range"),
                Value::U64(i) => u32::try_from(*i).context("out of range"),
                v => v.to_u32().map_err(anyhow::Error::from),
            })
            .transpose()
            .with_context(|| format!("reading GGUF metadata {key}"))
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.to_bool()
                    .with_context(|| format!("reading GGUF metadata {key}"))
            })
            .transpose()
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        value
            .to_vec()?
            .iter()
            .map(|v| Ok(v.to_string()?.clone()))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("reading GGUF metadata {key}"))
            .map(Some)
    }

    fn i32s(&self, key: &str) -> Result<Option<Vec<i32>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        value
            .to_vec()?
            .iter()
            .map(|v| match v {
                Value::I32(i) => Ok(*i),
                Value::U32(i) => Ok(*i as i32),
                Value::U8(i) => Ok(*i as i32),
                Value::I8(i) => Ok(*i as i32),
                v => bail!("not an integer: {v:?}"),
            })
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("reading GGUF metadata {key}"))
            .map(Some)
    }

    fn f32s(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        value
            .to_vec()?
            .iter()
            .map(|v| Ok(v.to_f32()?))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("reading GGUF metadata {key}"))
            .map(Some)
    }
}

/// Builds the tokenizer described by a GGUF file's metadata.
pub fn from_gguf(content: &Content) -> Result<GgufTokenizer> {
    let meta = Metadata(&content.metadata);
    let model = meta
        .string("tokenizer.ggml.model")?
        .context("GGUF has no tokenizer.ggml.model: no tokenizer in this file")?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .context("GGUF has no tokenizer.ggml.tokens")?;
    let token_types = match meta.i32s("tokenizer.ggml.token_type")? {
        Some(types) if types.len() == tokens.len() => types,
        Some(types) => bail!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        ),
        None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
    };
    let pre = meta.string("tokenizer.ggml.pre")?;

    let token_at = |key: &str| -> Result<Option<(u32, String)>> {
        Ok(match meta.u32(key)? {
            Some(id) => Some((
                id,
                tokens
                    .get(id as usize)
                    .with_context(|| format!("{key} = {id} is past the vocabulary"))?
                    .clone(),
            )),
            None => None,
        })
    };
    let bos = token_at("tokenizer.ggml.bos_token_id")?;
    let eos = token_at("tokenizer.ggml.eos_token_id")?;

    let (mut tokenizer, default_add_bos) = match model.as_str() {
        "gpt2" => {
            let merges = meta
                .strings("tokenizer.ggml.merges")?
                .context("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")?;
            let kind = match pre.as_deref() {
                None => PreTokenizerKind::Gpt2,
                Some(name) => PreTokenizerKind::from_gguf_name(name).unwrap_or_else(|| {
                    tracing::warn!(
                        pre = name,
                        "unknown tokenizer.ggml.pre; splitting words with GPT-2's regex"
                    );
                    PreTokenizerKind::Gpt2
                }),
            };
            let tokenizer = byte_level_bpe(&tokens, &merges, kind)?;
            // llama.cpp adds BOS by default for Llama 3 vocabularies only.
            (tokenizer, kind == PreTokenizerKind::Llama3)
        }
        "llama" => {
            let scores = meta
                .f32s("tokenizer.ggml.scores")?
                .context("GGUF llama tokenizer has no tokenizer.ggml.scores")?;
            if scores.len() != tokens.len() {
                bail!(
                    "tokenizer.ggml.scores has {} entries for {} tokens",
                    scores.len(),
                    tokens.len()
                );
            }
            let unk_id = meta.u32("tokenizer.ggml.unknown_token_id")?.unwrap_or(0);
            let add_space_prefix = meta
                .bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true);
            let tokenizer =
                sentencepiece_bpe(&tokens, &token_types, &scores, unk_id, add_space_prefix)?;
            (tokenizer, true)
        }
        other => bail!("unsupported GGUF tokenizer model {other:?} (supported: gpt2, llama)"),
    };

    add_vocabulary_tokens(&mut tokenizer, &tokens, &token_types)?;

    let add_bos = meta
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(default_add_bos);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let template = post_processor(
        if add_bos { bos.as_ref() } else { None },
        if add_eos { eos.as_ref() } else { None },
    )?;
    if let Some(template) = template {
        tokenizer.with_post_processor(Some(template));
    } else if model == "gpt2" {
        // Offsets only: ByteLevel as post-processor trims the leading-space byte from offsets.
        tokenizer.with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::new(
            false, true, true,
        ))));
    }

    Ok(GgufTokenizer {
        tokenizer,
        chat_template: meta.string("tokenizer.chat_template")?,
        bos_token: bos.map(|(_, text)| text),
        eos_token: eos.map(|(_, text)| text),
    })
}

/// The token → id map; on duplicate strings the first id wins, as in llama.cpp.
fn vocab_map(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry(token.clone()).or_insert(id as u32);
    }
    vocab
}

fn byte_level_bpe(
    tokens: &[String],
    merges: &[String],
    kind: PreTokenizerKind,
) -> Result<Tokenizer> {
    let merges = merges
        .iter()
        .map(|merge| {
            // Byte-level symbols never hold a raw space, so the first space after the first
            // character separates the pair (starting at 1 keeps a pair whose left part is " ").
            let cut = merge
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i)
                .with_context(|| format!("merge {merge:?} is not \"left right\""))?;
            Ok((merge[..cut].to_string(), merge[cut + 1..].to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(tokens), merges)
        .ignore_merges(kind == PreTokenizerKind::Llama3)
        .build()
        .map_err(anyhow::Error::msg)
        .context("building BPE from GGUF tokens and merges")?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(kind.build()?));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
        false, true, true,
    ))));
    Ok(tokenizer)
}

/// SentencePiece BPE as Hugging Face's Llama converter rebuilds it: a merge for every split of
/// a normal piece into two normal pieces, ranked by the merged piece's score (SentencePiece
/// merges the highest-scoring pair first), unknown characters fall back to `<0xNN>` bytes.
fn sentencepiece_bpe(
    tokens: &[String],
    token_types: &[i32],
    scores: &[f32],
    unk_id: u32,
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    let vocab = vocab_map(tokens);
    let unk = tokens
        .get(unk_id as usize)
        .with_context(|| {
            format!("tokenizer.ggml.unknown_token_id {unk_id} is past the vocabulary")
        })?
        .clone();
    let is_normal = |id: u32| token_types[id as usize] == TOKEN_TYPE_NORMAL;

    // (score of merged, merged id, left id, right id, left, right)
    let mut ranked = Vec::new();
    for (merged_id, merged) in tokens.iter().enumerate() {
        if !is_normal(merged_id as u32) || vocab[merged] != merged_id as u32 {
            continue;
        }
        for (cut, _) in merged.char_indices().skip(1) {
            let (left, right) = merged.split_at(cut);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                if is_normal(l) && is_normal(r) {
                    ranked.push((scores[merged_id], merged_id as u32, l, r));
                }
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let merges = ranked
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect();

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(anyhow::Error::msg)
        .context("building SentencePiece BPE from GGUF tokens and scores")?;
    let mut tokenizer = Tokenizer::new(bpe);

    // llama.cpp prefixes a space to every text fragment that follows a special token (and to the
    // first): a normaliser does that, since normalisers run once per fragment between added tokens.
    let replace = Replace::new(" ", SPM_SPACE).map_err(anyhow::Error::msg)?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![
            Prepend::new(SPM_SPACE.to_string()).into(),
            replace.into(),
        ])
        .into()
    } else {
        replace.into()
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(anyhow::Error::msg)?;

    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new(SPM_SPACE, " ")
            .map_err(anyhow::Error::msg)?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Control (and SentencePiece's unknown) tokens become special added tokens; user-defined ones
/// plain added tokens. Both are then matched whole before the model sees the text.
fn add_vocabulary_tokens(
    tokenizer: &mut Tokenizer,
    tokens: &[String],
    types: &[i32],
) -> Result<()> {
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (token, &kind) in tokens.iter().zip(types) {
        match kind {
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => special.push(AddedToken::from(token, true)),
            TOKEN_TYPE_USER_DEFINED => user.push(AddedToken::from(token, false).normalized(false)),
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(special)
        .map_err(anyhow::Error::msg)?;
    tokenizer.add_tokens(user).map_err(anyhow::Error::msg)?;
    Ok(())
}

/// `BOS $A [EOS]` (and the pair form) when the file asks for BOS/EOS to be added.
fn post_processor(
    bos: Option<&(u32, String)>,
    eos: Option<&(u32, String)>,
) -> Result<Option<TemplateProcessing>> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_tokens = Vec::new();
    if let Some((id, text)) = bos {
        single.push("bos".to_string());
        pair.push("bos".to_string());
        special_tokens.push(
            SpecialToken::new("bos".to_string(), vec![*id], vec![text.clone()])
                .map_err(anyhow::Error::msg)?,
        );
    }
    single.push("$A".to_string());
    pair.push("$A".to_string());
    if let Some((id, text)) = eos {
        single.push("eos".to_string());
        pair.push("eos".to_string());
        special_tokens.push(
            SpecialToken::new("eos".to_string(), vec![*id], vec![text.clone()])
                .map_err(anyhow::Error::msg)?,
        );
    }
    if bos.is_some() {
        pair.push("bos:1".to_string());
    }
    pair.push("$B:1".to_string());
    if eos.is_some() {
        pair.push("eos:1".to_string());
    }
    let template = TemplateProcessing::builder()
        .try_single(single)
        .map_err(anyhow::Error::msg)?
        .try_pair(pair)
        .map_err(anyhow::Error::msg)?
        .special_tokens(special_tokens)
        .build()
        .map_err(anyhow::Error::msg)?;
    Ok(Some(template))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use candle_core::quantized::gguf_file::VersionedMagic;
    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::testing::{tiny_tokenizer, write_gguf_model, TinyModelSpec};

    /// The metadata of a tiny GGUF model (gpt2 tokenizer), to edit per test.
    fn tiny_content() -> Content {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_gguf_model(&path, &TinyModelSpec::llama(), GgmlDType::F32).unwrap();
        Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap()
    }

    fn tokens_of(tokenizer: &Tokenizer, text: &str) -> Vec<String> {
        tokenizer.encode(text, false).unwrap().get_tokens().to_vec()
    }

    fn with_pre(pre: &str) -> Tokenizer {
        let mut content = tiny_content();
        content
            .metadata
            .insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
        from_gguf(&content).unwrap().tokenizer
    }

    #[test]
    fn pre_tokenizer_follows_tokenizer_ggml_pre() {
        // The tiny corpus holds "2024" and "2025": GPT-2's split lets BPE merge digits.
        let gpt2 = with_pre("gpt-2");
        assert!(
            tokens_of(&gpt2, "2024").len() < 4,
            "{:?}",
            tokens_of(&gpt2, "2024")
        );
        assert_eq!(
            tokens_of(&gpt2, "2024"),
            tokens_of(&tiny_tokenizer(), "2024")
        );
        // SmolLM and Qwen2 split every digit; Llama 3 cuts numbers into runs of three.
        for pre in ["smollm", "qwen2"] {
            assert_eq!(
                tokens_of(&with_pre(pre), "2024"),
                ["2", "0", "2", "4"],
                "{pre}"
            );
        }
        let llama3 = with_pre("llama-bpe");
        let digits = tokens_of(&llama3, "1234567").concat();
        assert_eq!(digits, "1234567");
        let groups = tokens_of(&with_pre("llama3"), "12345 678");
        assert!(
            groups.iter().all(|t| t.trim_start_matches('Ġ').len() <= 3),
            "{groups:?}"
        );
        // An unknown name falls back to GPT-2's split rather than failing to load.
        assert_eq!(
            tokens_of(&with_pre("no-such-pre"), "2024"),
            tokens_of(&gpt2, "2024")
        );
        for tokenizer in [gpt2, with_pre("smollm"), llama3, with_pre("qwen2")] {
            let text = "Hello, world! It's 2024 — naïve café 日本 🦀\n\n  x";
            let ids = tokenizer.encode(text, false).unwrap();
            assert_eq!(tokenizer.decode(ids.get_ids(), false).unwrap(), text);
        }
    }

    #[test]
    fn add_bos_token_adds_bos_and_eos_when_asked() {
        let mut content = tiny_content();
        let plain = from_gguf(&content).unwrap().tokenizer;
        assert_eq!(
            plain.encode("hi", true).unwrap().get_ids(),
            plain.encode("hi", false).unwrap().get_ids()
        );

        content
            .metadata
            .insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        content
            .metadata
            .insert("tokenizer.ggml.add_eos_token".into(), Value::Bool(true));
        let tokenizer = from_gguf(&content).unwrap().tokenizer;
        let bare = tokenizer.encode("hi", false).unwrap().get_ids().to_vec();
        let ids = tokenizer.encode("hi", true).unwrap().get_ids().to_vec();
        assert_eq!(ids, [vec![1], bare, vec![2]].concat());
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), "hi");
    }

    #[test]
    fn control_tokens_are_special_and_user_defined_are_kept() {
        let mut content = tiny_content();
        let Value::Array(types) = content
            .metadata
            .get_mut("tokenizer.ggml.token_type")
            .unwrap()
        else {
            panic!("token types are an array")
        };
        // Make <|endoftext|> (id 0) user-defined: matched whole, but kept when skipping specials.
        types[0] = Value::I32(TOKEN_TYPE_USER_DEFINED);
        let tokenizer = from_gguf(&content).unwrap().tokenizer;
        let ids = tokenizer
            .encode("<|im_start|>a<|endoftext|>b<|im_end|>", false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!((ids[0], ids[2], *ids.last().unwrap()), (1, 0, 2), "{ids:?}");
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), "a<|endoftext|>b");
    }

    #[test]
    fn rejects_missing_or_unknown_tokenizers() {
        let mut content = tiny_content();
        content
            .metadata
            .insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
        let err = from_gguf(&content).err().unwrap().to_string();
        assert!(err.contains("bert"), "{err}");
        content.metadata.remove("tokenizer.ggml.model");
        assert!(from_gguf(&content).is_err());
        let mut content = tiny_content();
        content
            .metadata
            .insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1 << 20));
        assert!(from_gguf(&content).is_err());
    }

    /// A small SentencePiece vocabulary: specials, 256 byte tokens, pieces with scores.
    fn spm_content(extra: &[(&str, f32, i32)]) -> Content {
        let mut tokens = vec![("<unk>".to_string(), 0.0, TOKEN_TYPE_UNKNOWN)];
        tokens.push(("<s>".into(), 0.0, TOKEN_TYPE_CONTROL));
        tokens.push(("</s>".into(), 0.0, TOKEN_TYPE_CONTROL));
        tokens.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
        tokens.extend(extra.iter().map(|(t, s, k)| (t.to_string(), *s, *k)));
        let mut metadata = HashMap::new();
        metadata.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        let column =
            |f: &dyn Fn(&(String, f32, i32)) -> Value| Value::Array(tokens.iter().map(f).collect());
        metadata.insert(
            "tokenizer.ggml.tokens".into(),
            column(&|t| Value::String(t.0.clone())),
        );
        metadata.insert("tokenizer.ggml.scores".into(), column(&|t| Value::F32(t.1)));
        metadata.insert(
            "tokenizer.ggml.token_type".into(),
            column(&|t| Value::I32(t.2)),
        );
        metadata.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        metadata.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn sentencepiece_vocabulary_merges_by_score_with_byte_fallback() {
        let n = TOKEN_TYPE_NORMAL;
        let pieces = [
            ("▁", -1.0, n),
            ("h", -1.0, n),
            ("e", -1.0, n),
            ("l", -1.0, n),
            ("o", -1.0, n),
            ("w", -1.0, n),
            ("r", -1.0, n),
            ("d", -1.0, n),
            ("ll", -2.0, n),
            ("▁h", -3.0, n),
            ("▁he", -4.0, n),
            ("llo", -5.0, n),
            ("▁hello", -6.0, n),
            ("▁w", -7.0, n),
            ("or", -8.0, n),
            ("▁wor", -9.0, n),
            ("ld", -10.0, n),
            ("▁world", -11.0, n),
            ("<tool>", 0.0, TOKEN_TYPE_USER_DEFINED),
        ];
        let gguf = from_gguf(&spm_content(&pieces)).unwrap();
        assert_eq!(gguf.bos_token.as_deref(), Some("<s>"));
        let tokenizer = gguf.tokenizer;
        assert_eq!(tokens_of(&tokenizer, "hello world"), ["▁hello", "▁world"]);
        // "é" is not a piece: its UTF-8 bytes stand in.
        assert_eq!(tokens_of(&tokenizer, "hé"), ["▁h", "<0xC3>", "<0xA9>"]);
        // BOS by default for SentencePiece; a space is prefixed after every special token.
        let ids = tokenizer.encode("hello</s>world", true).unwrap();
        assert_eq!(ids.get_tokens(), ["<s>", "▁hello", "</s>", "▁world"]);
        for text in ["hello world", "hé  wörld", " hello\n"] {
            let ids = tokenizer.encode(text, false).unwrap();
            assert_eq!(tokenizer.decode(ids.get_ids(), true).unwrap(), text);
        }
        // A user-defined token is matched whole and kept by decode; like llama.cpp, the text
        // after it gets its own space prefix.
        let ids = tokenizer.encode("hello<tool>world", false).unwrap();
        assert_eq!(ids.get_tokens(), ["▁hello", "<tool>", "▁world"]);
        assert_eq!(
            tokenizer.decode(ids.get_ids(), true).unwrap(),
            "hello<tool> world"
        );
        let ids = tokenizer.encode("hello</s>world", true).unwrap();
        assert_eq!(
            tokenizer.decode(ids.get_ids(), true).unwrap(),
            "hello world"
        );
    }

    /// SmolLM2-135M-Instruct, fetched by the lead into `models/` (CI has it).
    fn smollm2_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    #[test]
    fn smollm2_gguf_tokenizer() {
        let path = smollm2_path();
        if !path.exists() {
            eprintln!("skipping: {} is absent", path.display());
            return;
        }
        let content = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
        let gguf = from_gguf(&content).unwrap();
        let tokenizer = &gguf.tokenizer;
        assert_eq!(tokenizer.get_vocab_size(true), 49152);
        assert!(gguf
            .chat_template
            .as_deref()
            .unwrap()
            .contains("<|im_start|>"));
        assert_eq!(gguf.eos_token.as_deref(), Some("<|im_end|>"));

        let question = tokenizer
            .encode("What is the capital of France?", false)
            .unwrap();
        assert_eq!(
            question.get_tokens(),
            ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]
        );
        assert!(question.get_ids().iter().all(|&id| id < 49152));
        let chat = tokenizer
            .encode("<|im_start|>user\nHi<|im_end|>\n", true)
            .unwrap();
        assert_eq!(chat.get_ids()[0], 1);
        assert!(chat.get_ids().contains(&2));
        assert_eq!(tokens_of(tokenizer, "2024"), ["2", "0", "2", "4"]);
        for text in [
            "What is the capital of France?",
            "Hello, world! It's 2024 — naïve café 日本 🦀\n\n  x",
            "<|im_start|>system\nYou are helpful.<|im_end|>\n",
        ] {
            let ids = tokenizer.encode(text, false).unwrap();
            assert_eq!(tokenizer.decode(ids.get_ids(), false).unwrap(), text);
        }
    }
}
