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
use wick_grammar::Compiler;

use crate::kv_cache::{KvCache, KvStore};
use crate::model::{LlamaModel, StepProfile};
use crate::sampling::Sampler;
use crate::step::StepInput;
use crate::stopping::{Detokenizer, StopCriteria};
use wick_kernels::KvDtype;
use wick_model::config::ModelConfig;

mod running;
mod types;

use running::{BatchState, PendingMask, RequestState};
pub use types::{
    CachedBatchInfo, Finished, Generation, NewRequest, StepOutput, TokenOut, WarmupInfo,
    WarmupLimits,
};

/// KV block size (token slots per block) when none is configured.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// A decoder the engine can step: one forward pass over a packed batch, writing K/V into the
/// cache, returning f32 logits `[step.logit_rows.len(), vocab]`, and adding the time its
/// linear layers and attention took to `profile`.
pub trait StepModel: Send {
    fn forward(
        &self,
        step: &StepInput<'_>,
        kv: &mut dyn KvStore,
        profile: &mut StepProfile,
    ) -> candle_core::Result<Tensor>;

    /// KV heads this model's cache holds (a tensor-parallel rank's share).
    fn kv_heads(&self) -> usize;

    /// The store this model keeps its K/V in, of the geometry `options` gives.
    fn new_kv_store(&self, options: &EngineOptions) -> Box<dyn KvStore>;

    /// Why the model can no longer run (its tensor-parallel ranks fell apart), once it can't.
    fn failure(&self) -> Option<String> {
        None
    }

    /// Tensor parallel: how many ranks run this model, and which one this is. Only rank 0
    /// samples; the others take its tokens through [`StepModel::share_ids`].
    fn ranks(&self) -> (usize, usize) {
        (0, 1)
    }

    /// Rank 0's `ids` on every rank; every rank passes as many values (the others' are
    /// placeholders). A whole model returns them as they are.
    fn share_ids(&self, ids: &[u32]) -> candle_core::Result<Vec<u32>> {
        Ok(ids.to_vec())
    }
}

impl StepModel for LlamaModel {
    fn forward(
        &self,
        step: &StepInput<'_>,
        kv: &mut dyn KvStore,
        profile: &mut StepProfile,
    ) -> candle_core::Result<Tensor> {
        LlamaModel::forward_profiled(self, step, kv, profile)
    }

    fn kv_heads(&self) -> usize {
        self.plan().kv_heads.len()
    }

    /// The CPU cache: host memory, read in place by wick's attention kernels.
    fn new_kv_store(&self, options: &EngineOptions) -> Box<dyn KvStore> {
        Box::new(KvCache::with_dtype(
            self.config(),
            self.kv_heads(),
            options.num_blocks,
            options.block_size,
            options.kv_dtype,
        ))
    }

    fn failure(&self) -> Option<String> {
        self.parallel_failure()
    }

    fn ranks(&self) -> (usize, usize) {
        LlamaModel::ranks(self)
    }

