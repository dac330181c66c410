//! Admission: how many jobs run at once, how many wait for a turn, and whose job runs next;
//! one per served model, since each model has its own unet pool (a flood of one model's jobs
//! must not keep another model's idle pool from its jobs).
//!
//! Many tenants share one orchestrator, and behind it a pool of model services that can only
//! go so fast: jobs beyond what the pool serves well would only slow every running job down
//! (each step waits longer in the unet queue) until some failed half done. So at most
//! `max_running` jobs run; the rest wait in a line of at most `max_waiting`, and beyond it a job
//! is refused at once with RESOURCE_EXHAUSTED and a retry hint, before any work is spent on it.
//!
//! Tenants share fairly (the tenant is the `x-sdmesh-tenant` metadata; none is one tenant):
//! - a freed place goes to the waiting job whose tenant runs the fewest jobs, the earliest
//!   come among those, so a tenant that sent a burst does not hold every place while others
//!   wait;
//! - `max_running_per_tenant` (0: no bound but `max_running`) caps each tenant;
//! - when the line is full, a job from a tenant with at least two fewer waiting jobs than the
//!   tenant with the most takes the place of that tenant's latest job, which is refused with
//!   RESOURCE_EXHAUSTED: one tenant's burst cannot fill the line and shut the others out.
//!
//! Priorities (the `x-sdmesh-priority` metadata: `high`, `normal`, the default, or `low`) come
//! first: a freed place goes to a waiting job of the highest priority, fairly among tenants
//! within it, and in a full line a job takes the place of the latest job of a lower priority
//! before anything else. Running jobs are never stopped for another. So a platform's
//! interactive jobs go ahead of its batch jobs without a pool of their own.
//!
//! A waiting job whose caller goes away (cancelled, deadline) leaves the line.

use sdmesh_core::{Error, Result};
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How many jobs run and wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    pub max_running: usize,
    pub max_waiting: usize,
    /// 0: a tenant may run up to `max_running`.
    pub max_running_per_tenant: usize,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self { max_running: 64, max_waiting: 256, max_running_per_tenant: 0 }
    }
}

/// The hint sent with a refusal when no job has finished yet to estimate from.
const DEFAULT_HINT: Duration = Duration::from_secs(1);

/// Shares out places to run among jobs (see the module's documentation). Cheap to clone.
#[derive(Clone)]
pub struct Admission {
    shared: Arc<Shared>,
}

struct Shared {
    limits: JobLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: usize,
    running_by_tenant: HashMap<String, usize>,
    /// By arrival: the key is a sequence number.
    waiting: BTreeMap<u64, Waiter>,
    next_seq: u64,
    /// Mean seconds a job runs (exponentially weighted), for retry hints.
    mean_run_seconds: Option<f64>,
    /// The model whose jobs these are (the gauges' label).
    model: String,
}

