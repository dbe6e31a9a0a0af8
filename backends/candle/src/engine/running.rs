//! The running side of a batch: each request's state, and one step (pack every request's
//! tokens into one forward pass, then sample, detokenize and check stop rules per request).

use std::collections::HashSet;
use std::sync::mpsc;
use std::time::Instant;

use candle_core::Device;
use rayon::prelude::*;
use tokenizers::Tokenizer;
use wick_grammar::{Constraint, Mask};

use super::{Engine, EngineError, Finished, Generation, Result, StepOutput, TokenOut};
use crate::linear::host_f32;
use crate::model::StepProfile;
use crate::sampling::{logprob_of, Sampler};
use crate::step::{SeqSpan, StepInput};
use crate::stopping::{Detokenizer, FinishReason, StopCriteria};

pub(super) struct RequestState {
    pub(super) id: u64,
    pub(super) prompt_len: usize,
    /// Prompt then generated ids.
    pub(super) all_ids: Vec<u32>,
    /// Positions whose K/V are in the cache.
    pub(super) computed: usize,
    pub(super) chunk_len: Option<usize>,
    pub(super) blocks: Vec<u32>,
    pub(super) sampler: Sampler,
    pub(super) stop: StopCriteria,
    pub(super) detok: Detokenizer,
    pub(super) prefill_logprobs: bool,
    /// Logprob of each prompt token (NaN where unknown), filled chunk by chunk.
    pub(super) prompt_logprobs: Vec<f32>,
    pub(super) top_n: usize,
    pub(super) seed: Option<u64>,
    /// Structured output: which tokens the request's grammar allows next.
    pub(super) grammar: Option<PendingMask>,
    /// Scratch: the last logits row with the grammar's mask applied.
    pub(super) masked: Vec<f32>,
}

/// A request's grammar between steps: its next mask being computed on the engine's grammar
/// thread, right after its previous token, while the shard answers the step and runs the next
/// forward pass (the mask depends only on the tokens accepted so far), so sampling seldom waits.
pub(super) struct PendingMask(mpsc::Receiver<(Constraint, Option<Mask>)>);

impl PendingMask {
    /// Queues `constraint`'s next mask on `thread`.
    pub(super) fn start(thread: &rayon::ThreadPool, mut constraint: Constraint) -> Self {
        let (tx, rx) = mpsc::sync_channel(1);
        thread.spawn(move || {
            let mask = constraint.compute_mask();
            let _ = tx.send((constraint, mask));
        });
        PendingMask(rx)
    }

    /// The constraint and its next token's mask (`None` inside: the grammar allows nothing);
    /// `None` if the grammar thread failed.
    fn wait(self) -> Option<(Constraint, Option<Mask>)> {
        self.0.recv().ok()
    }
}

impl RequestState {
    pub(super) fn in_prompt(&self) -> bool {
        self.computed < self.prompt_len
    }

    /// Tokens the next forward pass computes for this request.
    pub(super) fn next_tokens(&self) -> usize {
        if self.in_prompt() {
            let remaining = self.prompt_len - self.computed;
            self.chunk_len.map_or(remaining, |c| c.min(remaining))
        } else {
            1
        }
    }
}

#[derive(Default)]
pub(super) struct BatchState {
    pub(super) requests: Vec<RequestState>,
}

/// Where one request's rows sit in a step's packed input and logits.
struct StepPlan {
    /// First position computed this step.
    from: usize,
    len: usize,
    /// How many logits rows this request has (each request's follow the previous one's).
    rows: usize,
}

impl Engine {
    /// Runs one step of `state`, then stores what is still running under `id`. On error the
    /// batch is stored as it is, so that the caller can clear it.
    pub(super) fn run_step(
        &mut self,
        id: u64,
        state: &mut BatchState,
        start: Instant,
        concat_ns: Option<u64>,
    ) -> Result<StepOutput> {
        let idle_ns = self
            .last_step_end
            .map(|end| start.saturating_duration_since(end).as_nanos() as u64);
        let result = self.step(state);
        self.last_step_end = Some(Instant::now());
        let (generations, finished, forward_ns, profile, decode_ns) = match result {
            Ok(r) => r,
            Err(e) => {
                self.store(id, std::mem::take(state));
                return Err(e);
            }
        };
        state.requests.retain(|r| !finished.contains(&r.id));
        self.store(id, std::mem::take(state));
        Ok(StepOutput {
            generations,
            batch: self.batches.get(&id).map(|b| self.info(id, b)),
            forward_ns,
            profile,
            decode_ns,
            total_ns: start.elapsed().as_nanos() as u64,
            concat_ns,
            idle_ns,
        })
    }

