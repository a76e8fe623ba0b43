//! A UDP relay on loopback that drops, delays and reorders datagrams between devices and a coordinator, standing in for `tc netem` in tests.
//!
//! Devices send to the relay's listening socket ([`Relay::addr`]). For each device address
//! the relay opens its own upstream socket towards the coordinator, so the coordinator sees
//! one distinct peer per device, as it would on a real network. Every datagram, in either
//! direction, goes through one scheduler task that draws its fate from a seeded RNG per
//! direction ([`LinkProfile`]): dropped, or delivered after the one-way delay plus a uniform
//! jitter. Jitter alone keeps each device's datagrams in order, as a FIFO link does; a
//! fraction of datagrams is held back further, and later datagrams overtake it. Delivery times sit in a bounded timer queue; a datagram that finds it full is
//! dropped (counted as `overflowed`), as a router's full buffer would.
//!
//! The relay only binds `127.0.0.1`, refuses a non-loopback upstream and ignores datagrams
//! from non-loopback sources. It stops when its handle is dropped, or, awaiting the end of
//! its tasks, with [`Relay::shutdown`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Most datagrams waiting in the timer queue; more are dropped.
pub const MAX_QUEUED: usize = 4096;
/// Most device addresses (and so upstream sockets) the relay serves; datagrams from more are dropped.
pub const MAX_FLOWS: usize = 1024;
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams the readers may hand to the scheduler before they wait for it.
const CHANNEL: usize = 1024;
/// The longest `one_way_delay + jitter` a profile may ask for.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// The shortest extra hold-back of a reordered datagram.
const MIN_HOLD: Duration = Duration::from_millis(1);

/// What the link does to each datagram, in each direction independently.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkProfile {
    /// Probability that a datagram is dropped, in `[0, 1]`.
    pub loss: f64,
    /// Delay added to every delivered datagram.
    pub one_way_delay: Duration,
    /// Upper bound of a uniform extra delay drawn per datagram. A datagram is never delivered
    /// before one the relay received earlier from (or for) the same device, unless that one
    /// was held back by `reorder`: jitter varies the delay, it does not reorder.
    pub jitter: Duration,
    /// Probability, in `[0, 1]`, that a delivered datagram is held back a further
    /// `one_way_delay + jitter` (at least 1 ms), so that datagrams sent after it overtake it.
    pub reorder: f64,
    /// Seed of the relay's RNGs (one per direction).
    pub seed: u64,
}

impl LinkProfile {
    /// No loss, no delay, no jitter, no reordering: the relay only forwards.
    pub const fn clean(seed: u64) -> LinkProfile {
        LinkProfile { loss: 0.0, one_way_delay: Duration::ZERO, jitter: Duration::ZERO, reorder: 0.0, seed }
    }

    /// Why this profile is unusable, if it is.
    fn check(&self) -> Result<(), RelayError> {
        let probability = |p: f64| (0.0..=1.0).contains(&p);
        if !probability(self.loss) {
            return Err(RelayError::InvalidProfile("loss must be in [0, 1]"));
        }
        if !probability(self.reorder) {
            return Err(RelayError::InvalidProfile("reorder must be in [0, 1]"));
        }
        // Delay, jitter and hold-back together stay far from overflowing a clock.
        if self.one_way_delay.saturating_add(self.jitter) > MAX_DELAY {
            return Err(RelayError::InvalidProfile("one_way_delay + jitter must be at most 60 s"));
        }
        Ok(())
    }

    /// The extra hold-back of a reordered datagram.
    fn hold(&self) -> Duration {
        self.one_way_delay.saturating_add(self.jitter).max(MIN_HOLD)
    }
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The upstream address is not a loopback address.
    #[error("the relay only talks to loopback, not {0}")]
    NotLoopback(SocketAddr),
    /// The link profile is out of range.
    #[error("invalid link profile: {0}")]
    InvalidProfile(&'static str),
    /// A socket could not be bound.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a device to the coordinator.
    ToServer,
    /// From the coordinator to a device.
    ToDevice,
}

/// What happened to the datagrams of one direction so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionCounters {
    /// Datagrams the relay received.
    pub seen: u64,
    /// Datagrams delivered.
    pub forwarded: u64,
    /// Datagrams dropped by the profile's loss.
    pub dropped: u64,
    /// Datagrams dropped because the timer queue was full, or (towards the coordinator)
    /// because the relay already serves [`MAX_FLOWS`] devices.
    pub overflowed: u64,
    /// Delivered datagrams that arrived after a datagram of the same device and direction
    /// that the relay had received later.
    pub reordered: u64,
}