/// How soon a job runs next to others waiting (the `x-sdmesh-priority` metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    /// `high`, `normal` or `low`; INVALID_ARGUMENT for anything else.
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "high" => Ok(Self::High),
            "normal" => Ok(Self::Normal),
            "low" => Ok(Self::Low),
            other => Err(Error::invalid(format!(
                "x-sdmesh-priority: {other:?} is not a priority; use high, normal (the default) or low"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }
}

struct Waiter {
    tenant: String,
    priority: Priority,
    /// The most jobs its tenant may run at once (0: no bound but `max_running`).
    cap: usize,
    /// Sends the place when it is this job's turn, or why it lost its place in the line.
    turn: oneshot::Sender<Result<Running>>,
}

impl State {
    fn running_of(&self, tenant: &str) -> usize {
        self.running_by_tenant.get(tenant).copied().unwrap_or(0)
    }

    fn may_run(&self, limits: &JobLimits, tenant: &str, cap: usize) -> bool {
        self.running < limits.max_running && (cap == 0 || self.running_of(tenant) < cap)
    }

    fn start(&mut self, tenant: &str) {
        self.running += 1;
        *self.running_by_tenant.entry(tenant.to_string()).or_default() += 1;
    }

    fn finish(&mut self, tenant: &str) {
        self.running -= 1;
        if let Some(n) = self.running_by_tenant.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                self.running_by_tenant.remove(tenant);
            }
        }
    }

    /// About how long until a place frees for a job that would wait behind `ahead` others.
    fn hint(&self, limits: &JobLimits, ahead: usize) -> Duration {
        let Some(mean) = self.mean_run_seconds else { return DEFAULT_HINT };
        let rounds = (ahead / limits.max_running.max(1) + 1) as f64;
        Duration::from_secs_f64((mean * rounds).clamp(0.1, 60.0))
    }

    /// In a full line, the waiting job whose place a new job of `tenant` at `priority` takes,
    /// with the refusal's reason and message: the latest job of the lowest priority below
    /// `priority`, else, among jobs of `priority`, the latest of the tenant with the most
    /// waiting if `tenant` has at least two fewer. None: the new job is refused.
    fn place_to_take(&self, tenant: &str, priority: Priority) -> Option<(u64, &'static str, String)> {
        let outranked = self
            .waiting
            .iter()
            .filter(|(_, w)| w.priority < priority)
            .min_by_key(|(seq, w)| (w.priority, Reverse(**seq)));
        if let Some((seq, w)) = outranked {
            let message = format!(
                "the line of waiting jobs is full and a job of higher priority took this {} priority job's \
                 place; retry later",
                w.priority.as_str()
            );
            return Some((*seq, "outranked", message));
        }
        let mut by_tenant: HashMap<&str, usize> = HashMap::new();
        for w in self.waiting.values().filter(|w| w.priority == priority) {
            *by_tenant.entry(w.tenant.as_str()).or_default() += 1;
        }
        let own = by_tenant.get(tenant).copied().unwrap_or(0);
        let (longest, _) = by_tenant.into_iter().max_by_key(|(_, n)| *n).filter(|(_, n)| *n > own + 1)?;
        let seq = self.waiting.iter().rev().find(|(_, w)| w.tenant == longest && w.priority == priority)?.0;
        let message = "the line of waiting jobs is full and this tenant had the most jobs in it: another tenant's \
                       job took this one's place; retry later";
        Some((*seq, "place_taken", message.to_string()))
    }

    fn gauges(&self) {
        metrics::gauge!("sdmesh_jobs_running", "model" => self.model.clone()).set(self.running as f64);
        metrics::gauge!("sdmesh_jobs_waiting", "model" => self.model.clone()).set(self.waiting.len() as f64);
    }
}

/// A place to run; gives it back when dropped.
pub struct Running {
    shared: Option<Arc<Shared>>,
    tenant: String,
    since: Instant,
    /// The job ran to its end.
    finished: bool,
}

impl Running {
    fn new(shared: &Arc<Shared>, tenant: &str) -> Self {
        Self { shared: Some(shared.clone()), tenant: tenant.to_string(), since: Instant::now(), finished: false }
    }

    /// The job ran to its end: its time feeds the retry hints. (A cancelled or failed job's
    /// time says nothing of how long jobs take: a burst of cancellations would shorten them.)
    pub fn finished(&mut self) {
        self.finished = true;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else { return };
        let seconds = self.since.elapsed().as_secs_f64();
        crate::usage::ran(&self.tenant, seconds);
        let Ok(mut state) = shared.state.lock() else { return };
        state.finish(&self.tenant);
        if self.finished {
            state.mean_run_seconds = Some(match state.mean_run_seconds {
                Some(mean) => 0.9 * mean + 0.1 * seconds,
                None => seconds,
            });
        }
        hand_out(&shared, &mut state);
        state.gauges();
    }
}

