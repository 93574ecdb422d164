//! The lean path's keep-alive pool of upstream connections. Each proxy thread has its own
//! (`ListenerApp` is per thread), so parking and taking a connection is a push and a pop under
//! a lock no other thread takes. One sweeper task per pool watches every parked connection —
//! the socket's readiness wakes it when the upstream closes one or writes to it — and closes
//! those, and those whose idle timeout passed; pingora-core's pool spawns a watching task and
//! makes a lock, a channel and an LRU entry for every connection it parks (benches/README.md,
//! "The per-request floor").

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::prelude::*;
use pingora::protocols::Stream;
use pingora::protocols::http::v1::client::HttpSession as Upstream;
use pingora::upstreams::peer::Peer;
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, Sleep};

pub struct LeanPool {
    transport: TransportConnector,
    /// Parked connections at most (`server.upstream_keepalive_pool_size`); 0 keeps none.
    capacity: usize,
    parked: Mutex<Parked>,
}

#[derive(Default)]
struct Parked {
    /// By `Peer::reuse_hash`, which covers the address, TLS, SNI, CA bundle and client
    /// certificate; the newest last, so the connection most likely still open is taken first.
    by_peer: HashMap<u64, Vec<Idle>>,
    count: usize,
    /// The sweeper, once it runs: every parked connection wakes it when it becomes readable.
    sweeper: Option<Waker>,
    /// When the sweeper's timer fires next; `None` while it waits for readiness only.
    next_sweep: Option<Instant>,
    sweeper_started: bool,
}

struct Idle {
    stream: Stream,
    parked_at: Instant,
    until: Option<Instant>,
}

impl Idle {
    fn expired(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| until <= now)
    }
}

impl LeanPool {
    /// `capacity` is per pool, so per proxy thread (pingora's `keepalive_pool_size` in
    /// `options` is the whole process's).
    pub fn new(options: ConnectorOptions, capacity: usize) -> Self {
        LeanPool {
            capacity,
            transport: TransportConnector::new(Some(options)),
            parked: Mutex::default(),
        }
    }

    /// An HTTP/1 session to `peer`, whose `reuse_hash` is `key` (hashed once per request by
    /// the caller, for this and `release`): on a parked connection that is still open when
    /// there is one (`true`), else on a new one.
    pub async fn session<P: Peer + Send + Sync + 'static>(
        &self,
        peer: &P,
        key: u64,
    ) -> Result<(Upstream, bool)> {
        if let Some(stream) = self.take(key) {
            return Ok((Upstream::new_with_options(stream, peer), true));
        }
        // Boxed: connecting (TCP and TLS) is an 8 KiB state machine that every request's
        // future would otherwise carry, and move into its box, for the few that connect.
        let stream = Box::pin(self.transport.new_stream(peer)).await?;
        Ok((Upstream::new_with_options(stream, peer), false))
    }

    /// Parks the session's connection under `key` (its peer's `reuse_hash`) when its exchange
    /// left it reusable; closes it otherwise. Called from a proxy thread's runtime, where the
    /// sweeper starts with the first connection parked.
    pub async fn release(
        self: &Arc<Self>,
        mut session: Upstream,
        key: u64,
        idle_timeout: Option<Duration>,
    ) {
        session.respect_keepalive();
        let Some(stream) = session.reuse().await else {
            return;
        };
        self.park(key, stream, idle_timeout);
    }

    fn park(self: &Arc<Self>, key: u64, mut stream: Stream, idle_timeout: Option<Duration>) {
        if self.capacity == 0 {
            return;
        }
        let now = Instant::now();
        let until = idle_timeout.map(|t| now + t);
        let mut parked = self.lock();
        if !parked.sweeper_started {
            parked.sweeper_started = true;
            // Its first pass registers it with this connection.
            tokio::spawn(Arc::clone(self).sweep());
        } else if let Some(sweeper) = &parked.sweeper {
            if !still_open(&mut stream, sweeper) {
                return;
            }
            if until.is_some_and(|until| parked.next_sweep.is_none_or(|next| until < next)) {
                // Due before the sweeper's timer: it sets it again.
                sweeper.wake_by_ref();
            }
        }
        if parked.count >= self.capacity {
            parked.drop_oldest();
        }
        parked.by_peer.entry(key).or_default().push(Idle {
            stream,
            parked_at: now,
            until,
        });
        parked.count += 1;
    }

    fn take(&self, key: u64) -> Option<Stream> {
        let now = Instant::now();
        let mut parked = self.lock();
        let stack = parked.by_peer.get_mut(&key)?;
        let mut taken = None;
        let mut dropped = 0;
        while let Some(mut idle) = stack.pop() {
            dropped += 1;
            // The no-op waker takes the sweeper's place: the connection is no longer its own.
            if !idle.expired(now) && still_open(&mut idle.stream, Waker::noop()) {
                taken = Some(idle.stream);
                break;
            }
        }
        if stack.is_empty() {
            parked.by_peer.remove(&key);
        }
        parked.count -= dropped;
        taken
    }

    fn lock(&self) -> MutexGuard<'_, Parked> {
        // Nothing panics while holding it; a poisoned pool is still a valid pool.
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes parked connections the upstream ended or wrote to as their readiness wakes it,
    /// and those whose idle timeout passed at their deadline. Runs for the life of the proxy
    /// thread's runtime.
    async fn sweep(self: Arc<Self>) {
        loop {
            let next = poll_fn(|cx| Poll::Ready(self.lock().sweep(Instant::now(), cx.waker())));
            let next = next.await;
            let timer = next.map(tokio::time::sleep_until);
            NextWake {
                timer: timer.map(Box::pin),
                waited: false,
            }
            .await;
        }
    }
}

