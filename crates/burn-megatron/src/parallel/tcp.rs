//! [`TcpGroup`]: ranks as processes, on any host reachable over TCP, for CPU tensors.
//!
//! Rank 0 runs a hub that relays: every rank keeps one connection to it, a collective's
//! contributions go to the hub, and when all members of the group have sent theirs, the
//! hub sends every member all of them; point-to-point messages are forwarded. Tensors
//! travel as their host data. A rank whose connection drops without saying goodbye (a
//! crash, a kill) fails the job at once: the hub tells every rank.

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use burn::tensor::{DType, TensorData};

use super::{Group, OpName, Payload, ProcessGroup};
use crate::{CollectiveFailure, Error, Result};

/// Message kinds on the wire.
mod kind {
    pub const HELLO: u8 = 1;
    pub const GATHER: u8 = 2;
    pub const SEND: u8 = 3;
    pub const ABORT: u8 = 4;
    pub const BYE: u8 = 5;
    pub const GATHERED: u8 = 10;
    pub const DELIVERED: u8 = 11;
    pub const FAILED: u8 = 12;
}

/// A message body being written.
#[derive(Default)]
struct Encoder(Vec<u8>);

impl Encoder {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(self, v: &[u8]) -> Self {
        let mut this = self.u64(v.len() as u64);
        this.0.extend_from_slice(v);
        this
    }
    fn str(self, v: &str) -> Self {
        self.bytes(v.as_bytes())
    }
}

/// A message body being read; every read is checked.
struct Decoder<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end =
            end.ok_or_else(|| Error::InvalidData("truncated message from a peer".to_string()))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| Error::InvalidData("a peer sent invalid UTF-8".to_string()))
    }
}

const DTYPES: [DType; 9] = [
    DType::F32,
    DType::F64,
    DType::F16,
    DType::BF16,
    DType::I64,
    DType::I32,
    DType::U32,
    DType::U8,
    DType::U16,
];

/// A payload as bytes: 0 for "no data", 1 and the tensor data otherwise.
fn encode_payload(payload: &Payload) -> Result<Vec<u8>> {
    if payload.downcast_ref::<()>().is_some() {
        return Ok(vec![0]);
    }
    let data = payload
        .downcast_ref::<TensorData>()
        .ok_or_else(|| Error::InvalidData("TcpGroup carries tensor data only".to_string()))?;
    let code = DTYPES
        .iter()
        .position(|d| *d == data.dtype)
        .ok_or_else(|| {
            Error::InvalidData(format!("TcpGroup cannot carry {:?} tensors", data.dtype))
        })?;
    let mut encoder = Encoder::default()
        .u8(1)
        .u8(code as u8)
        .u64(data.shape.num_dims() as u64);
    for &dim in data.shape.as_slice() {
        encoder = encoder.u64(dim as u64);
    }
    Ok(encoder.bytes(data.as_bytes()).0)
}

fn decode_payload(bytes: &[u8]) -> Result<Payload> {
    let mut decoder = Decoder { bytes, at: 0 };
    if decoder.u8()? == 0 {
        return Ok(Arc::new(()));
    }
    let dtype = *DTYPES
        .get(decoder.u8()? as usize)
        .ok_or_else(|| Error::InvalidData("a peer sent an unknown dtype".to_string()))?;
    let dims = decoder.u64()? as usize;
    let shape = (0..dims)
        .map(|_| decoder.u64().map(|d| d as usize))
        .collect::<Result<Vec<_>>>()?;
    let data = decoder.bytes()?.to_vec();
    Ok(Arc::new(TensorData::from_bytes_vec(data, shape, dtype)))
}

