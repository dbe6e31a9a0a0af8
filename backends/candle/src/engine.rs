//! The shard's batch engine: batches keyed by id, each step one packed forward pass over every
//! request of the batch, then per-request sampling, detokenization and stop rules.
//!
//! Only plain data crosses this module's edge (no proto and no candle types in the public
//! requests and results): the gRPC service converts at its edge, tests drive the engine directly.
//! The engine is synchronous and single-threaded; the service runs it on its own thread.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use candle_core::Tensor;
use tokenizers::Tokenizer;

use crate::kv_cache::KvCache;
use crate::model::{LlamaModel, StepProfile};
use crate::sampling::{logprob_of, Sampler, SamplingParams};
use crate::step::{SeqSpan, StepInput};
use crate::stopping::{Detokenizer, FinishReason, StopCriteria, StoppingParams};
use wick_model::config::ModelConfig;

/// KV block size (token slots per block) when none is configured.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// A decoder the engine can step: one forward pass over a packed batch, writing K/V into the
/// cache, returning f32 logits `[step.logit_rows.len(), vocab]`, and adding the time its
/// linear layers and attention took to `profile`.
pub trait StepModel: Send {
    fn forward(
        &self,
        step: &StepInput<'_>,
        kv: &mut KvCache,
        profile: &mut StepProfile,
    ) -> candle_core::Result<Tensor>;

    /// KV heads this model's cache holds (a tensor-parallel rank's share).
    fn kv_heads(&self) -> usize;

    /// Why the model can no longer run (its tensor-parallel ranks fell apart), once it can't.
    fn failure(&self) -> Option<String> {
        None
    }
}

impl StepModel for LlamaModel {
    fn forward(
        &self,
        step: &StepInput<'_>,
        kv: &mut KvCache,
        profile: &mut StepProfile,
    ) -> candle_core::Result<Tensor> {
        LlamaModel::forward_profiled(self, step, kv, profile)
    }

    fn kv_heads(&self) -> usize {
        self.plan().kv_heads.len()
    }

    fn failure(&self) -> Option<String> {
        self.parallel_failure()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("batch {0} not found in cache")]
    BatchNotFound(u64),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("model error: {0}")]
    Model(#[from] candle_core::Error),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// A request entering the engine (TGI's `Request`, already tokenized and normalised).
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub id: u64,
    pub input_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stopping: StoppingParams,
    /// Return the logprob of every prompt token.
    pub prefill_logprobs: bool,
    pub top_n_tokens: u32,
    /// KV blocks of the whole allocation (prompt + new tokens), chosen by the router (or
    /// whoever drives the engine: warmup, the benchmark): position `p` lives in slot
    /// `blocks[p / block_size] · block_size + p % block_size`.
    pub blocks: Vec<u32>,
    /// Prompt tokens whose K/V are already in `blocks` (prefix cache).
    pub cache_len: u32,
    /// Prompt tokens computed per step; `None` = the whole remaining prompt at once.
    pub chunk_len: Option<u32>,
}

/// One token with its logprob and text.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: f32,
    pub text: String,
    /// The token is one of the tokenizer's added special tokens.
    pub special: bool,
}

/// How and why a request ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Every generated token decoded without special tokens (a matched stop sequence included).
    pub text: String,
    pub generated_tokens: u32,
    pub reason: FinishReason,
    /// The seed, when the request sampled.
    pub seed: Option<u64>,
}

/// The token one request produced in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub request_id: u64,
    /// Prompt tokens with their logprobs (the first is NaN), once, when the prompt completes and
    /// `prefill_logprobs` was asked.
    pub prefill: Option<Vec<TokenOut>>,
    pub token: TokenOut,
    /// The `top_n_tokens` most likely alternatives for `token`.
    pub top_tokens: Vec<TokenOut>,
    pub finished: Option<Finished>,
}

/// A batch the engine holds (TGI's `CachedBatch`); finished requests are already gone from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBatchInfo {
    pub id: u64,
    pub request_ids: Vec<u64>,
    pub size: u32,
    /// KV token slots the batch's requests hold (blocks × block size).
    pub max_tokens: u32,
    /// Tokens the next forward pass of this batch computes.
    pub current_tokens: u32,
}

/// The result of one prefill or decode step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub generations: Vec<Generation>,
    /// `None` when every request finished.
    pub batch: Option<CachedBatchInfo>,
    pub forward_ns: u64,
    /// The parts of `forward_ns` spent in the linear layers and in attention.
    pub profile: StepProfile,
    pub decode_ns: u64,
    pub total_ns: u64,
    /// Time spent merging batches, when batches were merged.
    pub concat_ns: Option<u64>,
}

