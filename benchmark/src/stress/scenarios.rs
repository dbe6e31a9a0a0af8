//! The scenarios: each starts a deployment, runs its load, checks what it must and stops it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::load::{send, Job, Outcome, Payload, Route, PROMPTS};
use super::server::{open_fds, rss_kib, scrape, Metrics, Server};
use super::{hostile, Scenario, ScenarioReport, StressArgs};
use crate::arrivals::SplitMix64;

/// How long the deployment gets to return to idle after the load (KV blocks, queue, permits).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `wick` gets to exit after SIGTERM once its requests are done.
const DRAIN_EXIT_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn run(
    scenario: Scenario,
    args: &StressArgs,
    wick: &Path,
) -> anyhow::Result<ScenarioReport> {
    match scenario {
        Scenario::Mixed => mixed(args, wick).await,
        Scenario::Slow => slow(args, wick).await,
        Scenario::Kv => kv(args, wick).await,
        Scenario::Drain => drain(args, wick).await,
        Scenario::Kill => fault(args, wick, Scenario::Kill).await,
        Scenario::Hang => fault(args, wick, Scenario::Hang).await,
        Scenario::Soak => soak(args, wick).await,
    }
}

fn http_client(args: &StressArgs) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?)
}

/// Every deterministic request the scenarios send.
fn all_jobs() -> Vec<Job> {
    let mut jobs = Vec::new();
    for route in Route::ALL {
        for prompt in 0..PROMPTS.len() {
            for sampled in [false, true] {
                jobs.push(Job {
                    route,
                    prompt,
                    sampled,
                });
            }
        }
    }
    jobs
}

/// Each job's text when it runs alone, one after another.
async fn references(
    client: &reqwest::Client,
    server: &Server,
    jobs: &[Job],
    args: &StressArgs,
) -> anyhow::Result<HashMap<Job, String>> {
    let base = server.url("");
    let mut texts = HashMap::new();
    for job in jobs {
        let outcome = job
            .run(client, &base, args.max_tokens, None, args.request_timeout)
            .await;
        match outcome {
            Outcome::Completed(text) => {
                texts.insert(*job, text);
            }
            other => anyhow::bail!("{job:?} alone did not complete: {other:?}"),
        }
    }
    Ok(texts)
}