impl DirectionCounters {
    /// The fraction of received datagrams dropped by the profile's loss.
    pub fn loss_rate(&self) -> f64 {
        if self.seen == 0 { 0.0 } else { self.dropped as f64 / self.seen as f64 }
    }
}

/// Counters of both directions and the relay's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Device → coordinator.
    pub to_server: DirectionCounters,
    /// Coordinator → device.
    pub to_device: DirectionCounters,
    /// Device addresses served (one upstream socket each).
    pub n_flows: usize,
    /// Datagrams waiting in the timer queue.
    pub in_flight: usize,
}

impl RelayCounters {
    /// The counters of `direction`.
    pub fn direction(&self, direction: Direction) -> &DirectionCounters {
        match direction {
            Direction::ToServer => &self.to_server,
            Direction::ToDevice => &self.to_device,
        }
    }

    fn direction_mut(&mut self, direction: Direction) -> &mut DirectionCounters {
        match direction {
            Direction::ToServer => &mut self.to_server,
            Direction::ToDevice => &mut self.to_device,
        }
    }
}

/// A running relay. Dropping it stops it.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    counters: watch::Receiver<RelayCounters>,
    /// Dropping it tells every task to stop.
    stop: watch::Sender<()>,
    front: JoinHandle<()>,
    scheduler: JoinHandle<()>,
}

impl Relay {
    /// Starts a relay on a free port of `127.0.0.1` that forwards to `upstream` (a loopback
    /// address) through a link shaped by `profile`. Needs a running tokio runtime.
    pub async fn start(upstream: SocketAddr, profile: LinkProfile) -> Result<Relay, RelayError> {
        if !upstream.ip().is_loopback() {
            return Err(RelayError::NotLoopback(upstream));
        }
        profile.check()?;
        let front = Arc::new(UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?);
        let addr = front.local_addr()?;
        let (counters_tx, counters) = watch::channel(RelayCounters::default());
        let (stop, stopped) = watch::channel(());
        let (queue_tx, queue_rx) = mpsc::channel(CHANNEL);
        let scheduler = Scheduler::new(profile, counters_tx);
        let scheduler = tokio::spawn(scheduler.run(queue_rx, stopped.clone()));
        let front = tokio::spawn(run_front(front, upstream, queue_tx, stopped));
        Ok(Relay { addr, counters, stop, front, scheduler })
    }

    /// The address devices send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters now.
    pub fn counters(&self) -> RelayCounters {
        *self.counters.borrow()
    }

    /// Waits until the counters satisfy `condition` (they change at every datagram). Returns
    /// `None` if the relay stopped first.
    pub async fn wait_for(&self, condition: impl FnMut(&RelayCounters) -> bool) -> Option<RelayCounters> {
        let mut counters = self.counters.clone();
        counters.wait_for(condition).await.ok().map(|c| *c)
    }

    /// Stops the relay and waits until its tasks have ended and its sockets are closed; the
    /// final counters.
    pub async fn shutdown(self) -> RelayCounters {
        let Relay { counters, stop, front, scheduler, .. } = self;
        drop(stop);
        // A task that panicked has nothing more to stop.
        let _ = front.await;
        let _ = scheduler.await;
        *counters.borrow()
    }
}