/// What warmup found the shard can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmupInfo {
    pub max_supported_total_tokens: u32,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
}

/// The limits a warmup request asks for (unset values are derived as TGI does).
#[derive(Debug, Clone, Copy, Default)]
pub struct WarmupLimits {
    pub max_input_tokens: Option<u32>,
    pub max_prefill_tokens: u32,
    pub max_total_tokens: Option<u32>,
}

/// KV cache geometry.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub block_size: usize,
    pub num_blocks: usize,
}

impl EngineOptions {
    /// As many blocks of a cache holding `kv_heads` KV heads as fit in `kv_cache_bytes` (at
    /// least one).
    pub fn from_budget(
        config: &ModelConfig,
        kv_heads: usize,
        kv_cache_bytes: usize,
        block_size: usize,
    ) -> Self {
        let block_bytes = KvCache::bytes_per_slot(config, kv_heads) * block_size;
        Self {
            block_size,
            num_blocks: (kv_cache_bytes / block_bytes.max(1)).max(1),
        }
    }
}

struct RequestState {
    id: u64,
    prompt_len: usize,
    /// Prompt then generated ids.
    all_ids: Vec<u32>,
    /// Positions whose K/V are in the cache.
    computed: usize,
    chunk_len: Option<usize>,
    blocks: Vec<u32>,
    sampler: Sampler,
    stop: StopCriteria,
    detok: Detokenizer,
    prefill_logprobs: bool,
    /// Logprob of each prompt token (NaN where unknown), filled chunk by chunk.
    prompt_logprobs: Vec<f32>,
    top_n: usize,
    seed: Option<u64>,
}

impl RequestState {
    fn in_prompt(&self) -> bool {
        self.computed < self.prompt_len
    }

    /// Tokens the next forward pass computes for this request.
    fn next_tokens(&self) -> usize {
        if self.in_prompt() {
            let remaining = self.prompt_len - self.computed;
            self.chunk_len.map_or(remaining, |c| c.min(remaining))
        } else {
            1
        }
    }

    fn slot(&self, position: usize, block_size: usize) -> u32 {
        self.blocks[position / block_size] * block_size as u32 + (position % block_size) as u32
    }
}

#[derive(Default)]
struct BatchState {
    requests: Vec<RequestState>,
}

/// Where one request's rows sit in a step's packed input and logits.
struct StepPlan {
    /// First position computed this step.
    from: usize,
    len: usize,
    /// First logits row of this request and how many it has.
    row: usize,
    rows: usize,
}

/// Batches keyed by id over one model and one paged KV cache.
pub struct Engine {
    model: Box<dyn StepModel>,
    config: ModelConfig,
    tokenizer: Tokenizer,
    special_ids: HashSet<u32>,
    kv: KvCache,
    block_size: usize,
    batches: HashMap<u64, BatchState>,
}