/// Waits until nothing is queued, batched, held or allocated; the last scrape and how long it
/// took.
async fn settle(client: &reqwest::Client, server: &Server) -> (Metrics, Duration, bool) {
    let start = Instant::now();
    loop {
        let metrics = scrape(client, server).await.unwrap_or_default();
        let idle = [
            "wick_kv_blocks_used",
            "tgi_queue_size",
            "tgi_batch_current_size",
            "wick_requests_in_flight",
        ]
        .iter()
        .all(|name| metrics.get(name) == 0.0);
        if idle || start.elapsed() > SETTLE_TIMEOUT {
            return (metrics, start.elapsed(), idle);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The after-load checks every scenario that keeps its deployment shares: back to idle, and
/// the processes' memory and descriptors.
async fn after_load(
    report: &mut ScenarioReport,
    client: &reqwest::Client,
    server: &Server,
    before: &Resources,
) {
    let (metrics, waited, idle) = settle(client, server).await;
    report.figure(
        "idle after (kv blocks/queue/batch/permits)",
        format!(
            "{}/{}/{}/{} in {:.1}s",
            metrics.get("wick_kv_blocks_used"),
            metrics.get("tgi_queue_size"),
            metrics.get("tgi_batch_current_size"),
            metrics.get("wick_requests_in_flight"),
            waited.as_secs_f64()
        ),
    );
    report.expect(idle, || {
        "KV blocks, queue, batch or permits did not return to idle".into()
    });
    let after = Resources::read(server);
    report.figure("rss MiB (router, shard)", before.rss_change(&after));
    report.figure("fds (router, shard)", before.fd_change(&after));
}

/// Memory and open descriptors of the router and shard 0.
struct Resources {
    rss: [Option<u64>; 2],
    fds: [Option<usize>; 2],
}

impl Resources {
    fn read(server: &Server) -> Self {
        let pids = [server.child_pid("router"), server.child_pid("shard-0")];
        Self {
            rss: pids.map(|p| p.and_then(rss_kib)),
            fds: pids.map(|p| p.and_then(open_fds)),
        }
    }

    fn rss_change(&self, after: &Resources) -> String {
        let mib = |k: Option<u64>| k.map_or("?".into(), |k| format!("{:.0}", k as f64 / 1024.0));
        format!(
            "{}->{}, {}->{}",
            mib(self.rss[0]),
            mib(after.rss[0]),
            mib(self.rss[1]),
            mib(after.rss[1])
        )
    }

    fn fd_change(&self, after: &Resources) -> String {
        let n = |f: Option<usize>| f.map_or("?".into(), |f| f.to_string());
        format!(
            "{}->{}, {}->{}",
            n(self.fds[0]),
            n(after.fds[0]),
            n(self.fds[1]),
            n(after.fds[1])
        )
    }
}

/// Stops `server` with SIGTERM and checks it exits 0 leaving nothing behind.
async fn stop(report: &mut ScenarioReport, mut server: Server) {
    server.signal(libc::SIGTERM);
    let exit = server.wait_exit(Instant::now(), DRAIN_EXIT_TIMEOUT).await;
    report.expect(exit.is_some_and(|(s, _)| s.success()), || {
        format!("wick did not exit 0 after SIGTERM: {exit:?}")
    });
    leftovers(report, &server);
}

fn leftovers(report: &mut ScenarioReport, server: &Server) {
    let (processes, sockets, shm) = server.leftovers();
    report.figure(
        "left behind",
        format!(
            "{} processes, {} sockets, {} shm",
            processes.len(),
            sockets.len(),
            shm.len()
        ),
    );
    report.expect(
        processes.is_empty() && sockets.is_empty() && shm.is_empty(),
        || format!("left behind: processes {processes:?}, sockets {sockets:?}, shm {shm:?}"),
    );
}

/// What one mixed-load request was.
#[derive(Debug, Clone, Copy)]
enum Planned {
    /// Run to its end; its text must match its run alone.
    Whole(Job),
    /// A streamed job whose client hangs up after this many events.
    HangUp(Job, usize),
    /// The hostile body of this index.
    Hostile(usize),
}

#[derive(Default)]
struct Tally {
    completed: usize,
    hung_up: usize,
    hostile_refused: usize,
    hostile_accepted: usize,
    failed: usize,
    lost: usize,
    garbled: usize,
    server_errors: usize,
    examples: Vec<String>,
}

impl Tally {
    fn example(&mut self, text: String) {
        if self.examples.len() < 4 {
            self.examples.push(crate::openai::clip(&text));
        }
    }

    /// Counts one outcome; `reference` is the job's text alone (none for a hostile body).
    fn count(&mut self, planned: Planned, outcome: Outcome, reference: Option<&String>) {
        match (planned, outcome) {
            (_, Outcome::ServerError(status, body)) => {
                self.server_errors += 1;
                self.example(format!("{planned:?}: {status} {body}"));
            }
            // A stream refuses in band (TGI's `/generate_stream` answers 200 and an error event).
            (Planned::Hostile(_), Outcome::Refused(..)) => self.hostile_refused += 1,
            (Planned::Hostile(_), Outcome::Broken(e)) if e.starts_with("error event") => {
                self.hostile_refused += 1
            }
            (Planned::Hostile(_), Outcome::Completed(_) | Outcome::Disconnected(_)) => {
                self.hostile_accepted += 1
            }
            (_, Outcome::Completed(text)) | (Planned::HangUp(..), Outcome::Disconnected(text)) => {
                let matches = match (planned, reference) {
                    (Planned::Whole(_), Some(r)) => &text == r,
                    (_, Some(r)) => r.starts_with(&text),
                    _ => true,
                };
                if matches {
                    match planned {
                        Planned::HangUp(..) => self.hung_up += 1,
                        _ => self.completed += 1,
                    }
                } else {
                    self.garbled += 1;
                    self.example(format!("{planned:?}: {text:?} vs alone {reference:?}"));
                }
            }
            (_, Outcome::Refused(status, body)) => {
                self.failed += 1;
                self.example(format!("{planned:?}: {status} {body}"));
            }
            (_, Outcome::Broken(e)) if e.starts_with("error event") => {
                self.failed += 1;
                self.example(format!("{planned:?}: {e}"));
            }
            (_, Outcome::Broken(e))
                if e.starts_with("unparsable")
                    || e.starts_with("an event")
                    || e.starts_with("no generated text") =>
            {
                self.garbled += 1;
                self.example(format!("{planned:?}: {e}"));
            }
            (_, other) => {
                self.lost += 1;
                self.example(format!("{planned:?}: {other:?}"));
            }
        }
    }
}

/// The mixed load: every route, streamed and not, greedy and seeded, clients hanging up and
/// hostile bodies among them.
async fn mixed(args: &StressArgs, wick: &Path) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new(Scenario::Mixed);
    let server = Server::start(wick, &args.model_id, &args.wick_args).await?;
    let client = http_client(args)?;
    let jobs = all_jobs();
    let references = Arc::new(references(&client, &server, &jobs, args).await?);
    let before = Resources::read(&server);

    let mut rng = SplitMix64::new(args.seed);
    let streamed: Vec<Job> = jobs
        .iter()
        .copied()
        .filter(|j| j.route.streamed())
        .collect();
    let plans: Vec<Planned> = (0..args.requests)
        .map(|_| {
            let u = rng.next_unit();
            let pick =
                |rng: &mut SplitMix64, from: &[Job]| from[rng.next_u64() as usize % from.len()];
            if u < args.hostile_rate {
                Planned::Hostile(rng.next_u64() as usize % hostile::COUNT)
            } else if u < args.hostile_rate + args.disconnect_rate {
                let after = 1 + rng.next_u64() as usize % args.max_tokens.max(1) as usize;
                Planned::HangUp(pick(&mut rng, &streamed), after)
            } else {
                Planned::Whole(pick(&mut rng, &jobs))
            }
        })
        .collect();
    let routes = plans.iter().fold([0usize; 3], |mut n, p| {
        match p {
            Planned::Whole(j) | Planned::HangUp(j, _) if j.route.native() => n[0] += 1,
            Planned::Whole(_) | Planned::HangUp(..) => n[1] += 1,
            Planned::Hostile(_) => n[2] += 1,
        }
        n
    });

    let start = Instant::now();
    let base = server.url("");
    let outcomes: Vec<(Planned, Outcome)> = futures::stream::iter(plans)
        .map(|planned| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let outcome = match planned {
                    Planned::Whole(job) | Planned::HangUp(job, _) => {
                        let hang_up = match planned {
                            Planned::HangUp(_, n) => Some(n),
                            _ => None,
                        };
                        job.run(
                            &client,
                            &base,
                            args.max_tokens,
                            hang_up,
                            args.request_timeout,
                        )
                        .await
                    }
                    Planned::Hostile(i) => {
                        let (path, payload) = hostile::body(i);
                        // Read as a non-streamed answer: whatever it is, it must end.
                        send(
                            &client,
                            &base,
                            Route::Generate,
                            path,
                            payload,
                            None,
                            args.request_timeout,
                        )
                        .await
                    }
                };
                (planned, outcome)
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let elapsed = start.elapsed();

    let mut tally = Tally::default();
    for (planned, outcome) in outcomes {
        let reference = match planned {
            Planned::Whole(j) | Planned::HangUp(j, _) => references.get(&j),
            Planned::Hostile(_) => None,
        };
        tally.count(planned, outcome, reference);
    }
    report.figure("requests", args.requests);
    report.figure(
        "native/openai/hostile",
        format!("{}/{}/{}", routes[0], routes[1], routes[2]),
    );
    report.figure("completed", tally.completed);
    report.figure("hung up", tally.hung_up);
    report.figure(
        "hostile refused/accepted",
        format!("{}/{}", tally.hostile_refused, tally.hostile_accepted),
    );
    report.figure("failed", tally.failed);
    report.figure("lost", tally.lost);
    report.figure("garbled", tally.garbled);
    report.figure("5xx", tally.server_errors);
    report.figure("seconds", format!("{:.1}", elapsed.as_secs_f64()));
    let clean = tally.failed + tally.lost + tally.garbled + tally.server_errors == 0;
    let examples = tally.examples.join(" / ");
    report.expect(clean, || {
        format!("failed, lost, garbled or 5xx: {examples}")
    });
    after_load(&mut report, &client, &server, &before).await;
    stop(&mut report, server).await;
    Ok(report)
}

/// Long streams started at once; returns their tasks once the batch holds some of them, and
/// how many it held then.
async fn start_streams(
    client: &reqwest::Client,
    server: &Server,
    args: &StressArgs,
) -> (Vec<tokio::task::JoinHandle<Outcome>>, usize) {
    let (count, max_tokens, timeout) = (args.concurrency, args.fault_tokens, args.request_timeout);
    let base = server.url("");
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let job = Job {
                route: if i % 2 == 0 {
                    Route::GenerateStream
                } else {
                    Route::ChatStream
                },
                prompt: i % PROMPTS.len(),
                sampled: false,
            };
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                let mut body = job.body(max_tokens);
                if job.route.native() {
                    body["parameters"]["details"] = serde_json::json!(false);
                }
                send(
                    &client,
                    &base,
                    job.route,
                    job.route.path(),
                    Payload::Json(body),
                    None,
                    timeout,
                )
                .await
            })
        })
        .collect();
    // Until most of them are running (or a while has passed).
    let start = Instant::now();
    let mut running = 0;
    while start.elapsed() < Duration::from_secs(30) {
        running = scrape(client, server)
            .await
            .map(|m| m.get("tgi_batch_current_size"))
            .unwrap_or(0.0) as usize;
        if running >= count.div_ceil(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (tasks, running)
}

/// How and when `wick` exited, for the report.
fn exit_figure(exit: Option<(std::process::ExitStatus, Duration)>) -> String {
    match exit {
        Some((status, after)) => format!("{status} after {:.2}s", after.as_secs_f64()),
        None => "none".into(),
    }
}

/// SIGTERM under load: in-flight requests finish, new ones are refused, exit 0.
async fn drain(args: &StressArgs, wick: &Path) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new(Scenario::Drain);
    let mut server = Server::start(wick, &args.model_id, &args.wick_args).await?;
    let client = http_client(args)?;
    let (tasks, running) = start_streams(&client, &server, args).await;
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut refused, mut accepted) = (0, 0);
    let late = Job {
        route: Route::Generate,
        prompt: 0,
        sampled: false,
    };
    for _ in 0..4 {
        let fresh = reqwest::Client::new();
        let outcome = late
            .run(&fresh, &server.url(""), 4, None, Duration::from_secs(10))
            .await;
        match outcome {
            Outcome::Refused(503, _) => refused += 1,
            Outcome::Broken(e) if e.starts_with("transport") => refused += 1,
            _ => accepted += 1,
        }
    }
    let (mut finished, mut cut) = (0, 0);
    for task in tasks {
        match task.await {
            Ok(Outcome::Completed(_)) => finished += 1,
            _ => cut += 1,
        }
    }
    let exit = server.wait_exit(signalled, DRAIN_EXIT_TIMEOUT).await;
    report.figure("streams", args.concurrency);
    report.figure("running at SIGTERM", running);
    report.figure("finished", finished);
    report.figure("cut", cut);
    report.figure("new refused/accepted", format!("{refused}/{accepted}"));
    report.figure("exit", exit_figure(exit));
    report.expect(running > 0, || "nothing was running at SIGTERM".into());
    report.expect(cut == 0, || format!("{cut} in-flight requests were cut"));
    report.expect(accepted == 0, || {
        format!("{accepted} requests accepted after SIGTERM")
    });
    report.expect(exit.is_some_and(|(s, _)| s.success()), || {
        format!("wick did not exit 0: {exit:?}")
    });
    leftovers(&mut report, &server);
    Ok(report)
}

