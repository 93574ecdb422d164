//! The proxy threads: `server.threads` OS threads, each running a single-threaded tokio runtime
//! that accepts on every route listener and serves what it accepts with its own `ListenerApp`
//! (so its own upstream keep-alive pool). With several threads each has its own `SO_REUSEPORT`
//! socket per listener and the kernel spreads new connections over them, as over nginx's
//! workers with `reuseport` (`server.reuse_port = false`: they share one socket); a connection
//! then lives on the thread that accepted it, with no work stealing and no wake-ups across
//! threads (benches/README.md, "Many cores").

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::server::ShutdownWatch;
use pingora::services::Service;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::client_stream::ClientStream;
use crate::proxy::lean::ListenerApp;

/// The accept queue asked of the kernel per socket (it caps it at `net.core.somaxconn`), as
/// pingora's own listeners ask.
const BACKLOG: i32 = 65535;

/// How long an accept loop rests after running out of file descriptors or memory: accepting
/// again at once would fail again at once, in a busy loop.
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// How long a new connection may stay silent: pingora's HTTP/1 sessions give up on a read
/// after as long (their default `read_timeout`), and nginx on a request head
/// (`client_header_timeout`).
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);

/// One proxy thread's sockets and the apps that serve them, one per route listener.
pub struct ThreadListeners(Vec<(std::net::TcpListener, ListenerApp)>);

/// How the proxy threads listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sockets {
    /// Each of `threads` has its own `SO_REUSEPORT` socket per listener: the kernel spreads
    /// connections over them. Another process of the same user could bind the port too and
    /// take a share of them (SECURITY.md), so this is only for several threads.
    PerThread { threads: usize },
    /// `threads` share one plain socket per listener: nothing else can bind the port; every
    /// idle thread is woken for each new connection and one of them accepts it.
    Shared { threads: usize },
}

impl Sockets {
    /// One thread needs no port sharing, whatever `reuse_port` says.
    pub fn for_threads(threads: usize, reuse_port: bool) -> Self {
        if threads > 1 && reuse_port {
            Sockets::PerThread { threads }
        } else {
            Sockets::Shared { threads }
        }
    }

    /// For `tokenward check`: whether another process of the same user could join a port.
    pub fn describe(&self) -> String {
        match self {
            Sockets::PerThread { threads } => format!(
                "{threads} proxy threads, a SO_REUSEPORT socket each per listener (a process of the same user can bind the port too; server.reuse_port = false closes it)"
            ),
            Sockets::Shared { threads: 1 } => "1 proxy thread, one socket per listener".to_string(),
            Sockets::Shared { threads } => {
                format!("{threads} proxy threads sharing one socket per listener")
            }
        }
    }
}

/// Binds the listeners' sockets for the proxy threads before the server starts, so a listener
/// that cannot be bound is a start error naming its address and a client that connects once
/// tokenward is up waits in the accept queue, not on a refused port.
pub fn bind(
    listeners: &[SocketAddr],
    sockets: Sockets,
    app: impl Fn(SocketAddr) -> ListenerApp,
) -> anyhow::Result<Vec<ThreadListeners>> {
    let (threads, reuse_port) = match sockets {
        Sockets::PerThread { threads } => (threads, true),
        Sockets::Shared { threads } => (threads, false),
    };
    let shared = if reuse_port {
        Vec::new()
    } else {
        listeners
            .iter()
            .map(|addr| listening_socket(*addr, false))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    (0..threads)
        .map(|_| {
            listeners
                .iter()
                .enumerate()
                .map(|(i, addr)| {
                    let socket = if reuse_port {
                        listening_socket(*addr, true)?
                    } else {
                        shared[i]
                            .try_clone()
                            .with_context(|| format!("cannot share the socket of {addr}"))?
                    };
                    Ok((socket, app(*addr)))
                })
                .collect::<anyhow::Result<_>>()
                .map(ThreadListeners)
        })
        .collect()
}

fn listening_socket(addr: SocketAddr, reuse_port: bool) -> anyhow::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bound = (|| {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(reuse_port)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        Ok::<_, std::io::Error>(socket)
    })();
    Ok(bound
        .with_context(|| format!("cannot listen on {addr}"))?
        .into())
}