impl Engine {
    pub fn new(
        model: Box<dyn StepModel>,
        config: ModelConfig,
        tokenizer: Tokenizer,
        options: EngineOptions,
    ) -> Self {
        let special_ids = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let kv = KvCache::with_kv_heads(
            &config,
            model.kv_heads(),
            options.num_blocks,
            options.block_size,
        );
        Self {
            model,
            config,
            tokenizer,
            special_ids,
            kv,
            block_size: options.block_size,
            batches: HashMap::new(),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.kv.num_blocks
    }

    /// Ids of the batches the engine holds.
    pub fn batch_ids(&self) -> Vec<u64> {
        self.batches.keys().copied().collect()
    }

    /// Starts `requests` as batch `batch_id` and runs its first step; with `cached`, that batch's
    /// running requests step in the same forward pass and the result keeps the cached batch's id.
    pub fn prefill(
        &mut self,
        batch_id: u64,
        requests: Vec<NewRequest>,
        cached: Option<u64>,
    ) -> Result<StepOutput> {
        let start = Instant::now();
        if let Some(c) = cached {
            if !self.batches.contains_key(&c) {
                return Err(EngineError::BatchNotFound(c));
            }
        }
        if cached != Some(batch_id) && self.batches.contains_key(&batch_id) {
            return Err(EngineError::InvalidRequest(format!(
                "batch {batch_id} already exists"
            )));
        }
        let mut ids: HashSet<u64> = cached
            .and_then(|c| self.batches.get(&c))
            .map(|b| b.requests.iter().map(|r| r.id).collect())
            .unwrap_or_default();
        for r in &requests {
            if !ids.insert(r.id) {
                return Err(EngineError::InvalidRequest(format!(
                    "request id {} appears twice in the batch",
                    r.id
                )));
            }
        }
        for r in &requests {
            self.validate(r)?;
        }
        let new_states: Vec<RequestState> = requests.into_iter().map(|r| self.admit(r)).collect();

        let concat_start = Instant::now();
        let (id, mut state, concat_ns) = match cached {
            Some(c) => {
                let mut state = self.batches.remove(&c).unwrap_or_default();
                state.requests.extend(new_states);
                (c, state, Some(concat_start.elapsed().as_nanos() as u64))
            }
            None => (
                batch_id,
                BatchState {
                    requests: new_states,
                },
                None,
            ),
        };
        self.run_step(id, &mut state, start, concat_ns)
    }

    /// One step for every request of `batch_ids`, merged into the first id.
    pub fn decode(&mut self, batch_ids: &[u64]) -> Result<StepOutput> {
        let start = Instant::now();
        let Some(&first) = batch_ids.first() else {
            return Err(EngineError::InvalidRequest(
                "decode needs at least one batch".into(),
            ));
        };
        for id in batch_ids {
            if !self.batches.contains_key(id) {
                return Err(EngineError::BatchNotFound(*id));
            }
        }
        let concat_start = Instant::now();
        let mut state = BatchState::default();
        for id in batch_ids {
            if let Some(b) = self.batches.remove(id) {
                state.requests.extend(b.requests);
            }
        }
        let concat_ns = (batch_ids.len() > 1).then(|| concat_start.elapsed().as_nanos() as u64);
        self.run_step(first, &mut state, start, concat_ns)
    }

    /// Keeps only `keep` of batch `batch_id`; the others leave and their engine blocks are freed.
    /// `None` when nothing is kept (the batch is gone).
    pub fn filter(&mut self, batch_id: u64, keep: &[u64]) -> Result<Option<CachedBatchInfo>> {
        let batch = self
            .batches
            .get(&batch_id)
            .ok_or(EngineError::BatchNotFound(batch_id))?;
        if let Some(missing) = keep
            .iter()
            .find(|id| !batch.requests.iter().any(|r| r.id == **id))
        {
            return Err(EngineError::InvalidRequest(format!(
                "request {missing} is not in batch {batch_id}"
            )));
        }
        let Some(mut batch) = self.batches.remove(&batch_id) else {
            return Err(EngineError::BatchNotFound(batch_id));
        };
        batch.requests.retain(|r| keep.contains(&r.id));
        if batch.requests.is_empty() {
            return Ok(None);
        }
        let info = self.info(batch_id, &batch);
        self.batches.insert(batch_id, batch);
        Ok(Some(info))
    }

    /// Why the model can no longer run, once it can't (see [`StepModel::failure`]).
    pub fn model_failure(&self) -> Option<String> {
        self.model.failure()
    }

    /// Drops batch `id` (a missing one is not an error), or every batch.
    pub fn clear(&mut self, id: Option<u64>) {
        match id {
            Some(id) => {
                self.batches.remove(&id);
            }
            None => self.batches.clear(),
        }
    }

    /// Runs the warmup batch as one prefill on engine-allocated blocks, drops it, and reports the
    /// token limits the KV cache supports.
    pub fn warmup(
        &mut self,
        batch_id: u64,
        requests: Vec<NewRequest>,
        limits: WarmupLimits,
    ) -> Result<WarmupInfo> {
        let slots = self.kv.num_slots();
        let requests = requests
            .into_iter()
            .map(|mut r| {
                // Only the prefill runs; prompt logprobs are skipped because their logits
                // (prompt tokens × vocab) would dwarf the real working set on a CPU host.
                r.stopping.max_new_tokens = 1;
                r.prefill_logprobs = false;
                r.cache_len = 0;
                r
            })
            .collect();
        let result = self.prefill(batch_id, requests, None);
        self.clear(Some(batch_id));
        result?;

        let slots = u32::try_from(slots).unwrap_or(u32::MAX);
        let max_position = u32::try_from(self.config.max_position_embeddings).unwrap_or(u32::MAX);
        let max_total_tokens = limits
            .max_total_tokens
            .unwrap_or_else(|| slots.min(max_position));
        let max_input_tokens = limits
            .max_input_tokens
            .unwrap_or_else(|| max_total_tokens.saturating_sub(1));
        Ok(WarmupInfo {
            max_supported_total_tokens: slots,
            max_input_tokens,
            max_total_tokens,
        })
    }

    /// Checks a request against the model and the cache, so a bad one is refused before it can
    /// disturb a batch.
    fn validate(&self, r: &NewRequest) -> Result<()> {
        let invalid = |msg: String| {
            Err(EngineError::InvalidRequest(format!(
                "request {}: {msg}",
                r.id
            )))
        };
        let prompt_len = r.input_ids.len();
        if prompt_len == 0 {
            return invalid("empty prompt".into());
        }
        if let Some(&bad) = r
            .input_ids
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return invalid(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.config.vocab_size
            ));
        }
        if r.stopping.max_new_tokens == 0 {
            return invalid("max_new_tokens must be at least 1".into());
        }
        if r.cache_len as usize >= prompt_len {
            return invalid(format!(
                "cache_len {} must be below the prompt length {prompt_len}",
                r.cache_len
            ));
        }
        if r.chunk_len == Some(0) {
            return invalid("chunk_len must be at least 1".into());
        }
        let total = prompt_len + r.stopping.max_new_tokens as usize;
        if total > self.config.max_position_embeddings {
            return invalid(format!(
                "prompt ({prompt_len}) + max_new_tokens ({}) exceeds the model's {} positions",
                r.stopping.max_new_tokens, self.config.max_position_embeddings
            ));
        }
        // The last generated token is never fed back, so its K/V needs no slot.
        let positions = total - 1;
        if r.blocks.is_empty() {
            return invalid("no KV blocks (the router allocates them)".into());
        }
        if let Some(&bad) = r.blocks.iter().find(|&&b| b as usize >= self.kv.num_blocks) {
            return invalid(format!(
                "block {bad} is outside the KV cache ({} blocks)",
                self.kv.num_blocks
            ));
        }
        if r.blocks.len() * self.block_size < positions {
            return invalid(format!(
                "{} blocks of {} hold fewer than the {positions} positions it needs",
                r.blocks.len(),
                self.block_size
            ));
        }
        Ok(())
    }

    /// Builds the running state of a validated request.
    fn admit(&self, r: NewRequest) -> RequestState {
        let prompt_len = r.input_ids.len();
        let seed = r.sampling.do_sample.then_some(r.sampling.seed);
        let sampler = Sampler::new(r.sampling, &r.input_ids);
        let stop = StopCriteria::new(r.stopping, &self.config.eos_token_ids);
        RequestState {
            id: r.id,
            prompt_len,
            all_ids: r.input_ids,
            computed: r.cache_len as usize,
            chunk_len: r.chunk_len.map(|c| c as usize),
            blocks: r.blocks,
            sampler,
            stop,
            detok: Detokenizer::new(prompt_len),
            prefill_logprobs: r.prefill_logprobs,
            prompt_logprobs: if r.prefill_logprobs {
                vec![f32::NAN; prompt_len]
            } else {
                Vec::new()
            },
            top_n: r.top_n_tokens as usize,
            seed,
        }
    }

    fn info(&self, id: u64, state: &BatchState) -> CachedBatchInfo {
        CachedBatchInfo {
            id,
            request_ids: state.requests.iter().map(|r| r.id).collect(),
            size: state.requests.len() as u32,
            max_tokens: state
                .requests
                .iter()
                .map(|r| (r.blocks.len() * self.block_size) as u32)
                .sum(),
            current_tokens: state.requests.iter().map(|r| r.next_tokens() as u32).sum(),
        }
    }

    /// Runs one step of `state`, then stores what is still running under `id`. On error the
    /// batch is stored as it is, so that the caller can clear it.
    fn run_step(
        &mut self,
        id: u64,
        state: &mut BatchState,
        start: Instant,
        concat_ns: Option<u64>,
    ) -> Result<StepOutput> {
        let result = self.step(state);
        let (generations, forward_ns, profile, decode_ns) = match result {
            Ok(r) => r,
            Err(e) => {
                self.batches.insert(id, std::mem::take(state));
                return Err(e);
            }
        };
        let finished: HashSet<u64> = generations
            .iter()
            .filter(|g| g.finished.is_some())
            .map(|g| g.request_id)
            .collect();
        state.requests.retain(|r| !finished.contains(&r.id));
        let batch = if state.requests.is_empty() {
            None
        } else {
            let info = self.info(id, state);
            self.batches.insert(id, std::mem::take(state));
            Some(info)
        };
        Ok(StepOutput {
            generations,
            batch,
            forward_ns,
            profile,
            decode_ns,
            total_ns: start.elapsed().as_nanos() as u64,
            concat_ns,
        })
    }

    /// One packed forward pass over every request, then sampling for those that produce a token.
    fn step(&mut self, state: &mut BatchState) -> Result<(Vec<Generation>, u64, StepProfile, u64)> {
        let forward_start = Instant::now();
        let total: usize = state.requests.iter().map(|r| r.next_tokens()).sum();
        let mut tokens = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut slots = Vec::with_capacity(total);
        let mut seqs = Vec::with_capacity(state.requests.len());
        let mut logit_rows = Vec::new();
        let mut plans = Vec::with_capacity(state.requests.len());
        for r in &state.requests {
            let from = r.computed;
            let len = r.next_tokens();
            let start = tokens.len();
            for p in from..from + len {
                tokens.push(r.all_ids[p]);
                positions.push(p as u32);
                slots.push(r.slot(p, self.block_size));
            }
            let row = logit_rows.len();
            let ends_prompt_or_decodes = from + len >= r.prompt_len;
            if r.prefill_logprobs && r.in_prompt() {
                logit_rows.extend((start..start + len).map(|i| i as u32));
            } else if ends_prompt_or_decodes {
                logit_rows.push((start + len - 1) as u32);
            }
            plans.push(StepPlan {
                from,
                len,
                row,
                rows: logit_rows.len() - row,
            });
            seqs.push(SeqSpan {
                start,
                len,
                context_len: from + len,
                block_table: &r.blocks,
            });
        }
        let input = StepInput {
            tokens,
            positions,
            slots,
            seqs,
            logit_rows,
        };
        let mut profile = StepProfile::default();
        let logits = self.model.forward(&input, &mut self.kv, &mut profile)?;
        let vocab = logits.dim(1)?;
        let mut logits = logits.flatten_all()?.to_vec1::<f32>()?;
        drop(input);
        let forward_ns = forward_start.elapsed().as_nanos() as u64;

        let decode_start = Instant::now();
        let mut generations = Vec::new();
        for (r, plan) in state.requests.iter_mut().zip(&plans) {
            let was_prompt = r.in_prompt();
            r.computed = plan.from + plan.len;
            if plan.rows == 0 {
                continue;
            }
            let rows = &mut logits[plan.row * vocab..(plan.row + plan.rows) * vocab];
            if was_prompt && r.prefill_logprobs {
                // Row of position p scores prompt token p + 1.
                for (i, row) in rows.chunks(vocab).enumerate() {
                    let next = plan.from + i + 1;
                    if next < r.prompt_len {
                        r.prompt_logprobs[next] = logprob_of(row, r.all_ids[next]);
                    }
                }
            }
            if r.in_prompt() {
                continue;
            }
            let last = &mut rows[(plan.rows - 1) * vocab..];
            let sampled = r.sampler.next(last, r.top_n);
            r.all_ids.push(sampled.id);
            let text = r
                .detok
                .next_text(&self.tokenizer, &r.all_ids)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
            let reason = r.stop.check(sampled.id, &text);
            let prefill = if was_prompt && r.prefill_logprobs {
                let ids = &r.all_ids[..r.prompt_len];
                let mut out = Vec::with_capacity(ids.len());
                for (&id, &logprob) in ids.iter().zip(&r.prompt_logprobs) {
                    out.push(self.token_out(id, logprob)?);
                }
                Some(out)
            } else {
                None
            };
            let mut top_tokens = Vec::with_capacity(sampled.top.len());
            for &(id, logprob) in &sampled.top {
                top_tokens.push(self.token_out(id, logprob)?);
            }
            let finished = match reason {
                Some(reason) => {
                    let generated = &r.all_ids[r.prompt_len..];
                    Some(Finished {
                        text: self
                            .tokenizer
                            .decode(generated, true)
                            .map_err(|e| EngineError::Tokenizer(e.to_string()))?,
                        generated_tokens: generated.len() as u32,
                        reason,
                        seed: r.seed,
                    })
                }
                None => None,
            };
            generations.push(Generation {
                request_id: r.id,
                prefill,
                token: TokenOut {
                    id: sampled.id,
                    logprob: sampled.logprob,
                    text,
                    special: self.special_ids.contains(&sampled.id),
                },
                top_tokens,
                finished,
            });
        }
        Ok((
            generations,
            forward_ns,
            profile,
            decode_start.elapsed().as_nanos() as u64,
        ))
    }

    /// A token decoded on its own (prompt tokens, top-n alternatives).
    fn token_out(&self, id: u32, logprob: f32) -> Result<TokenOut> {
        Ok(TokenOut {
            id,
            logprob,
            text: self
                .tokenizer
                .decode(&[id], false)
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?,
            special: self.special_ids.contains(&id),
        })
    }
}
