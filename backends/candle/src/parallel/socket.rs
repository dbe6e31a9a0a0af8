//! The CPU collective: the ranks of one host joined pairwise by unix sockets (a full mesh).
//!
//! Rendezvous: rank `r` listens on `{base}-{r}` and connects to every lower rank, which accepts;
//! once the mesh is complete the listening sockets are removed. An operation sends this rank's
//! buffer to every peer and reads every peer's buffer, all sockets at once under `poll(2)`, so
//! large buffers cannot deadlock and an idle rank sleeps in the kernel instead of spinning.
//! Each message carries the operation and its sequence number: ranks that fall out of step are
//! detected, not silently mixed. A peer that exits shows as a closed socket, one that hangs as a
//! timeout; either way the error names the rank and the collective stays failed.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor};

use super::Collective;

/// "WICK": first bytes of every message.
const MAGIC: u32 = 0x5749_434b;
/// magic u32, op u32, sequence u64, payload bytes u64.
const HEADER: usize = 24;
/// Pause between rendezvous attempts (set-up only; operations never poll in a loop).
const RENDEZVOUS_RETRY: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Hello = 1,
    AllReduce = 2,
    AllGather = 3,
    Barrier = 4,
    /// A rank gave up; the payload is its reason in UTF-8.
    Abort = 5,
}

impl Op {
    fn name(code: u32) -> &'static str {
        match code {
            1 => "hello",
            2 => "all-reduce",
            3 => "all-gather",
            4 => "barrier",
            5 => "abort",
            _ => "unknown",
        }
    }
}

fn header(op: Op, seq: u64, len: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(op as u32).to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h
}

/// `(magic, op, seq, len)`.
fn parse_header(h: &[u8; HEADER]) -> (u32, u32, u64, u64) {
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    (u32_at(0), u32_at(4), u64_at(8), u64_at(16))
}

/// The mesh of one rank: a stream to every other rank of the host.
pub struct SocketCollective {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    state: Mutex<State>,
}

struct State {
    /// The stream to each rank, `None` at this rank.
    peers: Vec<Option<UnixStream>>,
    /// Operations done so far; every message carries it.
    seq: u64,
    failure: Option<String>,
}