/// The shard killed (SIGKILL) or stopped (SIGSTOP) under load: every client gets an error
/// (not a hang), `wick` exits non-zero naming the shard, nothing is left behind.
async fn fault(
    args: &StressArgs,
    wick: &Path,
    scenario: Scenario,
) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new(scenario);
    let mut extra = args.wick_args.clone();
    let mut bound = args.exit_within;
    if scenario == Scenario::Hang {
        extra.extend([
            "--shard-health-timeout".into(),
            args.hang_timeout.to_string(),
        ]);
        bound += Duration::from_secs(args.hang_timeout);
    }
    let mut server = Server::start(wick, &args.model_id, &extra).await?;
    let client = http_client(args)?;
    let shard = server
        .child_pid("shard-0")
        .ok_or_else(|| anyhow::anyhow!("no shard-0 pid in the log:\n{}", server.log()))?;
    let (tasks, running) = start_streams(&client, &server, args).await;
    let signalled = Instant::now();
    let signal = if scenario == Scenario::Kill {
        libc::SIGKILL
    } else {
        libc::SIGSTOP
    };
    super::server::send_signal(shard, signal);
    let (mut errors, mut truncated, mut hung, mut finished) = (0, 0, 0, 0);
    let mut slowest = Duration::ZERO;
    for task in tasks {
        let outcome = task.await.unwrap_or(Outcome::TimedOut);
        slowest = slowest.max(signalled.elapsed());
        match outcome {
            Outcome::Completed(_) => finished += 1,
            Outcome::ServerError(..) | Outcome::Refused(..) => errors += 1,
            Outcome::Broken(e) if e.starts_with("error event") => errors += 1,
            Outcome::TimedOut => hung += 1,
            _ => truncated += 1,
        }
    }
    let exit = server.wait_exit(signalled, args.request_timeout).await;
    report.figure("streams", args.concurrency);
    report.figure("running at signal", running);
    report.figure("finished before", finished);
    report.figure("error", errors);
    report.figure("cut without error", truncated);
    report.figure("hung", hung);
    report.figure(
        "last client answered after",
        format!("{:.2}s", slowest.as_secs_f64()),
    );
    report.figure("exit", exit_figure(exit));
    report.expect(running > 0 && finished < args.concurrency, || {
        "nothing was running when the shard was signalled".into()
    });
    report.expect(hung == 0, || format!("{hung} clients hung"));
    report.expect(truncated == 0, || {
        format!("{truncated} streams ended without an error")
    });
    report.expect(exit.is_some_and(|(s, _)| !s.success()), || {
        format!("wick did not exit non-zero: {exit:?}")
    });
    let log = server.log();
    report.expect(log.contains("shard-0"), || {
        "the log does not name shard-0".into()
    });
    if let Some((_, after)) = exit {
        report.expect(after <= bound, || {
            format!(
                "wick took {:.2}s to exit (bound {bound:?})",
                after.as_secs_f64(),
            )
        });
    }
    leftovers(&mut report, &server);
    Ok(report)
}

