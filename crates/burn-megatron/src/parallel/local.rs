//! [`LocalGroup`]: ranks as threads of one process, for any backend.

use std::collections::{HashMap, VecDeque};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{DEFAULT_TIMEOUT, Group, Layout, OpName, ParallelContext, Payload, ProcessGroup};
use crate::{CollectiveFailure, Error, Result};

/// The threads of one local job: the state that their groups share.
///
/// One mutex and condition variable serve every group of the world: thread ranks are
/// few, and a single lock makes aborting the whole job trivial.
#[derive(Clone)]
pub struct LocalWorld {
    shared: Arc<WorldShared>,
}

struct WorldShared {
    size: usize,
    timeout: Duration,
    state: Mutex<WorldState>,
    changed: Condvar,
}

#[derive(Default)]
struct WorldState {
    /// The first failure: the rank that failed and why. Once set, every collective fails.
    failure: Option<(usize, String)>,
    /// Collectives in progress, by group and sequence number.
    rounds: HashMap<(GroupKey, u64), Round>,
    /// Point-to-point messages in flight, by group, source and destination position.
    mailboxes: HashMap<(GroupKey, usize, usize), VecDeque<Payload>>,
}

/// A group's identity: its name and members.
type GroupKey = Arc<(String, Vec<usize>)>;

struct Round {
    op: OpName,
    first_rank: usize,
    slots: Vec<Option<Payload>>,
    arrived: usize,
    collected: usize,
}

impl LocalWorld {
    /// A world of `size` thread ranks whose collectives wait at most `timeout`.
    pub fn new(size: usize, timeout: Duration) -> Self {
        Self {
            shared: Arc::new(WorldShared {
                size,
                timeout,
                state: Mutex::new(WorldState::default()),
                changed: Condvar::new(),
            }),
        }
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// The group `name` of the given global ranks, as seen from `global_rank`.
    ///
    /// Each member calls this once with the same name and members; groups with the same
    /// members but different names are independent.
    ///
    /// # Panics
    ///
    /// When `global_rank` is not among `members` or a member is outside the world.
    pub fn group(&self, name: &str, members: Vec<usize>, global_rank: usize) -> Group {
        assert!(
            members.iter().all(|&m| m < self.shared.size),
            "group {name}{members:?} has ranks outside a world of {}",
            self.shared.size
        );
        let rank = members
            .iter()
            .position(|&m| m == global_rank)
            .unwrap_or_else(|| panic!("rank {global_rank} is not in group {name}{members:?}"));
        Group::new(LocalGroup {
            world: self.shared.clone(),
            key: Arc::new((name.to_string(), members)),
            rank,
            sequence: AtomicU64::new(0),
        })
    }

    /// Fails the job: every collective in progress or to come returns an error that
    /// names `rank` and `reason`. The first abort wins.
    pub fn abort(&self, rank: usize, reason: String) {
        self.shared.abort(rank, reason);
    }

    /// The first failure, if any: the rank and its reason.
    pub fn failure(&self) -> Option<(usize, String)> {
        self.shared.lock().failure.clone()
    }
}

impl WorldShared {
    fn lock(&self) -> MutexGuard<'_, WorldState> {
        // A rank that panics never does so while holding this lock, but stay robust.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn abort(&self, rank: usize, reason: String) {
        let mut state = self.lock();
        state.failure.get_or_insert((rank, reason));
        drop(state);
        self.changed.notify_all();
    }
}

/// One rank's handle to a group of thread ranks. Made by [`LocalWorld::group`].
pub struct LocalGroup {
    world: Arc<WorldShared>,
    key: GroupKey,
    rank: usize,
    /// Collectives this rank has entered on this group: the n-th collective of every member
    /// is the same operation.
    sequence: AtomicU64,
}

impl std::fmt::Debug for LocalGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LocalGroup({}{:?}, rank {})",
            self.key.0, self.key.1, self.rank
        )
    }
}

impl LocalGroup {
    fn global_rank(&self) -> usize {
        self.key.1[self.rank]
    }

    fn error(&self, op: OpName, reason: CollectiveFailure) -> Error {
        Error::Collective {
            group: format!("{}{:?}", self.key.0, self.key.1),
            rank: self.global_rank(),
            op,
            reason,
        }
    }