/// One datagram handed to the scheduler.
#[derive(Debug)]
struct Datagram {
    direction: Direction,
    /// The device's address: the flow the datagram belongs to.
    device: SocketAddr,
    /// The socket to send it from: the flow's upstream socket towards the coordinator, the
    /// listening socket towards the device. `None` for a datagram from a device past
    /// [`MAX_FLOWS`], which is only counted.
    via: Option<Arc<UdpSocket>>,
    /// Whether this datagram opened its flow.
    new_flow: bool,
    bytes: Vec<u8>,
}

/// Reads what devices send, opens an upstream socket per device, and hands every datagram to
/// the scheduler; ends at the stop signal, after its upstream readers have ended.
async fn run_front(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    queue: mpsc::Sender<Datagram>,
    mut stop: watch::Receiver<()>,
) {
    let mut flows: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut readers = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, device) = tokio::select! {
            _ = stop.changed() => break,
            received = front.recv_from(&mut buf) => match received {
                Ok(r) => r,
                // An ICMP error for an earlier datagram: the socket still works.
                Err(e) if transient(&e) => continue,
                Err(_) => break,
            },
        };
        if !device.ip().is_loopback() {
            continue;
        }
        let (via, new_flow) = match flows.get(&device) {
            Some(socket) => (Some(Arc::clone(socket)), false),
            // Handed to the scheduler without a socket, so that it is counted, not delivered.
            None if flows.len() >= MAX_FLOWS => (None, false),
            None => match open_upstream(upstream).await {
                Ok(socket) => {
                    flows.insert(device, Arc::clone(&socket));
                    let reader = run_upstream(
                        Arc::clone(&socket),
                        device,
                        Arc::clone(&front),
                        queue.clone(),
                        stop.clone(),
                    );
                    readers.spawn(reader);
                    (Some(socket), true)
                }
                Err(_) => continue,
            },
        };
        let datagram =
            Datagram { direction: Direction::ToServer, device, via, new_flow, bytes: buf[..len].to_vec() };
        if queue.send(datagram).await.is_err() {
            break;
        }
    }
    drop(flows);
    while readers.join_next().await.is_some() {}
}

/// A socket on `127.0.0.1` connected to `upstream`, so that it only hears the coordinator.
async fn open_upstream(upstream: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let socket = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    socket.connect(upstream).await?;
    Ok(Arc::new(socket))
}

/// Reads what the coordinator sends to `device` and hands it to the scheduler.
async fn run_upstream(
    socket: Arc<UdpSocket>,
    device: SocketAddr,
    front: Arc<UdpSocket>,
    queue: mpsc::Sender<Datagram>,
    mut stop: watch::Receiver<()>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let len = tokio::select! {
            _ = stop.changed() => return,
            received = socket.recv(&mut buf) => match received {
                Ok(len) => len,
                Err(e) if transient(&e) => continue,
                Err(_) => return,
            },
        };
        let datagram = Datagram {
            direction: Direction::ToDevice,
            device,
            via: Some(Arc::clone(&front)),
            new_flow: false,
            bytes: buf[..len].to_vec(),
        };
        if queue.send(datagram).await.is_err() {
            return;
        }
    }
}

/// Errors a UDP socket reports for an earlier datagram (an ICMP port unreachable), after
/// which it still works.
fn transient(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset)
}

/// A datagram waiting for its delivery time.
#[derive(Debug)]
struct Scheduled {
    due: Instant,
    /// Arrival order within the direction: breaks ties in `due` and detects reordering.
    seq: u64,
    direction: Direction,
    device: SocketAddr,
    via: Arc<UdpSocket>,
    bytes: Vec<u8>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// Decides each datagram's fate and delivers the survivors on time.
#[derive(Debug)]
struct Scheduler {
    profile: LinkProfile,
    /// One RNG per direction, so that a direction's draws do not depend on the other's timing.
    to_server_rng: StdRng,
    to_device_rng: StdRng,
    queue: BinaryHeap<Reverse<Scheduled>>,
    /// The next arrival number per direction.
    next_seq: [u64; 2],
    /// Per device and direction, the highest arrival number delivered so far.
    delivered: HashMap<(SocketAddr, Direction), u64>,
    /// Per device and direction, the latest delivery time of a datagram not held back.
    last_due: HashMap<(SocketAddr, Direction), Instant>,
    counters: watch::Sender<RelayCounters>,
}

impl Scheduler {
    fn new(profile: LinkProfile, counters: watch::Sender<RelayCounters>) -> Self {
        Scheduler {
            profile,
            to_server_rng: StdRng::seed_from_u64(profile.seed),
            // A different stream for the other direction (the golden-ratio constant of splitmix64).
            to_device_rng: StdRng::seed_from_u64(profile.seed ^ 0x9E37_79B9_7F4A_7C15),
            queue: BinaryHeap::new(),
            next_seq: [0; 2],
            delivered: HashMap::new(),
            last_due: HashMap::new(),
            counters,
        }
    }