/// Clients that read their stream slowly or not at all, beside normal ones: the normal ones
/// finish with the right text, the batch does not wait for the stuck ones, and what the stuck
/// ones hold afterwards is reported.
async fn slow(args: &StressArgs, wick: &Path) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new(Scenario::Slow);
    let server = Server::start(wick, &args.model_id, &args.wick_args).await?;
    let client = http_client(args)?;
    let jobs: Vec<Job> = all_jobs()
        .into_iter()
        .filter(|j| j.route.streamed())
        .collect();
    let references = references(&client, &server, &jobs, args).await?;
    let before = Resources::read(&server);
    let base = server.url("");
    let odd = (args.concurrency / 4).max(1);
    let long = args.max_tokens * 16;
    // Stuck: open the stream, read the headers, never read the body (each on its own
    // connection, held until the end of the scenario).
    let mut stuck = Vec::new();
    for i in 0..odd {
        let job = Job {
            route: Route::GenerateStream,
            prompt: i % PROMPTS.len(),
            sampled: false,
        };
        let response = reqwest::Client::new()
            .post(format!("{base}{}", job.route.path()))
            .json(&job.body(long))
            .send()
            .await?;
        stuck.push(response);
    }
    // Slow: read one network chunk every 200 ms.
    let slow_tasks: Vec<_> = (0..odd)
        .map(|i| {
            let job = Job {
                route: Route::ChatStream,
                prompt: i % PROMPTS.len(),
                sampled: false,
            };
            let url = format!("{base}{}", job.route.path());
            let body = job.body(args.max_tokens * 2);
            tokio::spawn(async move {
                let mut response = reqwest::Client::new()
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .ok()?;
                let mut bytes = 0;
                while let Ok(Some(chunk)) = response.chunk().await {
                    bytes += chunk.len();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Some(bytes)
            })
        })
        .collect();
    // Normal clients beside them.
    let normal = args.concurrency.saturating_sub(2 * odd).max(1);
    let count = 4 * args.concurrency;
    let start = Instant::now();
    let outcomes: Vec<(Job, Outcome)> = futures::stream::iter(0..count)
        .map(|i| {
            let job = jobs[i % jobs.len()];
            let (client, base) = (client.clone(), base.clone());
            async move {
                let outcome = job
                    .run(&client, &base, args.max_tokens, None, args.request_timeout)
                    .await;
                (job, outcome)
            }
        })
        .buffer_unordered(normal)
        .collect()
        .await;
    let normal_secs = start.elapsed().as_secs_f64();
    let mut tally = Tally::default();
    for (job, outcome) in outcomes {
        tally.count(Planned::Whole(job), outcome, references.get(&job));
    }
    // The stuck requests' generation must not wait for their readers: the batch empties.
    let (metrics, waited, _) = settle(&client, &server).await;
    let batch_empty = metrics.get("tgi_batch_current_size") == 0.0;
    let held = metrics.get("wick_requests_in_flight");
    report.figure("normal clients", normal);
    report.figure("slow/stuck clients", format!("{odd}/{odd}"));
    report.figure("normal requests", count);
    report.figure("completed", tally.completed);
    report.figure("failed", tally.failed);
    report.figure("lost", tally.lost);
    report.figure("garbled", tally.garbled);
    report.figure("5xx", tally.server_errors);
    report.figure("normal seconds", format!("{normal_secs:.1}"));
    report.figure(
        "batch with stuck clients connected",
        format!(
            "{} after {:.1}s",
            metrics.get("tgi_batch_current_size"),
            waited.as_secs_f64()
        ),
    );
    report.figure("permits held by stuck clients", held);
    let examples = tally.examples.join(" / ");
    report.expect(
        tally.failed + tally.lost + tally.garbled + tally.server_errors == 0,
        || format!("normal clients: failed, lost, garbled or 5xx: {examples}"),
    );
    report.expect(batch_empty, || {
        "the batch kept the stuck clients' requests".into()
    });
    let mut slow_bytes = 0;
    for task in slow_tasks {
        slow_bytes += task.await.ok().flatten().unwrap_or(0);
    }
    report.figure("slow clients read bytes", slow_bytes);
    report.expect(slow_bytes > 0, || "the slow clients got nothing".into());
    drop(stuck);
    after_load(&mut report, &client, &server, &before).await;
    stop(&mut report, server).await;
    Ok(report)
}