    fn aborted(&self, op: OpName, state: &WorldState) -> Option<Error> {
        state.failure.as_ref().map(|(rank, reason)| {
            self.error(
                op,
                CollectiveFailure::Aborted(format!("rank {rank} failed: {reason}")),
            )
        })
    }

    /// Waits on the world's condition variable until `ready` gives a value, the world is
    /// aborted, or the timeout passes (then `missing` says whom we waited for, and the
    /// world is aborted so that the others stop too).
    fn wait<T>(
        &self,
        op: OpName,
        mut ready: impl FnMut(&mut WorldState) -> Option<T>,
        missing: impl Fn(&WorldState) -> Vec<usize>,
    ) -> Result<T> {
        let started = Instant::now();
        let deadline = started + self.world.timeout;
        let mut state = self.world.lock();
        loop {
            // What has arrived is valid even if the job was aborted since.
            if let Some(value) = ready(&mut state) {
                return Ok(value);
            }
            if let Some(error) = self.aborted(op, &state) {
                return Err(error);
            }
            let now = Instant::now();
            if now >= deadline {
                let failure = CollectiveFailure::Timeout {
                    waited: now - started,
                    missing: missing(&state),
                };
                let error = self.error(op, failure);
                state
                    .failure
                    .get_or_insert((self.global_rank(), error.to_string()));
                drop(state);
                self.world.changed.notify_all();
                return Err(error);
            }
            state = self
                .world
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

/// A rank thread that panics drops its groups while unwinding: abort the job then, so the
/// other ranks fail fast even when the threads were not started by [`LocalCluster`].
impl Drop for LocalGroup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.world.abort(self.global_rank(), "panicked".to_string());
        }
    }
}

impl ProcessGroup for LocalGroup {
    fn name(&self) -> &str {
        &self.key.0
    }

    fn members(&self) -> &[usize] {
        &self.key.1
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn timeout(&self) -> Duration {
        self.world.timeout
    }

    /// Thread ranks exchange host copies, not device tensors: on a GPU every thread
    /// queues work on its own stream, and a buffer shared between streams can be read by
    /// one while another already reuses it (measured on an H200: tp 2 thread ranks drifted
    /// from tp 1). On the CPU the copy is a memcpy.
    fn carries_host_data(&self) -> bool {
        true
    }

    fn threads_of_one_process(&self) -> bool {
        true
    }

    fn all_gather_payloads(&self, op: OpName, payload: Payload) -> Result<Vec<Payload>> {
        let size = self.key.1.len();
        let id = (
            self.key.clone(),
            self.sequence.fetch_add(1, Ordering::Relaxed),
        );
        {
            let mut state = self.world.lock();
            if let Some(error) = self.aborted(op, &state) {
                return Err(error);
            }
            if size == 1 {
                return Ok(vec![payload]);
            }
            let round = state.rounds.entry(id.clone()).or_insert_with(|| Round {
                op,
                first_rank: self.global_rank(),
                slots: vec![None; size],
                arrived: 0,
                collected: 0,
            });
            if round.op != op {
                let failure = CollectiveFailure::Mismatch {
                    other_rank: round.first_rank,
                    other_op: round.op,
                };
                let error = self.error(op, failure);
                state
                    .failure
                    .get_or_insert((self.global_rank(), error.to_string()));
                drop(state);
                self.world.changed.notify_all();
                return Err(error);
            }
            round.slots[self.rank] = Some(payload);
            round.arrived += 1;
        }
        self.world.changed.notify_all();
        self.wait(
            op,
            |state| {
                let round = state.rounds.get_mut(&id)?;
                if round.arrived < size {
                    return None;
                }
                let payloads: Vec<Payload> = round.slots.iter().flatten().cloned().collect();
                round.collected += 1;
                if round.collected == size {
                    state.rounds.remove(&id);
                }
                Some(payloads)
            },
            |state| {
                state.rounds.get(&id).map_or(Vec::new(), |round| {
                    round
                        .slots
                        .iter()
                        .zip(&self.key.1)
                        .filter(|(slot, _)| slot.is_none())
                        .map(|(_, &member)| member)
                        .collect()
                })
            },
        )
    }

    fn send_payload(&self, op: OpName, dst: usize, payload: Payload) -> Result<()> {
        let mut state = self.world.lock();
        if let Some(error) = self.aborted(op, &state) {
            return Err(error);
        }
        state
            .mailboxes
            .entry((self.key.clone(), self.rank, dst))
            .or_default()
            .push_back(payload);
        drop(state);
        self.world.changed.notify_all();
        Ok(())
    }

    fn recv_payload(&self, op: OpName, src: usize) -> Result<Payload> {
        let mailbox = (self.key.clone(), src, self.rank);
        let sender = self.key.1[src];
        self.wait(
            op,
            |state| state.mailboxes.get_mut(&mailbox)?.pop_front(),
            |_| vec![sender],
        )
    }

    fn abort(&self, reason: String) {
        self.world.abort(self.global_rank(), reason);
    }
}

/// Runs a parallel job with one thread per rank, in this process.
///
/// ```
/// use burn_megatron::parallel::{Layout, LocalCluster};
///
/// let layout = Layout::new(2, 1, 2).unwrap(); // tp 2 x pp 1 x dp 2
/// let ranks = LocalCluster::new(layout)
///     .run(|ctx| Ok::<_, burn_megatron::Error>(ctx.coords()))
///     .unwrap();
/// assert_eq!(ranks[3].dp, 1);
/// ```
#[derive(Debug, Clone)]
pub struct LocalCluster {
    layout: Layout,
    timeout: Duration,
}

impl LocalCluster {
    /// A cluster of `layout.world_size()` thread ranks, with the default 300 s timeout.
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets how long a rank waits in a collective before it fails.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    /// Runs `job` on every rank and returns each rank's outcome, in rank order.
    ///
    /// When a rank panics or returns an error, the job is aborted: the other ranks' pending
    /// and later collectives fail at once with an error naming that rank.
    pub fn run_each<T, E, F>(&self, job: F) -> Vec<Result<T>>
    where
        T: Send,
        E: std::fmt::Display,
        F: Fn(ParallelContext) -> std::result::Result<T, E> + Sync,
    {
        self.execute(job).0
    }