impl SocketCollective {
    /// Joins the mesh of `world_size` ranks rendezvousing at `base`. Waits up to `timeout` for
    /// the other ranks to appear; afterwards each operation waits up to `timeout` for its peers.
    pub fn connect(
        base: &Path,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            rank < world_size,
            "rank {rank} is outside world size {world_size}"
        );
        let deadline = Instant::now() + timeout;
        let own = wick_proto::rank_socket(base, rank);
        // Only ranks with a higher rank above them are connected to.
        let listener = if rank + 1 < world_size {
            match std::fs::remove_file(&own) {
                Ok(()) => tracing::warn!(socket = %own.display(), "removed a stale socket"),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => anyhow::bail!("cannot remove {}: {e}", own.display()),
            }
            let listener = UnixListener::bind(&own)
                .with_context(|| format!("cannot bind {}", own.display()))?;
            listener.set_nonblocking(true)?;
            Some(listener)
        } else {
            None
        };
        let result = Self::rendezvous(base, rank, world_size, listener.as_ref(), deadline);
        if listener.is_some() {
            let _ = std::fs::remove_file(&own);
        }
        let peers = result.map_err(|e| {
            anyhow::anyhow!(
                "tensor-parallel rendezvous of rank {rank} at {}: {e}",
                base.display()
            )
        })?;
        for stream in peers.iter().flatten() {
            stream.set_nonblocking(true)?;
        }
        tracing::info!(rank, world_size, "tensor-parallel ranks connected");
        Ok(Self {
            rank,
            world_size,
            timeout,
            state: Mutex::new(State {
                peers,
                seq: 0,
                failure: None,
            }),
        })
    }

    fn rendezvous(
        base: &Path,
        rank: usize,
        world_size: usize,
        listener: Option<&UnixListener>,
        deadline: Instant,
    ) -> anyhow::Result<Vec<Option<UnixStream>>> {
        let mut peers: Vec<Option<UnixStream>> = (0..world_size).map(|_| None).collect();
        for (peer, slot) in peers.iter_mut().enumerate().take(rank) {
            let path = wick_proto::rank_socket(base, peer);
            let mut stream = loop {
                match UnixStream::connect(&path) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(RENDEZVOUS_RETRY),
                    Err(e) => anyhow::bail!(
                        "rank {peer} did not listen on {} in time ({e})",
                        path.display()
                    ),
                }
            };
            stream.write_all(&header(Op::Hello, rank as u64, world_size as u64))?;
            *slot = Some(stream);
        }
        let Some(listener) = listener else {
            return Ok(peers);
        };
        while peers.iter().skip(rank + 1).any(Option::is_none) {
            let mut stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(RENDEZVOUS_RETRY);
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let missing: Vec<String> = (rank + 1..world_size)
                        .filter(|&p| peers[p].is_none())
                        .map(|p| p.to_string())
                        .collect();
                    anyhow::bail!("rank(s) {} did not connect in time", missing.join(", "));
                }
                Err(e) => return Err(e.into()),
            };
            stream.set_nonblocking(false)?;
            let wait = deadline.saturating_duration_since(Instant::now());
            stream.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            let mut hello = [0u8; HEADER];
            stream
                .read_exact(&mut hello)
                .context("a connecting rank did not introduce itself")?;
            let (magic, op, peer, world) = parse_header(&hello);
            let peer = peer as usize;
            anyhow::ensure!(
                magic == MAGIC && op == Op::Hello as u32,
                "something that is not a wick rank connected"
            );
            anyhow::ensure!(
                world as usize == world_size,
                "rank {peer} runs with world size {world}, this rank with {world_size}"
            );
            anyhow::ensure!(
                peer > rank && peer < world_size && peers[peer].is_none(),
                "unexpected rank {peer} connected"
            );
            stream.set_read_timeout(None)?;
            peers[peer] = Some(stream);
        }
        Ok(peers)
    }

    /// Runs one operation; on failure the collective stays failed and every peer connection is
    /// shut down, so the other ranks stop waiting for this one at once.
    fn run<T>(
        &self,
        op: Op,
        payload: &[u8],
        finish: impl FnOnce(Vec<Vec<f32>>) -> std::result::Result<T, String>,
    ) -> Result<T> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("the collective's lock is poisoned".into()))?;
        if let Some(failure) = &state.failure {
            return Err(candle_core::Error::Msg(format!(
                "tensor parallelism failed earlier: {failure}"
            )));
        }
        let seq = state.seq;
        state.seq += 1;
        let mut boundary = vec![true; self.world_size];
        let result = exchange(
            &state.peers,
            self.rank,
            op,
            seq,
            payload,
            self.timeout,
            &mut boundary,
        )
        .and_then(finish);
        result.map_err(|e| {
            let failure = format!("rank {}: {e}", self.rank);
            tracing::error!("tensor parallelism failed: {failure}");
            // Tell the peers why before hanging up, so their errors name the first cause
            // rather than this rank; a stream cut mid-message can only be closed.
            for (peer, stream) in state.peers.iter().enumerate() {
                let Some(stream) = stream else { continue };
                if boundary[peer] {
                    let reason = e.as_bytes();
                    let head = header(Op::Abort, seq, reason.len() as u64);
                    let _ = (&*stream).write_vectored(&[IoSlice::new(&head), IoSlice::new(reason)]);
                }
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            state.failure = Some(failure.clone());
            candle_core::Error::Msg(failure)
        })
    }
}