    async fn run(mut self, mut incoming: mpsc::Receiver<Datagram>, mut stop: watch::Receiver<()>) {
        loop {
            let next_due = self.queue.peek().map(|Reverse(s)| s.due);
            let timer = async move {
                match next_due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = stop.changed() => return,
                () = timer => self.deliver_due().await,
                datagram = incoming.recv() => match datagram {
                    Some(d) => self.admit(d),
                    None => return,
                },
            }
        }
    }

    /// Draws the datagram's fate: dropped, or queued for its delivery time.
    fn admit(&mut self, datagram: Datagram) {
        let Datagram { direction, device, via, new_flow, bytes } = datagram;
        let idx = direction_idx(direction);
        let seq = self.next_seq[idx];
        self.next_seq[idx] += 1;
        let profile = self.profile;
        let rng = match direction {
            Direction::ToServer => &mut self.to_server_rng,
            Direction::ToDevice => &mut self.to_device_rng,
        };
        // Every datagram takes the same three draws, so the n-th datagram's fate only
        // depends on the seed.
        let lost = rng.random::<f64>() < profile.loss;
        let jitter = profile.jitter.mul_f64(rng.random::<f64>());
        let held = rng.random::<f64>() < profile.reorder;
        let overflowed = !lost && (via.is_none() || self.queue.len() >= MAX_QUEUED);
        if let (false, false, Some(via)) = (lost, overflowed, via) {
            let due = Instant::now() + profile.one_way_delay.saturating_add(jitter);
            let due = if held {
                due + profile.hold()
            } else {
                // FIFO: not before the flow's previous datagram.
                let last = self.last_due.entry((device, direction)).or_insert(due);
                *last = due.max(*last);
                *last
            };
            self.queue.push(Reverse(Scheduled { due, seq, direction, device, via, bytes }));
        }
        let in_flight = self.queue.len();
        // One update, so that a watcher never sees a datagram counted but not yet queued.
        self.counters.send_modify(|c| {
            let d = c.direction_mut(direction);
            d.seen += 1;
            d.dropped += u64::from(lost);
            d.overflowed += u64::from(overflowed);
            c.n_flows += usize::from(new_flow);
            c.in_flight = in_flight;
        });
    }