fn write_message(stream: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
    stream.write_all(&(body.len() as u64).to_le_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn read_message(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut length = [0u8; 8];
    stream.read_exact(&mut length)?;
    let mut body = vec![0u8; u64::from_le_bytes(length) as usize];
    stream.read_exact(&mut body)?;
    Ok(body)
}

/// The relay on rank 0.
struct Hub {
    writers: Vec<Mutex<Outbox>>,
    state: Mutex<HubState>,
    done: Condvar,
}

#[derive(Default)]
struct HubState {
    rounds: HashMap<(String, u64), HubRound>,
    goodbyes: usize,
    failed: bool,
}

/// Where the hub's messages to one rank go: its connection once the rank has connected,
/// until then a queue that its connection is handed first (ranks start at different
/// times: a pipeline's first stage may send activations to a rank not connected yet).
enum Outbox {
    Waiting(Vec<Vec<u8>>),
    Connected(BufWriter<TcpStream>),
}

struct HubRound {
    op: String,
    first_rank: u64,
    members: Vec<u64>,
    slots: Vec<Option<Vec<u8>>>,
}

impl Hub {
    fn send(&self, rank: usize, body: &[u8]) {
        match &mut *self.writers[rank].lock().expect("hub writer") {
            Outbox::Waiting(queue) => queue.push(body.to_vec()),
            // A rank that is gone cannot be told; its own failure is reported anyway.
            Outbox::Connected(writer) => {
                let _ = write_message(writer, body);
            }
        }
    }

    fn fail(&self, rank: u64, reason: &str) {
        let mut state = self.state.lock().expect("hub state");
        if state.failed {
            return;
        }
        state.failed = true;
        drop(state);
        let body = Encoder::default().u8(kind::FAILED).u64(rank).str(reason).0;
        for r in 0..self.writers.len() {
            self.send(r, &body);
        }
        self.done.notify_all();
    }

    /// Serves one rank's connection until it says goodbye or drops.
    fn serve(&self, rank: usize, mut reader: BufReader<TcpStream>) {
        loop {
            let body = match read_message(&mut reader) {
                Ok(body) => body,
                Err(_) => {
                    self.fail(
                        rank as u64,
                        "its connection dropped (the process died or was killed)",
                    );
                    return;
                }
            };
            if let Err(error) = self.handle(rank, &body) {
                self.fail(rank as u64, &error.to_string());
                return;
            }
            if body.first() == Some(&kind::BYE) {
                let mut state = self.state.lock().expect("hub state");
                state.goodbyes += 1;
                self.done.notify_all();
                return;
            }
        }
    }

    fn handle(&self, rank: usize, body: &[u8]) -> Result<()> {
        let mut decoder = Decoder { bytes: body, at: 0 };
        match decoder.u8()? {
            kind::GATHER => {
                let key = decoder.str()?;
                let seq = decoder.u64()?;
                let op = decoder.str()?;
                let position = decoder.u64()? as usize;
                let members = (0..decoder.u64()?)
                    .map(|_| decoder.u64())
                    .collect::<Result<Vec<_>>>()?;
                let payload = decoder.bytes()?.to_vec();
                let mut state = self.state.lock().expect("hub state");
                let round = state
                    .rounds
                    .entry((key.clone(), seq))
                    .or_insert_with(|| HubRound {
                        op: op.clone(),
                        first_rank: rank as u64,
                        slots: vec![None; members.len()],
                        members: members.clone(),
                    });
                if round.op != op || round.members != members || position >= round.slots.len() {
                    let reason = format!(
                        "rank {rank} called `{op}` where rank {} called `{}` on group {key}; every \
                         rank of a group must call the same collectives in the same order",
                        round.first_rank, round.op
                    );
                    drop(state);
                    self.fail(rank as u64, &reason);
                    return Ok(());
                }
                round.slots[position] = Some(payload);
                if round.slots.iter().all(Option::is_some) {
                    let round = state.rounds.remove(&(key.clone(), seq)).expect("present");
                    drop(state);
                    let mut encoder = Encoder::default()
                        .u8(kind::GATHERED)
                        .str(&key)
                        .u64(seq)
                        .u64(round.slots.len() as u64);
                    for slot in &round.slots {
                        encoder = encoder.bytes(slot.as_deref().expect("complete"));
                    }
                    for &member in &round.members {
                        self.send(member as usize, &encoder.0);
                    }
                }
            }
            kind::SEND => {
                let key = decoder.str()?;
                let source = decoder.u64()?;
                let destination = decoder.u64()? as usize;
                let payload = decoder.bytes()?;
                if destination >= self.writers.len() {
                    return Err(Error::InvalidData(format!(
                        "send to rank {destination}, outside the world"
                    )));
                }
                let body = Encoder::default()
                    .u8(kind::DELIVERED)
                    .str(&key)
                    .u64(source)
                    .bytes(payload)
                    .0;
                self.send(destination, &body);
            }
            kind::ABORT => {
                let failed_rank = decoder.u64()?;
                let reason = decoder.str()?;
                self.fail(failed_rank, &reason);
            }
            kind::BYE => {}
            other => return Err(Error::InvalidData(format!("unknown message kind {other}"))),
        }
        Ok(())
    }
}

/// One process's connection to the job: its rank, the hub (on rank 0) and the state of
/// its collectives.
pub struct TcpWorld {
    rank: usize,
    size: usize,
    timeout: Duration,
    writer: Mutex<BufWriter<TcpStream>>,
    state: Mutex<ClientState>,
    changed: Condvar,
    hub: Option<Arc<Hub>>,
}

#[derive(Default)]
struct ClientState {
    failure: Option<(usize, String)>,
    gathered: HashMap<(String, u64), Vec<Payload>>,
    mailboxes: HashMap<(String, u64), VecDeque<Payload>>,
}

impl TcpWorld {
    /// Joins the job of `size` processes as `rank`; rank 0 serves the hub on `address`
    /// (`host:port`) and every rank connects to it, retrying until `timeout`.
    ///
    /// # Errors
    ///
    /// `Io` when rank 0 cannot listen on the address; `Collective` when the hub cannot be
    /// reached within the timeout.
    pub fn connect(
        rank: usize,
        size: usize,
        address: &str,
        timeout: Duration,
    ) -> Result<Arc<Self>> {
        let hub = if rank == 0 {
            let port = address.rsplit(':').next().unwrap_or_default();
            let listener =
                TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e| Error::io(address, e))?;
            let hub = Arc::new(Hub {
                writers: (0..size)
                    .map(|_| Mutex::new(Outbox::Waiting(Vec::new())))
                    .collect(),
                state: Mutex::new(HubState::default()),
                done: Condvar::new(),
            });
            let serving = hub.clone();
            std::thread::Builder::new()
                .name("hub".to_string())
                .spawn(move || accept(serving, listener, size))
                .map_err(|e| Error::io(address, e))?;
            Some(hub)
        } else {
            None
        };
        let started = Instant::now();
        let stream = loop {
            let attempt = address.to_socket_addrs().ok().and_then(|mut addresses| {
                addresses.find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok())
            });
            match attempt {
                Some(stream) => break stream,
                None if started.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                None => {
                    return Err(Error::Collective {
                        group: "world".to_string(),
                        rank,
                        op: "connect",
                        reason: CollectiveFailure::BadInput(format!(
                            "could not reach rank 0 at {address} within {timeout:?}; check \
                             MASTER_ADDR/MASTER_PORT and that rank 0 is running"
                        )),
                    });
                }
            }
        };
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io(address, e))?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| Error::io(address, e))?);
        let mut writer = BufWriter::new(stream);
        write_message(
            &mut writer,
            &Encoder::default().u8(kind::HELLO).u64(rank as u64).0,
        )
        .map_err(|e| Error::io(address, e))?;
        let world = Arc::new(Self {
            rank,
            size,
            timeout,
            writer: Mutex::new(writer),
            state: Mutex::new(ClientState::default()),
            changed: Condvar::new(),
            hub,
        });
        let listening = world.clone();
        std::thread::Builder::new()
            .name(format!("rank-{rank}-receiver"))
            .spawn(move || listening.receive(reader))
            .map_err(|e| Error::io(address, e))?;
        Ok(world)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The group `name` of the given global ranks, as seen from this rank.
    ///
    /// # Panics
    ///
    /// When this rank is not among `members`.
    pub fn group(self: &Arc<Self>, name: &str, members: Vec<usize>) -> Group {
        let position = members
            .iter()
            .position(|&m| m == self.rank)
            .unwrap_or_else(|| panic!("rank {} is not in group {name}{members:?}", self.rank));
        Group::new(TcpGroup {
            world: self.clone(),
            key: format!("{name}{members:?}"),
            name: name.to_string(),
            members,
            position,
            sequence: AtomicU64::new(0),
        })
    }

    /// Says goodbye; on rank 0, keeps the hub up until every rank has said goodbye (or
    /// the job failed, or the timeout passed).
    pub fn finish(&self) {
        let _ = self.write(&Encoder::default().u8(kind::BYE).0);
        if let Some(hub) = &self.hub {
            let deadline = Instant::now() + self.timeout;
            let mut state = hub.state.lock().expect("hub state");
            while state.goodbyes < self.size && !state.failed && Instant::now() < deadline {
                state = hub
                    .done
                    .wait_timeout(state, Duration::from_millis(100))
                    .expect("hub state")
                    .0;
            }
        }
    }

    /// Fails the job: every rank's collectives return an error naming this rank.
    pub fn abort(&self, reason: &str) {
        let _ = self.write(
            &Encoder::default()
                .u8(kind::ABORT)
                .u64(self.rank as u64)
                .str(reason)
                .0,
        );
        self.lock()
            .failure
            .get_or_insert((self.rank, reason.to_string()));
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, ClientState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self, body: &[u8]) -> std::io::Result<()> {
        let mut writer = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        write_message(&mut *writer, body)
    }

    fn receive(&self, mut reader: BufReader<TcpStream>) {
        loop {
            let outcome = read_message(&mut reader)
                .map_err(|e| e.to_string())
                .and_then(|body| self.deliver(&body).map_err(|e| e.to_string()));
            if let Err(reason) = outcome {
                let mut state = self.lock();
                state
                    .failure
                    .get_or_insert((0, format!("lost the connection to rank 0's hub ({reason})")));
                drop(state);
                self.changed.notify_all();
                return;
            }
        }
    }

    fn deliver(&self, body: &[u8]) -> Result<()> {
        let mut decoder = Decoder { bytes: body, at: 0 };
        let mut state = self.lock();
        match decoder.u8()? {
            kind::GATHERED => {
                let key = decoder.str()?;
                let seq = decoder.u64()?;
                let payloads = (0..decoder.u64()?)
                    .map(|_| decoder.bytes().and_then(decode_payload))
                    .collect::<Result<Vec<_>>>()?;
                state.gathered.insert((key, seq), payloads);
            }
            kind::DELIVERED => {
                let key = decoder.str()?;
                let source = decoder.u64()?;
                let payload = decode_payload(decoder.bytes()?)?;
                state
                    .mailboxes
                    .entry((key, source))
                    .or_default()
                    .push_back(payload);
            }
            kind::FAILED => {
                let rank = decoder.u64()? as usize;
                let reason = decoder.str()?;
                state.failure.get_or_insert((rank, reason));
            }
            other => {
                return Err(Error::InvalidData(format!(
                    "unknown message kind {other} from the hub"
                )));
            }
        }
        drop(state);
        self.changed.notify_all();
        Ok(())
    }
}