/// Gives free places to waiting jobs: each to a job of the highest priority waiting, among
/// those to the job whose tenant runs the fewest jobs (the earliest come among those) and may
/// run another.
fn hand_out(shared: &Arc<Shared>, state: &mut State) {
    while state.running < shared.limits.max_running {
        let next = state
            .waiting
            .iter()
            .filter(|(_, w)| state.may_run(&shared.limits, &w.tenant, w.cap))
            .min_by_key(|(seq, w)| (Reverse(w.priority), state.running_of(&w.tenant), **seq))
            .map(|(seq, _)| *seq);
        let Some(seq) = next else { return };
        let waiter = state.waiting.remove(&seq).expect("just found");
        state.start(&waiter.tenant);
        let place = Running::new(shared, &waiter.tenant);
        if let Err(Ok(mut place)) = waiter.turn.send(Ok(place)) {
            // Its caller went away meanwhile: the place is still free (given back here, under
            // the lock this function holds, not by the place's drop).
            place.shared = None;
            state.finish(&waiter.tenant);
        }
    }
}

/// A job's place in the line (or to run); leaves the line when dropped.
pub struct Ticket {
    turn: TicketState,
    shared: Arc<Shared>,
    /// When it entered the line: jobs waiting ahead of it, and jobs running.
    line: Option<(usize, usize)>,
}

enum TicketState {
    Running(Running),
    Waiting {
        seq: u64,
        turn: oneshot::Receiver<Result<Running>>,
    },
    /// Taken by `wait`.
    Done,
}

impl Ticket {
    /// Whether the job waits for its turn (false: it runs at once).
    pub fn waits(&self) -> bool {
        matches!(self.turn, TicketState::Waiting { .. })
    }

    /// For a job that waits: the jobs waiting ahead of it and the jobs running, when it
    /// entered the line.
    pub fn line(&self) -> Option<(usize, usize)> {
        self.line
    }

    /// Waits for the job's turn; RESOURCE_EXHAUSTED if a job of a tenant with fewer waiting
    /// jobs took its place in a full line. Dropped while waiting, the job leaves the line.
    pub async fn wait(mut self) -> Result<Running> {
        let started = Instant::now();
        let outcome = match &mut self.turn {
            TicketState::Waiting { turn, .. } => {
                turn.await.unwrap_or_else(|_| Err(Error::internal("the admission line was dropped")))
            }
            TicketState::Running(_) => match std::mem::replace(&mut self.turn, TicketState::Done) {
                TicketState::Running(running) => return Ok(running),
                _ => unreachable!("matched as running"),
            },
            TicketState::Done => return Err(Error::internal("a ticket waited on twice")),
        };
        self.turn = TicketState::Done;
        metrics::histogram!("sdmesh_job_wait_seconds").record(started.elapsed().as_secs_f64());
        outcome
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let TicketState::Waiting { seq, .. } = &self.turn {
            let Ok(mut state) = self.shared.state.lock() else { return };
            // If it is no longer in the line, its turn came as it went: the place sits in the
            // receiver, and is given back when that drops, after this lock is released.
            state.waiting.remove(seq);
            state.gauges();
        }
    }
}

impl Admission {
    /// The admission of one model's jobs (its name labels the gauges).
    pub fn new(limits: JobLimits, model: &str) -> Self {
        let limits = JobLimits { max_running: limits.max_running.max(1), ..limits };
        let state = State { model: model.to_string(), ..State::default() };
        Self { shared: Arc::new(Shared { limits, state: Mutex::new(state) }) }
    }

    /// [`Admission::enter_at`] at normal priority.
    pub fn enter(&self, tenant: &str) -> Result<Ticket> {
        self.enter_at(tenant, Priority::Normal)
    }

    /// Takes a place for a job of `tenant`: to run at once if there is room for it, else in the
    /// line; RESOURCE_EXHAUSTED with a retry hint when the line is full.
    pub fn enter_at(&self, tenant: &str, priority: Priority) -> Result<Ticket> {
        self.enter_capped(tenant, priority, None)
    }