    /// Keeps `state`'s requests under batch `id`, after those already stored there (a step
    /// computed ahead left them there, see [`Engine::run_ahead`]); an empty batch is not kept.
    pub(super) fn store(&mut self, id: u64, state: BatchState) {
        if state.requests.is_empty() {
            return;
        }
        self.batches
            .entry(id)
            .or_default()
            .requests
            .extend(state.requests);
    }

    /// One packed forward pass over every request, then sampling for those that produce a token.
    /// Returns the generations (none on a tensor-parallel rank other than 0) and the ids of the
    /// requests that finished.
    fn step(&mut self, state: &mut BatchState) -> Result<StepDone> {
        let forward_start = Instant::now();
        let total: usize = state.requests.iter().map(|r| r.next_tokens()).sum();
        let mut tokens = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
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
                rows: logit_rows.len() - row,
            });
            seqs.push(SeqSpan {
                start,
                len,
                context_len: from + len,
                block_table: &r.blocks,
                prompt: r.in_prompt(),
            });
        }
        let input = StepInput {
            tokens,
            positions,
            seqs,
            logit_rows,
        };
        let mut profile = StepProfile::default();
        let logits = self.model.forward(&input, self.kv.as_mut(), &mut profile)?;
        let vocab = logits.dim(1)?;
        // Read where the lm_head wrote them: no copy of `[rows, vocab]` floats per step.
        let logits = logits.to_device(&Device::Cpu)?.contiguous()?;
        let (storage, layout) = logits.storage_and_layout();
        let logits = host_f32(&storage, layout)?;
        drop(input);
        let forward_ns = forward_start.elapsed().as_nanos() as u64;

        let decode_start = Instant::now();
        let (rank, ranks) = self.model.ranks();
        let (generations, finished) = if rank > 0 {
            (Vec::new(), self.follow(state, &plans)?)
        } else {
            let generations = self.sample(state, &plans, logits, vocab);
            if ranks > 1 {
                self.lead(state, &plans, generations.as_deref())?;
            }
            let generations = generations?;
            let finished = generations
                .iter()
                .filter(|g| g.finished.is_some())
                .map(|g| g.request_id)
                .collect();
            (generations, finished)
        };
        Ok((
            generations,
            finished,
            forward_ns,
            profile,
            decode_start.elapsed().as_nanos() as u64,
        ))
    }

    /// Samples, detokenizes and checks the stop rules of every request whose rows end its
    /// prompt or decode.
    fn sample(
        &self,
        state: &mut BatchState,
        plans: &[StepPlan],
        logits: &[f32],
        vocab: usize,
    ) -> Result<Vec<Generation>> {
        // Each request's rows of the logits (plans hold consecutive rows, in order), so the
        // requests sample, detokenize and check their stops in parallel: each one's result
        // depends on its own rows and state only.
        let mut rest = logits;
        let mut request_rows = Vec::with_capacity(plans.len());
        for plan in plans {
            let (mine, tail) = rest.split_at(plan.rows * vocab);
            request_rows.push(mine);
            rest = tail;
        }
        let tokens = TokenText {
            tokenizer: &self.tokenizer,
            special_ids: &self.special_ids,
            eos: self.config.eos_token_ids.first().copied().unwrap_or(0),
            grammar_thread: self.grammars.as_ref().map(|g| &g.thread),
        };
        Ok(state
            .requests
            .par_iter_mut()
            .zip(plans.par_iter())
            .zip(request_rows.into_par_iter())
            .map(|((r, plan), rows)| tokens.advance(r, plan, rows, vocab))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Rank 0 of several: sends the other ranks what it sampled. The message is
    /// `[ok, (token, finished) for each request that produced one, in batch order]`, the same
    /// length on every rank (each knows from its own state which requests produce a token);
    /// `ok` is 0 when rank 0's step failed after the forward pass, so the others fail it too.
    fn lead(
        &self,
        state: &BatchState,
        plans: &[StepPlan],
        generations: std::result::Result<&[Generation], &EngineError>,
    ) -> Result<()> {
        let producing = producing(state, plans);
        let mut message = vec![0; 1 + 2 * producing];
        if let Ok(generations) = generations {
            message[0] = 1;
            for (pair, g) in message[1..].chunks_mut(2).zip(generations) {
                pair[0] = g.token.id;
                pair[1] = u32::from(g.finished.is_some());
            }
        }
        self.model.share_ids(&message)?;
        Ok(())
    }

    /// A rank other than 0: records this step's positions and takes rank 0's tokens (see
    /// [`Engine::lead`]) instead of sampling. Returns the ids of the requests that finished.
    fn follow(&self, state: &mut BatchState, plans: &[StepPlan]) -> Result<HashSet<u64>> {
        let producing = producing(state, plans);
        let message = self.model.share_ids(&vec![0; 1 + 2 * producing])?;
        if message.first() != Some(&1) {
            return Err(EngineError::Model(candle_core::Error::Msg(
                "rank 0 failed this step after the forward pass".into(),
            )));
        }
        let mut shared = message[1..].chunks(2);
        let mut finished = HashSet::new();
        for (r, plan) in state.requests.iter_mut().zip(plans) {
            r.computed = plan.from + plan.len;
            if plan.rows == 0 || r.in_prompt() {
                continue;
            }
            let Some(&[id, done]) = shared.next() else {
                return Err(EngineError::Model(candle_core::Error::Msg(
                    "rank 0's tokens are fewer than this rank's requests".into(),
                )));
            };
            r.all_ids.push(id);
            if done == 1 {
                finished.insert(r.id);
            }
        }
        Ok(finished)
    }
}

/// What a step returns: rank 0's generations, the finished request ids, the forward pass's
/// time and profile, and the sampling time.
type StepDone = (Vec<Generation>, HashSet<u64>, u64, StepProfile, u64);

/// How many requests of `state` produce a token this step (their rows end the prompt or
/// decode), read before or after the step records its positions.
fn producing(state: &BatchState, plans: &[StepPlan]) -> usize {
    state
        .requests
        .iter()
        .zip(plans)
        .filter(|(r, plan)| plan.rows > 0 && plan.from + plan.len >= r.prompt_len)
        .count()
}

/// What turning a request's logits into its next token needs from the engine.
struct TokenText<'a> {
    tokenizer: &'a Tokenizer,
    special_ids: &'a HashSet<u32>,
    /// The model's first end id: what a request whose grammar allows nothing produces.
    eos: u32,
    /// Where grammars compute their next masks (there once a request had a grammar).
    grammar_thread: Option<&'a rayon::ThreadPool>,
}

