//! The engine on its own thread: typed commands from a bounded channel, one at a time, each in
//! its tracing span; candle compute never runs on a tokio worker.

use std::panic::AssertUnwindSafe;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::engine::{CachedBatchInfo, Engine, NewRequest, StepOutput, WarmupInfo, WarmupLimits};

type EngineResult<T> = crate::engine::Result<T>;

/// What the engine thread is asked to run, with the channel its answer goes back on.
pub(super) enum Command {
    Clear {
        id: Option<u64>,
        reply: oneshot::Sender<()>,
    },
    Filter {
        batch_id: u64,
        keep: Vec<u64>,
        reply: oneshot::Sender<EngineResult<Option<CachedBatchInfo>>>,
    },
    Warmup {
        batch_id: u64,
        requests: Vec<NewRequest>,
        limits: WarmupLimits,
        reply: oneshot::Sender<EngineResult<WarmupInfo>>,
    },
    Prefill {
        batch_id: u64,
        requests: Vec<NewRequest>,
        cached: Option<u64>,
        /// Compute the returned batch's next decode once the answer is sent.
        run_ahead: bool,
        reply: oneshot::Sender<EngineResult<StepOutput>>,
    },
    Decode {
        batch_ids: Vec<u64>,
        run_ahead: bool,
        reply: oneshot::Sender<EngineResult<StepOutput>>,
    },
}

impl Command {
    /// The command's name and the batch it is about, for its tracing span.
    fn describe(&self) -> (&'static str, Option<u64>) {
        match self {
            Command::Clear { id, .. } => ("clear_cache", *id),
            Command::Filter { batch_id, .. } => ("filter_batch", Some(*batch_id)),
            Command::Warmup { batch_id, .. } => ("warmup", Some(*batch_id)),
            Command::Prefill { batch_id, .. } => ("prefill", Some(*batch_id)),
            Command::Decode { batch_ids, .. } => ("decode", batch_ids.first().copied()),
        }
    }

    /// Runs on the engine. A caller that has gone (its request was cancelled) drops the answer.
    fn run(self, engine: &mut Engine) {
        match self {
            Command::Clear { id, reply } => {
                engine.clear(id);
                let _ = reply.send(());
            }
            Command::Filter {
                batch_id,
                keep,
                reply,
            } => {
                let _ = reply.send(engine.filter(batch_id, &keep));
            }
            Command::Warmup {
                batch_id,
                requests,
                limits,
                reply,
            } => {
                let _ = reply.send(engine.warmup(batch_id, requests, limits));
            }
            Command::Prefill {
                batch_id,
                requests,
                cached,
                run_ahead,
                reply,
            } => {
                let out = engine.prefill(batch_id, requests, cached);
                answer_step(engine, out, run_ahead, reply);
            }
            Command::Decode {
                batch_ids,
                run_ahead,
                reply,
            } => {
                let out = engine.decode(&batch_ids);
                answer_step(engine, out, run_ahead, reply);
            }
        }
    }
}

/// Sends a step's answer, then, when the router asked for it, computes the returned batch's
/// next step while the answer travels (see [`Engine::run_ahead`]). Whether a step runs ahead
/// depends only on the call, never on timing, so tensor-parallel ranks run the same passes.
fn answer_step(
    engine: &mut Engine,
    out: EngineResult<StepOutput>,
    run_ahead: bool,
    reply: oneshot::Sender<EngineResult<StepOutput>>,
) {
    let next = match &out {
        Ok(step) if run_ahead => step.batch.as_ref().map(|b| b.id),
        _ => None,
    };
    let _ = reply.send(out);
    if let Some(id) = next {
        engine.run_ahead(id);
    }
}

/// Commands waiting for the engine at most. The router steps the shards one call at a time, so
/// a full queue means something upstream misbehaves: senders then wait.
const COMMAND_QUEUE: usize = 16;

/// The engine's own thread and the bounded command channel to it. Cloning shares the same
/// thread; the thread ends when every handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
}

impl EngineHandle {
    /// Moves `engine` onto a new thread that runs commands one at a time. The receiver gets
    /// the model's failure once it can no longer run (its tensor-parallel ranks fell apart).
    pub fn spawn(engine: Engine) -> std::io::Result<(Self, oneshot::Receiver<String>)> {
        let (commands, mut rx) = mpsc::channel::<Command>(COMMAND_QUEUE);
        let (failed_tx, failed_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("wick-engine".into())
            .spawn(move || {
                let mut engine = engine;
                let mut failed_tx = Some(failed_tx);
                while let Some(command) = rx.blocking_recv() {
                    let (name, batch) = command.describe();
                    let _span = tracing::info_span!("engine", command = name, batch).entered();
                    // A panicking command must not take the shard down: its caller gets an
                    // error (its reply sender is dropped) and the next command runs. It runs
                    // on a worker of the compute pool (`rayon::scope` from outside the pool
                    // moves it there), so its parallel loops start without a hand-off each.
                    let run = AssertUnwindSafe(|| rayon::scope(|_| command.run(&mut engine)));
                    if std::panic::catch_unwind(run).is_err() {
                        tracing::error!("engine command panicked");
                    }
                    if let Some(failure) = engine.model_failure() {
                        if let Some(tx) = failed_tx.take() {
                            let _ = tx.send(failure);
                        }
                    }
                }
            })?;
        Ok((Self { commands }, failed_rx))
    }

    /// Sends the command `make` builds around a reply channel and waits for the answer without
    /// blocking the runtime.
    pub(super) async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("the engine thread has stopped"))?;
        rx.await
            .map_err(|_| Status::internal("the engine failed while running this call"))
    }
}