    /// [`Admission::enter_at`], the tenant held to `cap` jobs running at once instead of
    /// `max_running_per_tenant` (its API key's `max_jobs`).
    pub fn enter_capped(&self, tenant: &str, priority: Priority, cap: Option<usize>) -> Result<Ticket> {
        let shared = &self.shared;
        let limits = &shared.limits;
        let cap = cap.unwrap_or(limits.max_running_per_tenant);
        let mut state = shared.state.lock().map_err(|_| Error::internal("the admission state is poisoned"))?;
        // Jobs wait only while no place is free to them (places are handed out as they free),
        // so a job that may run now jumps no one.
        if state.may_run(limits, tenant, cap) {
            state.start(tenant);
            state.gauges();
            let running = Running::new(shared, tenant);
            return Ok(Ticket { turn: TicketState::Running(running), shared: shared.clone(), line: None });
        }
        if state.waiting.len() >= limits.max_waiting {
            let hint = state.hint(limits, state.waiting.len());
            let Some((seq, reason, message)) = state.place_to_take(tenant, priority) else {
                metrics::counter!("sdmesh_jobs_refused_total", "reason" => "line_full").increment(1);
                return Err(Error::ResourceExhausted {
                    message: format!(
                        "{} jobs are running and {} waiting, the most this orchestrator takes (--max-jobs, \
                         --max-waiting-jobs); retry later",
                        state.running,
                        state.waiting.len()
                    ),
                    retry_after: hint,
                });
            };
            let bumped = state.waiting.remove(&seq).expect("just found");
            metrics::counter!("sdmesh_jobs_refused_total", "reason" => reason).increment(1);
            let _ = bumped.turn.send(Err(Error::ResourceExhausted { message, retry_after: hint }));
        }
        Ok(self.wait_in_line(&mut state, tenant, priority, cap))
    }

    /// A place in the line (which has room).
    fn wait_in_line(&self, state: &mut State, tenant: &str, priority: Priority, cap: usize) -> Ticket {
        let seq = state.next_seq;
        state.next_seq += 1;
        // The jobs that would run before it, as things stand: those of its priority or higher.
        let ahead = state.waiting.values().filter(|w| w.priority >= priority).count();
        let line = Some((ahead, state.running));
        let (send, turn) = oneshot::channel();
        state.waiting.insert(seq, Waiter { tenant: tenant.to_string(), priority, cap, turn: send });
        state.gauges();
        Ticket { turn: TicketState::Waiting { seq, turn }, shared: self.shared.clone(), line }
    }

    /// About how long until one of a tenant's running jobs ends: the hint sent with a refusal
    /// for a tenant at its cap.
    pub fn retry_hint(&self) -> Duration {
        self.shared.state.lock().map(|s| s.hint(&self.shared.limits, 0)).unwrap_or(DEFAULT_HINT)
    }