/// Ready at the task's next wake-up, whatever woke it: the timer, a parked connection's
/// readiness, or a park due before the timer.
struct NextWake {
    timer: Option<Pin<Box<Sleep>>>,
    waited: bool,
}

impl Future for NextWake {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.waited {
            return Poll::Ready(());
        }
        self.waited = true;
        if let Some(timer) = &mut self.timer
            && timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Parked {
    /// Drops what has expired or closed, registers `sweeper` with every connection left, and
    /// returns the earliest deadline among them (`None` when none has one).
    fn sweep(&mut self, now: Instant, sweeper: &Waker) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        let mut count = 0;
        self.by_peer.retain(|_, stack| {
            stack.retain_mut(|idle| !idle.expired(now) && still_open(&mut idle.stream, sweeper));
            for until in stack.iter().filter_map(|idle| idle.until) {
                earliest = Some(earliest.map_or(until, |e| e.min(until)));
            }
            count += stack.len();
            !stack.is_empty()
        });
        self.count = count;
        if !self.sweeper.as_ref().is_some_and(|w| w.will_wake(sweeper)) {
            self.sweeper = Some(sweeper.clone());
        }
        self.next_sweep = earliest;
        earliest
    }

    /// Closes the connection parked longest, to make room for a newer one.
    fn drop_oldest(&mut self) {
        let oldest = self
            .by_peer
            .iter()
            .filter(|(_, stack)| !stack.is_empty())
            .min_by_key(|(_, stack)| stack[0].parked_at)
            .map(|(key, _)| *key);
        if let Some(key) = oldest
            && let Some(stack) = self.by_peer.get_mut(&key)
        {
            stack.remove(0);
            self.count -= 1;
            if stack.is_empty() {
                self.by_peer.remove(&key);
            }
        }
    }
}