    /// Sends every datagram whose time has come, earliest first.
    async fn deliver_due(&mut self) {
        let now = Instant::now();
        while self.queue.peek().is_some_and(|Reverse(s)| s.due <= now) {
            let Some(Reverse(Scheduled { seq, direction, device, via, bytes, .. })) = self.queue.pop() else {
                break;
            };
            let sent = match direction {
                Direction::ToServer => via.send(&bytes).await,
                Direction::ToDevice => via.send_to(&bytes, device).await,
            };
            let highest = self.delivered.entry((device, direction)).or_insert(seq);
            let reordered = seq < *highest;
            *highest = (*highest).max(seq);
            let in_flight = self.queue.len();
            self.counters.send_modify(|c| {
                let d = c.direction_mut(direction);
                // A send can only fail for a socket error; the datagram is then lost.
                if sent.is_ok() {
                    d.forwarded += 1;
                    d.reordered += u64::from(reordered);
                } else {
                    d.overflowed += 1;
                }
                c.in_flight = in_flight;
            });
        }
    }
}

fn direction_idx(direction: Direction) -> usize {
    match direction {
        Direction::ToServer => 0,
        Direction::ToDevice => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback: sends every datagram back to its sender until dropped.
    async fn echo() -> (SocketAddr, JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
        let addr = socket.local_addr().expect("an address");
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..len], from).await;
            }
        });
        (addr, task)
    }

    /// Waits until the relay's counters satisfy `condition`; panics with them after
    /// [`crate::WAIT`].
    async fn settle(relay: &Relay, condition: impl FnMut(&RelayCounters) -> bool) {
        match tokio::time::timeout(crate::WAIT, relay.wait_for(condition)).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the relay stopped"),
            Err(_) => panic!("the relay did not settle: {:?}", relay.counters()),
        }
    }

    impl RelayCounters {
        /// Datagrams of an echo whose journey is over: dropped on the way there, or echoed
        /// and then dropped or delivered.
        fn settled(&self) -> u64 {
            let (there, back) = (&self.to_server, &self.to_device);
            there.dropped + there.overflowed + back.dropped + back.overflowed + back.forwarded
        }
    }

    /// Sends `n` datagrams carrying their index through `relay`, at most `window` of them
    /// on their way at once (so that no socket buffer overflows, which would lose a datagram
    /// the relay never counts), and returns the indices echoed back, in arrival order, once
    /// the relay has settled every datagram.
    async fn echo_through(relay: &Relay, n: u64, window: u64) -> Vec<u64> {
        // Not connected: the end marker comes from another socket.
        let client = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("binds"));
        let receiver = {
            let client = Arc::clone(&client);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                while let Ok((len, _)) = client.recv_from(&mut buf).await {
                    let bytes: [u8; 8] = buf[..len].try_into().expect("an 8-byte index");
                    let idx = u64::from_le_bytes(bytes);
                    if idx == u64::MAX {
                        break;
                    }
                    got.push(idx);
                }
                got
            })
        };
        for idx in 0..n {
            settle(relay, |c| idx - c.settled() < window).await;
            client.send_to(&idx.to_le_bytes(), relay.addr()).await.expect("sends");
        }
        // Settled: every datagram sent was seen, and every echo of a forwarded one was
        // seen and is no longer queued.
        settle(relay, |c| {
            c.to_server.seen == n && c.to_device.seen == c.to_server.forwarded && c.in_flight == 0
        })
        .await;
        // The relay's last delivery is already in the client's socket buffer (a loopback
        // send is delivered before it returns), so this marker arrives after it.
        let marker = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
        marker
            .send_to(&u64::MAX.to_le_bytes(), client.local_addr().expect("an address"))
            .await
            .expect("sends");
        receiver.await.expect("the receiver ends")
    }

    const LOSSY: LinkProfile = LinkProfile {
        loss: 0.1,
        one_way_delay: Duration::from_millis(1),
        jitter: Duration::from_millis(2),
        reorder: 0.05,
        seed: 7,
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_loss_fraction_is_near_the_configured_one() {
        const N: u64 = 2000;
        let (upstream, _echo) = echo().await;
        let relay = Relay::start(upstream, LOSSY).await.expect("starts");
        let got = echo_through(&relay, N, 64).await;
        let c = relay.counters();
        // Binomial(2000, 0.1): a standard deviation of 0.0067; 0.03 is 4.5 of them.
        for d in [c.to_server, c.to_device] {
            assert!((d.loss_rate() - LOSSY.loss).abs() < 0.03, "{d:?}");
            assert_eq!(d.overflowed, 0, "{d:?}");
            assert_eq!(d.seen, d.forwarded + d.dropped, "{d:?}");
        }
        assert_eq!(got.len() as u64, c.to_device.forwarded, "every forwarded echo arrives");
        let round_trip = got.len() as f64 / N as f64;
        assert!((round_trip - 0.81).abs() < 0.04, "{round_trip} of the datagrams came back");
        assert_eq!(c.n_flows, 1);
        // The seed fixes the draws: the device → coordinator direction, whose arrival order
        // is the sending order, drops the same datagrams every time.
        let again = Relay::start(upstream, LOSSY).await.expect("starts");
        let _ = echo_through(&again, N, 64).await;
        let repeat = again.counters().to_server;
        assert_eq!((repeat.seen, repeat.dropped), (c.to_server.seen, c.to_server.dropped));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_datagram_waits_at_least_the_one_way_delay() {
        const DELAY: Duration = Duration::from_millis(30);
        let (upstream, _echo) = echo().await;
        let profile = LinkProfile { one_way_delay: DELAY, ..LinkProfile::clean(1) };
        let relay = Relay::start(upstream, profile).await.expect("starts");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("binds");
        client.connect(relay.addr()).await.expect("connects");
        let mut buf = [0u8; 8];
        for idx in 0u64..5 {
            let sent = Instant::now();
            client.send(&idx.to_le_bytes()).await.expect("sends");
            let len = client.recv(&mut buf).await.expect("the echo comes back");
            assert_eq!(&buf[..len], &idx.to_le_bytes());
            // Both ways: twice the one-way delay is a lower bound, not a speed.
            assert!(sent.elapsed() >= 2 * DELAY, "round trip {:?}", sent.elapsed());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_without_loss_or_reordering_delivers_everything_in_order() {
        const N: u64 = 500;
        let (upstream, _echo) = echo().await;
        let delay = LinkProfile { one_way_delay: Duration::from_millis(2), ..LinkProfile::clean(3) };
        // Jitter varies each datagram's delay but does not reorder a flow.
        let jitter = LinkProfile { jitter: Duration::from_millis(3), ..delay };
        for profile in [delay, jitter] {
            let relay = Relay::start(upstream, profile).await.expect("starts");
            let got = echo_through(&relay, N, 32).await;
            assert_eq!(got, (0..N).collect::<Vec<_>>(), "{profile:?}");
            let c = relay.counters();
            assert_eq!((c.to_server.reordered, c.to_device.reordered), (0, 0), "{c:?}");
            assert_eq!((c.to_server.forwarded, c.to_device.forwarded), (N, N), "{c:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_back_datagrams_are_overtaken() {
        const N: u64 = 500;
        let (upstream, _echo) = echo().await;
        let profile =
            LinkProfile { reorder: 0.2, one_way_delay: Duration::from_millis(2), ..LinkProfile::clean(5) };
        let relay = Relay::start(upstream, profile).await.expect("starts");
        let got = echo_through(&relay, N, 32).await;
        let c = relay.counters();
        assert_eq!(got.len() as u64, N, "nothing is lost");
        let inversions = got.windows(2).filter(|w| w[0] > w[1]).count();
        assert!(inversions > 0 && c.to_server.reordered > 0, "{inversions} inversions, {c:?}");
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..N).collect::<Vec<_>>(), "each datagram arrives once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_refuses_other_hosts_and_bad_profiles_and_frees_its_port() {
        let remote = SocketAddr::from(([192, 0, 2, 1], 443));
        assert!(matches!(Relay::start(remote, LOSSY).await, Err(RelayError::NotLoopback(_))));
        let (upstream, _echo) = echo().await;
        let bad = LinkProfile { loss: 1.5, ..LOSSY };
        assert!(matches!(Relay::start(upstream, bad).await, Err(RelayError::InvalidProfile(_))));
        let nan = LinkProfile { reorder: f64::NAN, ..LOSSY };
        assert!(matches!(Relay::start(upstream, nan).await, Err(RelayError::InvalidProfile(_))));
        let forever = LinkProfile { one_way_delay: Duration::MAX, ..LOSSY };
        assert!(matches!(Relay::start(upstream, forever).await, Err(RelayError::InvalidProfile(_))));

        let relay = Relay::start(upstream, LinkProfile::clean(0)).await.expect("starts");
        let addr = relay.addr();
        let _ = echo_through(&relay, 10, 4).await;
        let counters = relay.shutdown().await;
        assert_eq!(counters.to_device.forwarded, 10);
        // Every task has ended and dropped its sockets: the port is free again.
        UdpSocket::bind(addr).await.expect("the relay's port is released at shutdown");
    }
}