impl TokenText<'_> {
    /// Records that `r` computed `plan`'s positions and, if they end its prompt or decode,
    /// samples its next token from `rows` (its logits rows), detokenizes it and checks its stop
    /// rules.
    fn advance(
        &self,
        r: &mut RequestState,
        plan: &StepPlan,
        rows: &[f32],
        vocab: usize,
    ) -> Result<Option<Generation>> {
        let was_prompt = r.in_prompt();
        r.computed = plan.from + plan.len;
        if plan.rows == 0 {
            return Ok(None);
        }
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
            return Ok(None);
        }
        let last = &rows[(plan.rows - 1) * vocab..];
        let banned = r.stop.banned_ids();
        // `None` inside: the grammar allows nothing (or its mask thread failed).
        let grammar = r.grammar.take().map(PendingMask::wait);
        let sampled = if grammar.is_some() || !banned.is_empty() {
            // Logprobs are those of the distribution the grammar and `min_new_tokens` leave.
            r.masked.clear();
            r.masked.extend_from_slice(last);
            for &id in banned {
                if let Some(l) = r.masked.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            if let Some(grammar) = &grammar {
                let allowed = match grammar {
                    Some((_, Some(mask))) => mask.apply(&mut r.masked),
                    _ => false,
                };
                if !allowed {
                    // A live grammar always allows a token; should it not, the request ends.
                    r.masked.fill(f32::NEG_INFINITY);
                    if let Some(l) = r.masked.get_mut(self.eos as usize) {
                        *l = 0.0;
                    }
                }
            }
            r.sampler.next(&r.masked, r.top_n)
        } else {
            r.sampler.next(last, r.top_n)
        };
        r.all_ids.push(sampled.id);
        let text = r
            .detok
            .next_text(self.tokenizer, &r.all_ids)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut reason = r.stop.check(sampled.id, &text);
        if let Some(grammar) = grammar {
            // The grammar is complete (nothing may follow) or cannot go on: the output ends
            // here, as if the model had chosen its end token.
            let live = grammar.and_then(|(mut constraint, _)| {
                let accepted = constraint.accept(sampled.id).is_ok();
                (accepted && !constraint.is_finished()).then_some(constraint)
            });
            match (live, self.grammar_thread) {
                (Some(constraint), Some(thread)) if reason.is_none() => {
                    r.grammar = Some(PendingMask::start(thread, constraint));
                }
                (Some(_), _) if reason.is_some() => {}
                _ => {
                    reason.get_or_insert(FinishReason::EosToken);
                }
            }
        }
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
                let text = self
                    .tokenizer
                    .decode(generated, true)
                    .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
                Some(Finished {
                    stop_start: r.stop.stop_start(&text),
                    text,
                    generated_tokens: generated.len() as u32,
                    reason,
                    seed: r.seed,
                })
            }
            None => None,
        };
        Ok(Some(Generation {
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
        }))
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