fn accept(hub: Arc<Hub>, listener: TcpListener, size: usize) {
    for _ in 0..size {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let Ok(read_half) = stream.try_clone() else {
            continue;
        };
        let mut reader = BufReader::new(read_half);
        let Ok(hello) = read_message(&mut reader) else {
            continue;
        };
        let mut decoder = Decoder {
            bytes: &hello,
            at: 0,
        };
        let rank = match (decoder.u8(), decoder.u64()) {
            (Ok(kind::HELLO), Ok(rank)) if (rank as usize) < size => rank as usize,
            _ => continue,
        };
        {
            // Under the outbox's lock: what was queued goes first, in order.
            let mut outbox = hub.writers[rank].lock().expect("hub writer");
            let mut writer = BufWriter::new(stream);
            if let Outbox::Waiting(queue) = &*outbox {
                for body in queue {
                    let _ = write_message(&mut writer, body);
                }
            }
            *outbox = Outbox::Connected(writer);
        }
        let serving = hub.clone();
        std::thread::spawn(move || serving.serve(rank, reader));
    }
}

/// One rank's handle to a group of process ranks. Made by [`TcpWorld::group`].
pub struct TcpGroup {
    world: Arc<TcpWorld>,
    key: String,
    name: String,
    members: Vec<usize>,
    position: usize,
    sequence: AtomicU64,
}