/// The pingora service that starts the proxy threads and hands them the server's shutdown
/// signal; its own one-thread runtime has nothing else to do.
pub struct ProxyThreads {
    threads: Vec<ThreadListeners>,
}

impl ProxyThreads {
    pub fn new(threads: Vec<ThreadListeners>) -> Self {
        ProxyThreads { threads }
    }
}

#[async_trait]
impl Service for ProxyThreads {
    async fn start_service(
        &mut self,
        #[cfg(unix)] _fds: Option<pingora::server::ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        for (index, listeners) in self.threads.drain(..).enumerate() {
            let shutdown = shutdown.clone();
            let started = std::thread::Builder::new()
                .name(format!("proxy-{index}"))
                .spawn(move || run_thread(listeners, shutdown));
            if let Err(e) = started {
                // Without its threads the proxy serves nothing: better no process than a
                // listener whose connections wait forever in the accept queue.
                tracing::error!(error = %e, "cannot start a proxy thread; exiting");
                std::process::exit(1);
            }
        }
    }

    fn name(&self) -> &str {
        "proxy threads"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }
}

fn run_thread(listeners: ThreadListeners, shutdown: ShutdownWatch) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a proxy thread's runtime; exiting");
            std::process::exit(1);
        }
    };
    runtime.block_on(async move {
        for (socket, app) in listeners.0 {
            match TcpListener::from_std(socket) {
                Ok(socket) => {
                    tokio::spawn(accept_connections(socket, Arc::new(app), shutdown.clone()));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot register a listening socket; exiting");
                    std::process::exit(1);
                }
            }
        }
        // Connections accepted before the shutdown are served until they end; the drain
        // (server::Drain) ends the process.
        std::future::pending::<()>().await
    });
}

/// Accepts until the shutdown, then closes this thread's socket: new connections go to no one,
/// as with pingora's own listeners.
async fn accept_connections(socket: TcpListener, app: Arc<ListenerApp>, shutdown: ShutdownWatch) {
    let mut stop = shutdown.clone();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|stopping| *stopping) => return,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((client, _)) => {
                // Requests and answers are small writes that must not wait for an ACK.
                let _ = client.set_nodelay(true);
                tokio::spawn(serve_client(client, app.clone(), shutdown.clone()));
            }
            Err(e) if is_out_of_resources(&e) => {
                warn!(error = %e, "cannot accept connections; pausing for a second");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
            Err(e) => debug!(error = %e, "accept failed"),
        }
    }
}

fn is_out_of_resources(e: &std::io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// One client connection. Until its first byte arrives it costs its socket and this small
/// task: nothing of a request (session, buffers, the request loop's state) is built for a
/// connection that is only held open (benches/README.md, 10,000 idle connections). One that
/// sends nothing for `FIRST_BYTE_TIMEOUT` is closed, as a read that waits that long is.
async fn serve_client(client: TcpStream, app: Arc<ListenerApp>, shutdown: ShutdownWatch) {
    let mut stop = shutdown.clone();
    let mut first = [0u8; 1];
    tokio::select! {
        biased;
        _ = stop.wait_for(|stopping| *stopping) => return,
        // A peek, not `readable()`: that was seen to resolve for new connections that had
        // sent nothing, so that each idle one held a whole client stream (3.3 KiB against
        // 1.3 KiB each, benches/README.md).
        peeked = client.peek(&mut first) => match peeked {
            Ok(n) if n > 0 => {}
            _ => return,
        },
        _ = tokio::time::sleep(FIRST_BYTE_TIMEOUT) => return,
    }
    let mut next = app
        .serve_arrived(Box::new(ClientStream::new(client)), &shutdown)
        .await;
    while let Some(stream) = next {
        next = app.process_new(stream, &shutdown).await;
    }
}