    /// Jobs running and waiting now.
    pub fn counts(&self) -> (usize, usize) {
        self.shared.state.lock().map(|s| (s.running, s.waiting.len())).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::future::Future;
    use std::pin::Pin;

    type Turn = Pin<Box<dyn Future<Output = Result<Running>> + Send>>;

    fn limits(max_running: usize, max_waiting: usize, max_running_per_tenant: usize) -> Admission {
        Admission::new(JobLimits { max_running, max_waiting, max_running_per_tenant }, "m")
    }

    /// A job's turn, polled once: Ok(place) if it runs now, else the waiting future.
    fn enter(a: &Admission, tenant: &str) -> std::result::Result<Running, Turn> {
        let mut turn: Turn = Box::pin(a.enter(tenant).unwrap().wait());
        match turn.as_mut().now_or_never() {
            Some(place) => Ok(place.unwrap()),
            None => Err(turn),
        }
    }

    fn came(turn: &mut Turn) -> Option<Result<Running>> {
        turn.as_mut().now_or_never()
    }

    #[tokio::test]
    async fn jobs_beyond_the_running_bound_wait_and_beyond_the_line_are_refused_with_a_hint() {
        let a = limits(2, 2, 0);
        let first = enter(&a, "").ok().unwrap();
        let _second = enter(&a, "").ok().unwrap();
        let mut third = enter(&a, "").err().unwrap();
        let ticket = a.enter("").unwrap();
        assert_eq!(ticket.line(), Some((1, 2)), "one waiting ahead of it, two running");
        let mut fourth: Turn = Box::pin(ticket.wait());
        assert_eq!(a.counts(), (2, 2));
        let refused = a.enter("").err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let status = tonic::Status::from(refused);
        assert!(status.message().contains("--max-jobs"), "{}", status.message());
        assert_eq!(sdmesh_core::retry_after(&status), Some(DEFAULT_HINT), "no job has finished yet");

        assert!(came(&mut third).is_none());
        drop(first);
        let mut third = came(&mut third).expect("a freed place goes to the first in line").unwrap();
        assert!(came(&mut fourth).is_none());
        assert_eq!(a.counts(), (2, 1));
        assert_eq!(a.retry_hint(), DEFAULT_HINT, "the first job did not run to its end: it says nothing");
        third.finished();
        drop(third);
        let _fourth = came(&mut fourth).unwrap().unwrap();
        // The hint now comes from how long the job that finished ran.
        assert!(a.retry_hint() < DEFAULT_HINT);
        let _fifth = a.enter("").unwrap();
        let _sixth = a.enter("").unwrap();
        let status = tonic::Status::from(a.enter("").err().unwrap());
        assert!(sdmesh_core::retry_after(&status).unwrap() < DEFAULT_HINT);
    }

    /// A tenant's own bound (its API key's max_jobs) holds in place of the orchestrator's, when
    /// it enters and when places free; other tenants keep the orchestrator's.
    #[tokio::test]
    async fn a_tenant_may_have_its_own_bound_on_running_jobs() {
        let a = limits(8, 8, 2);
        let capped = |cap| -> std::result::Result<Running, Turn> {
            let mut turn: Turn = Box::pin(a.enter_capped("small", Priority::Normal, cap).unwrap().wait());
            turn.as_mut().now_or_never().map(|place| place.unwrap()).ok_or(turn)
        };
        let first = capped(Some(1)).ok().expect("runs");
        let mut second = capped(Some(1)).err().expect("waits: its tenant runs one, its bound");
        let _big: Vec<Running> = (0..2).map(|_| enter(&a, "big").ok().expect("the orchestrator's bound: 2")).collect();
        assert!(enter(&a, "big").is_err(), "big waits at 2");
        let more: Vec<Running> = (0..3).map(|_| capped(Some(5)).ok().expect("a bound of 5")).collect();
        assert!(came(&mut second).is_none());
        drop(first);
        assert!(came(&mut second).is_none(), "small still runs 3, above the waiting job's bound of 1");
        drop(more);
        assert!(came(&mut second).expect("small runs none now").is_ok());

        // A bound above the orchestrator's holds when a place frees too.
        let b = limits(3, 4, 2);
        let wide = || -> Turn { Box::pin(b.enter_capped("wide", Priority::Normal, Some(5)).unwrap().wait()) };
        let mut running: Vec<Running> = (0..3).map(|_| came(&mut wide()).expect("runs").unwrap()).collect();
        let mut fourth = wide();
        assert!(came(&mut fourth).is_none(), "the orchestrator runs 3, its most");
        running.pop();
        assert!(came(&mut fourth).expect("wide runs 2, under its bound of 5").is_ok());
    }

    #[tokio::test]
    async fn higher_priorities_run_first_and_take_the_places_of_lower_ones_in_a_full_line() {
        let a = limits(1, 3, 0);
        let running = enter(&a, "x").ok().unwrap();
        let enter_at = |tenant: &str, priority| -> Turn { Box::pin(a.enter_at(tenant, priority).unwrap().wait()) };
        let mut low = enter_at("a", Priority::Low);
        let mut normal = enter_at("a", Priority::Normal);
        let ticket = a.enter_at("b", Priority::High).unwrap();
        assert_eq!(ticket.line(), Some((0, 1)), "no job of its priority or higher waits ahead of it");
        let mut high: Turn = Box::pin(ticket.wait());
        // The line is full: another high job takes the low one's place ...
        let mut high_2 = enter_at("c", Priority::High);
        let status = tonic::Status::from(came(&mut low).expect("refused at once").err().unwrap());
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("took this low priority job's place"), "{}", status.message());
        // ... while a low job finds no place, and a normal one none of the high jobs'.
        assert_eq!(a.enter_at("d", Priority::Low).err().unwrap().code(), tonic::Code::ResourceExhausted);
        assert_eq!(a.enter_at("d", Priority::Normal).err().unwrap().code(), tonic::Code::ResourceExhausted);
        // Freed places go to the high jobs (in the order they came), then the normal one.
        drop(running);
        let first = came(&mut high).expect("high first").unwrap();
        assert!(came(&mut high_2).is_none() && came(&mut normal).is_none());
        drop(first);
        let second = came(&mut high_2).expect("the other high job next").unwrap();
        assert!(came(&mut normal).is_none());
        drop(second);
        let _third = came(&mut normal).expect("then the normal job").unwrap();
        assert_eq!(Priority::parse("high").unwrap(), Priority::High);
        assert_eq!(Priority::parse("low").unwrap(), Priority::Low);
        let e = Priority::parse("urgent").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_freed_place_goes_to_the_tenant_running_the_fewest_jobs() {
        let a = limits(2, 10, 0);
        let burst_1 = enter(&a, "burst").ok().unwrap();
        let _burst_2 = enter(&a, "burst").ok().unwrap();
        let mut burst_3 = enter(&a, "burst").err().unwrap();
        let mut burst_4 = enter(&a, "burst").err().unwrap();
        let mut quiet = enter(&a, "quiet").err().unwrap();
        drop(burst_1);
        let quiet = came(&mut quiet).expect("quiet runs none, burst one: quiet first").unwrap();
        assert!(came(&mut burst_3).is_none() && came(&mut burst_4).is_none());
        drop(quiet);
        let _burst_3 = came(&mut burst_3).expect("then burst's, in the order they came").unwrap();
        assert!(came(&mut burst_4).is_none());
    }

    #[tokio::test]
    async fn a_tenant_runs_at_most_its_own_bound() {
        let a = limits(4, 10, 1);
        let one = enter(&a, "a").ok().unwrap();
        let mut two = enter(&a, "a").err().unwrap();
        let _other = enter(&a, "b").ok().expect("another tenant runs at once");
        assert_eq!(a.counts(), (2, 1));
        drop(one);
        assert!(came(&mut two).is_some());
    }

    #[tokio::test]
    async fn in_a_full_line_a_tenant_with_fewer_waiting_jobs_takes_the_place_of_one_with_the_most() {
        let a = limits(1, 3, 0);
        let _running = enter(&a, "burst").ok().unwrap();
        let mut waiting: Vec<Turn> = (0..3).map(|_| enter(&a, "burst").err().unwrap()).collect();
        let mut quiet = enter(&a, "quiet").err().expect("quiet waits");
        let bumped = came(&mut waiting[2]).expect("burst's latest lost its place").err().unwrap();
        assert_eq!(bumped.code(), tonic::Code::ResourceExhausted);
        assert!(came(&mut waiting[0]).is_none() && came(&mut waiting[1]).is_none() && came(&mut quiet).is_none());
        assert_eq!(a.counts(), (1, 3));
        // burst 2, quiet 1: taking burst's place would leave it as unequal the other way.
        assert_eq!(a.enter("quiet").err().unwrap().code(), tonic::Code::ResourceExhausted);
        assert_eq!(a.enter("burst").err().unwrap().code(), tonic::Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn a_job_whose_caller_goes_away_leaves_the_line_and_gives_back_a_place_sent_to_it() {
        let a = limits(1, 10, 0);
        let running = enter(&a, "").ok().unwrap();
        let gone = enter(&a, "").err().unwrap();
        drop(gone);
        assert_eq!(a.counts(), (1, 0), "it left the line");

        // A ticket whose turn comes before it is waited on, then dropped: the place comes back.
        let late = a.enter("").unwrap();
        assert!(late.waits());
        drop(running);
        assert_eq!(a.counts(), (1, 0), "the place was sent to it");
        drop(late);
        assert_eq!(a.counts(), (0, 0), "and given back");
        let _next = enter(&a, "").ok().expect("the next job runs at once");
    }
}