/// Sends `payload` to every peer and reads every peer's payload of the same operation; returns
/// them by rank (empty at this rank). On failure, `boundary[r]` tells whether the stream to
/// rank `r` stopped between messages (nothing or all of this message sent).
fn exchange(
    peers: &[Option<UnixStream>],
    rank: usize,
    op: Op,
    seq: u64,
    payload: &[u8],
    timeout: Duration,
    boundary: &mut [bool],
) -> std::result::Result<Vec<Vec<f32>>, String> {
    let deadline = Instant::now() + timeout;
    let head = header(op, seq, payload.len() as u64);
    let total_out = HEADER + payload.len();
    let mut io: Vec<PeerIo> = peers
        .iter()
        .enumerate()
        .filter_map(|(r, s)| s.as_ref().map(|s| PeerIo::new(r, s)))
        .collect();
    let result = (|| {
        while io.iter().any(|p| !p.done(total_out)) {
            let mut fds: Vec<libc::pollfd> = io
                .iter()
                .map(|p| libc::pollfd {
                    fd: p.stream.as_raw_fd(),
                    events: if p.sent < total_out { libc::POLLOUT } else { 0 }
                        | if p.received { 0 } else { libc::POLLIN },
                    revents: 0,
                })
                .collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let late: Vec<String> = io
                    .iter()
                    .filter(|p| !p.done(total_out))
                    .map(|p| p.rank.to_string())
                    .collect();
                return Err(format!(
                    "rank(s) {} did not answer the {} within {:?} (hung or overloaded?)",
                    late.join(", "),
                    Op::name(op as u32),
                    timeout
                ));
            }
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll failed: {e}"));
            }
            let (out_ready, in_ready) = (
                libc::POLLOUT | libc::POLLERR | libc::POLLHUP,
                libc::POLLIN | libc::POLLERR | libc::POLLHUP,
            );
            for (p, fd) in io.iter_mut().zip(&fds) {
                if p.sent < total_out && fd.revents & out_ready != 0 {
                    if let Err(e) = p.send(&head, payload) {
                        // A peer that gave up says why before it hangs up: prefer its reason.
                        return Err(p.salvage_abort(op, seq).unwrap_or(e));
                    }
                }
                if !p.received && fd.revents & in_ready != 0 {
                    p.receive(op, seq)?;
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        for p in &io {
            boundary[p.rank] = p.sent == 0 || p.sent >= total_out;
        }
        return Err(e);
    }
    let mut parts: Vec<Vec<f32>> = vec![Vec::new(); peers.len()];
    for p in io {
        parts[p.rank] = p.body;
    }
    debug_assert!(parts[rank].is_empty());
    Ok(parts)
}

/// One peer's progress through an exchange.
struct PeerIo<'a> {
    rank: usize,
    stream: &'a UnixStream,
    /// Bytes of header + payload written.
    sent: usize,
    head: [u8; HEADER],
    head_got: usize,
    body: Vec<f32>,
    /// Bytes of the body expected and read.
    body_len: usize,
    body_got: usize,
    received: bool,
    /// The reason in an abort message from this peer.
    abort: Option<String>,
}

impl<'a> PeerIo<'a> {
    fn new(rank: usize, stream: &'a UnixStream) -> Self {
        Self {
            rank,
            stream,
            sent: 0,
            head: [0; HEADER],
            head_got: 0,
            body: Vec::new(),
            body_len: 0,
            body_got: 0,
            received: false,
            abort: None,
        }
    }

    fn done(&self, total_out: usize) -> bool {
        self.sent >= total_out && self.received
    }

    fn lost(&self, e: std::io::Error) -> String {
        match e.kind() {
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof => {
                format!("rank {} closed its connection (did it exit?)", self.rank)
            }
            _ => format!("connection to rank {} failed: {e}", self.rank),
        }
    }

    fn send(&mut self, head: &[u8; HEADER], payload: &[u8]) -> std::result::Result<(), String> {
        loop {
            let slices: [IoSlice; 2] = if self.sent < HEADER {
                [IoSlice::new(&head[self.sent..]), IoSlice::new(payload)]
            } else {
                [
                    IoSlice::new(&[]),
                    IoSlice::new(&payload[self.sent - HEADER..]),
                ]
            };
            if slices[0].is_empty() && slices[1].is_empty() {
                return Ok(());
            }
            match (&*self.stream).write_vectored(&slices) {
                Ok(0) => return Err(self.lost(ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.lost(e)),
            }
        }
    }

    fn receive(&mut self, op: Op, seq: u64) -> std::result::Result<(), String> {
        loop {
            let buf: &mut [u8] = if self.head_got < HEADER {
                &mut self.head[self.head_got..]
            } else {
                &mut f32_bytes_mut(&mut self.body)[self.body_got..self.body_len]
            };
            if buf.is_empty() {
                return self.finish_message();
            }
            let n = match (&*self.stream).read(buf) {
                Ok(0) => return Err(self.lost(ErrorKind::UnexpectedEof.into())),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.lost(e)),
            };
            if self.head_got < HEADER {
                self.head_got += n;
                if self.head_got == HEADER {
                    self.start_body(op, seq)?;
                }
            } else {
                self.body_got += n;
            }
        }
    }

    /// Reads what the peer sent before it hung up (the rest of its message, then perhaps an
    /// abort) and returns the reason of that abort.
    fn salvage_abort(&mut self, op: Op, seq: u64) -> Option<String> {
        for _ in 0..2 {
            if self.received {
                self.received = false;
                self.head_got = 0;
                self.body_got = 0;
                self.body_len = 0;
                self.body.clear();
            }
            if self.receive(op, seq).is_err() || !self.received {
                break;
            }
        }
        self.abort.clone()
    }

    /// Checks a complete header and sizes the body it announces.
    fn start_body(&mut self, op: Op, seq: u64) -> std::result::Result<(), String> {
        let (magic, got_op, got_seq, len) = parse_header(&self.head);
        let well_formed = magic == MAGIC && (got_op == Op::Abort as u32 || len % 4 == 0);
        if !well_formed {
            return Err(format!("rank {} sent a malformed message", self.rank));
        }
        if got_op != Op::Abort as u32 && (got_op != op as u32 || got_seq != seq) {
            return Err(format!(
                "rank {} is out of step: it sent {} #{got_seq} while this rank runs {} #{seq}",
                self.rank,
                Op::name(got_op),
                Op::name(op as u32)
            ));
        }
        self.body_len = len as usize;
        self.body = vec![0f32; self.body_len.div_ceil(4)];
        Ok(())
    }

    /// A whole message is in: an abort turns into the peer's reason, anything else is kept.
    fn finish_message(&mut self) -> std::result::Result<(), String> {
        let (_, got_op, _, _) = parse_header(&self.head);
        if got_op == Op::Abort as u32 {
            let bytes = &f32_bytes(&self.body)[..self.body_len];
            let reason = format!(
                "rank {} gave up: {}",
                self.rank,
                String::from_utf8_lossy(bytes)
            );
            self.abort = Some(reason.clone());
            return Err(reason);
        }
        self.received = true;
        Ok(())
    }
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 initialised bytes; u8 has no alignment requirement.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f32, so writes through the byte view
    // cannot create an invalid value.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The values of `x` as f32, in host memory.
fn host_values(x: &Tensor) -> Result<Vec<f32>> {
    x.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

impl Collective for SocketCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let own = host_values(x)?;
        let rank = self.rank;
        let sum = self.run(Op::AllReduce, f32_bytes(&own), |mut parts| {
            if let Some((r, p)) = parts
                .iter()
                .enumerate()
                .find(|(r, p)| *r != rank && p.len() != own.len())
            {
                return Err(format!(
                    "rank {r} reduced {} values, this rank {}",
                    p.len(),
                    own.len()
                ));
            }
            // The same order on every rank, so every rank gets the same bits.
            // Rank 0's part first, then the others in order: the same additions on every
            // rank. Ranks other than 0 add into the buffer rank 0's part arrived in.
            let mut sum = if rank == 0 {
                own.clone()
            } else {
                std::mem::take(&mut parts[0])
            };
            for (r, received) in parts.iter().enumerate().skip(1) {
                let part = if r == rank { &own } else { received };
                for (s, v) in sum.iter_mut().zip(part) {
                    *s += v;
                }
            }
            Ok(sum)
        })?;
        Tensor::from_vec(sum, x.shape(), &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((_, lead)) = dims.split_last() else {
            candle_core::bail!("all-gather needs a tensor of rank 1 or more");
        };
        let rows: usize = lead.iter().product();
        let own = host_values(x)?;
        let rank = self.rank;
        let (gathered, total_cols) = self.run(Op::AllGather, f32_bytes(&own), |parts| {
            let part = |r: usize| if r == rank { &own } else { &parts[r] };
            let mut widths = Vec::with_capacity(parts.len());
            for r in 0..parts.len() {
                let len = part(r).len();
                if rows == 0 || len % rows != 0 {
                    if rows == 0 && len == 0 {
                        widths.push(0);
                        continue;
                    }
                    return Err(format!("rank {r} gathered {len} values, not {rows} rows"));
                }
                widths.push(len / rows);
            }
            let total: usize = widths.iter().sum();
            let mut out = Vec::with_capacity(rows * total);
            for row in 0..rows {
                for (r, &w) in widths.iter().enumerate() {
                    out.extend_from_slice(&part(r)[row * w..(row + 1) * w]);
                }
            }
            Ok((out, total))
        })?;
        let mut shape = lead.to_vec();
        shape.push(total_cols);
        Tensor::from_vec(gathered, shape, &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())
    }

    fn barrier(&self) -> Result<()> {
        self.run(Op::Barrier, &[], |_| Ok(()))
    }

    fn failure(&self) -> Option<String> {
        self.state.lock().ok().and_then(|s| s.failure.clone())
    }
}