impl std::fmt::Debug for TcpGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpGroup({}, position {})", self.key, self.position)
    }
}

impl TcpGroup {
    fn error(&self, op: OpName, reason: CollectiveFailure) -> Error {
        Error::Collective {
            group: self.key.clone(),
            rank: self.world.rank,
            op,
            reason,
        }
    }

    fn send_or_fail(&self, op: OpName, body: &[u8]) -> Result<()> {
        self.world.write(body).map_err(|e| {
            self.error(
                op,
                CollectiveFailure::Aborted(format!("lost the connection to rank 0's hub: {e}")),
            )
        })
    }

    fn wait<T>(
        &self,
        op: OpName,
        mut ready: impl FnMut(&mut ClientState) -> Option<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let mut state = self.world.lock();
        loop {
            if let Some(value) = ready(&mut state) {
                return Ok(value);
            }
            if let Some((rank, reason)) = &state.failure {
                return Err(self.error(
                    op,
                    CollectiveFailure::Aborted(format!("rank {rank} failed: {reason}")),
                ));
            }
            let waited = started.elapsed();
            if waited >= self.world.timeout {
                drop(state);
                let others: Vec<usize> = self
                    .members
                    .iter()
                    .copied()
                    .filter(|&m| m != self.world.rank)
                    .collect();
                let error = self.error(
                    op,
                    CollectiveFailure::Timeout {
                        waited,
                        missing: others,
                    },
                );
                self.world.abort(&error.to_string());
                return Err(error);
            }
            state = self
                .world
                .changed
                .wait_timeout(state, self.world.timeout - waited)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

impl ProcessGroup for TcpGroup {
    fn name(&self) -> &str {
        &self.name
    }

    fn members(&self) -> &[usize] {
        &self.members
    }

    fn rank(&self) -> usize {
        self.position
    }

    fn timeout(&self) -> Duration {
        self.world.timeout
    }

    fn carries_host_data(&self) -> bool {
        true
    }

    fn all_gather_payloads(&self, op: OpName, payload: Payload) -> Result<Vec<Payload>> {
        if let Some((rank, reason)) = &self.world.lock().failure {
            return Err(self.error(
                op,
                CollectiveFailure::Aborted(format!("rank {rank} failed: {reason}")),
            ));
        }
        if self.members.len() == 1 {
            return Ok(vec![payload]);
        }
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        let bytes = encode_payload(&payload)
            .map_err(|e| self.error(op, CollectiveFailure::BadInput(e.to_string())))?;
        let mut encoder = Encoder::default()
            .u8(kind::GATHER)
            .str(&self.key)
            .u64(seq)
            .str(op)
            .u64(self.position as u64)
            .u64(self.members.len() as u64);
        for &member in &self.members {
            encoder = encoder.u64(member as u64);
        }
        self.send_or_fail(op, &encoder.bytes(&bytes).0)?;
        let id = (self.key.clone(), seq);
        self.wait(op, |state| state.gathered.remove(&id))
    }

    fn send_payload(&self, op: OpName, dst: usize, payload: Payload) -> Result<()> {
        let bytes = encode_payload(&payload)
            .map_err(|e| self.error(op, CollectiveFailure::BadInput(e.to_string())))?;
        let body = Encoder::default()
            .u8(kind::SEND)
            .str(&self.key)
            .u64(self.position as u64)
            .u64(self.members[dst] as u64)
            .bytes(&bytes)
            .0;
        self.send_or_fail(op, &body)
    }

    fn recv_payload(&self, op: OpName, src: usize) -> Result<Payload> {
        let mailbox = (self.key.clone(), src as u64);
        self.wait(op, |state| state.mailboxes.get_mut(&mailbox)?.pop_front())
    }

    fn abort(&self, reason: String) {
        self.world.abort(&reason);
    }
}
