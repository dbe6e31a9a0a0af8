//! Proto <-> engine conversions at the shard's gRPC edge.

use tonic::Status;
use wick_grammar::{Grammar, GrammarError, GrammarKind};
use wick_proto::v1 as pb;

use crate::engine::{CachedBatchInfo, EngineError, Generation, NewRequest, TokenOut};
use crate::sampling::SamplingParams;
use crate::stopping::{FinishReason, StoppingParams};

pub(super) fn status(e: EngineError) -> Status {
    match e {
        EngineError::BatchNotFound(_) => Status::not_found(e.to_string()),
        EngineError::InvalidRequest(_) => Status::invalid_argument(e.to_string()),
        EngineError::Model(_) | EngineError::Tokenizer(_) => Status::internal(e.to_string()),
    }
}

/// Zero means "off" for the multiplicative parameters.
pub(super) fn or_one(x: f32) -> f32 {
    if x == 0.0 {
        1.0
    } else {
        x
    }
}

pub(super) fn sampling_params(p: Option<pb::NextTokenChooserParameters>) -> SamplingParams {
    let p = p.unwrap_or_default();
    SamplingParams {
        temperature: or_one(p.temperature),
        top_k: p.top_k,
        top_p: or_one(p.top_p),
        typical_p: or_one(p.typical_p),
        do_sample: p.do_sample,
        seed: p.seed,
        repetition_penalty: or_one(p.repetition_penalty),
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        // Sorted: the bias is applied in a fixed order whatever the map's.
        logit_bias: {
            let mut bias: Vec<(u32, f32)> = p.logit_bias.into_iter().collect();
            bias.sort_unstable_by_key(|&(id, _)| id);
            bias
        },
    }
}

/// Converts a proto request. The router tokenized and truncated the prompt and chose its KV
/// blocks; the engine checks them against the model and the cache.
pub(super) fn new_request(r: pb::Request) -> Result<NewRequest, EngineError> {
    let params = r.parameters.unwrap_or_default();
    let grammar = grammar(&params)
        .map_err(|e| EngineError::InvalidRequest(format!("request {}: {e}", r.id)))?;
    let stopping = r.stopping_parameters.unwrap_or_default();
    Ok(NewRequest {
        id: r.id,
        input_ids: r.input_ids,
        sampling: sampling_params(Some(params)),
        stopping: StoppingParams {
            max_new_tokens: stopping.max_new_tokens,
            stop_sequences: stopping.stop_sequences,
            ignore_eos: stopping.ignore_eos_token,
            min_new_tokens: stopping.min_new_tokens,
        },
        prefill_logprobs: r.prefill_logprobs,
        top_n_tokens: r.top_n_tokens,
        blocks: r.blocks,
        cache_len: r.cache_len,
        chunk_len: r.chunk_len,
        grammar,
    })
}

/// The request's grammar, if it has one.
fn grammar(p: &pb::NextTokenChooserParameters) -> Result<Option<Grammar>, GrammarError> {
    let kind = match pb::GrammarType::try_from(p.grammar_type) {
        Ok(pb::GrammarType::None) if p.grammar.is_empty() => return Ok(None),
        Ok(pb::GrammarType::Json) => GrammarKind::Json,
        Ok(pb::GrammarType::Regex) => GrammarKind::Regex,
        Ok(pb::GrammarType::Lark) => GrammarKind::Lark,
        _ => return Err(GrammarError::NotSupported),
    };
    Grammar::from_wire(kind, &p.grammar).map(Some)
}

pub(super) fn new_requests(batch: pb::Batch) -> Result<Vec<NewRequest>, EngineError> {
    batch.requests.into_iter().map(new_request).collect()
}

pub(super) fn tokens(ts: &[TokenOut]) -> pb::Tokens {
    pb::Tokens {
        ids: ts.iter().map(|t| t.id).collect(),
        logprobs: ts.iter().map(|t| t.logprob).collect(),
        texts: ts.iter().map(|t| t.text.clone()).collect(),
        is_special: ts.iter().map(|t| t.special).collect(),
    }
}

pub(super) fn finish_reason(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::EosToken => pb::FinishReason::EosToken,
        FinishReason::StopSequence => pb::FinishReason::StopSequence,
    }
}

pub(super) fn generation(g: Generation) -> pb::Generation {
    pb::Generation {
        request_id: g.request_id,
        prefill_tokens: g.prefill.as_deref().map(tokens),
        tokens: Some(tokens(std::slice::from_ref(&g.token))),
        generated_text: g.finished.map(|f| pb::GeneratedText {
            stop_sequence_start: f.stop_start.and_then(|at| u32::try_from(at).ok()),
            text: f.text,
            generated_tokens: f.generated_tokens,
            finish_reason: finish_reason(f.reason) as i32,
            seed: f.seed,
        }),
        // One entry per generated token; none when no alternatives were asked for.
        top_tokens: if g.top_tokens.is_empty() {
            Vec::new()
        } else {
            vec![tokens(&g.top_tokens)]
        },
    }
}

pub(super) fn cached_batch(b: CachedBatchInfo) -> pb::CachedBatch {
    pb::CachedBatch {
        id: b.id,
        request_ids: b.request_ids,
        size: b.size,
        max_tokens: b.max_tokens,
        current_tokens: b.current_tokens,
    }
}

/// A prefill or decode answer (`pb::PrefillResponse` and `pb::DecodeResponse` have the same
/// fields) from the engine's step output.
macro_rules! step_response {
    ($response:path, $out:expr) => {{
        let out: crate::engine::StepOutput = $out;
        $response {
            generations: out
                .generations
                .into_iter()
                .map(crate::service::convert::generation)
                .collect(),
            batch: out.batch.map(crate::service::convert::cached_batch),
            forward_ns: out.forward_ns,
            linear_ns: out.profile.linear_ns,
            attention_ns: out.profile.attention_ns,
            decode_ns: out.decode_ns,
            total_ns: out.total_ns,
            concat_ns: out.concat_ns,
            idle_ns: out.idle_ns,
        }
    }};
}
pub(super) use step_response;