    /// Runs `job` on every rank and returns the ranks' results, in rank order.
    ///
    /// # Errors
    ///
    /// [`Error::RankFailed`] naming the first rank that failed and why (not the ranks that
    /// were aborted because of it).
    pub fn run<T, E, F>(&self, job: F) -> Result<Vec<T>>
    where
        T: Send,
        E: std::fmt::Display,
        F: Fn(ParallelContext) -> std::result::Result<T, E> + Sync,
    {
        let (outcomes, first_failure) = self.execute(job);
        if let Some((rank, message)) = first_failure {
            return Err(Error::RankFailed { rank, message });
        }
        outcomes.into_iter().collect()
    }

    /// Runs the ranks; returns their outcomes and the job's first failure.
    fn execute<T, E, F>(&self, job: F) -> (Vec<Result<T>>, Option<(usize, String)>)
    where
        T: Send,
        E: std::fmt::Display,
        F: Fn(ParallelContext) -> std::result::Result<T, E> + Sync,
    {
        let world = LocalWorld::new(self.layout.world_size(), self.timeout);
        let outcomes = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world.size())
                .map(|rank| {
                    let (world, job) = (&world, &job);
                    std::thread::Builder::new()
                        .name(format!("rank-{rank}"))
                        .spawn_scoped(scope, move || {
                            let context = ParallelContext::local(self.layout, rank, world);
                            // Holding a clone keeps the groups alive through a panic, so the
                            // abort below (with the panic message) is the one the others see.
                            let _groups = context.clone();
                            let outcome = panic::catch_unwind(AssertUnwindSafe(|| job(context)));
                            let message = match outcome {
                                Ok(Ok(value)) => return Ok(value),
                                Ok(Err(error)) => error.to_string(),
                                Err(panic) => format!("panicked: {}", panic_message(&panic)),
                            };
                            world.abort(rank, message.clone());
                            Err(Error::RankFailed { rank, message })
                        })
                        .expect("spawning a rank thread")
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("rank threads catch their panics"))
                .collect()
        });
        (outcomes, world.failure())
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message.to_string()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(no message)".to_string()
    }
}