    fn share_ids(&self, ids: &[u32]) -> candle_core::Result<Vec<u32>> {
        LlamaModel::share_ids(self, ids)
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

/// KV cache geometry and element type.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub block_size: usize,
    pub num_blocks: usize,
    pub kv_dtype: KvDtype,
}

impl EngineOptions {
    /// As many blocks of a cache of `kv_dtype` holding `kv_heads` KV heads as fit in
    /// `kv_cache_bytes` (at least one).
    pub fn from_budget(
        config: &ModelConfig,
        kv_heads: usize,
        kv_cache_bytes: usize,
        block_size: usize,
        kv_dtype: KvDtype,
    ) -> Self {
        let block_bytes = KvCache::bytes_per_slot(config, kv_heads, kv_dtype) * block_size;
        Self {
            block_size,
            num_blocks: (kv_cache_bytes / block_bytes.max(1)).max(1),
            kv_dtype,
        }
    }
}

/// What requests with a grammar need: the compiler, and one thread their masks are computed on
/// between steps (off the compute pool, whose threads run the forward pass).
struct Grammars {
    compiler: Compiler,
    thread: rayon::ThreadPool,
}

/// A decode step computed before it was asked for (see [`Engine::run_ahead`]).
struct Ahead {
    batch_id: u64,
    /// The batch's requests before that step: what the router still knows of the batch, and
    /// what a filter arriving before the step is taken answers with.
    before: Vec<BeforeAhead>,
    result: Result<StepOutput>,
}

/// One request of a batch as it was before a step computed ahead.
struct BeforeAhead {
    id: u64,
    /// KV slots its blocks hold.
    slots: u32,
    /// Tokens that step computes for it.
    tokens: u32,
}

/// Batches keyed by id over one model and one paged KV cache.
pub struct Engine {
    model: Box<dyn StepModel>,
    config: ModelConfig,
    tokenizer: Tokenizer,
    special_ids: HashSet<u32>,
    kv: Box<dyn KvStore>,
    block_size: usize,
    batches: HashMap<u64, BatchState>,
    /// Structured output; set up with the first request that has a grammar.
    grammars: Option<Grammars>,
    /// The next decode of one batch, computed ahead of its call.
    ahead: Option<Ahead>,
    /// When the last step ended.
    last_step_end: Option<Instant>,
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
        let kv = model.new_kv_store(&options);
        Self {
            model,
            config,
            tokenizer,
            special_ids,
            kv,
            block_size: options.block_size,
            batches: HashMap::new(),
            grammars: None,
            ahead: None,
            last_step_end: None,
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

    /// Ids of the batches the engine holds (with one whose step ran ahead and finished it).
    pub fn batch_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.batches.keys().copied().collect();
        if let Some(a) = &self.ahead {
            if !ids.contains(&a.batch_id) {
                ids.push(a.batch_id);
            }
        }
        ids
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
            if !self.batches.contains_key(&c) && !self.is_ahead(c) {
                return Err(EngineError::BatchNotFound(c));
            }
        }
        if cached != Some(batch_id) && self.batches.contains_key(&batch_id) {
            return Err(EngineError::InvalidRequest(format!(
                "batch {batch_id} already exists"
            )));
        }
        let mut ids: HashSet<u64> = match cached {
            Some(c) if self.is_ahead(c) => self.ahead_ids().collect(),
            Some(c) => self
                .batches
                .get(&c)
                .map_or_else(HashSet::new, |b| b.requests.iter().map(|r| r.id).collect()),
            None => HashSet::new(),
        };
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
        let mut constraints = Vec::with_capacity(requests.len());
        for r in &requests {
            constraints.push(self.constraint(r)?);
        }
        let new_states: Vec<RequestState> = requests
            .into_iter()
            .zip(constraints)
            .map(|(r, c)| self.admit(r, c))
            .collect();