/// Whether an idle connection can carry a request: no end, error or stray byte from the
/// upstream since it was parked. A read that would wait leaves `waker` to be woken when
/// something arrives, and costs no system call unless something did (tokio keeps the
/// socket's readiness), as pingora-core's pool tests a connection.
fn still_open(stream: &mut Stream, waker: &Waker) -> bool {
    let mut byte = [0u8; 1];
    // Unconstrained: tokio's cooperative budget must not make a closed connection look open.
    let read = pin!(tokio::task::unconstrained(stream.read(&mut byte)));
    read.poll(&mut Context::from_waker(waker)).is_pending()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::protocols::l4::stream::Stream as L4Stream;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    fn new_pool(capacity: usize) -> Arc<LeanPool> {
        Arc::new(LeanPool::new(ConnectorOptions::new(capacity), capacity))
    }

    /// A loopback connection: tokenward's end as a pingora stream, and the upstream's end.
    async fn connection() -> (Stream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap());
        let (ours, (theirs, _)) = tokio::join!(ours, async { listener.accept().await.unwrap() });
        (Box::new(L4Stream::from(ours.unwrap())), theirs)
    }

    /// Waits until the upstream's end reads the connection's end (bounded).
    async fn closed_by_us(theirs: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 8];
        matches!(
            tokio::time::timeout(within, theirs.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn a_parked_connection_is_taken_again_by_its_peer_only() {
        let pool = new_pool(4);
        let (ours, _theirs) = connection().await;
        let id = ours.id();
        pool.park(1, ours, None);
        assert!(pool.take(2).is_none(), "another peer's connection");
        let taken = pool.take(1).expect("the parked connection");
        assert_eq!(taken.id(), id);
        assert!(pool.take(1).is_none(), "taken once");
    }

    #[tokio::test]
    async fn the_newest_connection_is_taken_first() {
        let pool = new_pool(4);
        let (older, _a) = connection().await;
        let (newer, _b) = connection().await;
        let newer_id = newer.id();
        pool.park(1, older, None);
        pool.park(1, newer, None);
        assert_eq!(pool.take(1).unwrap().id(), newer_id);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_or_wrote_to_is_never_taken() {
        let pool = new_pool(4);
        let (closed, theirs) = connection().await;
        let (chatty, mut talker) = connection().await;
        pool.park(1, closed, None);
        pool.park(1, chatty, None);
        drop(theirs);
        talker.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        // The bytes and the end reach our sockets (loopback), seen by the next read.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(pool.take(1).is_none());
        assert_eq!(pool.lock().count, 0);
    }

    #[tokio::test]
    async fn an_expired_connection_is_closed_at_its_timeout_and_not_taken() {
        let pool = new_pool(4);
        let (ours, mut theirs) = connection().await;
        let parked = std::time::Instant::now();
        pool.park(1, ours, Some(Duration::from_millis(300)));
        assert!(
            closed_by_us(&mut theirs, Duration::from_secs(3)).await,
            "the sweeper closes it"
        );
        let idle = parked.elapsed();
        assert!(
            idle >= Duration::from_millis(300) && idle < Duration::from_millis(1000),
            "closed after {idle:?}"
        );
        assert!(pool.take(1).is_none());

        // An expired connection is not taken even before the sweeper comes by.
        let (ours, _theirs) = connection().await;
        pool.park(2, ours, Some(Duration::ZERO));
        assert!(pool.take(2).is_none());
    }

    #[tokio::test]
    async fn the_sweeper_closes_what_the_upstream_closed_while_parked() {
        let pool = new_pool(4);
        // The first park starts the sweeper, which then waits for the pool to fill again.
        let (first, _a) = connection().await;
        pool.park(1, first, None);
        assert!(pool.take(1).is_some());
        tokio::task::yield_now().await;
        let (ours, theirs) = connection().await;
        pool.park(1, ours, None);
        drop(theirs);
        let gone = tokio::time::timeout(Duration::from_secs(3), async {
            while pool.lock().count > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(gone.is_ok(), "still parked after 3 s");
    }

    #[tokio::test]
    async fn a_full_pool_closes_its_oldest_connection_and_an_empty_one_keeps_none() {
        let pool = new_pool(2);
        let (oldest, mut oldest_upstream) = connection().await;
        let (b, _b) = connection().await;
        let (c, _c) = connection().await;
        let c_id = c.id();
        pool.park(1, oldest, None);
        pool.park(2, b, None);
        pool.park(2, c, None);
        assert_eq!(pool.lock().count, 2);
        assert!(closed_by_us(&mut oldest_upstream, Duration::from_secs(2)).await);
        assert!(pool.take(1).is_none());
        assert_eq!(pool.take(2).unwrap().id(), c_id);

        let none = new_pool(0);
        let (ours, mut theirs) = connection().await;
        none.park(1, ours, None);
        assert!(closed_by_us(&mut theirs, Duration::from_secs(2)).await);
        assert!(none.take(1).is_none());
    }
}