/// A completion's status and JSON body, or why none came.
type Answer = Result<(u16, serde_json::Value), String>;

/// Far more concurrent long requests than the KV pool holds: each one finishes with all its
/// tokens and the text it has alone, or is refused up front with a 4xx; none is cut short,
/// corrupted or left waiting. (wick allocates a request's KV blocks for its whole length at
/// admission, so a request that starts always has room to finish.)
async fn kv(args: &StressArgs, wick: &Path) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new(Scenario::Kv);
    // The pool is sized in memory: read what a token takes from a first start.
    let client = http_client(args)?;
    let probe = Server::start(wick, &args.model_id, &args.wick_args).await?;
    let info: serde_json::Value = client.get(probe.url("/info")).send().await?.json().await?;
    stop(&mut ScenarioReport::new(Scenario::Kv), probe).await;
    let per_token = info["kv_cache_bytes_per_token"]
        .as_u64()
        .unwrap_or(0)
        .max(1);
    // This scenario sets the KV memory itself.
    let mut extra = Vec::new();
    let mut given = args.wick_args.iter();
    while let Some(arg) = given.next() {
        if arg == "--kv-cache-memory" {
            given.next();
        } else if !arg.starts_with("--kv-cache-memory=") {
            extra.push(arg.clone());
        }
    }
    extra.extend([
        "--kv-cache-memory".to_string(),
        (u64::from(args.kv_pool) * per_token).to_string(),
        "--max-batch-prefill-tokens".to_string(),
        args.kv_pool.min(1024).to_string(),
    ]);
    let server = Server::start(wick, &args.model_id, &extra).await?;
    let info: serde_json::Value = client.get(server.url("/info")).send().await?.json().await?;
    let pool = info["max_batch_total_tokens"].as_u64().unwrap_or(0);
    let max_tokens = args.max_tokens * 2;
    // Long prompts: each request holds a good part of the pool.
    let prompts: Vec<String> = (0..PROMPTS.len())
        .map(|i| {
            format!(
                "{} {}",
                PROMPTS[i],
                "and then the story goes on, ".repeat(12)
            )
        })
        .collect();
    // Every 16th request could never fit the pool: it must be refused up front.
    let oversize = |i: usize| i % 16 == 15;
    let body = |i: usize| {
        let max_tokens = if oversize(i) {
            pool as u32 + 1
        } else {
            max_tokens
        };
        serde_json::json!({
            "model": "wick", "prompt": prompts[i % prompts.len()], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": true,
        })
    };
    let base = server.url("");
    let ask = |i: usize| {
        let (client, base, body) = (client.clone(), base.clone(), body(i));
        async move {
            let response = tokio::time::timeout(
                args.request_timeout,
                client
                    .post(format!("{base}/v1/completions"))
                    .json(&body)
                    .send(),
            )
            .await;
            let response = match response {
                Err(_) => return Err("timed out".to_string()),
                Ok(Err(e)) => return Err(format!("transport: {e}")),
                Ok(Ok(r)) => r,
            };
            let status = response.status().as_u16();
            let value: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
            Ok((status, value))
        }
    };
    let mut alone = HashMap::new();
    for i in (0..prompts.len()).filter(|&i| !oversize(i)) {
        match ask(i).await {
            Ok((200, v)) => {
                alone.insert(
                    i,
                    v["choices"][0]["text"].as_str().unwrap_or("").to_string(),
                );
            }
            other => anyhow::bail!("prompt {i} alone: {other:?}"),
        }
    }
    let before = Resources::read(&server);
    let count = 4 * args.concurrency;
    let results: Vec<(usize, Answer)> = futures::stream::iter(0..count)
        .map(|i| async move { (i, ask(i).await) })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let (mut completed, mut refused, mut short, mut garbled, mut lost, mut server_errors) =
        (0, 0, 0, 0, 0, 0);
    let mut oversize_accepted = 0;
    let mut examples = Vec::new();
    for (i, result) in results {
        match result {
            Ok((200, _)) if oversize(i) => oversize_accepted += 1,
            Ok((200, v)) => {
                let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                let text = v["choices"][0]["text"].as_str().unwrap_or("");
                if tokens != u64::from(max_tokens) {
                    short += 1;
                    examples.push(format!("{tokens} of {max_tokens} tokens"));
                } else if Some(&text.to_string()) != alone.get(&(i % prompts.len())) {
                    garbled += 1;
                    examples.push(format!("request {i}: {}", crate::openai::clip(text)));
                } else {
                    completed += 1;
                }
            }
            Ok((400..=499, _)) => refused += 1,
            Ok((status, v)) => {
                server_errors += 1;
                examples.push(format!("{status}: {v}"));
            }
            Err(e) => {
                lost += 1;
                examples.push(e);
            }
        }
    }
    report.figure("pool tokens", pool);
    report.figure("requests", count);
    report.figure("tokens each (about)", 100 + u64::from(max_tokens));
    report.figure("completed", completed);
    report.figure(
        "refused 4xx (oversize)",
        format!(
            "{refused} ({})",
            (0..count).filter(|&i| oversize(i)).count()
        ),
    );
    report.figure("cut short", short);
    report.figure("garbled", garbled);
    report.figure("lost", lost);
    report.figure("5xx", server_errors);
    examples.truncate(3);
    let examples = examples.join(" / ");
    report.expect(oversize_accepted == 0, || {
        format!("{oversize_accepted} requests larger than the pool were accepted")
    });
    report.expect(short + garbled + lost + server_errors == 0, || {
        format!("cut short, garbled, lost or 5xx: {examples}")
    });
    after_load(&mut report, &client, &server, &before).await;
    stop(&mut report, server).await;
    Ok(report)
}