        if let Some(ahead) = cached.and_then(|c| self.ahead.take_if(|a| a.batch_id == c)) {
            // The cached batch's step already ran: the new requests take theirs now, on their
            // own, and join it.
            let earlier = ahead.result?;
            let mut state = BatchState {
                requests: new_states,
            };
            let now = self.run_step(ahead.batch_id, &mut state, start, None)?;
            return Ok(self.joined(ahead.batch_id, earlier, now));
        }
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
            if !self.batches.contains_key(id) && !self.is_ahead(*id) {
                return Err(EngineError::BatchNotFound(*id));
            }
        }
        let Some(ahead) = self.ahead.take_if(|a| batch_ids.contains(&a.batch_id)) else {
            return self.step_batches(batch_ids, start);
        };
        let earlier = ahead.result?;
        if batch_ids.iter().all(|&id| id == ahead.batch_id) {
            // The usual step: the batch's own decode, computed ahead.
            return Ok(earlier);
        }
        // The other batches step now, on their own, and both parts join the first id.
        let others: Vec<u64> = batch_ids
            .iter()
            .copied()
            .filter(|&id| id != ahead.batch_id)
            .collect();
        let now = self.step_batches(&others, start)?;
        for id in [ahead.batch_id, others[0]] {
            if let Some(part) = self.batches.remove(&id) {
                self.store(first, part);
            }
        }
        Ok(self.joined(first, earlier, now))
    }

    /// One step of every request of `batch_ids`, merged into the first id.
    fn step_batches(&mut self, batch_ids: &[u64], start: Instant) -> Result<StepOutput> {
        let concat_start = Instant::now();
        let mut state = BatchState::default();
        for id in batch_ids {
            if let Some(b) = self.batches.remove(id) {
                state.requests.extend(b.requests);
            }
        }
        let concat_ns = (batch_ids.len() > 1).then(|| concat_start.elapsed().as_nanos() as u64);
        self.run_step(batch_ids[0], &mut state, start, concat_ns)
    }

    /// Computes the next decode step of batch `id` now, before it is asked for: the router
    /// said its next step for this batch is a decode of it alone (`run_ahead`), so the shard
    /// need not sit idle while the answer travels and the router works. The next
    /// [`Engine::decode`] of `id` returns it. A filter, a clear or a merge that comes first is
    /// answered as if the step had not run: a filter drops the requests from the step's
    /// results too, a clear drops them, and a merge runs the other requests' step on its own
    /// and joins the two. Tensor-parallel ranks run ahead on the same calls, so their forward
    /// passes stay in lock-step. Does nothing for a missing batch or while another step waits.
    pub fn run_ahead(&mut self, id: u64) {
        if self.ahead.is_some() {
            return;
        }
        let Some(batch) = self.batches.get(&id) else {
            return;
        };
        let before = batch
            .requests
            .iter()
            .map(|r| BeforeAhead {
                id: r.id,
                slots: (r.blocks.len() * self.block_size) as u32,
                tokens: r.next_tokens() as u32,
            })
            .collect();
        let result = self.decode(&[id]);
        self.ahead = Some(Ahead {
            batch_id: id,
            before,
            result,
        });
    }

    fn is_ahead(&self, id: u64) -> bool {
        self.ahead.as_ref().is_some_and(|a| a.batch_id == id)
    }

    /// The requests of the batch whose step ran ahead, as the router knows them.
    fn ahead_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.ahead
            .iter()
            .flat_map(|a| a.before.iter().map(|r| r.id))
    }

    /// One answer for two steps whose requests are now stored together under `id`. (A step
    /// computed ahead that failed is answered with its error; its batch stays as the failure
    /// left it, for the router to clear.)
    fn joined(&self, id: u64, earlier: StepOutput, now: StepOutput) -> StepOutput {
        let mut generations = earlier.generations;
        generations.extend(now.generations);
        let profile = StepProfile {
            linear_ns: earlier.profile.linear_ns + now.profile.linear_ns,
            attention_ns: earlier.profile.attention_ns + now.profile.attention_ns,
        };
        StepOutput {
            generations,
            batch: self.batches.get(&id).map(|b| self.info(id, b)),
            forward_ns: earlier.forward_ns + now.forward_ns,
            profile,
            decode_ns: earlier.decode_ns + now.decode_ns,
            total_ns: earlier.total_ns + now.total_ns,
            // Batches were merged: `store` appended the requests of one to the other's.
            concat_ns: Some(now.concat_ns.unwrap_or_default()),
            idle_ns: earlier.idle_ns,
        }
    }

    /// Keeps only `keep` of batch `batch_id`; the others leave and their engine blocks are freed.
    /// `None` when nothing is kept (the batch is gone).
    pub fn filter(&mut self, batch_id: u64, keep: &[u64]) -> Result<Option<CachedBatchInfo>> {
        if self.is_ahead(batch_id) {
            return self.filter_ahead(batch_id, keep);
        }
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

    /// [`Engine::filter`] of the batch whose next step ran ahead: the requests leave the batch
    /// and that step's results, and the answer is the batch as it was before that step.
    fn filter_ahead(&mut self, batch_id: u64, keep: &[u64]) -> Result<Option<CachedBatchInfo>> {
        let ahead = self.ahead.as_mut().expect("checked by the caller");
        if let Some(missing) = keep
            .iter()
            .find(|id| !ahead.before.iter().any(|r| r.id == **id))
        {
            return Err(EngineError::InvalidRequest(format!(
                "request {missing} is not in batch {batch_id}"
            )));
        }
        ahead.before.retain(|r| keep.contains(&r.id));
        if ahead.before.is_empty() {
            self.ahead = None;
            self.batches.remove(&batch_id);
            return Ok(None);
        }
        let before = CachedBatchInfo {
            id: batch_id,
            request_ids: ahead.before.iter().map(|r| r.id).collect(),
            size: ahead.before.len() as u32,
            max_tokens: ahead.before.iter().map(|r| r.slots).sum(),
            current_tokens: ahead.before.iter().map(|r| r.tokens).sum(),
        };
        if let Some(mut batch) = self.batches.remove(&batch_id) {
            batch.requests.retain(|r| keep.contains(&r.id));
            self.store(batch_id, batch);
        }
        let after = self.batches.get(&batch_id).map(|b| self.info(batch_id, b));
        if let Some(Ok(out)) = self.ahead.as_mut().map(|a| &mut a.result) {
            out.generations.retain(|g| keep.contains(&g.request_id));
            out.batch = after;
        }
        Ok(Some(before))
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
                if self.is_ahead(id) {
                    self.ahead = None;
                }
            }
            None => {
                self.batches.clear();
                self.ahead = None;
            }
        }
    }

    /// Runs the warmup batch (its blocks chosen by the router) as one prefill, drops it, and
    /// reports the token limits the KV cache supports.
    pub fn warmup(
        &mut self,
        batch_id: u64,
        requests: Vec<NewRequest>,
        limits: WarmupLimits,
    ) -> Result<WarmupInfo> {
        let slots = self.kv.num_blocks() * self.kv.block_size();
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
        if let Some(&bad) = r
            .blocks
            .iter()
            .find(|&&b| b as usize >= self.kv.num_blocks())
        {
            return invalid(format!(
                "block {bad} is outside the KV cache ({} blocks)",
                self.kv.num_blocks()
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

    /// The request's grammar compiled for this model (the router compiled it too, to refuse a
    /// bad one before queueing it, so a failure here is a router/shard mismatch).
    fn constraint(&mut self, r: &NewRequest) -> Result<Option<PendingMask>> {
        let Some(grammar) = &r.grammar else {
            return Ok(None);
        };
        if self.model.ranks().0 > 0 {
            // Only rank 0 samples (see `StepModel::ranks`).
            return Ok(None);
        }
        let invalid = |e: wick_grammar::GrammarError| {
            EngineError::InvalidRequest(format!("request {}: {e}", r.id))
        };
        if self.grammars.is_none() {
            let compiler = Compiler::new(
                &self.tokenizer,
                self.config.vocab_size,
                &self.config.eos_token_ids,
            )
            .map_err(invalid)?;
            let thread = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(|_| "wick-grammar".into())
                // A mask that panics drops its sender: that request ends, the shard goes on.
                .panic_handler(|_| tracing::error!("a grammar mask panicked"))
                .build()
                .map_err(|e| EngineError::InvalidRequest(format!("grammar thread: {e}")))?;
            self.grammars = Some(Grammars { compiler, thread });
        }
        let grammars = self.grammars.as_ref().expect("built above");
        grammars
            .compiler
            .compile(grammar)
            .map(|c| Some(PendingMask::start(&grammars.thread, c)))
            .map_err(invalid)
    }

    /// Builds the running state of a validated request.
    fn admit(&self, r: NewRequest, grammar: Option<PendingMask>) -> RequestState {
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
            grammar,
            masked: Vec::new(),
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
}