/// One /metrics and /proc sample of a soak.
struct Sample {
    at: Duration,
    generated: f64,
    resources: Resources,
}

/// Sustained load for `--soak`: memory, descriptors and throughput early against late.
async fn soak(args: &StressArgs, wick: &Path) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new(Scenario::Soak);
    let server = Server::start(wick, &args.model_id, &args.wick_args).await?;
    let client = http_client(args)?;
    let jobs = all_jobs();
    let references = Arc::new(references(&client, &server, &jobs, args).await?);
    let duration = args.soak;
    // The first tenth (at most a minute) warms up; throughput compares the first and last
    // windows after it.
    let warmup = (duration / 10).min(Duration::from_secs(60));
    let window = ((duration - warmup) / 6).min(Duration::from_secs(300));
    let base = server.url("");
    let start = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let (client, base, jobs, references) = (
                client.clone(),
                base.clone(),
                jobs.clone(),
                references.clone(),
            );
            let (max_tokens, timeout) = (args.max_tokens, args.request_timeout);
            let mut rng = SplitMix64::new(args.seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9));
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut requests = 0;
                while start.elapsed() < duration {
                    let job = jobs[rng.next_u64() as usize % jobs.len()];
                    let outcome = job.run(&client, &base, max_tokens, None, timeout).await;
                    tally.count(Planned::Whole(job), outcome, references.get(&job));
                    requests += 1;
                }
                (tally, requests)
            })
        })
        .collect();
    let mut samples = Vec::new();
    while start.elapsed() < duration {
        let metrics = scrape(&client, &server).await.unwrap_or_default();
        samples.push(Sample {
            at: start.elapsed(),
            generated: metrics.get("tgi_request_generated_tokens_sum"),
            resources: Resources::read(&server),
        });
        tokio::time::sleep(Duration::from_secs(1).min(duration / 20)).await;
    }
    let mut tally = Tally::default();
    let mut requests = 0;
    for worker in workers {
        let (t, n) = worker.await?;
        requests += n;
        tally.completed += t.completed;
        tally.failed += t.failed;
        tally.lost += t.lost;
        tally.garbled += t.garbled;
        tally.server_errors += t.server_errors;
        for e in t.examples {
            tally.example(e);
        }
    }
    let at = |t: Duration| samples.iter().find(|s| s.at >= t).or(samples.last());
    let rate = |from: Duration, to: Duration| -> Option<f64> {
        let (a, b) = (at(from)?, at(to)?);
        let secs = (b.at - a.at).as_secs_f64();
        (secs > 0.0).then(|| (b.generated - a.generated) / secs)
    };
    let first = rate(warmup, warmup + window);
    let last = rate(duration.saturating_sub(window), duration);
    let (early, late) = (
        at(warmup).map(|s| &s.resources),
        samples.last().map(|s| &s.resources),
    );
    report.figure("seconds", duration.as_secs());
    report.figure("streams", args.concurrency);
    report.figure("requests", requests);
    report.figure("completed", tally.completed);
    report.figure("failed", tally.failed);
    report.figure("lost", tally.lost);
    report.figure("garbled", tally.garbled);
    report.figure("5xx", tally.server_errors);
    let examples = tally.examples.join(" / ");
    report.expect(
        tally.failed + tally.lost + tally.garbled + tally.server_errors == 0,
        || format!("failed, lost, garbled or 5xx: {examples}"),
    );
    if let (Some(early), Some(late)) = (early, late) {
        report.figure(
            "rss MiB after warmup -> end (router, shard)",
            early.rss_change(late),
        );
        report.figure(
            "fds after warmup -> end (router, shard)",
            early.fd_change(late),
        );
        for (i, name) in ["router", "shard"].iter().enumerate() {
            if let (Some(a), Some(b)) = (early.rss[i], late.rss[i]) {
                let growth = b as f64 / a as f64 - 1.0;
                report.figure(
                    &format!("{name} rss growth"),
                    format!("{:.1}%", 100.0 * growth),
                );
                report.expect(growth <= args.rss_tolerance, || {
                    format!("{name} memory grew {:.1}% after warmup", 100.0 * growth)
                });
            }
            if let (Some(a), Some(b)) = (early.fds[i], late.fds[i]) {
                report.expect(b <= a + 2, || {
                    format!("{name} descriptors grew from {a} to {b}")
                });
            }
        }
    }
    if let (Some(first), Some(last)) = (first, last) {
        report.figure(
            "generated tok/s first -> last window",
            format!(
                "{first:.1} -> {last:.1} ({:+.1}%)",
                100.0 * (last / first - 1.0)
            ),
        );
        report.expect(last >= (1.0 - args.throughput_tolerance) * first, || {
            format!("throughput fell from {first:.1} to {last:.1} tok/s")
        });
    }
    stop(&mut report, server).await;
    Ok(report)
}
